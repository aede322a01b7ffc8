"""VEPipeline, and VEHeunScheduler (order 2) inside the diffusers pipelines users already have."""

import io

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from diffusers_ve import VEHeunScheduler, VEPipeline, VEScheduler

from .gmm import MixtureUNet, image_mixture
from .tiny_sd import prompt_embeds, tiny_sd_components, tiny_unet


def _count_progress(pipe):
    """Record the real tqdm bars the pipeline opens (written to a string, not the terminal)."""
    pipe.set_progress_bar_config(file=io.StringIO())
    bars, original = [], pipe.progress_bar

    def progress_bar(*args, **kwargs):
        bars.append(original(*args, **kwargs))
        return bars[-1]

    pipe.progress_bar = progress_bar
    return bars


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def mixture_pipe():
    mix = image_mixture((1, 8, 8))
    return VEPipeline(MixtureUNet.from_mixture(mix), VEHeunScheduler(reverse_noise=1.0))


# ----------------------------------------------------------------------------------------- VEPipeline
def test_pipeline_is_the_scheduler_loop(mixture_pipe):
    """Same start noise, same model calls, same steps as driving the scheduler by hand (then x/2 + 1/2, clamped)."""
    pipe = mixture_pipe
    bars = _count_progress(pipe)
    got = pipe(batch_size=3, num_inference_steps=6, generator=_gen(1), output_type="pt").images
    g = _gen(1)
    sched = VEHeunScheduler(reverse_noise=1.0)
    x = torch.randn((3, 1, 8, 8), generator=g)
    sched.set_timesteps(6)
    for tau in sched.timesteps:
        x = sched.step(pipe.unet(x, tau).sample, tau, x, generator=g).prev_sample
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1))
    assert len(sched.timesteps) == 11 and bars[-1].total == 6 and bars[-1].n == 6  # steps, not model calls


def test_output_types_and_bad_inputs(mixture_pipe):
    pipe = mixture_pipe
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=3, generator=_gen())
    pil = pipe(**kw).images
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (8, 8)
    arr = pipe(**kw | dict(generator=_gen()), output_type="np").images
    pt = pipe(**kw | dict(generator=_gen()), output_type="pt", return_dict=False)[0]
    assert arr.shape == (2, 8, 8, 1) and arr.dtype == np.float32 and pt.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0, ..., 0] * 255).round().astype(np.uint8))
    for bad, match in [
        (dict(output_type="latent"), "output_type"),
        (dict(batch_size=0), "batch_size"),
        (dict(generator=[_gen(), _gen()], batch_size=3), "generator"),
        (dict(latents=torch.zeros(1, 1, 4, 4)), "latents"),
        (dict(reverse_noise=-0.5), "reverse_noise"),
        (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]), "tensor_inputs"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipe(**dict(num_inference_steps=2) | bad)


def test_reverse_noise_at_call_time_leaves_the_scheduler_alone(mixture_pipe):
    pipe = mixture_pipe
    pipe.set_progress_bar_config(disable=True)
    sched = pipe.scheduler
    kw = dict(batch_size=2, num_inference_steps=4, output_type="pt")
    once = pipe(**kw, generator=_gen(2), reverse_noise=0.0).images
    assert pipe.scheduler is sched and sched.config.reverse_noise == 1.0
    lam0 = VEPipeline(pipe.unet, VEHeunScheduler.from_config(sched.config, reverse_noise=0.0))
    lam0.set_progress_bar_config(disable=True)
    torch.testing.assert_close(once, lam0(**kw, generator=_gen(2)).images, rtol=0, atol=0)
    assert not torch.equal(once, pipe(**kw, generator=_gen(2)).images)  # lambda = 1 differs

    def boom(*args):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe(**kw, reverse_noise=2.0, callback_on_step_end=boom)
    assert pipe.scheduler is sched and sched.config.reverse_noise == 1.0  # restored on error too
    plain = VEPipeline(pipe.unet, DDPMScheduler())
    with pytest.raises(ValueError, match="VE scheduler"):
        plain(num_inference_steps=2, reverse_noise=0.5)


def test_generator_lists_callbacks_and_latents(mixture_pipe):
    pipe = mixture_pipe
    pipe.set_progress_bar_config(disable=True)
    two = pipe(batch_size=2, num_inference_steps=4, generator=[_gen(3), _gen(4)], output_type="pt").images
    one = pipe(batch_size=1, num_inference_steps=4, generator=[_gen(4)], output_type="pt").images
    torch.testing.assert_close(two[1:], one)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, float(t)))
        return {"latents": kwargs["latents"] * 0 + 1.0} if i == len(p.scheduler.timesteps) - 1 else {}

    out = pipe(batch_size=1, num_inference_steps=4, generator=_gen(), callback_on_step_end=callback, output_type="pt")
    assert [i for i, _ in seen] == list(range(7))  # every model call of a 4-step Heun schedule
    assert torch.all(out.images == 1.0)  # the callback's replacement is what comes out
    start = torch.randn(2, 1, 8, 8, generator=_gen(5))
    a = pipe(batch_size=2, num_inference_steps=3, latents=start, generator=_gen(6), output_type="pt").images
    b = pipe(batch_size=2, num_inference_steps=3, latents=start, generator=_gen(6), output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("scheduler", [VEScheduler(reverse_noise=0.5), VEHeunScheduler(reverse_noise=0.5)])
def test_bf16_model(scheduler):
    pipe = VEPipeline(tiny_unet(), scheduler).to(dtype=torch.bfloat16)
    bars = _count_progress(pipe)
    out = pipe(batch_size=2, num_inference_steps=3, generator=_gen(), output_type="np").images
    assert out.dtype == np.float32 and np.isfinite(out).all() and out.shape == (2, 8, 8, 1)
    assert bars[-1].n == 3


# ------------------------------------------------------------------------ Heun in diffusers' pipelines
def test_heun_in_ddpm_pipeline():
    """DDPMPipeline's bar iterates over ``timesteps``: it counts model calls (2N - 1), as with diffusers' Heun."""
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(prediction_type="v_prediction"))
    pipe.scheduler = VEHeunScheduler.from_config(pipe.scheduler.config, reverse_noise=0.5)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    bars = _count_progress(pipe)
    a = pipe(batch_size=2, num_inference_steps=5, generator=_gen(), output_type="np").images
    b = pipe(batch_size=2, num_inference_steps=5, generator=_gen(), output_type="np").images
    assert np.isfinite(a).all() and a.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(a, b)
    assert bars[0].n == 9 and pipe.scheduler.step_index == 9


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("tok"))


def test_heun_in_stable_diffusion(sd_parts):
    pipe = StableDiffusionPipeline(**sd_parts)
    pipe.scheduler = VEHeunScheduler.from_config(pipe.scheduler.config, reverse_noise=0.0)
    bars = _count_progress(pipe)
    pe, ne = prompt_embeds()
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=4, height=16, width=16,
              output_type="np")
    a = pipe(**kw, generator=_gen()).images
    assert a.shape == (1, 16, 16, 3) and np.isfinite(a).all()
    assert bars[0].total == 4 and bars[0].n == 4 and pipe.scheduler.step_index == 7
    # the documented way to change lambda on any pipeline holding our scheduler keeps the class and the rest
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, reverse_noise=1.0)
    assert isinstance(pipe.scheduler, VEHeunScheduler) and pipe.scheduler.reverse_noise == 1.0
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    c = pipe(**kw, generator=_gen()).images
    assert np.isfinite(c).all() and not np.allclose(a, c)


def test_heun_in_img2img(sd_parts):
    pipe = StableDiffusionImg2ImgPipeline(**sd_parts)
    pipe.scheduler = VEHeunScheduler.from_config(pipe.scheduler.config, reverse_noise=0.5)
    bars = _count_progress(pipe)
    pe, ne = prompt_embeds()
    out = pipe(image=torch.rand(1, 3, 16, 16), strength=0.5, prompt_embeds=pe, negative_prompt_embeds=ne,
               num_inference_steps=8, output_type="np", generator=_gen()).images
    assert np.isfinite(out).all() and out.shape == (1, 16, 16, 3)
    # strength 0.5 of 8 steps: start at step 4 = call 8 (a predictor), run 4 steps = 7 calls
    assert pipe.scheduler.begin_index == 8 and bars[0].total == 4 and bars[0].n == 4
    assert pipe.scheduler.step_index == len(pipe.scheduler.timesteps) == 15
