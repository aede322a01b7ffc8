"""lambda = 1 is DDPM, lambda = 0 is DDIM, order 2 is DPM-Solver++ 2M / SDE-DPM-Solver++ (math.md §"Summary of equivalences").

Each scheduler is driven by the same exact Gaussian-mixture model and the same noise; the diffusers schedulers
get their tables recomputed in float64, so the comparison is of the step maths alone.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffusers_ve import VEScheduler

from .gmm import MixtureUNet, image_mixture


def _float64_tables(sched, ve):
    abar = ve.family.alphas_cumprod
    sched.alphas_cumprod = abar
    sched.alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    sched.betas = 1 - sched.alphas
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _run(sched, unet, x, timesteps, noises, **kw):
    """The noise is passed in, or (``noises=None``: DDPM takes no noise) drawn from one seeded generator."""
    g = torch.Generator().manual_seed(7)
    for i, tau in enumerate(timesteps):
        out = unet(x, tau).sample
        noise = {"generator": g} if noises is None else {"variance_noise": noises[i]}
        x = sched.step(out, tau, x, **noise, **kw).prev_sample
    return x


def _setup(ptype, n, dtype=torch.float64):
    unet = MixtureUNet.from_mixture(image_mixture(), prediction_type=ptype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 4, 4, generator=g, dtype=dtype)
    noises = torch.randn(n, 16, 1, 4, 4, generator=g, dtype=dtype)
    return unet, x, noises


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("n", [10, 50])
def test_lambda1_order1_equals_ddpm(ptype, n):
    unet, x, noises = _setup(ptype, n)
    ddpm = DDPMScheduler(prediction_type=ptype, clip_sample=False)
    ve = VEScheduler.from_config(ddpm.config, reverse_noise=1.0, solver_order=1, sigma_schedule="ddpm")
    _float64_tables(ddpm, ve)
    ddpm.set_timesteps(n)
    ve.set_timesteps(n)
    assert torch.equal(ddpm.timesteps.float(), ve.timesteps)
    ref = _run(ddpm, unet, x, ddpm.timesteps, None)
    ours = _run(ve, unet, x, ve.timesteps, None)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_lambda0_order1_equals_ddim_eta0(ptype):
    n = 20
    unet, x, noises = _setup(ptype, n)
    ddim = DDIMScheduler(prediction_type=ptype, clip_sample=False, set_alpha_to_one=True)
    ve = VEScheduler.from_config(ddim.config, reverse_noise=0.0, solver_order=1, sigma_schedule="ddpm")
    _float64_tables(ddim, ve)
    ddim.set_timesteps(n)
    ve.set_timesteps(n)
    ref = _run(ddim, unet, x, ddim.timesteps, noises, eta=0.0)
    ours = _run(ve, unet, x, ve.timesteps, noises, eta=0.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("lam,algorithm", [(0.0, "dpmsolver++"), (1.0, "sde-dpmsolver++")])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_order2_equals_dpmsolver_2m(lam, algorithm, ptype):
    n = 12
    unet, x, noises = _setup(ptype, n)
    ve = VEScheduler(prediction_type=ptype, reverse_noise=lam, solver_order=2)
    dpm = DPMSolverMultistepScheduler(
        prediction_type=ptype, algorithm_type=algorithm, solver_order=2, solver_type="midpoint",
        use_karras_sigmas=True, final_sigmas_type="zero", lower_order_final=True,
    )
    ve.set_timesteps(n)
    dpm.set_timesteps(n)
    dpm.sigmas = ve.sigmas.double()  # the same sigma grid, in float64 (theirs rounds the model timesteps)
    dpm.timesteps = ve.timesteps
    ref = _run(dpm, unet, x, ve.timesteps, noises)
    ours = _run(ve, unet, x, ve.timesteps, noises)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # and the multistep correction is really there: order 1 differs by much more than the tolerance
    ve1 = VEScheduler(prediction_type=ptype, reverse_noise=lam, solver_order=1)
    ve1.set_timesteps(n)
    assert (_run(ve1, unet, x, ve1.timesteps, noises) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("sched_cls,lam,kw", [(DDPMScheduler, 1.0, {}), (DDIMScheduler, 0.0, {"eta": 0.0})])
def test_agrees_with_stock_float32_schedulers(sched_cls, lam, kw):
    n = 25
    unet, x, noises = _setup("epsilon", n, dtype=torch.float32)
    extra = {"set_alpha_to_one": True} if sched_cls is DDIMScheduler else {}
    stock = sched_cls(clip_sample=False, **extra)
    ve = VEScheduler.from_config(stock.config, reverse_noise=lam, solver_order=1, sigma_schedule="ddpm")
    stock.set_timesteps(n)
    ve.set_timesteps(n)
    noises = None if sched_cls is DDPMScheduler else noises
    ref = _run(stock, unet, x, stock.timesteps, noises, **kw)
    ours = _run(ve, unet, x, ve.timesteps, noises)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-3)


def test_order2_first_and_last_steps_are_exact_steps():
    """2M has no history on its first step and lands on yhat at t = 0: both steps equal the order-1 steps."""
    unet, x, noises = _setup("epsilon", 3)
    outs = []
    for order in (1, 2):
        ve = VEScheduler(reverse_noise=0.5, solver_order=order)
        ve.set_timesteps(3)
        xi, steps = x, []
        for i, tau in enumerate(ve.timesteps):
            steps.append(ve.step(unet(xi, tau).sample, tau, xi, variance_noise=noises[i]))
            xi = steps[-1].prev_sample
        outs.append(steps)
    first1, first2 = outs[0][0].prev_sample, outs[1][0].prev_sample
    torch.testing.assert_close(first2, first1, rtol=0, atol=0)
    assert (outs[1][1].prev_sample - outs[0][1].prev_sample).abs().max() > 1e-4  # the middle step is 2M
    torch.testing.assert_close(outs[1][2].prev_sample, outs[1][2].pred_original_sample, rtol=0, atol=0)
