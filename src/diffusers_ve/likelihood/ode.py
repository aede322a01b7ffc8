"""The probability-flow ODE likelihood (math.md §"The probability-flow ODE likelihood"), with per-image error control.

In VE time the flow and the log-density change are

    dz/dt = (z - yhat(z, t)) / (2t),    d ell/dt = (d - tr grad_z yhat) / (2t),    z(t_min) = y
    ln p_{t_min}(y) = ln p_prior(z(T)) + ell(T)

(:func:`diffusers_ve.process.pf_ode_drift`). They are integrated in ``sigma = sqrt(t)`` by default
(``variable="sigma"``: solutions are nearly linear at both ends) or in ``ln t`` (``variable="log_t"``).
Every image (and every dequantisation repeat) carries its own step size and accept/reject decisions, so a
result does not depend on what else is in the batch; images that finish leave the model batch.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .. import process
from .common import Estimate, check_generators, check_positive_int, check_t_range, dim_of, draw
from .discrete import dequantization_offset, dequantize
from .prior import Prior, make_prior, prior_log_prob

TRACES = ("auto", "exact", "hutchinson")
SOLVERS = ("dopri5", "fixed")
VARIABLES = ("sigma", "log_t")  # integration variable s: t = s^2 or t = e^s
EXACT_TRACE_MAX_DIM = 64  # "auto" takes the exact divergence up to this many dimensions

# Dormand-Prince 5(4): nodes, stages, 5th-order weights (= last stage, FSAL) and the error weights b5 - b4
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1).sqrt()


def _step(f, u, h, y, k1, rows):
    """One DP5 step for every row: returns the 5th-order solution, its error estimate and the last stage."""
    ks = [k1]
    for s in range(1, 7):
        ys = y + h[:, None] * sum(a * k for a, k in zip(_A[s], ks) if a != 0.0)
        ks.append(f(u + _C[s] * h, ys, rows))
    err = h[:, None] * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
    return ys, err, ks[-1]


def _initial_step(f, u, y, k1, norm, rtol, atol, span):
    """Hairer's starting step (one extra evaluation), per row."""
    scale = atol + rtol * y.abs()
    d0, d1 = norm(y / scale), norm(k1 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=span)
    k2 = f(u + h0, y + h0[:, None] * k1, torch.arange(len(y), device=y.device))
    d2 = norm((k2 - k1) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(h0 * 1e-3, torch.full_like(h0, 1e-6)), (0.01 / dmax) ** 0.2)
    return torch.minimum(100 * h0, h1).clamp(max=span)


def solve_dopri5(f: Callable, y0: torch.Tensor, u0: float, u1: float, rtol: float, atol: float, split: int,
                 max_steps: int = 10_000):
    """Adaptive Dormand-Prince 5(4) for a batch of independent ODEs, each with its own step size.

    Args:
        f: ``f(u, y, rows)`` with ``u`` (n,), ``y`` (n, D) and the indices ``rows`` (n,) of the rows still
            running -> (n, D).
        y0: (N, D) initial states; u0 < u1: integration range shared by all rows.
        rtol, atol: tolerances; the error norm is the larger of the RMS over columns ``[:split]`` and
            ``[split:]`` (the state and the log-density parts, as torchdiffeq's mixed norm).

    Returns:
        ``(y1, nfe)``: (N, D) states at ``u1`` and (N,) int64 evaluations per row.
    """
    n = y0.shape[0]
    y, u = y0.clone(), torch.full((n,), float(u0), dtype=y0.dtype, device=y0.device)
    k1, nfe = f(u, y, torch.arange(n, device=y.device)), torch.ones(n, dtype=torch.long)
    norm = lambda x: torch.maximum(_rms(x[:, :split]), _rms(x[:, split:]))  # noqa: E731
    h = _initial_step(f, u, y, k1, norm, rtol, atol, u1 - u0)
    nfe += 1
    active, steps = torch.ones(n, dtype=torch.bool, device=y.device), 0
    while bool(active.any()):
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"the ODE solver took more than {max_steps} steps; loosen `rtol`/`atol`.")
        i = active.nonzero()[:, 0]
        hi = torch.minimum(h[i], u1 - u[i])
        y_new, err, k_new = _step(f, u[i], hi, y[i], k1[i], i)
        nfe[i.cpu()] += 6
        ratio = norm(err / (atol + rtol * torch.maximum(y[i].abs(), y_new.abs())))
        ok = ratio <= 1.0
        factor = (0.9 * ratio.clamp(min=1e-10) ** -0.2).clamp(0.2, 10.0)
        h[i] = hi * torch.where(ok, factor, factor.clamp(max=1.0))
        acc = i[ok]
        y[acc], k1[acc] = y_new[ok], k_new[ok]
        u[acc] = torch.where(hi[ok] >= u1 - u[acc], torch.full_like(hi[ok], u1), u[acc] + hi[ok])
        active[acc] = u[acc] < u1
    return y, nfe


def solve_fixed(f: Callable, y0: torch.Tensor, grid: Sequence[float]):
    """The same Dormand-Prince stages on a fixed increasing ``grid`` (``1 + 6 (len(grid) - 1)`` evaluations)."""
    n = y0.shape[0]
    rows, y = torch.arange(n, device=y0.device), y0.clone()
    full = lambda v: torch.full((n,), float(v), dtype=y0.dtype, device=y0.device)  # noqa: E731
    k1 = f(full(grid[0]), y, rows)
    for s0, s1 in zip(grid[:-1], grid[1:]):
        y, _, k1 = _step(f, full(s0), full(s1 - s0), y, k1, rows)
    return y, torch.full((n,), 1 + 6 * (len(grid) - 1), dtype=torch.long)


def divergence(denoiser, z: torch.Tensor, t: torch.Tensor, probes: Optional[torch.Tensor] = None):
    """``yhat(z, t)`` and the divergence term ``tr grad_z yhat`` of the flow.

    Args:
        denoiser: ``yhat(z, t)`` in VE terms.
        z: (N, ...) VE states; t: (N,) VE times.
        probes: (P, N, ...) Hutchinson probes (``v^T (d yhat / d z) v`` per probe), or None for the exact trace
            (d backward passes, vectorised where the model allows).

    Returns:
        ``(yhat, tr)``: ``yhat`` like ``z`` (in ``z``'s dtype) and ``tr`` of shape (N, P) (P = 1 when exact).
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        yhat = denoiser(z, t).to(z.dtype)
        if probes is None:
            d = z[0].numel()
            basis = torch.eye(d, dtype=z.dtype, device=z.device).reshape(d, 1, *z.shape[1:]).expand(d, *z.shape)
            grads = _vjps(yhat, z, basis)
            tr = (grads * basis).reshape(d, z.shape[0], -1).sum(-1).sum(0)[:, None]
        else:
            grads = _vjps(yhat, z, probes)
            tr = (grads * probes).reshape(probes.shape[0], z.shape[0], -1).sum(-1).T
    return yhat.detach(), tr.detach()


def _vjps(out: torch.Tensor, inp: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """``v^T d out / d inp`` for a stack of ``v`` (vectorised when the model allows it)."""
    try:
        return torch.autograd.grad(out, inp, vs, retain_graph=True, is_grads_batched=True)[0]
    except (RuntimeError, NotImplementedError):  # some ops have no batching rule for their backward
        return torch.stack([torch.autograd.grad(out, inp, v, retain_graph=True)[0] for v in vs])


def ode_log_likelihood(
    denoiser,
    y: torch.Tensor,
    generators: Sequence[torch.Generator],
    t_min: Optional[float] = None,
    t_max: Optional[float] = None,
    prior: Prior | str = "vp",
    rtol: float = 1e-4,
    atol: float = 1e-4,
    solver: str = "dopri5",
    num_steps: int = 16,
    trace: str = "auto",
    num_probes: int = 4,
    num_levels: Optional[int] = None,
    num_dequant: int = 1,
    variable: str = "sigma",
) -> Estimate:
    """``ln p(y)`` of the probability-flow ODE model, per image.

    Args:
        denoiser: ``yhat(z, t)`` in VE terms (a :class:`~diffusers_ve.denoiser.Denoiser`).
        y: (B, C, H, W) images in VE data space (= model space).
        generators: one generator per image (probes and dequantisation noise of image i; CPU or CUDA, each
            draws on its own device).
        t_min, t_max: integration range (VE variance); defaults: the model table's ends.
        prior: a :class:`Prior` or ``"vp"`` / ``"ve"``; ``ln p_prior(z(T))`` closes the integral.
        rtol, atol: tolerances of the adaptive solver (per image).
        solver: ``"dopri5"`` (adaptive) or ``"fixed"`` (``num_steps`` equal steps in ``ln t``, 6 calls each).
        trace: ``"exact"`` (d backward passes per call), ``"hutchinson"`` (Rademacher probes, fixed along the
            path) or ``"auto"`` (exact up to 64 dimensions).
        num_probes: Hutchinson probes per image; the spread over probes gives the standard error.
        num_levels: n for n-level data: uniform dequantisation ``y + delta u``, ``+ d ln(2 delta)``.
        num_dequant: dequantisation repeats per image (each its own ODE solve).
        variable: integration variable, ``"sigma"`` (``t = s^2``: solutions are nearly linear at both ends) or
            ``"log_t"``.

    Returns:
        :class:`Estimate` (nats; ``extras["latent"]`` holds ``z(T)``, ``extras["delta_logp"]`` the integral;
        ``protocol`` the solver, variable, tolerances or steps, trace and dequantisation repeats).
    """
    if trace not in TRACES:
        raise ValueError(f"`trace` must be one of {TRACES}; got {trace!r}.")
    if variable not in VARIABLES:
        raise ValueError(f"`variable` must be one of {VARIABLES}; got {variable!r}.")
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}; got {solver!r}.")
    if not (float(rtol) > 0 and float(atol) > 0):
        raise ValueError(f"`rtol` and `atol` must be > 0; got {rtol!r}, {atol!r}.")
    lo, hi = check_t_range(denoiser.axis, t_min, t_max)
    gens = check_generators(generators, y.shape[0])
    reps = check_positive_int(num_dequant, "num_dequant") if num_levels is not None else 1
    prior = make_prior(prior, hi) if isinstance(prior, str) else prior
    b, d, shape, dev = y.shape[0], dim_of(y), y.shape[1:], y.device
    exact = trace == "exact" or (trace == "auto" and d <= EXACT_TRACE_MAX_DIM)
    p = 1 if exact else check_positive_int(num_probes, "num_probes")

    yy, v_all = _starts_and_probes(y, gens, num_levels, reps, None if exact else p)
    # s is the integration variable: t = s^2 (dt/ds = 2s) or t = e^s (dt/ds = t)
    to_s, to_t, dt_ds = (math.sqrt, torch.square, lambda s: 2 * s) if variable == "sigma" else \
        (math.log, torch.exp, torch.exp)

    def f(s, state, rows):  # d/ds of (z, ell) = (dt/ds) * (dz/dt, d ell/dt)
        z = state[:, :d].reshape(-1, *shape)
        t = to_t(s)
        yhat, tr = divergence(denoiser, z, t, None if exact else v_all[:, rows])
        rates = [process.pf_ode_drift(z, yhat, t).reshape(len(z), d), process.pf_ode_drift(d, tr, t)]
        return dt_ds(s)[:, None] * torch.cat(rates, 1)

    y0 = torch.cat([yy.reshape(b * reps, d), torch.zeros(b * reps, p, dtype=torch.float64, device=dev)], 1)
    if solver == "dopri5":
        y1, nfe = solve_dopri5(f, y0, to_s(lo), to_s(hi), float(rtol), float(atol), d)
    else:
        steps = check_positive_int(num_steps, "num_steps")  # equal steps in ln t, whatever the variable
        y1, nfe = solve_fixed(f, y0, [to_s(t) for t in reversed(process.log_t_grid(lo, hi, steps + 1))])
    latent, delta = y1[:, :d].reshape(b, reps, *shape), y1[:, d:].reshape(b, reps, p)
    logp = prior_log_prob(latent.reshape(b * reps, *shape), prior).reshape(b, reps, 1) + delta
    if num_levels is not None:
        logp = logp + dequantization_offset(num_levels, d)
    extras = {"latent": latent[:, 0].cpu(), "delta_logp": delta.cpu()}
    protocol = {"solver": solver, "variable": variable,
                **({"rtol": rtol, "atol": atol} if solver == "dopri5" else {"num_steps": num_steps}),
                "trace": "exact" if exact else f"hutchinson (Rademacher, {p} probes)",
                **({"num_dequant": reps} if num_levels is not None else {})}
    return Estimate(logp.mean((1, 2)).cpu(), _stderr(logp, exact and num_levels is None).cpu(), nfe.reshape(b, reps).sum(1), extras,
                    protocol)


def _starts_and_probes(y, gens, num_levels, reps: int, probes: Optional[int]):
    """Per image, in a fixed order from its generator: dequantisation noise, then Rademacher probes.

    Returns the (B, R, ...) starting points (VE data space) and the (P, B*R, ...) probes (None: exact trace).
    """
    b, shape, dev = y.shape[0], y.shape[1:], y.device
    deq, vs = [], []
    for g in gens:
        if num_levels is not None:
            deq.append(draw("rand", (reps, *shape), g).to(dev) * 2 - 1)
        if probes is not None:
            vs.append(draw("sign", (probes, reps, *shape), g).to(dev))
    yy = y.to(torch.float64)[:, None].expand(b, reps, *shape)
    if num_levels is not None:
        yy = dequantize(yy, num_levels, torch.stack(deq))
    return yy, None if probes is None else torch.stack(vs, 1).reshape(probes, b * reps, *shape).to(dev)


def _stderr(logp: torch.Tensor, deterministic: bool) -> torch.Tensor:
    """Standard error of the (B, R, P) values' mean: over dequantisation repeats, else over probes; 0 only for a
    deterministic estimate (exact trace, continuous data), NaN (unknown) for a single random draw."""
    b, reps, p = logp.shape
    if reps > 1:
        return logp.mean(2).std(1) / math.sqrt(reps)
    if p > 1:
        return logp[:, 0].std(1) / math.sqrt(p)
    return torch.full((b,), 0.0 if deterministic else math.nan, dtype=logp.dtype, device=logp.device)
