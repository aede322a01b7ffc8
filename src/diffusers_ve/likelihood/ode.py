"""The probability-flow ODE likelihood (math.md §"The probability-flow ODE likelihood"), with per-image error control.

In VE time the flow and the log-density change are

    dz/dt = (z - yhat(z, t)) / (2t),    d ell/dt = (d - tr grad_z yhat) / (2t),    z(t_min) = y
    ln p_{t_min}(y) = ln p_prior(z(T)) + ell(T)

(:func:`diffusers_ve.process.pf_ode_drift`). They are integrated by default in ``s = asinh(sigma)``
(``variable="asinh"``, ``sigma = sqrt(t)``): like ``sigma`` below 1, where the solution is nearly linear in
``sigma``, and like ``ln sigma`` above, where ``ell`` grows as ``d ln sigma``; ``"sigma"`` and ``"log_t"`` are kept.
A step's error is measured by what it does to the result ``ln p(y)`` per dimension (``error_norm="loglik"``,
:func:`_loglik_error`), not by a relative tolerance on the accumulated ``ell``, which grows to hundreds of nats
and let every step lose up to ``rtol * |ell|``. Every image (and every dequantisation repeat) carries its own step
size and accept/reject decisions, so a result does not depend on what else is in the batch; images that finish
leave the model batch.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Optional, Sequence

import torch

from .. import process
from .common import Estimate, check_generators, dim_of, draw
from .discrete import dequantization_offset, dequantize
from .options import LikelihoodOptions
from .prior import prior_log_prob
EXACT_TRACE_MAX_DIM = 64  # "auto" takes the exact divergence up to this many dimensions
ASINH_SCALE = 1.0  # sigma where variable="asinh" turns from sigma-like to ln(sigma)-like: the data's scale in [-1, 1]
_C2 = ASINH_SCALE**2
# variable -> (s(t) for a float, t(s) and dt/ds for tensors)
_VARIABLES = {
    "asinh": (lambda t: math.asinh(math.sqrt(t) / ASINH_SCALE), lambda s: _C2 * torch.sinh(s) ** 2,
              lambda s: _C2 * torch.sinh(2 * s)),
    "sigma": (math.sqrt, torch.square, lambda s: 2 * s),
    "log_t": (math.log, torch.exp, torch.exp),
}

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
                 max_steps: int = 10_000, progress: Optional[Callable] = None, error: Optional[Callable] = None):
    """Adaptive Dormand-Prince 5(4) for a batch of independent ODEs, each with its own step size.

    Args:
        f: ``f(u, y, rows)`` with ``u`` (n,), ``y`` (n, D) and the indices ``rows`` (n,) of the rows still
            running -> (n, D).
        y0: (N, D) initial states; u0 < u1: integration range shared by all rows.
        rtol, atol: tolerances of the default error norm (and of the starting step): the larger of the RMS over
            columns ``[:split]`` and ``[split:]`` (the state and the log-density parts, as torchdiffeq's mixed norm).
        progress: optional ``progress(done, 1.0)``: the share of ``[u0, u1]`` the slowest row has covered.
        error: optional ``error(u, y, y_new, k1, err) -> (n,)``, a step's error over its tolerance (a step is
            accepted at <= 1), replacing the default norm; ``k1`` is the derivative at the step's start.

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
        if error is None:
            ratio = norm(err / (atol + rtol * torch.maximum(y[i].abs(), y_new.abs())))
        else:
            ratio = error(u[i], y[i], y_new, k1[i], err)
        ok = ratio <= 1.0
        factor = (0.9 * ratio.clamp(min=1e-10) ** -0.2).clamp(0.2, 10.0)
        h[i] = hi * torch.where(ok, factor, factor.clamp(max=1.0))
        acc = i[ok]
        y[acc], k1[acc] = y_new[ok], k_new[ok]
        u[acc] = torch.where(hi[ok] >= u1 - u[acc], torch.full_like(hi[ok], u1), u[acc] + hi[ok])
        active[acc] = u[acc] < u1
        if progress is not None:
            progress(float((u.min() - u0) / (u1 - u0)), 1.0)
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


_NO_VMAP = weakref.WeakKeyDictionary()  # denoisers whose backward has no vmap rule: use replicas at once


def divergence(denoiser, z: torch.Tensor, t: torch.Tensor, probes: Optional[torch.Tensor] = None):
    """``yhat(z, t)`` and the divergence term ``tr grad_z yhat`` of the flow.

    The vector-Jacobian products come from one batched backward pass (``is_grads_batched``) where the model's ops
    allow it, else from one forward and one backward pass over P replicas of the batch (each replica's rows only
    depend on themselves, as in any per-sample network): a UNet2DModel has no vmap rule for its backward, and
    P separate backward passes cost about 50 times more on a CPU.

    Args:
        denoiser: ``yhat(z, t)`` in VE terms.
        z: (N, ...) VE states; t: (N,) VE times.
        probes: (P, N, ...) Hutchinson probes (``v^T (d yhat / d z) v`` per probe), or None for the exact trace
            (the d basis vectors).

    Returns:
        ``(yhat, tr)``: ``yhat`` like ``z`` (in ``z``'s dtype) and ``tr`` of shape (N, P) (P = 1 when exact).
    """
    d, n = z[0].numel(), z.shape[0]
    if probes is None:
        vs = torch.eye(d, dtype=z.dtype, device=z.device).reshape(d, 1, *z.shape[1:]).expand(d, *z.shape)
    else:
        vs = probes
    p = vs.shape[0]
    with torch.enable_grad():
        grads = None
        if denoiser not in _NO_VMAP:
            zz = z.detach().requires_grad_(True)
            yhat = denoiser(zz, t).to(z.dtype)
            try:
                grads = torch.autograd.grad(yhat, zz, vs, is_grads_batched=True)[0]
            except (RuntimeError, NotImplementedError):  # some ops have no batching rule for their backward
                _NO_VMAP[denoiser] = True
        if grads is None:
            zr = z.detach().unsqueeze(0).expand(p, *z.shape).reshape(p * n, *z.shape[1:]).requires_grad_(True)
            out = denoiser(zr, t.repeat(p)).to(z.dtype)
            grads = torch.autograd.grad(out, zr, vs.reshape(p * n, *z.shape[1:]))[0].reshape(vs.shape)
            yhat = out[:n]
    tr = (grads * vs).reshape(p, n, -1).sum(-1)
    tr = tr.sum(0)[:, None] if probes is None else tr.T
    return yhat.detach(), tr.detach()


@torch.no_grad()
def ode_log_likelihood(denoiser, y: torch.Tensor, generators: Sequence[torch.Generator],
                       options: Optional[LikelihoodOptions] = None, progress=None, **fields) -> Estimate:
    """``ln p(y)`` of the probability-flow ODE model, per image.

    Args:
        denoiser: ``yhat(z, t)`` in VE terms (a :class:`~diffusers_ve.denoiser.Denoiser`).
        y: (B, C, H, W) images in VE data space (= model space).
        generators: one generator per image (probes and dequantisation noise of image i; CPU or CUDA, each
            draws on its own device).
        options: a :class:`~diffusers_ve.likelihood.options.LikelihoodOptions`; ``fields`` override its
            fields by name. The ones used here: ``t_min``/``t_max`` (default: the table's ends), ``prior``
            (``ln p_prior(z(T))`` closes the integral), ``rtol``/``atol`` (per image), ``solver``
            (``"dopri5"`` adaptive, or ``"fixed"``: ``num_steps`` equal steps in ``ln t``, 6 calls each),
            ``error_norm`` (``"loglik"`` or ``"state"``), ``variable`` (``"asinh"``: ``sigma = sinh(s)``,
            ``"sigma"``: ``t = s^2``, or ``"log_t"``), ``trace`` (``"exact"``: d backward passes
            per call; ``"hutchinson"``: ``num_probes`` Rademacher probes fixed along the path, their spread is
            the standard error; ``"auto"``: exact up to 64 dimensions), ``num_levels`` (uniform dequantisation
            ``y + delta u`` and ``+ d ln(2 delta)``) and ``num_dequant`` (repeats per image, each its own solve).
        progress: optional ``progress(done, total)`` with the share of the integration range that the
            slowest image has covered (``total = 1``) and called after every solver step.

    Returns:
        :class:`Estimate` (nats; ``extras["latent"]`` holds ``z(T)``, ``extras["delta_logp"]`` the integral;
        ``protocol`` the solver, variable, tolerances or steps, trace and dequantisation repeats).
    """
    opts = LikelihoodOptions.build(options, **fields)
    num_levels, trace, variable, solver = opts.num_levels, opts.trace, opts.variable, opts.solver
    rtol, atol, num_steps = opts.rtol, opts.atol, opts.num_steps
    lo, hi = opts.t_range(denoiser.family, "ode")
    gens = check_generators(generators, y.shape[0])
    reps = opts.num_dequant if num_levels is not None else 1
    prior = opts.make_prior(hi)
    b, d, shape, dev = y.shape[0], dim_of(y), y.shape[1:], y.device
    exact = trace == "exact" or (trace == "auto" and d <= EXACT_TRACE_MAX_DIM)
    p = 1 if exact else opts.num_probes

    yy, v_all = _starts_and_probes(y, gens, num_levels, reps, None if exact else p)
    # s is the integration variable (_VARIABLES: sigma = sinh(s), t = s^2 or t = e^s)
    to_s, to_t, dt_ds = _VARIABLES[variable]

    def f(s, state, rows):  # d/ds of (z, ell) = (dt/ds) * (dz/dt, d ell/dt)
        z = state[:, :d].reshape(-1, *shape)
        t = to_t(s)
        yhat, tr = divergence(denoiser, z, t, None if exact else v_all[:, rows])
        rates = [process.pf_ode_drift(z, yhat, t).reshape(len(z), d), process.pf_ode_drift(d, tr, t)]
        return dt_ds(s)[:, None] * torch.cat(rates, 1)

    y0 = torch.cat([yy.reshape(b * reps, d), torch.zeros(b * reps, p, dtype=torch.float64, device=dev)], 1)
    if solver == "dopri5":
        error = _loglik_error(d, dt_ds, float(rtol), float(atol)) if opts.error_norm == "loglik" else None
        y1, nfe = solve_dopri5(f, y0, to_s(lo), to_s(hi), float(rtol), float(atol), d, progress=progress,
                               error=error)
    else:
        # equal steps in ln t, whatever the variable
        y1, nfe = solve_fixed(f, y0, [to_s(t) for t in reversed(process.log_t_grid(lo, hi, num_steps + 1))])
    latent, delta = y1[:, :d].reshape(b, reps, *shape), y1[:, d:].reshape(b, reps, p)
    logp = prior_log_prob(latent.reshape(b * reps, *shape), prior).reshape(b, reps, 1) + delta
    if num_levels is not None:
        logp = logp + dequantization_offset(num_levels, d)
    extras = {"latent": latent[:, 0].cpu(), "delta_logp": delta.cpu()}
    protocol = {"solver": solver, "variable": variable,
                **({"rtol": rtol, "atol": atol, "error_norm": opts.error_norm} if solver == "dopri5"
                   else {"num_steps": num_steps}),
                "trace": "exact" if exact else f"hutchinson (Rademacher, {p} probes)",
                **({"num_dequant": reps} if num_levels is not None else {})}
    return Estimate(logp.mean((1, 2)).cpu(), _stderr(logp, exact and num_levels is None).cpu(), nfe.reshape(b, reps).sum(1), extras,
                    protocol)


def _loglik_error(d: int, dt_ds: Callable, rtol: float, atol: float) -> Callable:
    """``error`` for :func:`solve_dopri5`: what a step's error does to the result ``ln p(y)``, in nats per dimension,
    over ``atol + rtol * |the step's change of ell| / d``.

    An error ``dz`` in the state at time t moves the result by ``grad ln p_t(z) . dz`` (the rest of the path is the
    flow from the moved point), and ``grad ln p_t(z) = (yhat - z) / t = -2 dz/dt`` is known from the step's first
    stage. With the log-density error ``dl`` (mean over probes) the two are combined as a root sum of squares.
    """
    def error(u, y, y_new, k1, err):
        score = -2 * k1[:, :d] / dt_ds(u)[:, None]
        e = torch.hypot(err[:, d:].mean(1), (score * err[:, :d]).sum(1)) / d
        return e / (atol + rtol * (y_new[:, d:] - y[:, d:]).mean(1).abs() / d)
    return error


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
