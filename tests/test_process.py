"""The process module against diffusers' own conventions and against closed forms."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from diffusers_ve import process
from diffusers_ve.process import TimeAxis

CONFIGS = [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_time_axis_matches_diffusers_alphas_cumprod(cfg):
    """t_k = (1 - abar_k)/abar_k against diffusers' own (float32) table."""
    axis = TimeAxis.from_config(DDPMScheduler(**cfg).config)
    abar = DDPMScheduler(**cfg).alphas_cumprod.double()
    np.testing.assert_allclose(axis.alphas_cumprod.numpy(), abar.numpy(), rtol=2e-5)
    t = torch.exp(axis.log_t)
    np.testing.assert_allclose(t[100:].numpy(), ((1 - abar) / abar)[100:].numpy(), rtol=1e-4)


def test_time_axis_is_exact_near_zero():
    """float64 expm1/log1p form: t_0 = beta_0 (1 + O(beta)) with no cancellation."""
    axis = TimeAxis.from_config(DDPMScheduler().config)
    beta0 = 1e-4
    assert axis.t_min == pytest.approx(beta0 / (1 - beta0), rel=1e-12)
    assert axis.t_max == pytest.approx(2.4777e4, rel=1e-4)  # math.md §"VP models in VE coordinates"


def test_timestep_interpolation_equals_euler_sigma_to_t():
    sched = EulerDiscreteScheduler()
    axis = TimeAxis.from_config(sched.config)
    sigmas = np.array(((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5)
    log_sigmas = np.log(sigmas)
    for sigma in [0.0101, 0.05, 0.3, 1.0, 7.7, 80.0, 150.0]:
        ours = float(axis.timestep(sigma**2))
        theirs = float(sched._sigma_to_t(np.array(sigma), log_sigmas))
        assert ours == pytest.approx(theirs, abs=2e-3)  # theirs uses the float32 table
    taus = torch.tensor([0.0, 0.5, 3.7, 500.25, 999.0], dtype=torch.float64)
    torch.testing.assert_close(axis.timestep(axis.t(taus)), taus, rtol=0, atol=1e-9)


def test_zero_snr_clamps_last_t_like_euler():
    sched = EulerDiscreteScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    axis = TimeAxis.from_config(sched.config)
    assert axis.alphas_cumprod[-1].item() == pytest.approx(float(sched.alphas_cumprod[-1]), rel=1e-6)
    # on a linear table Euler's clamp is not monotone; ours extrapolates in ln t and stays increasing
    axis = TimeAxis.from_config(EulerDiscreteScheduler(rescale_betas_zero_snr=True).config)
    assert math.isfinite(axis.t_max) and bool((axis.log_t.diff() > 0).all())


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_yhat_from_output_equals_ddpm_pred_original_sample(ptype):
    """Our VE conversion, read in VP terms, is diffusers' x0 prediction for every prediction type."""
    ddpm = DDPMScheduler(prediction_type=ptype, clip_sample=False)
    ddpm.set_timesteps(1000)
    axis = TimeAxis.from_config(ddpm.config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    k = 417
    ddpm.alphas_cumprod = axis.alphas_cumprod
    x0 = ddpm.step(out, k, x, generator=g).pred_original_sample
    t = float(torch.exp(axis.log_t[k]))
    z = process.ve_from_vp(x, t)
    yhat = process.yhat_from_output(out, z, t, ptype)
    torch.testing.assert_close(yhat, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(process.output_from_yhat(yhat, z, t, ptype), out, rtol=1e-9, atol=1e-9)


def test_noisy_and_velocity_match_ddpm_add_noise_and_get_velocity():
    ddpm = DDPMScheduler()
    axis = TimeAxis.from_config(ddpm.config)
    ddpm.alphas_cumprod = axis.alphas_cumprod
    g = torch.Generator().manual_seed(1)
    y, eps = torch.randn(4, 1, 3, 3, generator=g).double(), torch.randn(4, 1, 3, 3, generator=g).double()
    k = torch.tensor([0, 10, 500, 999])
    t = axis.t(k)
    torch.testing.assert_close(process.vp_from_ve(process.noisy(y, eps, t), t), ddpm.add_noise(y, eps, k))
    torch.testing.assert_close(process.velocity(y, eps, t), ddpm.get_velocity(y, eps, k))


@pytest.mark.parametrize("lam", [0.0, 1e-12, 0.5, 1.0, 2.0, 1e6])
@pytest.mark.parametrize("t,s", [(1e9, 1e8), (1e9, 1e-6), (1.0, 0.999999), (2e-6, 1e-6), (3.0, 0.0)])
def test_step_coefficients_preserve_variance_and_stay_finite(lam, t, s):
    """A^2 t + V = s: a point-mass population stays exact, for every lambda and step size."""
    a, v = process.step_coefficients(t, s, lam)
    assert math.isfinite(a) and math.isfinite(v) and 0 <= a <= 1 and v >= 0
    assert a * a * t + v == pytest.approx(s, rel=1e-9, abs=1e-300)


def test_tiny_lambda_noise_does_not_lose_precision():
    _, v = process.step_coefficients(2.0, 1.0, 1e-12)
    assert v == pytest.approx(1e-12 * math.log(2.0), rel=1e-6)  # s (1 - (s/t)^lam) ~ s lam ln(t/s)


def test_exact_step_is_exact_for_a_point_mass():
    """pop = delta_y: yhat = y, so z_s must be distributed exactly as y + sqrt(s) eps."""
    g = torch.Generator().manual_seed(0)
    y, t, s = 0.3, 4.0, 0.25
    for lam in [0.0, 0.5, 1.0, 3.0]:
        z = y + math.sqrt(t) * torch.randn(200_000, generator=g, dtype=torch.float64)
        a, v = process.step_coefficients(t, s, lam)
        zs = process.linear_step(z, torch.full_like(z, y), a, v, torch.randn(z.shape, generator=g, dtype=z.dtype))
        assert zs.mean().item() == pytest.approx(y, abs=5e-3)
        assert zs.var().item() == pytest.approx(s, rel=1e-2)


def test_heun_and_multistep_weights_limits():
    assert process.multistep_weight(2.0, 1.0, 4.0, 0.0) == pytest.approx(0.5 * (1 - math.sqrt(0.5)))
    assert process.multistep_weight(2.0, 0.0, 4.0, 0.0) == 0.0
    # Heun weight: w = 1 - (1 - A)/(c h) = c h/2 - (c h)^2/6 + ...; accurate (no cancellation) down to tiny steps
    for h in [1e-1, 1e-3, 1e-5, 1e-6, 1e-9, 1e-13]:
        x = h  # c = 1 at lambda = 1
        exact = sum((-1) ** (n + 1) * x**n / math.factorial(n + 1) for n in range(1, 30))  # series of 1 - (1-e^-x)/x
        assert process.heun_weight(1.0, math.exp(-h), 1.0) == pytest.approx(exact, rel=1e-9)
    assert process.heun_weight(1.0, 1e-3, 0.0) == pytest.approx(1 - (1 - math.sqrt(1e-3)) / (0.5 * math.log(1e3)))


def test_grids():
    g = process.karras_t(1e-4, 1e4, 10)
    assert g[0] == pytest.approx(1e4) and g[-1] == pytest.approx(1e-4) and all(np.diff(g) < 0)
    assert process.karras_t(1e-4, 1e4, 1) == [1e4]
    lg = process.log_t_grid(1e-4, 1e4, 9)
    assert np.allclose(np.diff(np.log(lg)), -math.log(1e8) / 8)
    np.testing.assert_array_equal(process.ddpm_timesteps(1000, 10, "leading", 1), np.arange(901, 0, -100))
    np.testing.assert_array_equal(process.ddpm_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "x", None])
def test_reverse_noise_validation(bad):
    with pytest.raises(ValueError, match="reverse_noise"):
        process.check_reverse_noise(bad)


def test_bad_tables_and_types():
    with pytest.raises(ValueError, match="beta_schedule"):
        process.make_betas(1000, beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type"):
        process.yhat_from_output(torch.zeros(1), torch.zeros(1), 1.0, "flow")
    with pytest.raises(ValueError, match="0 <= s <= t"):
        process.step_coefficients(1.0, 2.0, 1.0)
