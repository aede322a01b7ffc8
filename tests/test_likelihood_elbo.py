"""The ELBO (McAllester's VAE expression) against closed-form Gaussian-mixture ground truth (math.md §"The likelihood (ELBO)")."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import norm, qmc

from diffusers_ve.denoiser import Denoiser
from diffusers_ve.likelihood import elbo_log_likelihood, image_generators, make_prior, prior_log_prob
from diffusers_ve.likelihood.elbo import _control_integral, control_weight, radial_antithesis, stratified_stderr

from .gmm import GaussianMixture, MixtureUNet, image_mixture


def mixture_denoiser(mix, prediction_type="epsilon", **table):
    sch = DDPMScheduler(prediction_type=prediction_type, **table)
    return Denoiser.from_scheduler(MixtureUNet.from_mixture(mix, sch.config).double(), sch)


def qmc_normal(n, shape, seed=0):
    d = int(math.prod(shape))
    u = qmc.Sobol(d, scramble=True, seed=seed).random(n)
    return torch.as_tensor(norm.ppf(u)).reshape(n, *shape)


def l_star(mix, y, t_min, t_max, prior, n=4096):
    """``L* = E ln p_tmin(y + sqrt(t_min) eps) - Dprior(y, T)`` per image, by QMC over eps; also
    ``E ln p_tmin(...) - ln pop(y)`` (the t_min error, math.md §"The continuous ELBO")."""
    eps = qmc_normal(n, mix.shape)
    out, gap = [], []
    for yi in y.double():
        smooth = mix.log_prob(yi + math.sqrt(t_min) * eps, t_min).mean()
        z = yi + math.sqrt(t_max) * eps
        out.append(smooth - (mix.log_prob(z, t_max) - prior_log_prob(z, prior)).mean())
        gap.append(smooth - mix.log_prob(yi[None], 0.0)[0])
    return torch.stack(out), torch.stack(gap)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_elbo_with_exact_denoiser_is_tight_to_L_star(prediction_type):
    mix = image_mixture((1, 4, 4))
    den = mixture_denoiser(mix, prediction_type)
    y = mix.sample(8, generator=torch.Generator().manual_seed(3))
    est = elbo_log_likelihood(den, y, image_generators(7, range(8)), num_t_samples=64)
    prior = make_prior("vp", den.axis.t_max)
    ref, _ = l_star(mix, y, den.axis.t_min, den.axis.t_max, prior)
    mean_err = float((est.log_likelihood - ref).mean())
    mean_se = float(est.stderr.pow(2).sum().sqrt()) / len(y)
    print(f"{prediction_type}: mean (ELBO - L*) = {mean_err:+.4f} nats, s.e. {mean_se:.4f}")
    assert est.nfe.tolist() == [64] * 8
    assert bool((est.stderr > 0).all())
    assert abs(mean_err) < 3 * mean_se
    assert bool(((est.log_likelihood - ref).abs() < 5 * est.stderr).all())


def test_t_min_gap_follows_first_order_formula():
    """L* is not ln pop: E ln p_tmin(y + sqrt(t_min) eps) - ln pop(y) = (t_min/2)(2 Lap ln pop + |grad ln pop|^2)."""
    mix = image_mixture((1, 2, 2))
    y = mix.sample(4, generator=torch.Generator().manual_seed(0))
    t_min, t_max = 1e-4, 2.4777e4
    prior = make_prior("vp", t_max)
    ref, gap = l_star(mix, y, t_min, t_max, prior, n=2**14)
    first = []
    for yi in y:  # ln pop written out here (cdist in the package's log_prob has no second derivative)
        def log_pop(x):
            mu, s2 = mix.means.reshape(3, -1), mix.stds**2
            return torch.logsumexp(mix.weights.log() - 2 * torch.log(2 * math.pi * s2)
                                   - ((x.reshape(1, -1) - mu) ** 2).sum(1) / (2 * s2), 0)
        x = yi.flatten()
        g = torch.func.grad(log_pop)(x)
        lap = torch.func.hessian(log_pop)(x).diagonal().sum()
        first.append(0.5 * t_min * (2 * lap + g.pow(2).sum()))
    first = torch.stack(first)
    print("L* - ln pop:", (ref - torch.stack([mix.log_prob(yi[None], 0.0)[0] for yi in y])).tolist())
    print("E ln p_tmin - ln pop:", gap.tolist(), "first order:", first.tolist())
    assert torch.allclose(gap, first, rtol=0.1, atol=2e-3)


def test_stderr_is_calibrated_and_variance_reduction_works():
    mix = image_mixture((1, 4, 4))
    den = mixture_denoiser(mix)
    y = mix.sample(4, generator=torch.Generator().manual_seed(1))
    runs = [elbo_log_likelihood(den, y, image_generators(s, range(4)), num_t_samples=64) for s in range(24)]
    ll, se = torch.stack([r.log_likelihood for r in runs]), torch.stack([r.stderr for r in runs])
    ratio = ll.std(0) / se.mean(0)
    plain = torch.stack([elbo_log_likelihood(den, y, image_generators(s, range(4)), num_t_samples=64,
                                             control_variate=False).log_likelihood for s in range(24)])
    print("std / mean s.e. per image:", ratio.tolist(), "std with / without control:",
          ll.std(0).mean().item(), plain.std(0).mean().item())
    assert bool(((ratio > 0.5) & (ratio < 1.6)).all())
    assert ll.std(0).mean() < 0.95 * plain.std(0).mean()


def test_single_gaussian_elbo_is_exact_in_expectation():
    """One Gaussian N(mu, s^2 I): L* in closed form; 256 calls pin it to 0.02 nats/dim."""
    d, s2 = 16, 0.04
    mu = torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64)
    mix = GaussianMixture(mu, [math.sqrt(s2)])
    den = mixture_denoiser(mix)
    y = mix.sample(8, generator=torch.Generator().manual_seed(2))
    lo, hi, p = den.axis.t_min, den.axis.t_max, 1 + den.axis.t_max  # prior N(0, (1+T) I); p_T = N(mu, s2 + T)
    r2, y2 = ((y - mu) ** 2).flatten(1).sum(1), (y**2).flatten(1).sum(1)
    smooth = -0.5 * d * math.log(2 * math.pi * (s2 + lo)) - (r2 + d * lo) / (2 * (s2 + lo))
    e_log_pt = -0.5 * d * math.log(2 * math.pi * (s2 + hi)) - (r2 + d * hi) / (2 * (s2 + hi))
    e_log_prior = -0.5 * d * math.log(2 * math.pi * p) - (y2 + d * hi) / (2 * p)
    ref = smooth - (e_log_pt - e_log_prior)
    est = elbo_log_likelihood(den, y, image_generators(0, range(8)), num_t_samples=256)
    se = float(est.stderr.pow(2).sum().sqrt()) / 8
    assert abs(float((est.log_likelihood - ref).mean())) < 3 * se
    assert float(est.stderr.max()) < 0.02 * d


def test_control_integral_and_antithesis():
    edges = torch.linspace(math.log(1e-4), math.log(1e3), 5, dtype=torch.float64)
    grid = torch.tensor([0.0, 1e-3, 0.5], dtype=torch.float64)
    exact = _control_integral(edges, grid)
    u = torch.linspace(0, 1, 20001, dtype=torch.float64)
    for j in range(4):
        lu = edges[j] + u * (edges[j + 1] - edges[j])
        vals = control_weight(lu.exp()[:, None], grid)
        quad = torch.trapezoid(vals, lu, dim=0)
        assert torch.allclose(exact[j], quad, rtol=1e-6, atol=1e-9)
    eps = torch.randn(1, 20000, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    anti = radial_antithesis(eps)
    r2, r2a = eps.flatten(2).pow(2).sum(-1), anti.flatten(2).pow(2).sum(-1)
    assert abs(float(r2a.mean()) - 9) < 0.1 and abs(float(r2a.var()) - 18) < 1.0  # chi-square(9) again
    assert float((0.5 * (r2 + r2a)).std()) < 0.25 * float(r2.std())  # the pair nearly fixes the radius
    cos = (eps * anti).flatten(2).sum(-1) / (r2 * r2a).sqrt()
    assert torch.allclose(cos, -torch.ones_like(cos))


def test_stratified_stderr_of_independent_draws():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2000, 32, generator=g, dtype=torch.float64) * 2.0 + torch.linspace(0, 50, 32, dtype=torch.float64)
    se = stratified_stderr(v)
    assert abs(float(se.mean()) - 2.0 / math.sqrt(32)) < 0.02  # blind to the linear trend
    assert torch.isnan(stratified_stderr(v[:, :1])).all()


def quantised_digits(n=4, num_levels=256):
    """Digits-mixture draws (d = 64) rounded onto the 8-bit grid, with the exact denoiser."""
    from diffusers_ve.likelihood.discrete import levels_to_model
    from diffusers_ve.mixture import digits_mixture

    mix = digits_mixture()
    y = mix.sample(n, generator=torch.Generator().manual_seed(1))
    x = ((y + 1) * (num_levels - 1) / 2).round().clamp(0, num_levels - 1).long()
    return mixture_denoiser(mix), levels_to_model(x, num_levels)


def test_stderr_counts_the_decoder_draws_at_256_levels():
    """At 8 bits the discretised decoder is the largest noise source: the reported s.e. must include it.

    Measured: spread over 40 seeds / mean reported s.e. = 0.88-0.97 per image (it was about 3.4 when the single
    decoder draw was left out of the s.e.)."""
    den, y = quantised_digits()
    runs = [elbo_log_likelihood(den, y, image_generators(s, range(4)), num_t_samples=64, num_levels=256)
            for s in range(40)]
    ll, se = torch.stack([r.log_likelihood for r in runs]), torch.stack([r.stderr for r in runs])
    ratio = ll.std(0) / se.mean(0)
    print("spread over seeds / mean s.e.:", ratio.tolist())
    assert bool(((ratio > 0.6) & (ratio < 1.5)).all()) and 0.7 < float(ratio.mean()) < 1.3
    assert runs[0].nfe.tolist() == [64 + 8] * 4 and runs[0].protocol["num_decoder_samples"] == 8
    one = elbo_log_likelihood(den, y, image_generators(0, range(4)), num_t_samples=64, num_levels=256,
                              num_decoder_samples=1)
    assert bool(torch.isnan(one.stderr).all()) and one.nfe.tolist() == [65] * 4  # unknown, never a false 0
    with pytest.raises(ValueError, match="num_decoder_samples"):
        elbo_log_likelihood(den, y, image_generators(0, range(4)), num_levels=256, num_decoder_samples=0)


def test_memory_follows_batch_size(monkeypatch):
    """No (B*K, d) tensor: images go through in groups of batch_size // K, with unchanged values."""
    from diffusers_ve import process

    den, y = quantised_digits(n=6)
    ref = elbo_log_likelihood(den, y, image_generators(2, range(6)), num_t_samples=16, num_levels=256)
    rows, noisy = [], process.noisy
    monkeypatch.setattr(process, "noisy", lambda yy, ee, t: rows.append(len(yy)) or noisy(yy, ee, t))
    got = elbo_log_likelihood(den, y, image_generators(2, range(6)), num_t_samples=16, num_levels=256,
                              batch_size=32)
    print("rows per noisy():", rows)
    assert max(rows) <= 32 and sum(rows) == 6 * (16 + 8)
    assert torch.allclose(got.log_likelihood, ref.log_likelihood, rtol=0, atol=1e-9)
    assert torch.allclose(got.stderr, ref.stderr, rtol=0, atol=1e-9)
