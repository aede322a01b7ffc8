"""The math of the variance-exploding process ``z(t) = y + sqrt(t) * eps``, in one place.

Spaces, named in every docstring:

* **VE** ``z``: the process state; ``t`` is the noise *variance* (``sigma = sqrt(t)``).
* **VP** ``x``: what a diffusers model sees, ``x = z / sqrt(1 + t)`` (so ``alphas_cumprod = 1 / (1 + t)``).
* **model output** ``F``: epsilon, v or sample units, as the model was trained.
* **model timestep** ``tau``: the (fractional) index into the training beta table.

Schedule tables are float64 on the CPU; step coefficients are Python floats; tensor maths runs in the
tensors' own dtype (callers upcast half precision). Everything else in the package calls these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
ZERO_SNR_ABAR = 2.0**-24  # abar_{K-1} after zero-terminal-SNR rescaling, clamped as EulerDiscrete does

TLike = Union[float, torch.Tensor]


# ----------------------------------------------------------------------------------------------- checks
def check_reverse_noise(value, name: str = "reverse_noise") -> float:
    """Validate a reverse-noise level lambda: a finite real number >= 0."""
    try:  # a real number: not a bool, not a string
        lam = float("nan") if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        lam = float("nan")
    if not (math.isfinite(lam) and lam >= 0.0):
        raise ValueError(
            f"`{name}` must be a finite real number >= 0 (0 = probability-flow ODE, 1 = reverse noise equal to "
            f"the forward noise, larger = more noise); got {value!r}."
        )
    return lam


def check_choice(name: str, value, allowed):
    """ValueError naming the argument unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}.")
    return value


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}; got {prediction_type!r}.")
    return prediction_type


def reverse_noise_at(t: float, reverse_noise: float, window: Optional[Sequence[float]] = None) -> float:
    """lambda in force at VE time ``t``: ``reverse_noise`` inside ``window = [t_lo, t_hi]`` (or everywhere), else 0."""
    if window is None or window[0] <= t <= window[1]:
        return reverse_noise
    return 0.0


# ------------------------------------------------------------------------------------------- time axis
def make_betas(
    num_train_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
) -> torch.Tensor:
    """The DDPM beta table in float64 (diffusers' schedules, without its float32 rounding)."""
    k = int(num_train_timesteps)
    if k < 2:
        raise ValueError(f"`num_train_timesteps` must be an integer >= 2; got {num_train_timesteps!r}.")
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, k, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, k, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        i = torch.arange(k, dtype=torch.float64)
        abar = lambda s: torch.cos((s / k + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.clamp(1 - abar(i + 1) / abar(i), max=0.999)
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, k, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"`beta_schedule` must be one of {BETA_SCHEDULES}; got {beta_schedule!r}.")
    if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError("betas must be a 1-D table of at least 2 values in (0, 1].")
    return betas


def log_t_from_betas(betas: torch.Tensor, rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """``ln t_k`` for a beta table, float64: ``t_k = expm1(-cumsum(log1p(-beta)))`` (exact near t -> 0)."""
    betas = betas.to(torch.float64)
    if rescale_betas_zero_snr:
        from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

        betas = rescale_zero_terminal_snr(betas)
    t = torch.expm1(-torch.cumsum(torch.log1p(-betas), 0))
    if rescale_betas_zero_snr:
        # t_{K-1} = inf: clamp abar_{K-1} to 2^-24 as EulerDiscrete does; where that would not exceed t_{K-2}
        # (linear tables; Euler's table is then non-monotone) extrapolate linearly in ln t instead.
        clamped = (1 - ZERO_SNR_ABAR) / ZERO_SNR_ABAR
        t[-1] = clamped if clamped > t[-2] else float(t[-2] ** 2 / t[-3])
    log_t = torch.log(t)
    if not bool(torch.isfinite(log_t).all()) or not bool((log_t[1:] > log_t[:-1]).all()):
        raise ValueError("the beta table must give finite, strictly increasing noise levels t_k.")
    return log_t


def _float64(x) -> torch.Tensor:
    """float64 tensor on CUDA if ``x`` is there (no device round trip, no sync), else on the CPU."""
    x = torch.as_tensor(x).detach()
    return x.to(x.device if x.device.type == "cuda" else "cpu", torch.float64)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (float64, clamped to the ends), as ``np.interp``."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (x - x0) / (x1 - x0) * (f1 - f0)


@dataclass(frozen=True)
class TimeAxis:
    """The link between VE time ``t`` and a diffusers model's timestep ``tau`` (a beta table of K entries).

    ``timestep(t)`` interpolates the table index linearly in ``ln t`` (as ``EulerDiscreteScheduler`` does);
    ``continuous=True`` uses instead ``tau = ln(t) / 8`` (= ``0.25 ln sigma``, diffusers' ``timestep_type="continuous"``).
    """

    log_t: torch.Tensor  # float64 (K,), increasing
    continuous: bool = False

    @classmethod
    def from_config(cls, config) -> "TimeAxis":
        """Build from a scheduler config (any DDPM-family diffusers scheduler, or ours)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        betas = make_betas(
            get("num_train_timesteps", 1000),
            get("beta_start", 1e-4),
            get("beta_end", 0.02),
            get("beta_schedule", "linear"),
            get("trained_betas", None),
        )
        timestep_type = get("timestep_type", "discrete") or "discrete"
        if timestep_type not in ("discrete", "continuous"):
            raise ValueError(f"`timestep_type` must be 'discrete' or 'continuous'; got {timestep_type!r}.")
        log_t = log_t_from_betas(betas, bool(get("rescale_betas_zero_snr", False)))
        return cls(log_t, continuous=timestep_type == "continuous")

    @property
    def num_train_timesteps(self) -> int:
        return len(self.log_t)

    @property
    def t_min(self) -> float:
        return math.exp(float(self.log_t[0]))

    @property
    def t_max(self) -> float:
        return math.exp(float(self.log_t[-1]))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``abar_k = 1 / (1 + t_k)``, float64."""
        return torch.sigmoid(-self.log_t)

    def t(self, timestep) -> torch.Tensor:
        """VE ``t`` (float64) for model timesteps (integer or fractional), on the input's device (CUDA) or CPU."""
        tau = _float64(timestep)
        if self.continuous:
            return torch.exp(8.0 * tau)
        log_t = self.log_t.to(tau.device)
        return torch.exp(_interp(tau, torch.arange(len(log_t), dtype=torch.float64, device=tau.device), log_t))

    def timestep(self, t) -> torch.Tensor:
        """Model timestep (float64, input's device or CPU) for VE ``t``: linear in ``ln t`` between table entries,
        clamped to the table."""
        log_t = torch.log(_float64(t))
        if self.continuous:
            return log_t / 8.0
        table = self.log_t.to(log_t.device)
        return _interp(log_t, table, torch.arange(len(table), dtype=torch.float64, device=log_t.device))

    def check_range(self, t_lo: float, t_hi: float, name: str = "t range", rtol: float = 1e-6) -> None:
        """ValueError unless ``t_min <= t_lo < t_hi <= t_max`` of the table (the model was never trained outside)."""
        lo, hi = self.t_min * (1 - rtol), self.t_max * (1 + rtol)
        if not (math.isfinite(t_lo) and math.isfinite(t_hi) and lo <= t_lo < t_hi <= hi):
            raise ValueError(
                f"{name} must satisfy {self.t_min:.6g} <= t_lo < t_hi <= {self.t_max:.6g} (the model's table); "
                f"got [{t_lo!r}, {t_hi!r}]."
            )

    def check_inside(self, t, name: str = "t", rtol: float = 1e-6) -> None:
        """ValueError unless every VE time in ``t`` lies within the table's ``[t_min, t_max]``."""
        t = np.asarray(t, dtype=np.float64)
        lo, hi = self.t_min * (1 - rtol), self.t_max * (1 + rtol)
        if t.size == 0 or not np.all(np.isfinite(t)) or t.min() < lo or t.max() > hi:
            raise ValueError(f"{name} must lie within the model's table [{self.t_min:.6g}, {self.t_max:.6g}]; got {t.tolist()!r}.")


# ------------------------------------------------------------------------------------ VP <-> VE, units
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the process maths runs in for ``x``: float64 stays, anything narrower is lifted to float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _per_sample(t: TLike, like: torch.Tensor) -> TLike:
    """Broadcast a per-sample ``t`` of shape (B,) against ``like`` of shape (B, ...); floats pass through."""
    if isinstance(t, torch.Tensor):
        t = t.to(like.device, like.dtype)
        if t.ndim == 1:
            t = t.reshape(-1, *([1] * (like.ndim - 1)))
    return t


def _sqrt(t: TLike) -> TLike:
    return t.sqrt() if isinstance(t, torch.Tensor) else math.sqrt(t)


def vp_from_ve(z: torch.Tensor, t: TLike) -> torch.Tensor:
    """VE ``z`` -> VP model input ``x = z / sqrt(1 + t)``."""
    return z / _sqrt(1 + _per_sample(t, z))


def ve_from_vp(x: torch.Tensor, t: TLike) -> torch.Tensor:
    """VP ``x`` -> VE ``z = x * sqrt(1 + t)``."""
    return x * _sqrt(1 + _per_sample(t, x))


def noisy(y: torch.Tensor, eps: torch.Tensor, t: TLike) -> torch.Tensor:
    """The forward process in VE space: ``z = y + sqrt(t) eps``."""
    return y + _sqrt(_per_sample(t, y)) * eps


def velocity(y: torch.Tensor, eps: torch.Tensor, t: TLike) -> torch.Tensor:
    """The v-prediction target ``v = sqrt(abar) eps - sqrt(1 - abar) y = (eps - sqrt(t) y) / sqrt(1 + t)``."""
    t = _per_sample(t, y)
    return (eps - _sqrt(t) * y) / _sqrt(1 + t)


LEARNED_VARIANCE = ("learned", "learned_range")


def mean_output(output: torch.Tensor, like: torch.Tensor, variance_type: Optional[str] = None) -> torch.Tensor:
    """Model output in prediction units, shaped as ``like``: a learned-variance model's second half of its 2C
    channels dropped; ValueError for any other shape mismatch."""
    c = like.shape[1]
    if variance_type in LEARNED_VARIANCE and output.shape[1] == 2 * c:
        output = output[:, :c]
    if output.shape != like.shape:
        raise ValueError(
            f"model output shape {tuple(output.shape)} does not match the sample {tuple(like.shape)} "
            f"(variance_type={variance_type!r}: only 'learned'/'learned_range' carry 2x channels)."
        )
    return output


def yhat_from_output(output: torch.Tensor, z: torch.Tensor, t: TLike, prediction_type: str) -> torch.Tensor:
    """Model output (eps / v / sample units) at VE state ``z``, time ``t`` -> denoised ``yhat`` (data space)."""
    t = _per_sample(t, z)
    if prediction_type == "epsilon":
        return z - _sqrt(t) * output
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return z / (1 + t) - _sqrt(t / (1 + t)) * output
    return check_prediction_type(prediction_type)


def output_from_yhat(yhat: torch.Tensor, z: torch.Tensor, t: TLike, prediction_type: str) -> torch.Tensor:
    """Inverse of :func:`yhat_from_output`: ``yhat`` at VE ``(z, t)`` -> model output units."""
    t = _per_sample(t, z)
    if prediction_type == "sample":
        return yhat
    eps = (z - yhat) / _sqrt(t)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return (eps - _sqrt(t) * yhat) / _sqrt(1 + t)
    return check_prediction_type(prediction_type)


def pf_ode_drift(z: torch.Tensor, yhat: torch.Tensor, t: TLike) -> torch.Tensor:
    """Probability-flow ODE drift in VE time: ``dz/dt = (z - yhat(z, t)) / (2t)``.

    Its divergence is ``(d - tr grad_z yhat) / (2t)``, the same expression with ``z -> d`` and ``yhat -> tr``,
    so ``pf_ode_drift(d, tr, t)`` gives the log-density rate. Multiply by ``dt/ds`` for another variable ``s``
    (``2 sigma`` for ``sigma = sqrt(t)``, ``t`` for ``ln t``). ``t``: a float or (B,) per row of ``yhat``.
    """
    return (z - yhat) / (2 * _per_sample(t, yhat))


# ---------------------------------------------------------------------------------------- reverse steps
def step_coefficients(t: float, s: float, reverse_noise: float) -> tuple[float, float]:
    """Exact-linear reverse step ``t -> s`` (b2): ``A = (s/t)^((1+lambda)/2)``, ``V = s (1 - (s/t)^lambda)``.

    ``z_s = A z_t + (1 - A) yhat + sqrt(V) noise``. ``s = 0`` gives ``A = V = 0`` (``z_0 = yhat``).
    """
    if not (0 <= s <= t) or t <= 0:
        raise ValueError(f"a reverse step needs 0 <= s <= t and t > 0; got t={t!r}, s={s!r}.")
    if s == 0:
        return 0.0, 0.0
    log_r = math.log(s / t)
    return math.exp(0.5 * (1 + reverse_noise) * log_r), -s * math.expm1(reverse_noise * log_r)


def multistep_weight(t: float, s: float, t_prev: float, reverse_noise: float) -> float:
    """Weight on ``yhat - yhat_prev`` in the 2M step (b3, DPM-Solver++ midpoint form); ``t_prev > t > s > 0``."""
    if s == 0 or t_prev <= t:
        return 0.0
    a, _ = step_coefficients(t, s, reverse_noise)
    return 0.5 * (1 - a) * math.log(t / s) / math.log(t_prev / t)


def heun_weight(t: float, s: float, reverse_noise: float) -> float:
    """Weight on ``yhat(z~, s) - yhat(z, t)`` in the exponential Heun corrector (b5): ``1 - (1 - A) / (c h)``."""
    if s == 0 or s == t:
        return 0.0
    x = 0.5 * (1 + reverse_noise) * math.log(t / s)  # c h; 1 - A = -expm1(-x)
    return 1 + math.expm1(-x) / x if x > 1e-4 else x / 2 - x * x / 6 + x**3 / 24  # series: no cancellation


def linear_step(
    z: torch.Tensor,
    yhat: torch.Tensor,
    a: float,
    v: float,
    noise: Optional[torch.Tensor] = None,
    correction: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """VE ``z_s = A z_t + (1 - A) yhat [+ correction] + sqrt(V) noise`` (all in VE space)."""
    out = yhat + a * (z - yhat)
    if correction is not None:
        out = out + correction
    if v > 0:
        if noise is None:
            raise ValueError("a step with reverse noise needs a `noise` tensor.")
        out = out + math.sqrt(v) * noise
    return out


# ------------------------------------------------------------------------------------------------ grids
def karras_t(t_min: float, t_max: float, n: int, rho: float = 7.0) -> list[float]:
    """EDM rho-grid of ``n`` decreasing VE times from ``t_max`` to ``t_min`` (uniform in ``sigma^(1/rho)``)."""
    if n == 1:
        return [t_max]
    lo, hi = t_min ** (0.5 / rho), t_max ** (0.5 / rho)
    return [(hi + i / (n - 1) * (lo - hi)) ** (2 * rho) for i in range(n)]


DEFAULT_T_TOP = 625.0  # sigma = 25: 25x the scale of unit data (pixels in [-1, 1], scaled latents)


def default_grid_range(t_min: float, t_max: float, n: int) -> tuple[float, float]:
    """``(t_lo, t_hi)`` of the default ``n``-point grid inside the table's ``[t_min, t_max]`` (benchmarks.md).

    It starts at ``min(t_max, 625)``: above sigma = 25, yhat of unit-scale data is its mean whatever the draw, so a
    call there is wasted, and the starting noise ``N(0, 1 + t)`` is already within 4% of the true ``z(t)``. It
    ends at ``max(t_min, 10^(2 - n))``: with 2-4 calls the last one is better spent at moderate noise, from where
    the final step returns yhat, than near ``t_min``, where a trained network's yhat is the identity.
    """
    hi = min(t_max, DEFAULT_T_TOP)
    lo = max(t_min, 10.0 ** (2 - n))
    return (lo, hi) if lo < hi else (t_min, t_max)


def log_t_grid(t_min: float, t_max: float, n: int) -> list[float]:
    """``n`` decreasing VE times, uniform in ``ln t``."""
    if n == 1:
        return [t_max]
    return [math.exp(x) for x in np.linspace(math.log(t_max), math.log(t_min), n)]


def stratified_t(t_min: float, t_max: float, u: torch.Tensor, strata: torch.Tensor, n: int) -> torch.Tensor:
    """VE times log-uniform on ``[t_min, t_max]``, one per stratum: ``ln t = ln t_min + (j + u) / n * ln(t_max/t_min)``.

    ``u`` in [0, 1) and stratum indices ``strata`` (0..n-1) broadcast; float64, on ``u``'s device. With a
    random permutation of ``range(n)`` as ``strata`` it is the stratified draw of math.md §4.3.
    """
    lo = math.log(t_min)
    return torch.exp(lo + (strata.to(u) + u) / n * (math.log(t_max) - lo))


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def ddpm_timesteps(num_train_timesteps: int, n: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """Integer table timesteps, decreasing, laid out as ``DDPMScheduler.set_timesteps`` lays them out."""
    k = num_train_timesteps
    if n > k:
        raise ValueError(f"`num_inference_steps` ({n}) cannot exceed `num_train_timesteps` ({k}) with the 'ddpm' grid.")
    if spacing == "linspace":
        steps = np.linspace(0, k - 1, n).round()[::-1]
    elif spacing == "leading":
        steps = (np.arange(0, n) * (k // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(k, 0, -k / n)) - 1
    else:
        raise ValueError(f"`timestep_spacing` must be one of {TIMESTEP_SPACINGS}; got {spacing!r}.")
    return np.clip(steps.astype(np.int64), 0, k - 1)
