"""Discrete n-level data: bits/dim of known discrete distributions at 256 and 17 levels (math.md §"Discrete data and bits per dimension")."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import norm, qmc

from diffusers_ve.denoiser import Denoiser
from diffusers_ve.likelihood import (
    bits_per_dim, elbo_log_likelihood, image_generators, nats_from_bits_per_dim, ode_log_likelihood,
)
from diffusers_ve.likelihood.discrete import (
    dequantization_offset, discretized_log_prob, levels_to_model, model_to_levels,
)

from .gmm import GaussianMixture, MixtureUNet


def mixture_denoiser(mix, **table):
    sch = DDPMScheduler(**table)
    return Denoiser.from_scheduler(MixtureUNet.from_mixture(mix, sch.config).double(), sch)


def test_conversions():
    assert dequantization_offset(256, 10) / (10 * math.log(2)) == pytest.approx(-math.log2(127.5))
    assert dequantization_offset(17, 64) / (64 * math.log(2)) == pytest.approx(-3.0, abs=1e-12)
    ll = torch.tensor([-100.0, 3.5], dtype=torch.float64)
    assert torch.allclose(nats_from_bits_per_dim(bits_per_dim(ll, 7), 7), ll)
    assert float(bits_per_dim(torch.tensor([-64 * math.log(2)]), 64)) == pytest.approx(1.0)
    x = torch.arange(17)
    assert torch.equal(model_to_levels(levels_to_model(x, 17), 17), x)
    assert levels_to_model(torch.tensor([0, 255]), 256).tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="17-level grid"):
        model_to_levels(torch.tensor([0.01]), 17)


def test_discretized_decoder_against_scipy():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (3, 50), generator=g)
    x[:, :3] = torch.tensor([0, 16, 8])
    y = levels_to_model(x, 17)
    mean = y + 0.2 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    mean[:, 3] = y[:, 3] + 3.0  # deep in a tail
    t = 0.01
    got = discretized_log_prob(y, mean, t, 17)
    yn, mn, sd, dl = y.numpy(), mean.numpy(), math.sqrt(t), 1 / 16
    hi = np.where(x.numpy() == 16, np.inf, (yn + dl - mn) / sd)
    lo = np.where(x.numpy() == 0, -np.inf, (yn - dl - mn) / sd)
    # P = Phi(hi) - Phi(lo) = SF(lo) - SF(hi): take the form that keeps precision
    p = np.where(lo > 0, norm.sf(lo) - norm.sf(hi), norm.cdf(hi) - norm.cdf(lo))
    assert np.allclose(got.numpy(), np.log(p).sum(1), rtol=1e-10)


def atoms(num_levels, seed=0):
    """Three atoms on the level grid (distinct images) with weights 0.5, 0.3, 0.2: P(x) = w_k exactly."""
    g = torch.Generator().manual_seed(seed)
    means = levels_to_model(torch.randint(0, num_levels, (3, 1, 4, 4), generator=g), num_levels)
    return GaussianMixture(means, [0.0, 0.0, 0.0], [0.5, 0.3, 0.2])


@pytest.mark.parametrize("num_levels,beta_start", [(17, 1e-4), (256, 1e-7)])
def test_decoder_elbo_gives_bits_of_a_known_discrete_distribution(num_levels, beta_start):
    """sqrt(t_min) << delta: the discretised decoder is tight, and the ELBO is ln P(x) = ln w_k."""
    mix = atoms(num_levels)
    den = mixture_denoiser(mix, beta_start=beta_start)
    y, w = mix.means, mix.weights
    est = elbo_log_likelihood(den, y, image_generators(0, range(3)), num_t_samples=64, num_levels=num_levels)
    truth_bpd = -torch.log2(w) / 16
    got_bpd = bits_per_dim(est.log_likelihood, 16)
    se_bpd = est.stderr / (16 * math.log(2))
    print(num_levels, "bits/dim", got_bpd.tolist(), "truth", truth_bpd.tolist(), "s.e.", se_bpd.tolist())
    assert est.nfe.tolist() == [64 + 8] * 3  # K integral calls + R = 8 decoder draws
    assert bool(((got_bpd - truth_bpd).abs() < 3 * se_bpd + 2e-3).all())


def cdf_pmf(mix, x, num_levels):
    """Exact ln P(x) of an isotropic Gaussian mixture quantised to n levels (open edge bins)."""
    y, dl = levels_to_model(x, num_levels), 1.0 / (num_levels - 1)
    out = []
    for yi, xi in zip(y, x):
        terms = []
        for mu, s, w in zip(mix.means, mix.stds, mix.weights):
            hi = torch.where(xi == num_levels - 1, torch.tensor(math.inf, dtype=torch.float64), (yi + dl - mu) / s)
            lo = torch.where(xi == 0, torch.tensor(-math.inf, dtype=torch.float64), (yi - dl - mu) / s)
            p = torch.as_tensor(norm.cdf(hi.numpy()) - norm.cdf(lo.numpy()))
            terms.append(torch.log(w) + torch.log(p).sum())
        out.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(out)


@pytest.mark.parametrize("num_levels", [17, 256])
def test_ode_with_uniform_dequantisation(num_levels):
    """A smooth population quantised: the dequantised ODE equals E_u ln p_tmin(y + delta u) + d ln(2 delta)
    (QMC over u) and stays below the exact ln P(x)."""
    means = torch.stack([torch.full((1, 2, 2), -0.3), torch.full((1, 2, 2), 0.4)]).double()
    mix = GaussianMixture(means, [0.3, 0.25], [0.6, 0.4])
    den = mixture_denoiser(mix)
    x = torch.tensor([[[[3, 5], [6, 8]]], [[[12, 10], [9, 11]]], [[[0, 2], [16, 7]]]])
    x = x if num_levels == 17 else x * 15
    y, reps, d = levels_to_model(x, num_levels), 6, 4
    est = ode_log_likelihood(den, y, image_generators(0, range(3)), num_levels=num_levels, num_dequant=reps)
    u = torch.as_tensor(qmc.Sobol(d, seed=0).random(1024) * 2 - 1).reshape(-1, 1, 2, 2)
    dl = 1.0 / (num_levels - 1)
    ref = torch.stack([mix.log_prob(yi + dl * u, den.axis.t_min).mean() for yi in y]) + d * math.log(2 * dl)
    exact = cdf_pmf(mix, x, num_levels)
    print(num_levels, "ODE", est.log_likelihood.tolist(), "+-", est.stderr.tolist(), "QMC", ref.tolist(),
          "ln P", exact.tolist())
    assert est.nfe.min() > reps  # one solve per repeat
    assert bool(((est.log_likelihood - ref).abs() < 4 * est.stderr + 1e-3 * d).all())
    est_ll, slack = est.log_likelihood, 4 * est.stderr + 1e-3 * d
    assert bool((est_ll <= exact + slack).all())  # the package's number is a bound (up to t_min smoothing)
    # interior pixels: tight; the open edge bins of image 2 hold tail mass that dequantisation cannot see
    assert bool(((exact - est_ll)[:2] < (0.01 if num_levels == 17 else 0.002) * d + slack[:2]).all())
    assert float((exact - est_ll)[2]) > 0.1 + 2 * float(est.stderr[2])


def test_elbo_with_uniform_dequantisation_agrees_with_the_ode():
    """Both estimate E_u ln p(y + delta u) + d ln(2 delta) for a smooth population (up to O(t_min) terms)."""
    means = torch.stack([torch.full((1, 2, 2), -0.3), torch.full((1, 2, 2), 0.4)]).double()
    mix = GaussianMixture(means, [0.3, 0.25], [0.6, 0.4])
    den = mixture_denoiser(mix)
    y = levels_to_model(torch.tensor([[[[3, 5], [6, 8]]], [[[12, 10], [9, 11]]]]), 17)
    ode = ode_log_likelihood(den, y, image_generators(0, range(2)), num_levels=17, num_dequant=8)
    elbo = elbo_log_likelihood(den, y, image_generators(1, range(2)), num_t_samples=256, num_levels=17,
                               dequantization="uniform")
    se = (ode.stderr**2 + elbo.stderr**2).sqrt()
    print("ELBO", elbo.log_likelihood.tolist(), "ODE", ode.log_likelihood.tolist(), "s.e.", se.tolist())
    assert elbo.nfe.tolist() == [256, 256]
    assert bool(((elbo.log_likelihood - ode.log_likelihood).abs() < 3 * se + 0.01).all())
