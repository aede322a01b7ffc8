"""Fit a scheduler's grid, and where its reverse noise acts, to a model and a budget (in the spirit of GITS and
Align Your Steps).

Grid: from a few starting noises, a fine-grid solution of the probability-flow ODE is the teacher; the grid of
``num_inference_steps`` points that brings the scheduler's own few-step samples closest to it (mean squared
error, same starting noise) is found by a derivative-free search over the points' positions in ``ln t``.

Window (lambda > 0): a stochastic sample has no path to match, so the teacher is the fine-grid sampler at the
same lambda and the distance is between the two sample sets (the energy distance); the window is searched over
the grid's own steps. The model is called only through the standard pipeline loop (``scale_model_input``,
model, ``step``), so the scheduler's own conversions are the ones in force.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class CalibrationReport:
    """What a calibration found and cost."""

    num_inference_steps: int
    t_grid: list  # the fitted VE times, decreasing (the final t = 0 is implicit)
    error: float  # mean squared distance to the teacher per pixel, fitted grid
    start_error: float  # the same for the grid the search started from
    model_calls: int  # model evaluations of ``num_draws`` images each
    seconds: float
    window: Optional["WindowReport"] = None  # set by :meth:`VEScheduler.calibrate` when it fits the window too


class _Counter:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, tau):
        self.calls += 1
        out = self.model(x, tau.expand(len(x)) if tau.ndim == 0 else tau)
        return getattr(out, "sample", out)


@torch.no_grad()
def _run(scheduler, model, x, steps: int, seed: int) -> torch.Tensor:
    """The pipeline loop from the VP starting noise ``x``."""
    g = torch.Generator(x.device).manual_seed(seed)
    scheduler.set_timesteps(steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    for tau in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, tau), tau), tau, x, generator=g).prev_sample
    return x


def _grid_from_logits(logits: np.ndarray, log_lo: float, log_hi: float) -> list:
    """n decreasing VE times: ``t_hi`` then ``n - 1`` points whose ``ln t`` gaps are a softmax share of the range."""
    w = np.exp(logits - logits.max())
    gaps = w / w.sum() * (log_hi - log_lo)
    return [math.exp(log_hi - g) for g in np.concatenate([[0.0], np.cumsum(gaps)[:-1]])]


def _logits_from_grid(grid: Sequence[float], log_lo: float, log_hi: float) -> np.ndarray:
    """Inverse of :func:`_grid_from_logits` (the remainder down to ``t_lo`` is the last gap)."""
    logs = np.log(np.asarray(grid, dtype=np.float64))
    gaps = np.diff(np.concatenate([[log_hi], logs[1:], [log_lo]])) * -1
    return np.log(np.clip(gaps, 1e-3 * (log_hi - log_lo), None))


def _budget(num_inference_steps) -> int:
    """A fit's budget, checked: one point is the grid's top alone, nothing to fit."""
    n = int(num_inference_steps)
    if n < 2:
        raise ValueError(f"`num_inference_steps` must be an integer >= 2 to calibrate (1 point is t_max); got {num_inference_steps!r}.")
    return n


def _draws(model, sample_shape, num_draws, seed, device, **counts) -> torch.Tensor:
    """The starting noises of a fit, after checking its integer arguments."""
    for name, v in dict(num_draws=num_draws, **counts).items():
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"`{name}` must be an integer >= 1; got {v!r}.")
    if sample_shape is None:
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "sample_size"):
            raise ValueError("pass `sample_shape` (C, H, W): the model has no `config.in_channels`/`sample_size`.")
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
        sample_shape = (cfg.in_channels, *size)
    device = device or getattr(model, "device", "cpu")
    return torch.randn((num_draws, *sample_shape), generator=torch.Generator().manual_seed(seed)).to(device)


def _config(scheduler, **changes) -> dict:
    """The scheduler's config as keyword arguments, with ``changes``."""
    return {**{k: v for k, v in scheduler.config.items() if not k.startswith("_")}, **changes}


def calibrate_grid(
    scheduler,
    model,
    num_inference_steps: int,
    sample_shape: Optional[Sequence[int]] = None,
    num_draws: int = 32,
    teacher_steps: int = 100,
    max_evals: int = 80,
    seed: int = 0,
    device=None,
) -> CalibrationReport:
    """Fit the ``num_inference_steps``-point grid of ``scheduler`` (a VE scheduler, any lambda; the fit uses
    lambda = 0) to ``model``; returns the grid and its cost. The scheduler is not changed: store the result with
    ``scheduler.register_to_config(calibrated_grids=...)`` or call :meth:`VEScheduler.calibrate`.

    Args:
        scheduler: the VE scheduler whose config (table, prediction type, order, ``t_min``/``t_max``) is fitted.
        model: a ``UNet2DModel``-like module, called as ``model(x, timesteps)``.
        num_inference_steps: the budget the grid is for (>= 2).
        sample_shape: one sample's shape (C, H, W); default from ``model.config`` (``in_channels``, ``sample_size``).
        num_draws: starting noises the fit averages over.
        teacher_steps: steps of the teacher (order 2, lambda 0, log_t grid).
        max_evals: few-step runs the search may make (each costs ``num_inference_steps`` model calls).
        seed: seed of the starting noises; the result is deterministic for a seed.
        device: where the draws live (default: the model's device).
    """
    from scipy.optimize import minimize

    n = _budget(num_inference_steps)
    x = _draws(model, sample_shape, num_draws, seed, device, teacher_steps=teacher_steps, max_evals=max_evals)
    t0, counter, cls = time.time(), _Counter(model), type(scheduler)
    base = _config(scheduler, calibrated_grids=None, reverse_noise=0.0)
    teacher = cls.from_config({**base, "solver_order": 2, "sigma_schedule": "log_t"})
    target = _run(teacher, counter, x, teacher_steps, seed).double()
    student = cls.from_config(base)
    student.set_timesteps(n)
    start = [float(v) for v in student._t_grid[:n]]
    log_lo, log_hi = math.log(student.t_lo), math.log(start[0])  # the top stays where the default grid starts

    def error(logits):
        grid = _grid_from_logits(np.asarray(logits), log_lo, log_hi)
        student.register_to_config(calibrated_grids={str(n): grid})
        return float(((_run(student, counter, x, n, seed).double() - target) ** 2).mean())

    init = _logits_from_grid(start, log_lo, log_hi)
    start_error = error(init)
    res = minimize(error, init, method="Nelder-Mead", options=dict(maxfev=max_evals, xatol=1e-3, fatol=1e-7))
    best = res.x if res.fun < start_error else init
    return CalibrationReport(n, _grid_from_logits(best, log_lo, log_hi), float(min(res.fun, start_error)), start_error,
                             counter.calls, time.time() - t0)


@dataclass
class WindowReport:
    """What a window calibration found and cost; distances are energy distances to the teacher's samples."""

    num_inference_steps: int
    window: list  # [t_lo, t_hi]: lambda acts on the steps that start inside
    distance: float  # with the fitted window
    everywhere: float  # lambda on every step (no window)
    nowhere: float  # lambda on no step that adds noise (the deterministic sampler)
    model_calls: int
    seconds: float


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance between two sample sets (rows flattened): 2 E|a-b| - E|a-a'| - E|b-b'|, the within-set
    terms without their zero diagonal, so that the estimate is unbiased; its expectation is 0 exactly when the two
    laws agree."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    within = lambda u: torch.cdist(u, u).sum() / (len(u) * (len(u) - 1))  # noqa: E731
    return float(2 * torch.cdist(a, b).mean() - within(a) - within(b))


def _window_edges(grid: Sequence[float], top: float, max_edges: int) -> list:
    """Candidate window edges: 0, up to ``max_edges`` geometric midpoints between grid points (evenly spread over
    the grid, the lowest always kept: a window below it holds no noisy step), and ``top`` above them all."""
    mids = sorted(math.sqrt(hi * lo) for hi, lo in zip(grid[:-1], grid[1:]))
    k = min(max_edges, len(mids))
    keep = sorted({round(i * (len(mids) - 1) / max(k - 1, 1)) for i in range(k)})
    return [0.0, *(mids[i] for i in keep), top]


def calibrate_window(
    scheduler,
    model,
    num_inference_steps: int,
    sample_shape: Optional[Sequence[int]] = None,
    num_draws: int = 1024,
    teacher_steps: int = 100,
    max_edges: int = 8,
    seed: int = 0,
    device=None,
) -> WindowReport:
    """Fit ``reverse_noise_window`` of ``scheduler`` (its lambda, > 0) to ``model`` at ``num_inference_steps`` calls
    on the scheduler's own grid (calibrated or not). The scheduler is not changed: store ``report.window`` with
    ``scheduler.register_to_config(reverse_noise_window=...)`` or call :meth:`VEScheduler.calibrate`.

    The teacher is the ``teacher_steps``-step sampler at the same lambda (log_t grid, no window). Its samples and
    the few-step samples are compared by their energy distance, each window from the same noise and generator
    seed (so that windows are compared on equal draws). The window's edges lie between grid points; the search is
    by coordinates, first the top edge (bottom at 0), then the bottom edge: at most ``2 max_edges + 1`` few-step
    runs of ``num_inference_steps`` calls.

    Args:
        scheduler: the VE scheduler (``reverse_noise`` > 0) whose window is fitted.
        model: a ``UNet2DModel``-like module, called as ``model(x, timesteps)``.
        num_inference_steps: the budget the window is for (>= 2).
        sample_shape: one sample's shape (C, H, W); default from ``model.config``.
        num_draws: samples on each side of the energy distance (the distance's noise falls as
            ``1 / num_draws``; 256 did not resolve the mixture's 5-call choice, 1024 did).
        teacher_steps: steps of the teacher.
        max_edges: the most window edges tried between grid points.
        seed: seed of the starting noises and of the reverse noise; the result is deterministic for a seed.
        device: where the draws live (default: the model's device).
    """
    n = _budget(num_inference_steps)
    if not scheduler.reverse_noise > 0:
        raise ValueError(f"a `reverse_noise_window` is fitted for `reverse_noise` > 0; this scheduler has {scheduler.reverse_noise!r}.")
    x = _draws(model, sample_shape, num_draws, seed, device, teacher_steps=teacher_steps, max_edges=max_edges)
    t0, counter, cls = time.time(), _Counter(model), type(scheduler)
    teacher = cls.from_config(_config(scheduler, calibrated_grids=None, reverse_noise_window=None, sigma_schedule="log_t"))
    target = _run(teacher, counter, x, teacher_steps, seed + 1)
    student = cls.from_config(_config(scheduler, reverse_noise_window=None))
    student.set_timesteps(n)
    grid = [float(v) for v in student._t_grid[:n]]
    t_max = float(student.family.t_max)  # the top edge is above every grid, of this budget or another
    edges, scores = _window_edges(grid, max(t_max if math.isfinite(t_max) else 0.0, 10 * grid[0]), max_edges), {}

    def score(lo, hi):
        if (lo, hi) not in scores:
            student.register_to_config(reverse_noise_window=[lo, hi])
            scores[lo, hi] = energy_distance(_run(student, counter, x, n, seed), target)
        return scores[lo, hi]

    hi = min(edges[1:], key=lambda e: score(0.0, e))
    lo = min((e for e in edges if e < hi), key=lambda e: score(e, hi))
    return WindowReport(n, [lo, hi], score(lo, hi), score(0.0, edges[-1]), score(0.0, edges[1]), counter.calls,
                        time.time() - t0)


__all__ = ["CalibrationReport", "WindowReport", "calibrate_grid", "calibrate_window", "energy_distance"]
