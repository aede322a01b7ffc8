"""Sampler accuracy at 5/10/20/50 model calls and per-step overhead, on a population with an exact denoiser.

    OMP_NUM_THREADS=1 python benchmarks/samplers.py [--n 8192] [--out table.md] [--explore] [--family vp|flow|edm|ve|all]

The population is a 6-mode isotropic Gaussian mixture in image shape (1, 8, 8) (d = 64) with unequal weights and
widths; its exact denoiser is wrapped as an epsilon-prediction ``MixtureUNet`` on the DDPM linear beta table, so
every scheduler samples from the same model through the same loop (``set_timesteps``, ``scale_model_input``,
model, ``step``) from the same initial noise. The error of a sample set is measured against an independent set
of true draws; the first row ("exact population") is the same measurement made on further true sets, i.e. the
noise floor (mean ± sd over ``--floor-sets`` sets):

* **SW2**: sliced Wasserstein-2 distance (512 random directions).
* **Δw**: mode-weight error, total variation ``0.5 * sum_k |w_hat_k - w_k|`` (%), modes assigned by the
  posterior responsibility at ``t = 1e-4``.
* **Δvar**: per-mode variance error, ``sum_k w_k |var_k / s_k^2 - 1|`` (%), where ``var_k`` is the mean squared
  deviation from ``mu_k`` of the samples assigned to mode k.

The second row ("table limit") is the best any sampler can do with this model: exact draws of z(t_0) at the
table's smallest time, denoised once by yhat(z, t_0). The last column is the wall time of
``scale_model_input`` + ``step`` per model call over ``EulerDiscreteScheduler``'s (median of paired rounds on a
(4, 4, 64, 64) float32 batch, 1 thread). ``--explore`` adds grid variants.

``--family`` puts the same population behind another model family's parametrisation (math.md §"Model families"):
``flow`` (FlowMatchEuler config, shift 3: SD3), ``edm`` (EDMEuler config), ``ve`` (ScoreSdeVe config, sigma_max
100). Each table compares ours (lambda 0, 0.5, 1; order 2; the family's default grid, karras and log_t) with that
family's stock diffusers schedulers: FlowMatchEuler and FlowMatchHeun (and FlowMatchEuler's
``stochastic_sampling``); EDMEuler and EDMDPMSolverMultistep; ScoreSdeVe's predictor-corrector loop (one
corrector per predictor, as ScoreSdeVePipeline runs it).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ScoreSdeVeScheduler,
    UniPCMultistepScheduler,
)

import diffusers_ve  # noqa: E402
from diffusers_ve import process  # noqa: E402
from diffusers_ve.mixture import GaussianMixture, MixtureUNet  # noqa: E402

BUDGETS = (5, 10, 20, 50)
LAMBDAS = (0.0, 0.5, 1.0, 2.0)
T_ASSIGN = 1e-4  # VE time at which samples are assigned to modes


# ------------------------------------------------------------------------------------------ population
def population(seed: int = 0) -> GaussianMixture:
    """Six modes in (1, 8, 8): smooth random means in [-1, 1], widths 0.05..0.4, weights 0.05..0.3."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((6, 1, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    means = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=True)
    stds = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4]
    weights = [0.3, 0.05, 0.2, 0.1, 0.15, 0.2]
    return GaussianMixture(means, stds, weights)


class CountingModel(torch.nn.Module):
    """Counts the model calls of a sampling run."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x, timestep):
        self.calls += 1
        return self.model(x, torch.as_tensor(timestep).float()).sample


# ---------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Sample-set errors against the population (see the module docstring)."""

    def __init__(self, mix: GaussianMixture, n: int, floor_sets: int, seed: int = 1, directions: int = 512):
        self.mix = mix
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn((directions, mix.dim), generator=g, dtype=torch.float64)
        self.dirs = dirs / dirs.norm(dim=1, keepdim=True)
        self.ref = self._sorted_proj(mix.sample(n, generator=g))
        self.floor = [self(mix.sample(n, generator=g)) for _ in range(floor_sets)]

    def _sorted_proj(self, y):
        return (y.reshape(len(y), -1).double() @ self.dirs.T).sort(dim=0).values

    def __call__(self, y: torch.Tensor):
        """(SW2, mode-weight error %, per-mode variance error %) of the sample set ``y`` (VE data space)."""
        y = y.double().reshape(len(y), *self.mix.shape)
        if not bool(torch.isfinite(y).all()):
            return (math.nan,) * 3
        sw2 = ((self._sorted_proj(y) - self.ref) ** 2).mean().sqrt().item()
        k = self.mix.responsibilities(y, T_ASSIGN).argmax(1)
        w = self.mix.weights
        w_hat = torch.bincount(k, minlength=len(w)).double() / len(k)
        dw = 0.5 * (w_hat - w).abs().sum().item() * 100
        dev = ((y - self.mix.means[k]) ** 2).reshape(len(y), -1).mean(1)
        var = torch.stack([dev[k == j].mean() if (k == j).any() else torch.tensor(math.inf) for j in range(len(w))])
        dvar = (w * (var / self.mix.stds**2 - 1).abs()).sum().item() * 100
        return sw2, dw, dvar


# --------------------------------------------------------------------------------------------- samplers
@dataclass
class Sampler:
    name: str
    make: Callable[[dict], object]  # DDPM scheduler config -> scheduler


def samplers(explore: bool = False) -> List[Sampler]:
    out = []
    for order in (1, 2):
        for lam in LAMBDAS:
            out.append(Sampler(f"VEScheduler λ={lam:g} order {order}", _ve(reverse_noise=lam, solver_order=order)))
    for lam in (0.0, 1.0):  # the grid that beats DPM-Solver++ 2M Karras on this population (see the docs)
        out.append(Sampler(f"VEScheduler λ={lam:g} order 2 log_t", _ve(reverse_noise=lam, sigma_schedule="log_t")))
    heun = diffusers_ve.VEHeunScheduler
    for lam in (0.0, 1.0):
        out.append(Sampler(f"VEHeunScheduler λ={lam:g}", lambda c, lam=lam: heun.from_config(c, reverse_noise=lam)))
    out += [
        Sampler("DDIM (η=0)", lambda c: DDIMScheduler.from_config(c)),
        Sampler("EulerDiscrete", lambda c: EulerDiscreteScheduler.from_config(c)),
        Sampler("EulerAncestralDiscrete", lambda c: EulerAncestralDiscreteScheduler.from_config(c)),
        Sampler("DPMSolverMultistep 2M Karras", lambda c: DPMSolverMultistepScheduler.from_config(c, use_karras_sigmas=True)),
        Sampler(
            "DPMSolverMultistep sde-dpmsolver++ 2M Karras",
            lambda c: DPMSolverMultistepScheduler.from_config(c, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
        ),
        Sampler("UniPCMultistep", lambda c: UniPCMultistepScheduler.from_config(c)),
    ]
    if explore:
        out += explore_samplers()
    return out


def _ve(**kw):
    return lambda c: diffusers_ve.VEScheduler.from_config(c, **kw)


def explore_samplers() -> List[Sampler]:
    """Grid and order variants (``--explore``): what would beat the defaults, measured in the same run."""
    dpm = DPMSolverMultistepScheduler
    out = [
        Sampler("DPMSolverMultistep 3M Karras", lambda c: dpm.from_config(c, use_karras_sigmas=True, solver_order=3)),
        Sampler("DPMSolverMultistep 2M lu_lambdas", lambda c: dpm.from_config(c, use_lu_lambdas=True)),
        Sampler("DPMSolverMultistep sde-dpmsolver++ lu_lambdas",
                lambda c: dpm.from_config(c, use_lu_lambdas=True, algorithm_type="sde-dpmsolver++")),
    ]
    for lam in (0.5, 2.0):
        out.append(Sampler(f"VE λ={lam:g} o2 log_t", _ve(reverse_noise=lam, sigma_schedule="log_t")))
    for lam in (0.0, 1.0):
        out.append(Sampler(f"VE λ={lam:g} o1 log_t", _ve(reverse_noise=lam, solver_order=1, sigma_schedule="log_t")))
        for rho in (5.0, 10.0, 20.0):
            out.append(Sampler(f"VE λ={lam:g} o2 karras ρ={rho:g}", _ve(reverse_noise=lam, rho=rho)))
        out.append(Sampler(f"VE λ={lam:g} o2 karras t_max=6400", _ve(reverse_noise=lam, t_max=6400.0)))
        out.append(Sampler(f"VE λ={lam:g} o2 log_t t_min=4e-4", _ve(reverse_noise=lam, sigma_schedule="log_t", t_min=4e-4)))
        out.append(Sampler(f"VEHeun λ={lam:g} log_t", lambda c, lam=lam: diffusers_ve.VEHeunScheduler.from_config(
            c, reverse_noise=lam, sigma_schedule="log_t")))
    return out


FAMILY_CONFIGS = {
    "vp": lambda: DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).config,
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0).config,
    "edm": lambda: EDMEulerScheduler().config,
    "ve": lambda: ScoreSdeVeScheduler(sigma_max=100.0).config,
}


def family_samplers(family: str) -> List[Sampler]:
    """Ours on each grid beside the family's stock diffusers schedulers (see the module docstring)."""
    default = {"flow": "flow"}.get(family, "karras")
    out = []
    for grid in dict.fromkeys((default, "karras", "log_t")):
        for lam in (0.0, 0.5, 1.0):
            out.append(Sampler(f"VEScheduler λ={lam:g} order 2 {grid}", _ve(reverse_noise=lam, sigma_schedule=grid)))
    if family == "flow":
        out += [Sampler("FlowMatchEulerDiscrete", lambda c: FlowMatchEulerDiscreteScheduler.from_config(c)),
                Sampler("FlowMatchHeunDiscrete", lambda c: FlowMatchHeunDiscreteScheduler.from_config(c))]
        if "stochastic_sampling" in inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters:
            out.append(Sampler("FlowMatchEulerDiscrete stochastic_sampling",
                               lambda c: FlowMatchEulerDiscreteScheduler.from_config(c, stochastic_sampling=True)))
    elif family == "edm":
        out += [Sampler("EDMEuler", lambda c: EDMEulerScheduler.from_config(c)),
                Sampler("EDMDPMSolverMultistep 2M", lambda c: EDMDPMSolverMultistepScheduler.from_config(c))]
    elif family == "ve":
        out.append(Sampler("ScoreSdeVe predictor-corrector", lambda c: ScoreSdeVeLoop(c)))
    return out


class ScoreSdeVeLoop:
    """ScoreSdeVePipeline's loop (``correct_steps`` Langevin corrections, then a predictor) as a scheduler-shaped
    object: ``timesteps`` holds one entry per model call, the model's timestep being sigma, as that pipeline
    passes it. diffusers' ScoreSdeVeScheduler has no ``step`` (huggingface/diffusers#1642)."""

    def __init__(self, config):
        self.inner = ScoreSdeVeScheduler.from_config(config)
        self.per_step = 1 + self.inner.config.correct_steps

    @property
    def init_noise_sigma(self):
        return self.inner.init_noise_sigma

    def set_timesteps(self, n):
        self.inner.set_timesteps(n)
        self.inner.set_sigmas(n)
        self.timesteps = self.inner.sigmas.repeat_interleave(self.per_step)
        self._calls, self._mean = 0, None

    def scale_model_input(self, x, t):
        return x

    def step(self, out, t, x, generator=None):
        i, k = divmod(self._calls, self.per_step)
        self._calls += 1
        if k < self.per_step - 1:
            return self.inner.step_correct(out, x, generator=generator)
        res = self.inner.step_pred(out, self.inner.timesteps[i], x, generator=generator)
        last = self._calls == len(self.timesteps)
        return type(res)(prev_sample=res.prev_sample_mean if last else res.prev_sample,
                         prev_sample_mean=res.prev_sample_mean)


def steps_for_budget(scheduler, budget: int) -> int:
    """The most inference steps whose schedule needs at most ``budget`` model calls (Heun-type: 2 per step)."""
    for n in range(budget, 0, -1):
        scheduler.set_timesteps(n)
        if len(scheduler.timesteps) <= budget:
            return n
    raise ValueError(f"no schedule fits {budget} model calls")


def sample(scheduler, steps: int, model, x_init: torch.Tensor, seed: int):
    """One sampling run through the standard pipeline loop; returns (samples, model calls, step seconds per call)."""
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(steps)
    x = x_init * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch schedulers have none: they start at 1
    calls, spent = 0, 0.0
    for t in scheduler.timesteps:
        t0 = time.perf_counter()
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        spent += time.perf_counter() - t0
        out = model(inp, t)
        calls += 1
        t0 = time.perf_counter()
        x = scheduler.step(out, t, x, **kw).prev_sample
        spent += time.perf_counter() - t0
    return x, calls, spent / max(calls, 1)


def overhead_ratio(make, config, steps: int = 20, rounds: int = 7, shape=(4, 4, 64, 64)) -> tuple:
    """Per-call ``scale_model_input`` + ``step`` time over ``EulerDiscreteScheduler``'s (median of paired rounds).

    Each round times the scheduler and Euler back to back on a latent-sized batch with a free stand-in model, so
    the ratio survives the load of a shared machine. Returns (ratio, Euler's seconds per call).
    """
    model = lambda x, t: 0.5 * x  # noqa: E731  (the model's cost is not what is timed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    euler = lambda c: EulerDiscreteScheduler.from_config(c)  # noqa: E731
    ratios, base = [], []
    for _ in range(rounds):
        mine = sample(make(config), steps, model, x, 0)[2]
        ref = sample(euler(config), steps, model, x, 0)[2]
        ratios.append(mine / ref)
        base.append(ref)
    return sorted(ratios)[rounds // 2], sorted(base)[rounds // 2]


# ------------------------------------------------------------------------------------------------- table
def fmt(m) -> str:
    return f"{m[0]:.3f} · {m[1]:.1f} · {m[2]:.1f}"


def reference_rows(metrics: Metrics, t0: float, budgets, seed: int) -> List[str]:
    """Table head, the noise floor (true sets, mean ± sd) and the table limit (exact z(t0) -> yhat(z, t0))."""
    floor = torch.tensor(metrics.floor)
    mu, sd = floor.mean(0).tolist(), floor.std(0).tolist()
    floor_cell = f"{mu[0]:.3f}±{sd[0]:.3f} · {mu[1]:.1f}±{sd[1]:.1f} · {mu[2]:.1f}±{sd[2]:.1f}"
    mix, n = metrics.mix, len(metrics.ref)
    z0 = mix.sample(n, t=t0, generator=torch.Generator().manual_seed(seed + 4))
    limit_cell = fmt(metrics(mix.yhat(z0, t0)))
    return [
        "| sampler | " + " | ".join(f"{b} calls" for b in budgets) + " | step overhead (× Euler) |",
        "|" + "---|" * (len(budgets) + 2),
        "| exact population (noise floor) | " + " | ".join([floor_cell] * len(budgets)) + " | |",
        "| exact z(t_min) → yhat (table limit) | " + " | ".join([limit_cell] * len(budgets)) + " | |",
    ]


def run(n: int = 8192, floor_sets: int = 4, explore: bool = False, budgets=BUDGETS, seed: int = 0,
        family: str = "vp") -> str:
    torch.set_num_threads(1)
    mix = population(seed)
    config = FAMILY_CONFIGS[family]()
    model = CountingModel(MixtureUNet.from_mixture(mix, config))
    metrics = Metrics(mix, n, floor_sets, seed=seed + 1)
    x_init = torch.randn((n, *mix.shape), generator=torch.Generator().manual_seed(seed + 2))

    rows = reference_rows(metrics, process.model_family(config).t_min, budgets, seed)
    timing, base = {}, 0.0
    results = []
    for spec in samplers(explore) if family == "vp" else family_samplers(family):
        cells = []
        for b in budgets:
            sched = spec.make(config)
            steps = steps_for_budget(sched, b)
            model.calls = 0
            y, calls, _ = sample(sched, steps, model, x_init, seed + 3)
            assert calls == model.calls
            cells.append(fmt(metrics(y)) + ("" if calls == b else f" ({calls})"))
        if family == "vp":
            timing[spec.name], base = overhead_ratio(spec.make, config)
        results.append((spec.name, cells))
        print(f"  {spec.name}: " + " | ".join(cells), flush=True)
    for name, cells in results:
        rows.append(f"| {name} | " + " | ".join(cells) + (f" | {timing[name]:.2f} |" if name in timing else " | |"))
    note = (
        f"\nFamily {family} ({process.model_family(config)!r}). Cells: SW2 · Δw (%) · Δvar (%); lower is better, "
        f"the first row is the noise floor. d = {mix.dim}, {len(mix.weights)} modes, {n} samples, the exact "
        "denoiser in the family's parametrisation, float32 sampling. A number in parentheses is the model calls "
        "actually used when they differ from the budget."
        + (" Step overhead: scale_model_input + step per model call over EulerDiscreteScheduler's, median of 7 "
           f"paired rounds on a (4, 4, 64, 64) float32 batch (Euler: {base * 1e3:.2f} ms per call)." if timing else "")
        + "\n"
    )
    return "\n".join(rows) + "\n" + note


def main(argv: Optional[list] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192, help="samples per set")
    p.add_argument("--floor-sets", type=int, default=4, help="independent true sets for the noise floor")
    p.add_argument("--explore", action="store_true", help="add grid variants")
    p.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="model-call budgets")
    p.add_argument("--family", choices=[*FAMILY_CONFIGS, "all"], default="vp",
                   help="the model family the population is parametrised in (default: vp, the DDPM table)")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    t0 = time.time()
    families = list(FAMILY_CONFIGS) if args.family == "all" else [args.family]
    table = "\n".join(run(args.n, args.floor_sets, args.explore, tuple(args.budgets), family=f) for f in families)
    print(table)
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
