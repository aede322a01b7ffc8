"""Fit a scheduler's grid to a model and a budget (in the spirit of GITS and Align Your Steps).

From a few starting noises, a fine-grid solution of the probability-flow ODE is the teacher; the grid of
``num_inference_steps`` points that brings the scheduler's own few-step samples closest to it (mean squared
error, same starting noise) is found by a derivative-free search over the points' positions in ``ln t``. The
model is called only through the standard pipeline loop (``scale_model_input``, model, ``step``), so the
scheduler's own conversions are the ones in force.
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

    n = int(num_inference_steps)
    if n < 2:
        raise ValueError(f"`num_inference_steps` must be an integer >= 2 to calibrate (1 point is t_max); got {num_inference_steps!r}.")
    for name, v in (("num_draws", num_draws), ("teacher_steps", teacher_steps), ("max_evals", max_evals)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"`{name}` must be an integer >= 1; got {v!r}.")
    if sample_shape is None:
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "sample_size"):
            raise ValueError("pass `sample_shape` (C, H, W): the model has no `config.in_channels`/`sample_size`.")
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
        sample_shape = (cfg.in_channels, *size)
    device = device or getattr(model, "device", "cpu")
    t0 = time.time()
    counter = _Counter(model)
    x = torch.randn((num_draws, *sample_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    base = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    base["calibrated_grids"] = None
    cls = type(scheduler)
    teacher = cls.from_config({**base, "reverse_noise": 0.0, "solver_order": 2, "sigma_schedule": "log_t"})
    target = _run(teacher, counter, x, teacher_steps, seed).double()
    student = cls.from_config({**base, "reverse_noise": 0.0})
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


__all__ = ["CalibrationReport", "calibrate_grid"]
