"""Issue 8: tiny real pipelines of every family, end to end on the CPU, with the one-line scheduler swap.

Each stock pipeline (SD3, Flux, SDXL with an EDM config, SD3 img2img) is run with its own scheduler and with
``VEScheduler.from_config(pipe.scheduler.config, reverse_noise=0, solver_order=1)``: lambda = 0 at order 1 is the
family's first-order reference step (FlowMatchEuler; EDMEuler), so both give the same latents from the same seed.
An NCSN++-style score model (ScoreSdeVe config, Fourier time embedding) has no stock loop with a ``step``; its
reference is the same step written out here (Euler in sigma on the probability-flow ODE, yhat = z + sigma^2 score).
VEHeunScheduler is run in the same pipelines (it has no stock twin: finite output on the model's own range).
Components are random and built from configs offline; prompts enter as embeddings (no tokenizer, no text encoder).
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

from diffusers_ve import VEHeunScheduler, VEPipeline, VEScheduler

HUB = Path(__file__).parent / "fixtures" / "hub"
EMBED = 16
SIZE = 16


def _hub(name):
    return json.loads((HUB / f"{name}.json").read_text())


def _vae(latent_channels):
    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def _embeds(batch=1, length=4, pooled=EMBED):
    g = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(batch, length, EMBED, generator=g),
                pooled_prompt_embeds=torch.randn(batch, pooled, generator=g))


NO_TEXT = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def _sd3(pipeline_cls=StableDiffusion3Pipeline):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=EMBED, joint_attention_dim=EMBED, pooled_projection_dim=EMBED, out_channels=4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(_hub("stabilityai--stable-diffusion-3-medium-diffusers"))
    return pipeline_cls(transformer=transformer, vae=_vae(4), scheduler=scheduler, text_encoder_3=None,
                        tokenizer_3=None, **NO_TEXT)


def _flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=EMBED, pooled_projection_dim=EMBED, axes_dims_rope=[4, 4, 8],
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(_hub("black-forest-labs--FLUX.1-dev"))
    return FluxPipeline(transformer=transformer, vae=_vae(1), scheduler=scheduler, **NO_TEXT)


def _sdxl_edm(prediction_type="epsilon"):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=1, projection_class_embeddings_input_dim=6 * 8 + EMBED,
        cross_attention_dim=EMBED, norm_num_groups=1,
    )
    config = _hub("playgroundai--playground-v2.5-1024px-aesthetic")
    scheduler = EDMEulerScheduler.from_config(config, prediction_type=prediction_type)
    return StableDiffusionXLPipeline(vae=_vae(4), unet=unet, scheduler=scheduler, add_watermarker=False, **NO_TEXT)


# ------------------------------------------------------------------------------------------------- helpers
def _run(pipe, scheduler, **kwargs):
    """Latents out of the pipeline with ``scheduler``, and the timesteps the model was called with."""
    pipe.scheduler = scheduler
    seen = []

    def record(_pipe, _i, t, _kwargs):
        seen.append(float(t))
        return {}

    out = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=record,
               **kwargs)
    return out.images.double(), torch.tensor(seen, dtype=torch.float64)


def _check_swap(pipe, **kwargs):
    """lambda=0 order 1 equals the stock scheduler; lambda 0.5 and 1 run, finite and different."""
    stock = pipe.scheduler
    ref, ref_t = _run(pipe, stock, **kwargs)
    ours, ours_t = _run(pipe, VEScheduler.from_config(stock.config, reverse_noise=0, solver_order=1), **kwargs)
    torch.testing.assert_close(ours_t, ref_t, rtol=1e-5, atol=1e-5, msg="the model saw other timesteps")
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale)
    outs = [ours]
    for lam in (0.5, 1.0):
        noisy, _ = _run(pipe, VEScheduler.from_config(stock.config, reverse_noise=lam, solver_order=1), **kwargs)
        assert torch.isfinite(noisy).all()
        assert all((noisy - o).abs().max() > 1e-3 * scale for o in outs), f"lambda={lam} changed nothing"
        outs.append(noisy)
    pipe.scheduler = stock


STEPS = 4  # flow grids start at t = inf, where a 2M correction vanishes: 4 steps make order 2 differ


# --------------------------------------------------------------------------------------------- flow: SD3, Flux
@pytest.mark.parametrize("grid", ["default", "sigmas"])
def test_sd3_swap_equals_flowmatch_euler(grid):
    extra = {"sigmas": [1.0, 0.75, 0.5, 0.25]} if grid == "sigmas" else {}
    _check_swap(_sd3(), num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=1.0, **_embeds(), **extra)


@pytest.mark.parametrize("grid", ["default", "sigmas"])
def test_flux_swap_equals_flowmatch_euler(grid):
    extra = {"sigmas": [1.0, 0.75, 0.5, 0.25]} if grid == "sigmas" else {}  # Flux passes sigmas and mu itself
    _check_swap(_flux(), num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=1.0, **_embeds(), **extra)


def test_sd3_img2img_swap_equals_flowmatch_euler():
    pipe = _sd3(StableDiffusion3Img2ImgPipeline)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    _check_swap(pipe, image=image, strength=0.6, num_inference_steps=5, guidance_scale=1.0, **_embeds())


# -------------------------------------------------------------------------------------- EDM: SDXL (Playground)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sdxl_edm_swap_equals_edm_euler(prediction_type):
    # no custom-sigmas variant: EDMEulerScheduler.set_timesteps(sigmas=) takes a ramp in [0, 1], not sigmas
    _check_swap(_sdxl_edm(prediction_type), num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=1.0,
                **_embeds(pooled=EMBED))


@pytest.mark.parametrize("make", [_sd3, _flux, _sdxl_edm], ids=["sd3", "flux", "sdxl-edm"])
def test_heun_swap_runs_in_every_family_pipeline(make):
    pipe = make()
    kwargs = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=1.0, **_embeds())
    ref, ref_t = _run(pipe, pipe.scheduler, **kwargs)
    for lam in (0.0, 1.0):
        out, seen = _run(pipe, VEHeunScheduler.from_config(pipe.scheduler.config, reverse_noise=lam), **kwargs)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert seen[0] == pytest.approx(float(ref_t[0]), rel=1e-5), "Heun must start where the stock scheduler does"
        assert seen.min() >= ref_t.min() - 1e-4 * abs(float(ref_t.min())) - 1e-6, "a timestep outside the model range"


# ----------------------------------------------------------------------------------- VE score model: NCSN++
def _score_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, time_embedding_type="fourier",
    )


def _ve_run(pipe, latents, reverse_noise):
    pipe.scheduler = VEScheduler.from_config(_hub("google--ncsnpp-celebahq-256"), reverse_noise=reverse_noise,
                                             solver_order=1)
    last = {}

    def keep(_pipe, _i, _t, kwargs):
        last["z"] = kwargs["latents"]
        return {}

    pipe(batch_size=len(latents), latents=latents, num_inference_steps=STEPS,
         generator=torch.Generator().manual_seed(0), output_type="pt", callback_on_step_end=keep)
    return last["z"].double()


@torch.no_grad()
def test_ve_pipeline_samples_a_score_model_with_the_reference_step():
    unet = _score_unet()
    pipe = VEPipeline(unet=unet, scheduler=VEScheduler.from_config(_hub("google--ncsnpp-celebahq-256")))
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = _ve_run(pipe, latents, 0.0)
    sched = pipe.scheduler
    sigma_max = _hub("google--ncsnpp-celebahq-256")["sigma_max"]
    sigmas = sched.timesteps.double()  # the model's timestep is sigma itself
    assert sigmas[0] == pytest.approx(sigma_max, rel=1e-6) and sigmas.min() >= 0.01 * (1 - 1e-6)
    z = latents.double() * float(sched.init_noise_sigma)
    for i, sigma in enumerate(sigmas):
        score = unet(z.float(), sigma.float()).sample.double()
        yhat = z + sigma**2 * score
        nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        z = yhat + (nxt / sigma) * (z - yhat)
    torch.testing.assert_close(ours, z, rtol=1e-4, atol=1e-4 * float(z.abs().max()))
    noisy = [_ve_run(pipe, latents, lam) for lam in (0.5, 1.0)]
    for out in noisy:
        assert torch.isfinite(out).all() and (out - ours).abs().max() > 1e-3 * float(z.abs().max())
    assert (noisy[0] - noisy[1]).abs().max() > 1e-3 * float(z.abs().max())
