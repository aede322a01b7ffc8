"""VEHeunScheduler (math.md §"The exponential Heun step") against the exact Gaussian-mixture oracle and diffusers' HeunDiscreteScheduler."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler

from diffusers_ve import VEHeunScheduler, VEScheduler

from .gmm import MixtureUNet, image_mixture

SD_TABLE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _run(sched, unet, x, generator=None):
    """The pipeline loop: model call, scheduler step, for every entry of ``timesteps`` (VP state)."""
    kw = {} if generator is None else {"generator": generator}  # HeunDiscreteScheduler.step takes none
    for tau in sched.timesteps:
        out = unet(sched.scale_model_input(x, tau), tau).sample
        x = sched.step(out, tau, x, **kw).prev_sample
    return x


def _noise(n, shape, seed=0):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------- layout
def test_timesteps_laid_out_as_heun_discrete():
    """Same Karras grid, same [t0, t1, t1, ..., t_{N-1}, t_{N-1}] layout (2N - 1 calls) as diffusers' Heun."""
    t_min = VEHeunScheduler(**SD_TABLE).family.t_min  # the whole table (the default ends above t_min at n <= 4)
    ve, edm = VEHeunScheduler(t_min=t_min, **SD_TABLE), HeunDiscreteScheduler(use_karras_sigmas=True, **SD_TABLE)
    for n in (2, 6):  # (n = 1: diffusers starts at sigma_min, we at sigma_max)
        ve.set_timesteps(n)
        edm.set_timesteps(n)
        assert len(ve.timesteps) == 2 * n - 1 and ve.order == 2
        torch.testing.assert_close(ve.timesteps.double(), edm.timesteps.double(), atol=2e-3, rtol=0)  # float32 tables


def test_final_sigma_min_adds_a_corrector_call_and_null_step_is_one_call():
    sched = VEHeunScheduler(final_sigmas_type="sigma_min")
    sched.set_timesteps(6)  # (at 6 points the default grid ends at t_min)
    # 5 two-call steps down to t_min, then the null step t_min -> t_min: 11 calls
    assert len(sched.timesteps) == 11 and float(sched.timesteps[-1]) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------- lambda = 0: ODE
def test_lambda0_predictor_equals_heun_discrete_and_both_converge_to_one_ode_solution():
    """The exponential Heun differs from EDM's only in the corrector weight: the first call agrees exactly and the
    whole trajectories agree to O(h^2) as the grid refines (diffusers' Heun runs in VE z, ours in VP x)."""
    mix = image_mixture()
    unet = MixtureUNet.from_mixture(mix, SD_TABLE)
    x0 = _noise(64, mix.shape)
    ve, edm = VEHeunScheduler(reverse_noise=0.0, **SD_TABLE), HeunDiscreteScheduler(use_karras_sigmas=True, **SD_TABLE)
    ve.set_timesteps(6)
    edm.set_timesteps(6)
    tau = ve.timesteps[0]
    eps = unet(x0, tau).sample
    z_edm = edm.step(eps, edm.timesteps[0], x0 * (1 + edm.sigmas[0].double() ** 2).sqrt()).prev_sample
    z_ve = ve.step(eps, tau, x0).prev_sample * math.sqrt(1 + ve._t_grid[1])
    torch.testing.assert_close(z_ve, z_edm, rtol=1e-5, atol=1e-4)
    gaps = []
    for n in (10, 20, 40):
        ve.set_timesteps(n)
        edm.set_timesteps(n)
        z0 = x0 * (1 + edm.sigmas[0].double() ** 2).sqrt()  # the same start (init_noise_sigma is sigma_max here)
        gaps.append((_run(ve, unet, x0) - _run(edm, unet, z0)).pow(2).mean().sqrt().item())
    assert gaps[1] < gaps[0] / 3 and gaps[2] < gaps[1] / 3, gaps  # measured 0.020, 0.0044, 0.0010


class _LinearInLogT(torch.nn.Module):
    """A "sample"-predicting model whose denoiser is ``yhat = a + b ln t``, independent of ``z``."""

    def __init__(self, axis, a, b):
        super().__init__()
        self.axis, self.a, self.b = axis, a, b

    def forward(self, x, tau):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=self.a + self.b * torch.log(self.axis.t(tau)).item() + 0 * x)


@pytest.mark.parametrize("lam", [0.0, 1.0, 2.0])
def test_corrector_is_exact_when_yhat_is_linear_in_log_t(lam):
    """Against the closed form: with ``yhat = a + b u`` (``u = ln t``), the noise-free part of the reverse SDE solves
    ``dz/du = c (z - yhat)``, ``c = (1 + lambda)/2``: ``z(u) = a + b (u + 1/c) + C exp(c u)``. The exponential Heun
    step integrates exactly this, for any step size (the plain-average weight ``(1 - A)/2`` does not)."""
    sched = VEHeunScheduler(reverse_noise=lam, prediction_type="sample")
    shape = (3, 1, 4, 4)
    a, b = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4), 0.3
    model = _LinearInLogT(sched.family, a, b)
    c = 0.5 * (1 + lam)
    ts = [400.0, 9.0, 0.2, 0.003]
    z0 = _noise(shape[0], shape[1:], seed=5) * 20
    const = (z0 - a - b * (math.log(ts[0]) + 1 / c)) * math.exp(-c * math.log(ts[0]))
    sched.set_timesteps(sigmas=[math.sqrt(t) for t in ts])
    x = z0 / math.sqrt(1 + ts[0])
    zeros = torch.zeros(shape, dtype=torch.float64)
    for k, tau in enumerate(sched.timesteps[: 2 * (len(ts) - 1)]):
        x = sched.step(model(x, tau).sample, tau, x, variance_noise=zeros).prev_sample
        if k % 2 == 1:  # after each corrector: z at the next grid time
            u = math.log(ts[k // 2 + 1])
            exact = a + b * (u + 1 / c) + const * math.exp(c * u)
            torch.testing.assert_close(x * math.sqrt(1 + ts[k // 2 + 1]), exact, rtol=1e-5, atol=1e-5)


def _observed_orders(make, unet, x0, grids=(20, 40, 80, 160)):
    """log2 of successive Richardson differences |x_N - x_2N|: about 2 for a second-order method, 1 for first."""
    outs = []
    for n in grids:
        sched = make()
        sched.set_timesteps(n)
        outs.append(_run(sched, unet, x0))
    d = [(a - b).pow(2).mean().sqrt().item() for a, b in zip(outs, outs[1:])]
    return [math.log2(a / b) for a, b in zip(d, d[1:])]


def test_lambda0_is_second_order():
    mix = image_mixture()
    unet = MixtureUNet.from_mixture(mix)
    x0 = _noise(64, mix.shape, seed=1)
    heun = _observed_orders(lambda: VEHeunScheduler(reverse_noise=0.0), unet, x0)
    euler = _observed_orders(lambda: VEScheduler(reverse_noise=0.0, solver_order=1), unet, x0)
    assert min(heun) > 1.6, heun  # measured 1.8
    assert max(euler) < 1.3, euler  # the same measure on a first-order step


# ---------------------------------------------------------------------------- statistics vs the oracle
def _sample(sched, mix, n, steps, seed):
    g = torch.Generator().manual_seed(seed)
    unet = MixtureUNet.from_mixture(mix)
    sched.set_timesteps(steps)
    return _run(sched, unet, torch.randn((n, *mix.shape), generator=g, dtype=torch.float64), g)


def _stats(mix, y):
    """Means and standard errors of 6 per-sample statistics: the mode frequencies (mode = argmax responsibility),
    and per mode the mean of ``||y - mu_k||^2 / (d s_k^2)`` (the within-mode variance ratio)."""
    k = mix.responsibilities(y, 1e-4).argmax(1)
    mu = mix.means.reshape(len(mix.weights), -1)
    ratio = ((y.reshape(len(y), -1) - mu[k]) ** 2).mean(1) / mix.stds[k] ** 2
    cols = [(k == j).double() for j in range(3)] + [ratio[k == j] for j in range(3)]
    return torch.tensor([c.mean() for c in cols]), torch.tensor([c.std() / math.sqrt(len(c)) for c in cols])


def _reference(mix, t_min, n=200_000):
    """Any exact reverse process lands on ``z ~ p_{t_min}`` and then returns ``yhat(z, t_min)``: that law, exactly."""
    z = mix.sample(n, t=t_min, generator=torch.Generator().manual_seed(123))
    return _stats(mix, mix.yhat(z, t_min))


def test_beats_first_order_at_about_20_calls_lambda1():
    """Within-mode spread, the statistic few-step samplers get most wrong (they shrink the modes).

    Measured on this mixture (20k samples, default Karras grid), variance-ratio error per mode:
    10 calls: order 1 (-0.60, -0.46, -0.57), Heun 11 calls (-0.81, -0.51, -0.78): Heun is *worse* at about 10 calls.
    20 calls: order 1 (-0.49, -0.45, -0.50), Heun 21 calls (-0.41, -0.41, -0.46); 40/41: (-0.31, -0.28, -0.31) vs
    (-0.21, -0.19, -0.21). So the claim is tested at 20 calls, where it holds.
    """
    mix = image_mixture()
    ref, ref_se = _reference(mix, VEScheduler().family.t_min)
    o1, o1_se = _stats(mix, _sample(VEScheduler(reverse_noise=1.0, solver_order=1), mix, 8000, 20, seed=2))
    heun, heun_se = _stats(mix, _sample(VEHeunScheduler(reverse_noise=1.0), mix, 8000, 11, seed=3))
    gain = (o1 - ref).abs()[3:] - (heun - ref).abs()[3:]
    se = (o1_se**2 + heun_se**2 + 4 * ref_se**2).sqrt()[3:]
    assert bool((gain > 3 * se).all()), (gain, se)


@pytest.mark.parametrize("lam, points", [(0.0, 121), (1.0, 241), (2.0, 241)])
def test_many_steps_reproduce_the_population(lam, points):
    """Mode weights and within-mode spreads within 4 standard errors of the exact law (n = 6000)."""
    mix = image_mixture()
    ref, ref_se = _reference(mix, VEScheduler().family.t_min)
    got, got_se = _stats(mix, _sample(VEHeunScheduler(reverse_noise=lam), mix, 6000, points, seed=4))
    z = (got - ref) / (got_se**2 + ref_se**2).sqrt()
    assert bool((z.abs() < 4).all()), z


# ------------------------------------------------------------------------------------ step mechanics
def test_noise_is_drawn_once_per_step():
    """The corrector reuses the predictor's noise: passing ``variance_noise`` to the predictor fixes the step."""
    mix = image_mixture()
    unet = MixtureUNet.from_mixture(mix)
    sched = VEHeunScheduler(reverse_noise=1.0)
    outs = []
    for seed in (0, 1):
        sched.set_timesteps(5)
        x = _noise(4, mix.shape)
        xi = _noise(4, mix.shape, seed=9)
        g = torch.Generator().manual_seed(seed)  # different generators: unused by a step that is given its noise
        tau0, tau1 = sched.timesteps[:2]
        x = sched.step(unet(x, tau0).sample, tau0, x, generator=g, variance_noise=xi).prev_sample
        assert not sched.state_in_first_order
        outs.append(sched.step(unet(x, tau1).sample, tau1, x, generator=g).prev_sample)
        assert sched.state_in_first_order
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_generator_lists_and_img2img_start():
    mix = image_mixture()
    unet = MixtureUNet.from_mixture(mix)
    sched = VEHeunScheduler(reverse_noise=1.0)
    sched.set_timesteps(5)
    x = _noise(2, mix.shape).float()
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    one = _run(sched, unet, x[:1], [torch.Generator().manual_seed(5)])
    sched.set_timesteps(5)
    both = _run(sched, unet, x, gens)
    torch.testing.assert_close(both[:1], one)  # per-image generators: image 0 does not depend on the batch
    # img2img: `set_begin_index(k * order)` starts at a predictor call; an odd index is a clear error
    sched.set_timesteps(5)
    sched.set_begin_index(2)
    tau = sched.timesteps[2]
    sched.step(unet(x, tau).sample, tau, x)
    assert not sched.state_in_first_order
    sched.set_timesteps(5)
    sched.set_begin_index(1)
    with pytest.raises(ValueError, match="corrector"):
        sched.step(unet(x, sched.timesteps[1]).sample, sched.timesteps[1], x)
    # without a begin index the repeated timestep resolves to its second entry (a predictor), as diffusers' Heun
    sched.set_timesteps(5)
    assert sched.index_for_timestep(sched.timesteps[3]) == 4


# ------------------------------------------------------------------------------------------ configs
def test_config_swaps_with_vescheduler_and_ddpm():
    ve = VEScheduler(reverse_noise=0.3, sigma_schedule="log_t", solver_order=1, rho=5.0)
    heun = VEHeunScheduler.from_config(ve.config)
    assert (heun.config.reverse_noise, heun.config.sigma_schedule, heun.config.rho) == (0.3, "log_t", 5.0)
    back = VEScheduler.from_config(heun.config)  # solver_order travels as a hidden key
    assert back.config.solver_order == 1 and back.config.reverse_noise == 0.3
    ddpm = DDPMScheduler(prediction_type="v_prediction", clip_sample=True, variance_type="fixed_small", **SD_TABLE)
    heun = VEHeunScheduler.from_config(ddpm.config)
    assert heun.config.prediction_type == "v_prediction" and heun.config.clip_sample
    assert heun.family.t_max == pytest.approx(VEScheduler.from_config(ddpm.config).family.t_max)
    edm = VEHeunScheduler.from_config(HeunDiscreteScheduler(use_karras_sigmas=True, **SD_TABLE).config)
    assert edm.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reverse_noise=-1.0), "reverse_noise"),
        (dict(reverse_noise=float("inf")), "reverse_noise"),
        (dict(reverse_noise="a lot"), "reverse_noise"),
        (dict(sigma_schedule="cosine"), "sigma_schedule"),
        (dict(prediction_type="flow"), "prediction_type"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(t_min=1e-9), "t_min"),
    ],
)
def test_bad_config_is_a_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VEHeunScheduler(**kwargs)


def test_bad_calls_are_clear_errors():
    with pytest.raises(ValueError, match="unknown scheduler class 'NoSuchScheduler'"):
        VEHeunScheduler.from_config({**FlowMatchEulerDiscreteScheduler().config, "_class_name": "NoSuchScheduler"})
    sched = VEHeunScheduler()
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match="eta"):
        sched.step(x, sched.timesteps[0], x, eta=0.5)
    with pytest.raises(TypeError, match="unexpected"):
        sched.step(x, sched.timesteps[0], x, s_churn=1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(x, 123.4, x)
