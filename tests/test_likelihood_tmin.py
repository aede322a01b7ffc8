"""The ELBO for n-level data: the default t_min (quantisation rule) is near the tightest, every t_min is a valid
bound against the exact discrete log-likelihood, and the named terms add up (the likelihood guide)."""

import math

import torch
from diffusers import DDPMScheduler

from diffusers_ve.denoiser import Denoiser
from diffusers_ve.likelihood import elbo_log_likelihood, image_generators, prior_kl, quantisation_t_min
from diffusers_ve.likelihood.discrete import _log_diff_ndtr, half_width, levels_to_model
from diffusers_ve.likelihood.prior import make_prior
from diffusers_ve.mixture import MixtureUNet, digits_mixture

from .gmm import GaussianMixture

LN2 = math.log(2)


def denoiser_of(mix):
    sch = DDPMScheduler()
    return Denoiser.from_scheduler(MixtureUNet.from_mixture(mix, sch.config).double(), sch)


def quantised_sample(mix, n, num_levels, seed):
    y = mix.sample(n, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    return levels_to_model(((y + 1) * (num_levels - 1) / 2).round(), num_levels)


def exact_discrete_log_prob(mix, y, num_levels):
    """ln Q(x) of the mixture integrated over each pixel's bin (edge bins open), per image."""
    dl, yf = half_width(num_levels), y.reshape(len(y), -1)
    mu, s = mix.means.reshape(len(mix.weights), -1), mix.stds[None, :, None]
    lo = torch.where(yf <= -1 + dl / 2, -math.inf, yf - dl)[:, None]
    hi = torch.where(yf >= 1 - dl / 2, math.inf, yf + dl)[:, None]
    return torch.logsumexp(mix.weights.log() + _log_diff_ndtr((lo - mu) / s, (hi - mu) / s).sum(-1), 1)


def test_default_t_min_is_near_the_tightest_and_every_t_min_is_a_bound():
    """17-level digits mixture (d = 64): a sweep of t_min with common random numbers."""
    mix, n = digits_mixture(), 17
    den, y = denoiser_of(mix), quantised_sample(digits_mixture(), 16, n, seed=3)
    d, delta2 = 64, half_width(n) ** 2
    exact = float(-exact_discrete_log_prob(mix, y, n).mean() / (d * LN2))

    def bpd(t_min=None):
        est = elbo_log_likelihood(den, y, image_generators(0, range(len(y))), num_t_samples=64, num_levels=n,
                                  t_min=t_min)
        return float(-est.log_likelihood.mean() / (d * LN2)), float(est.stderr.pow(2).mean().sqrt() / (d * LN2))

    sweep = {c: bpd(max(c * delta2, den.family.t_min)) for c in (1 / 16, 1 / 8, 1 / 4, 0.35, 0.5, 0.7, 1, 1.4, 2, 4)}
    default, se = bpd()
    print("exact", exact, "default", default, {c: round(v[0], 4) for c, v in sweep.items()})
    assert default == bpd(quantisation_t_min(n))[0]  # the rule is the default
    assert default <= min(v[0] for v in sweep.values()) + 0.01
    for value, se_c in [*sweep.values(), (default, se)]:
        assert value >= exact - 3 * se_c / math.sqrt(len(y))  # a valid bound at every t_min
    assert sweep[1 / 16][0] > default + 0.5  # the table's end (today's t_min) is far looser


def test_terms_add_up_with_their_signs_and_limits():
    mix, n = digits_mixture(), 17
    den, y = denoiser_of(mix), quantised_sample(mix, 4, n, seed=5)
    gens = lambda: image_generators(1, range(4))  # noqa: E731
    est = elbo_log_likelihood(den, y, gens(), num_t_samples=32, num_levels=n)
    terms = est.extras["terms"]
    assert list(terms) == ["prior", "diffusion", "decoder"]
    assert torch.allclose(-(terms["prior"] + terms["diffusion"] + terms["decoder"]), est.log_likelihood, rtol=1e-12)
    hi = den.family.t_max
    assert torch.allclose(terms["prior"], prior_kl(y, hi, make_prior("vp", hi)), rtol=1e-12)  # exact, >= 0
    assert bool((terms["prior"] >= 0).all()) and bool((terms["prior"] < 1e-3).all())  # T = 2.5e4: nearly 0
    assert bool((terms["diffusion"] > 0).all()) and bool((terms["decoder"] > 0).all())
    late = elbo_log_likelihood(den, y, gens(), num_t_samples=32, num_levels=n, t_min=hi / 2).extras["terms"]
    assert bool((late["diffusion"].abs() < 1e-3 * terms["diffusion"]).all())  # nothing left to integrate
    atoms = GaussianMixture(y[:3], [0.0, 0.0, 0.0])  # a population on the grid: the decoder costs nothing
    den_atoms = denoiser_of(atoms)
    sharp = elbo_log_likelihood(den_atoms, y[:3], image_generators(1, range(3)), num_t_samples=32, num_levels=n,
                                t_min=den_atoms.family.t_min).extras["terms"]["decoder"]
    assert bool((sharp.abs() < 1e-6).all())  # nats per image, at sqrt(t_min) = delta / 6
