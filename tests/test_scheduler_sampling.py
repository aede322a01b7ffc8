"""VEScheduler samples the right population: Gaussian-mixture ground truth (exact denoiser, exact samples)."""

import math

import pytest
import torch

from diffusers_ve import VEScheduler

from .gmm import MixtureUNet, image_mixture

MIX = image_mixture()
UNET = MixtureUNet.from_mixture(MIX)
N = 20_000
D = MIX.dim


def sample(sched, steps, n=N, seed=0, x=None):
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(n, *MIX.shape, generator=g, dtype=torch.float64)
    for tau in sched.timesteps:
        x = sched.step(UNET(x, tau).sample, tau, x, generator=g).prev_sample
    return x


def mode_stats(y):
    """Mode weights, per-mode mean offset (averaged over pixels) and per-mode per-pixel variance, with counts."""
    k = MIX.responsibilities(y, 1e-3).argmax(1)
    flat = y.reshape(len(y), -1)
    counts = torch.bincount(k, minlength=len(MIX.weights))
    mu = MIX.means.reshape(len(MIX.weights), -1)
    offset = torch.stack([(flat[k == j] - mu[j]).mean() for j in range(len(counts))])
    var = torch.stack([(flat[k == j] - flat[k == j].mean(0)).pow(2).mean() for j in range(len(counts))])
    return counts.double() / len(y), offset, var, counts


def target_variance():
    """The sampler ends with yhat(z, t_min): the exact within-mode variance of that is s^4 / (s^2 + t_min)."""
    t_min = VEScheduler().family.t_min
    s2 = MIX.stds**2
    return s2 * s2 / (s2 + t_min)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_many_steps_reproduce_the_population(lam):
    w, offset, var, counts = mode_stats(sample(VEScheduler(reverse_noise=lam), 200))
    se_w = torch.sqrt(MIX.weights * (1 - MIX.weights) / N)
    assert ((w - MIX.weights).abs() < 4 * se_w).all(), (w, MIX.weights)
    se_mean = MIX.stds / torch.sqrt(counts * D)
    assert (offset.abs() < 4 * se_mean + 1e-4).all(), offset
    truth = target_variance()
    rel_se = torch.sqrt(2.0 / (counts * D))
    assert ((var / truth - 1).abs() < 4 * rel_se + 0.005).all(), (var, truth)


def test_order2_beats_order1_at_20_calls_on_the_ode_path():
    """lambda = 0 is deterministic: compare each sample with a 400-step solution from the same start."""
    x = torch.randn(4000, *MIX.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = sample(VEScheduler(reverse_noise=0.0), 400, x=x)
    e1 = (sample(VEScheduler(reverse_noise=0.0, solver_order=1), 20, x=x) - ref).flatten(1).norm(dim=1)
    e2 = (sample(VEScheduler(reverse_noise=0.0, solver_order=2), 20, x=x) - ref).flatten(1).norm(dim=1)
    diff = e1 - e2
    assert diff.mean() > 3 * diff.std() / math.sqrt(len(diff)), (e1.mean(), e2.mean())


def test_order2_beats_order1_at_20_calls_in_within_mode_variance():
    """lambda = 1: first order shrinks within-mode variance at 20 calls; 2M keeps it."""
    truth = target_variance()
    errs, ses = [], []
    for order in (1, 2):
        _, _, var, counts = mode_stats(sample(VEScheduler(reverse_noise=1.0, solver_order=order), 20, n=10_000))
        errs.append((var / truth - 1).abs().sum())
        ses.append(torch.sqrt((2.0 / (counts * D)).sum()))
    assert errs[0] - errs[1] > 3 * math.hypot(ses[0], ses[1]), errs


def test_reverse_noise_window():
    """lambda applies only to steps starting inside [t_lo, t_hi]; an empty window is the ODE, exactly."""
    base = dict(solver_order=2)
    ode = sample(VEScheduler(reverse_noise=0.0, **base), 10, n=64)
    empty = sample(VEScheduler(reverse_noise=1.0, reverse_noise_window=[1e-9, 1e-8], **base), 10, n=64)
    torch.testing.assert_close(empty, ode, rtol=0, atol=0)
    full = sample(VEScheduler(reverse_noise=1.0, **base), 10, n=64)
    everywhere = sample(VEScheduler(reverse_noise=1.0, reverse_noise_window=[0.0, 1e9], **base), 10, n=64)
    torch.testing.assert_close(everywhere, full, rtol=0, atol=0)
    part = sample(VEScheduler(reverse_noise=1.0, reverse_noise_window=[0.01, 1.0], **base), 10, n=64)
    assert not torch.allclose(part, ode) and not torch.allclose(part, full)


# ------------------------------------------------------------------------------------ one and two calls
@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_default_grid_at_one_and_two_calls_stays_in_the_data_range(calls, lam):
    """1-2 calls give a blurry mean, not saturated noise: on a model fitted to the digits (their ten class means,
    as a mixture of width 0.3) the samples stay inside the data range and spread less per pixel than the data.
    DDPM's leading grid, whose one call is at t_min, returns the starting noise (the check can fail)."""
    from diffusers_ve.data import load_digits_images
    from diffusers_ve.mixture import digits_mixture

    data = load_digits_images(8)
    unet = MixtureUNet.from_mixture(digits_mixture(std=0.3))

    def run(sched):
        sched.set_timesteps(calls)
        x = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for tau in sched.timesteps:
            x = sched.step(unet(x, tau).sample, tau, x, generator=torch.Generator().manual_seed(2)).prev_sample
        return x

    y = run(VEScheduler(reverse_noise=lam))
    assert y.abs().max() < 1.5 and y.std(0).mean() < data.std(0).mean(), (y.abs().max(), y.std(0).mean())
    if calls == 1:
        bad = run(VEScheduler(reverse_noise=lam, sigma_schedule="ddpm"))
        assert bad.abs().max() > 3
