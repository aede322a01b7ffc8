"""Likelihood estimators against exact answers: bias, per-image noise and model calls, in one table.

    OMP_NUM_THREADS=1 python benchmarks/likelihood.py [--images 32] [--seeds 8] [--out table.md]
    OMP_NUM_THREADS=1 python benchmarks/likelihood.py --trained ve-digits [ve-digits-v ...] [--ode-images 8]

The population is the 10-mode digits mixture (``diffusers_ve.mixture.digits_mixture``: class means of
scikit-learn's digits in [-1, 1], mode std 0.05, d = 64), whose exact denoiser is wrapped as an epsilon
``MixtureUNet`` on the DDPM linear table (t_min = 1.0e-4, T = 2.48e4). ``--images`` test points are drawn from
it; every estimator is run ``--seeds`` times on each (deterministic ones once).

* **reference**: for the ELBO, ``L* = E_eps ln p_tmin(y + sqrt(t_min) eps) - Dprior(y, T)`` (QMC, same prior);
  for an ODE, ``ln p_tmin(y) + ln p_prior(z(T)) - ln p_T(z(T))``: the exact density of the ODE model with that
  prior, at the solver's own latent.
* **bias**: mean over images and seeds of estimate - reference, bits/dim (± its standard error).
* **std/img**: per-image standard deviation over seeds (the noise of one evaluation), bits/dim.
* **max|err|**: largest |estimate - reference| of a single evaluation, bits/dim.
* **gap**: reference - ln pop(y), bits/dim: what finite t_min (and the prior) leave between the estimand and
  the population's own density; not an error of the estimator.

**k-diffusion's protocol** (``k_diffusion.sampling.log_likelihood``) is *reimplemented here*, not imported
(k-diffusion pulls in torchvision, which breaks this venv): torchdiffeq's ``dopri5`` in sigma from sigma_min to
sigma_max with ``atol = rtol``, one Rademacher probe fixed along the path, prior ``N(0, sigma_max^2 I)``,
calls counted as ODE-function evaluations. It runs one image per solve, so its calls are per image. The rows
"k-diffusion solver, exact trace" replace its probe by the exact divergence to isolate the solver's error.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from scipy.stats import norm, qmc  # noqa: E402

from diffusers_ve.denoiser import Denoiser  # noqa: E402
from diffusers_ve.likelihood import (  # noqa: E402
    LikelihoodOptions, elbo_log_likelihood, image_generators, make_prior, ode_log_likelihood, prior_log_prob,
)
from diffusers_ve.mixture import MixtureUNet, digits_mixture  # noqa: E402

LN2 = math.log(2)


def k_diffusion_log_likelihood(den, y, sigma_min, sigma_max, tol, generator, exact=False):
    """k-diffusion's ``log_likelihood`` protocol for one image (see the module docstring); ``exact=True``
    swaps its probe for the exact divergence, to measure its solver alone."""
    from torchdiffeq import odeint

    v = torch.randint(0, 2, y.shape, generator=generator).to(y) * 2 - 1
    calls = 0

    def ode_fn(sigma, state):
        nonlocal calls
        with torch.enable_grad():
            x = state[0].detach().requires_grad_()
            d = (x - den(x, (sigma**2).reshape(1).expand(len(x)))) / sigma
            calls += 1
            if exact:
                n = x[0].numel()
                basis = torch.eye(n, dtype=x.dtype).reshape(n, 1, *x.shape[1:])
                grads = torch.autograd.grad(d, x, basis, is_grads_batched=True)[0]
                return d.detach(), (grads * basis).flatten(1).sum(1, keepdim=True).sum(0)
            grad = torch.autograd.grad((d * v).sum(), x)[0]
        return d.detach(), (v * grad).flatten(1).sum(1)

    sol = odeint(ode_fn, (y, y.new_zeros(len(y))), y.new_tensor([sigma_min, sigma_max]), atol=tol, rtol=tol,
                 method="dopri5")
    latent, delta = sol[0][-1], sol[1][-1]
    prior = torch.distributions.Normal(0.0, sigma_max).log_prob(latent).flatten(1).sum(1)
    return prior + delta, latent, calls


def l_star(mix, y, lo, hi, prior, n=4096):
    d = mix.dim
    eps = torch.as_tensor(norm.ppf(qmc.Sobol(d, seed=0).random(n))).reshape(n, *mix.shape)
    out = []
    for yi in y:
        z = yi + math.sqrt(hi) * eps
        out.append(mix.log_prob(yi + math.sqrt(lo) * eps, lo).mean()
                   - (mix.log_prob(z, hi) - prior_log_prob(z, prior)).mean())
    return torch.stack(out)


def row(name, calls, est, ref, ln_pop, d):
    """est, ref: (S, N) nats -> a table row in bits/dim."""
    err = (est - ref) / (d * LN2)
    s, n = err.shape
    bias_se = float(err.mean(1).std() / math.sqrt(s)) if s > 1 else float(err.mean(0).std() / math.sqrt(n))
    std = float(est.std(0).mean() / (d * LN2)) if s > 1 else 0.0
    gap = float((ref - ln_pop).mean() / (d * LN2))
    return (name, calls, f"{float(err.mean()):+.4f} ± {bias_se:.4f}", f"{std:.4f}", f"{float(err.abs().max()):.4f}",
            f"{gap:+.4f}")


def digits_split():
    """The training script's digits split: (train, held-out) images in [-1, 1], 17 levels."""
    from diffusers_ve import data as ve_data

    x = ve_data.load_digits_images(8, "pad").double()
    train, held = ve_data.split_indices(len(x), 0.1, seed=0, min_held=8)
    return x[train], x[held]


def baseline_rows(train, held, n=17):
    """Per-pixel categorical (add-one counts on the training split) and sklearn's GaussianMixture (4 full-covariance
    components, fitted on uniformly dequantised training images; one dequantisation draw per held-out image)."""
    from sklearn.mixture import GaussianMixture as SkGMM

    d, delta = held[0].numel(), 1.0 / (n - 1)
    lv = lambda y: ((y.flatten(1) + 1) * (n - 1) / 2).round().long()  # noqa: E731
    counts = torch.nn.functional.one_hot(lv(train), n).sum(0).double() + 1.0  # (d, n)
    logp = (counts / counts.sum(1, keepdim=True)).log()
    cat = -logp.gather(1, lv(held).T).sum(0) / (d * LN2)
    g = torch.Generator().manual_seed(0)
    deq = lambda y: (y.flatten(1) + delta * (torch.rand(y.flatten(1).shape, generator=g, dtype=torch.float64) * 2 - 1))  # noqa: E731
    gmm = SkGMM(4, covariance_type="full", random_state=0).fit(deq(train).numpy())
    ll = torch.as_tensor(gmm.score_samples(deq(held).numpy())) + d * math.log(2 * delta)
    se = lambda v: float(v.std() / math.sqrt(len(v)))  # noqa: E731
    return [("per-pixel categorical (17 levels, train split)", "-", f"{float(cat.mean()):.3f} ± {se(cat):.3f}", "-"),
            ("sklearn GaussianMixture, 4 full, uniform dequantisation", "-",
             f"{float(-ll.mean() / (d * LN2)):.3f} ± {se(-ll / (d * LN2)):.3f}", "-")]


def trained_rows(path, held, ode_images):
    """ELBO (default, K = 16, 64, 256) on all held-out images; ODE (default, 1e-6) and k-diffusion's protocol on the
    first ``ode_images``: (estimator, calls/img, bits/dim ± s.e. over images, seconds/img)."""
    from diffusers_ve.likelihood import mean_bits_per_dim
    from diffusers_ve.pipelines.pipeline_ve_likelihood import VELikelihoodPipeline

    pipe = VELikelihoodPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    name, rows = os.path.basename(os.path.normpath(path)), []

    def add(label, y, **kw):
        t0 = time.time()
        out = pipe(y, num_levels=17, generator=torch.Generator().manual_seed(0), **kw)
        mean, _, spread = mean_bits_per_dim(out.bits_per_dim, out.stderr_bits_per_dim)
        rows.append((f"{name}: {label}", f"{float(out.nfe.double().mean()):.0f}", f"{mean:.3f} ± {spread:.3f}",
                     f"{(time.time() - t0) / len(y):.2f}"))
        return out

    for k in (16, 64, 256):
        add(f"ELBO, K={k}{' (default)' if k == 64 else ''}, t_min rule", held, num_t_samples=k)
    add("ELBO, K=64, t_min = table end (1e-4, the old default)", held, t_min=pipe.denoiser().family.t_min)
    sub = held[:ode_images]
    add(f"ELBO, K=64 (the ODE's {len(sub)} images)", sub)
    add("ODE, default tolerance", sub, method="ode")
    add("ODE, tol 1e-6 (reference)", sub, method="ode", rtol=1e-6, atol=1e-6)
    den, delta, d = pipe.denoiser(), 1.0 / 16, sub[0].numel()
    t0, ll, calls = time.time(), [], []
    for i, yi in enumerate(sub):
        g = torch.Generator().manual_seed(i)
        u = torch.rand(yi.shape, generator=g, dtype=torch.float64) * 2 - 1
        v, _, c = k_diffusion_log_likelihood(den, (yi + delta * u)[None], math.sqrt(den.family.t_min),
                                             math.sqrt(den.family.t_max), 1e-3, g)
        ll.append(float(v[0]) + d * math.log(2 * delta))
        calls.append(c)
    bpd = -torch.tensor(ll) / (d * LN2)
    rows.append((f"{name}: k-diffusion protocol (dopri5 1e-3, 1 probe, uniform dequantisation)",
                 f"{sum(calls) / len(calls):.0f}", f"{float(bpd.mean()):.3f} ± {float(bpd.std() / math.sqrt(len(bpd))):.3f}",
                 f"{(time.time() - t0) / len(sub):.2f}"))
    return rows


def trained_section(paths, ode_images):
    train, held = digits_split()
    rows = baseline_rows(train, held)
    for p in paths:
        rows += trained_rows(p, held, ode_images)
    head = ("held-out digits (17 levels)", "calls/img", "bits/dim ± s.e. over images", "s/img")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--trained", nargs="+", default=None,
                    help="pipeline folders of the main job (digits): print the trained-model table instead")
    ap.add_argument("--ode-images", type=int, default=8, help="held-out images for the ODE rows (--trained)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.trained:
        text = trained_section(a.trained, a.ode_images)
        print(text)
        if a.out:
            with open(a.out, "w") as fh:
                fh.write(text + "\n")
        return
    start = time.time()
    mix = digits_mixture()
    sch = DDPMScheduler()
    den = Denoiser.from_scheduler(MixtureUNet.from_mixture(mix, sch.config).double(), sch)
    lo, hi, d = den.family.t_min, den.family.t_max, mix.dim
    y = mix.sample(a.images, generator=torch.Generator().manual_seed(1234))
    idx, ln_pop = range(a.images), mix.log_prob(y, 0.0)
    rows = []

    vp = make_prior("vp", hi)
    ref = l_star(mix, y, lo, hi, vp)
    for k in (16, 64, 256):
        est = torch.stack([elbo_log_likelihood(den, y, image_generators(s, idx), num_t_samples=k).log_likelihood
                           for s in range(a.seeds)])
        rows.append(row(f"ours ELBO, K={k}", f"{k}", est, ref[None], ln_pop, d))

    def ode_ref(est, prior):
        z_t = est.extras["latent"]
        return mix.log_prob(y, lo) + prior_log_prob(z_t, prior) - mix.log_prob(z_t, hi)

    for tol in (1e-2, 3e-3, 1e-3, 1e-4, 1e-5):
        est = ode_log_likelihood(den, y, image_generators(0, idx), rtol=tol, atol=tol)
        tag = " (default)" if tol == LikelihoodOptions().rtol == LikelihoodOptions().atol else ""
        rows.append(row(f"ours ODE, exact trace, tol {tol:g}{tag}", f"{float(est.nfe.double().mean()):.0f}",
                        est.log_likelihood[None], ode_ref(est, vp)[None], ln_pop, d))
    hut = [ode_log_likelihood(den, y, image_generators(s, idx), trace="hutchinson", num_probes=4)
           for s in range(min(a.seeds, 4))]
    rows.append(row("ours ODE, Hutchinson 4 probes, default tol", f"{float(hut[0].nfe.double().mean()):.0f}",
                    torch.stack([h.log_likelihood for h in hut]), torch.stack([ode_ref(h, vp) for h in hut]),
                    ln_pop, d))

    ve = make_prior("ve", hi)
    for exact, tols, seeds in ((False, (1e-3, 1e-4, 1e-5), min(a.seeds, 4)), (True, (1e-3, 1e-4), 1)):
        for tol in tols:
            ests, refs, calls = [], [], []
            for s in range(seeds):
                e, r = [], []
                for i in idx:
                    ll, lat, c = k_diffusion_log_likelihood(den, y[i:i + 1], math.sqrt(lo), math.sqrt(hi), tol,
                                                            torch.Generator().manual_seed(1000 * s + i), exact)
                    e.append(ll[0])
                    r.append(mix.log_prob(y[i:i + 1], lo)[0] + prior_log_prob(lat, ve)[0]
                             - mix.log_prob(lat, hi)[0])
                    calls.append(c)
                ests.append(torch.stack(e))
                refs.append(torch.stack(r))
            name = "k-diffusion solver, exact trace" if exact else "k-diffusion protocol (1 probe)"
            rows.append(row(f"{name}, tol {tol:g}", f"{sum(calls) / len(calls):.0f}", torch.stack(ests),
                            torch.stack(refs), ln_pop, d))

    head = ("estimator", "calls/img", "bias (bpd)", "std/img (bpd)", "max|err| (bpd)", "gap to ln pop (bpd)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + (f"\n\n{a.images} images x {a.seeds} seeds (Hutchinson and k-diffusion: "
                               f"{min(a.seeds, 4)} seeds), digits mixture d = {d}; {time.time() - start:.0f} s.")
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
