"""Every model family on one VE axis: the exact mixture denoiser in each family's own parametrisation.

lambda = 0 at order 1 must be each family's reference step (EDMEuler, FlowMatchEuler; DDIM is in
test_scheduler_equalities), order 2 DPM-Solver++ 2M where diffusers has it (EDMDPMSolverMultistep), and
lambda = 0 and 1 must reach the population at 50 calls in every family.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    ScoreSdeVeScheduler,
)

from diffusers_ve import VEHeunScheduler, VEScheduler, process
from diffusers_ve.denoiser import Denoiser
from diffusers_ve.training import Objective

from .gmm import MixtureUNet, image_mixture

MIX = image_mixture()
FAMILIES = {
    "vp": DDPMScheduler(),
    "ve": ScoreSdeVeScheduler(sigma_max=100.0),
    "edm": EDMEulerScheduler(prediction_type="v_prediction"),
    "flow": FlowMatchEulerDiscreteScheduler(shift=3.0),
}


def run(sched, model, n=None, x=None, seed=0, **grid):
    sched.set_timesteps(n, **grid)
    g = torch.Generator().manual_seed(seed)
    for tau in sched.timesteps:
        inp = sched.scale_model_input(x, tau) if hasattr(sched, "scale_model_input") else x
        x = sched.step(model(inp, tau.reshape(1).expand(len(x))).sample, tau, x, generator=g).prev_sample
    return x


def start(n, sigma=1.0, seed=1):
    return torch.randn(n, *MIX.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma


@pytest.mark.parametrize("ref,order,grid", [
    (EDMEulerScheduler(), 1, {}),
    (EDMEulerScheduler(prediction_type="v_prediction", sigma_schedule="exponential"), 1, {}),
    (EDMDPMSolverMultistepScheduler(), 2, {}),
    (FlowMatchEulerDiscreteScheduler(shift=3.0), 1, {}),
    (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 1, dict(sigmas=np.linspace(1, 1 / 12, 12), mu=0.9)),
], ids=["edm-euler", "edm-euler-v-exponential", "edm-dpmsolver-2m", "flow-euler-shift3", "flow-euler-flux-mu"])
def test_lambda0_equals_the_family_reference_step(ref, order, grid):
    model = MixtureUNet.from_mixture(MIX, ref.config)
    ve = VEScheduler.from_config(ref.config, reverse_noise=0.0, solver_order=order)
    x = start(256, getattr(ref, "init_noise_sigma", 1.0))
    n = None if grid else 12
    np.testing.assert_allclose(ve.timesteps if ve.timesteps is not None else 0, 0)  # nothing laid out yet
    ours, theirs = run(ve, model, n, x, **grid), run(ref, model, n, x, **grid)
    assert ve.init_noise_sigma == pytest.approx(getattr(ref, "init_noise_sigma", 1.0))
    torch.testing.assert_close(ve.timesteps, ref.timesteps, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _mode_stats(y, t_last):
    k = MIX.responsibilities(y, 1e-3).argmax(1)
    flat = y.reshape(len(y), -1)
    counts = torch.bincount(k, minlength=len(MIX.weights))
    var = torch.stack([(flat[k == j] - flat[k == j].mean(0)).pow(2).mean() for j in range(len(counts))])
    s2 = MIX.stds**2
    return counts.double() / len(y), var / (s2 * s2 / (s2 + t_last)), counts  # yhat at the last call shrinks a mode


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_50_calls_reach_the_population_in_every_family(family, lam):
    """On the log_t grid (the best on the mixture in every family; FlowMatch's own shifted grid, the flow default,
    is coarse at low noise: 31-34% variance error at 50 calls, 6-17% for FlowMatchEuler at 200)."""
    ref = FAMILIES[family]
    sched = VEScheduler.from_config(ref.config, reverse_noise=lam, sigma_schedule="log_t")
    n = 8_000
    sched.set_timesteps(50)
    y = run(sched, MixtureUNet.from_mixture(MIX, ref.config), 50, start(n, sched.init_noise_sigma, seed=2), seed=3)
    w, var_ratio, counts = _mode_stats(y, sched._t_grid[-2])
    se_w = torch.sqrt(MIX.weights * (1 - MIX.weights) / n)
    assert ((w - MIX.weights).abs() < 4 * se_w).all(), (w, MIX.weights)
    rel_se = torch.sqrt(2.0 / (counts * MIX.dim))
    assert ((var_ratio - 1).abs() < 4 * rel_se + 0.03).all(), var_ratio


@pytest.mark.parametrize("family", list(FAMILIES))
def test_denoiser_and_objective_are_exact_in_every_family(family):
    """The same exact denoiser, spoken in four parametrisations, gives the same yhat and the same loss."""
    cfg = FAMILIES[family].config
    sched = VEScheduler.from_config(cfg)
    den = Denoiser.from_scheduler(MixtureUNet.from_mixture(MIX, cfg), sched)
    t = torch.tensor([1e-3, 0.3, 7.0, 50.0], dtype=torch.float64)
    z = MIX.sample(4, 0.0, torch.Generator().manual_seed(0)) + t.sqrt().reshape(-1, 1, 1, 1) * start(4)
    torch.testing.assert_close(den(z, t), MIX.yhat(z, t), rtol=1e-4, atol=1e-5)  # float32 model timesteps
    obj = Objective(process.model_family(cfg), "likelihood")
    batch = obj.draw(MIX.sample(64, 0.0, torch.Generator().manual_seed(1)).float(), torch.Generator().manual_seed(2))
    loss = obj.per_sample_loss(MixtureUNet.from_mixture(MIX, cfg)(batch.x, batch.timestep).sample, batch)
    exact = ((batch.z.double() - MIX.yhat(batch.z.double(), batch.t)) / batch.t.sqrt().reshape(-1, 1, 1, 1)
             - batch.eps.double()).pow(2).flatten(1).mean(1) * obj.weight(batch.t)
    torch.testing.assert_close(loss.double(), exact, rtol=2e-3, atol=1e-4)


def test_flow_state_img2img_and_heun():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ve = VEScheduler.from_config(ref.config)
    ref.set_timesteps(10)
    ve.set_timesteps(10)
    y, eps = start(8, seed=4), start(8, seed=5)
    for i in (0, 3, 9):
        ref.set_begin_index(i)
        torch.testing.assert_close(ve.scale_noise(y, ve.timesteps[i:i + 1], eps),
                                   ref.scale_noise(y, ref.timesteps[i:i + 1], eps), rtol=1e-5, atol=1e-5)
    assert ve.sigmas[0] == 1 and ve.sigmas[-1] == 0 and ve.init_noise_sigma == 1.0
    model, x = MixtureUNet.from_mixture(MIX, ref.config), start(256)
    ode = run(VEScheduler.from_config(ref.config, reverse_noise=0.0, sigma_schedule="log_t"), model, 800, x)
    errs = [(run(VEHeunScheduler.from_config(ref.config, reverse_noise=0.0), model, n, x) - ode).flatten(1).norm(dim=1)
            .mean() for n in (8, 32)]  # Heun starts at s = 1 (t = inf) too, and converges
    assert errs[1] < errs[0] / 3, errs


def test_passing_back_timesteps_gives_the_same_run():
    """SD's scaled_linear table with a Karras grid has fractional timesteps: float32 must not move the grid."""
    cfg = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").config
    a = VEScheduler.from_config(cfg)
    a.set_timesteps(10)
    for b in (a, VEScheduler.from_config(cfg)):
        grid = list(a._t_grid)
        b.set_timesteps(timesteps=a.timesteps.clone())
        assert b._t_grid == grid
    heun = VEHeunScheduler.from_config(cfg)
    heun.set_timesteps(6)
    grid = list(heun._t_grid)
    VEHeunScheduler.from_config(cfg).set_timesteps(6)
    fresh = VEHeunScheduler.from_config(cfg)
    with pytest.raises(ValueError, match="timesteps"):  # Heun's layout repeats timesteps: not a custom grid
        fresh.set_timesteps(timesteps=heun.timesteps[1:].clone())
    fresh.set_timesteps(timesteps=heun.timesteps.clone())
    assert fresh._t_grid == grid


@pytest.mark.parametrize("family", list(FAMILIES))
def test_betas_alphas_and_config_keys(family):
    sched = VEScheduler.from_config(FAMILIES[family].config)
    assert sched.config.model_family == family
    abar = 1 / (1 + sched.family.train_t())
    torch.testing.assert_close(sched.alphas_cumprod.double(), abar, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cumprod(sched.alphas.double(), 0), sched.alphas_cumprod.double(), rtol=1e-4, atol=0)
    assert sched.betas.shape == (sched.family.num_train_timesteps,)


def test_family_keys_are_checked():
    with pytest.raises(ValueError, match="prediction_type"):
        VEScheduler(model_family="ve")  # a VE score model answers with the score
    with pytest.raises(ValueError, match="sigma_schedule"):
        VEScheduler.from_config(EDMEulerScheduler().config, sigma_schedule="ddpm")
    with pytest.raises(ValueError, match="mu"):
        VEScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config).set_timesteps(4)
    with pytest.raises(ValueError, match="model_family"):
        VEScheduler(model_family="consistency")


@pytest.mark.parametrize("family", ["ve", "edm", "flow"])
def test_family_round_trips_through_pipeline_and_portable_folders(tmp_path, family):
    from diffusers_ve import VEPipeline
    from diffusers_ve.pipelines.pipeline_ve import portable_scheduler

    from .tiny_sd import tiny_unet

    sched = VEScheduler.from_config(FAMILIES[family].config, reverse_noise=0.7, sigma_schedule="log_t")
    pipe = VEPipeline(tiny_unet(), sched)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=4, output_type="pt")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.save_pretrained(tmp_path / "ours")
    loaded = VEPipeline.from_pretrained(tmp_path / "ours")
    assert loaded.scheduler.config.model_family == family
    torch.testing.assert_close(loaded(generator=torch.Generator().manual_seed(0), **kw).images, before, rtol=0, atol=0)

    portable = VEPipeline(tiny_unet(), portable_scheduler(sched))
    portable.save_pretrained(tmp_path / "portable")
    plain = VEPipeline.from_pretrained(tmp_path / "portable")  # the scheduler loads as the stock class
    assert type(plain.scheduler).__name__ == process.model_family(sched.config).reference_scheduler
    restored = VEScheduler.from_config(plain.scheduler.config)
    ours = [k for k in sched.config if not k.startswith("_") and k != "sigma_schedule"]
    assert {k: restored.config[k] for k in ours} == {k: sched.config[k] for k in ours}
    restored.set_timesteps(6)  # EDM's config names our log_t grid "exponential": the same grid
    sched.set_timesteps(6)
    assert restored._t_grid == pytest.approx(sched._t_grid, rel=1e-12)
