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

import functools
import inspect
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


def log_t_from_betas(betas: torch.Tensor, rescale_betas_zero_snr: bool = False,
                     snr_shift_scale: Optional[float] = None) -> torch.Tensor:
    """``ln t_k`` for a beta table, float64: ``t_k = expm1(-cumsum(log1p(-beta)))`` (exact near t -> 0).

    ``snr_shift_scale = c`` (CogVideoX: ``abar / (c + (1 - c) abar)``) is ``t -> c t``, applied before the
    zero-terminal-SNR rescaling, in the order diffusers' CogVideoX schedulers apply them.
    """
    t = torch.expm1(-torch.cumsum(torch.log1p(-betas.to(torch.float64)), 0))
    if snr_shift_scale is not None:
        t = t * snr_shift_scale
    if rescale_betas_zero_snr:
        # sqrt(abar) = (1 + t)^(-1/2), shifted to end at 0 and scaled to keep its first value: sqrt(abar) * f
        r = torch.rsqrt(1 + t)
        f = (1 - r[-1] / r) * r[0] / (r[0] - r[-1])
        t = (1 + t) / f**2 - 1  # f_0 = 1: t_0 keeps its precision
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
        snr_shift = get("snr_shift_scale", None)  # CogVideoX
        if snr_shift is not None and not (isinstance(snr_shift, (int, float)) and snr_shift > 0):
            raise ValueError(f"`snr_shift_scale` must be a number > 0; got {snr_shift!r}.")
        log_t = log_t_from_betas(betas, bool(get("rescale_betas_zero_snr", False)), snr_shift)
        lo, hi = get("sigma_min", None), get("sigma_max", None)
        if timestep_type == "continuous" and lo and hi:  # EulerDiscrete (SVD): the model's range, not the table's
            log_t = torch.linspace(2 * math.log(lo), 2 * math.log(hi), len(log_t), dtype=torch.float64)
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
    """Exact-linear reverse step ``t -> s`` (math.md §"The exact step"): ``A = (s/t)^((1+lambda)/2)``, ``V = s (1 - (s/t)^lambda)``.

    ``z_s = A z_t + (1 - A) yhat + sqrt(V) noise``. ``s = 0`` gives ``A = V = 0`` (``z_0 = yhat``).
    """
    if not (0 <= s <= t) or t <= 0:
        raise ValueError(f"a reverse step needs 0 <= s <= t and t > 0; got t={t!r}, s={s!r}.")
    if s == 0:
        return 0.0, 0.0
    log_r = math.log(s / t)
    return math.exp(0.5 * (1 + reverse_noise) * log_r), -s * math.expm1(reverse_noise * log_r)


MAX_STEP_RATIO = 2.0  # 2M extrapolates yhat by h / h_prev: past this ratio the step is taken first order


def multistep_weight(t: float, s: float, t_prev: float, reverse_noise: float) -> float:
    """Weight on ``yhat - yhat_prev`` in the 2M step (math.md §"The second-order multistep step", DPM-Solver++
    midpoint form); ``t_prev > t > s > 0``.

    0 (a first-order step) where the step in ``ln t`` is more than :data:`MAX_STEP_RATIO` times the previous one:
    the extrapolation then amplifies the model's error (FlowMatch's linear grid ends with such a jump; measured on
    the mixture, it made 2M worse than Euler there).
    """
    if s == 0 or t_prev <= t or math.log(t / s) > MAX_STEP_RATIO * math.log(t_prev / t):
        return 0.0
    a, _ = step_coefficients(t, s, reverse_noise)
    return 0.5 * (1 - a) * math.log(t / s) / math.log(t_prev / t)


def heun_weight(t: float, s: float, reverse_noise: float) -> float:
    """Weight on ``yhat(z~, s) - yhat(z, t)`` in the exponential Heun corrector (math.md §"The exponential Heun step"): ``1 - (1 - A) / (c h)``."""
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


# --------------------------------------------------------------------------------------- model families
FAMILIES = ("vp", "ve", "edm", "flow")
FAMILY_PREDICTION_TYPES = {
    "vp": PREDICTION_TYPES, "edm": ("epsilon", "v_prediction"), "ve": ("score",), "flow": ("flow_prediction",)
}


class UnsupportedConfigError(ValueError):
    """A scheduler config whose model family we cannot read: refused by name, never read as another family."""


_VP_CLASSES = {
    "DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
    "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverMultistepInverseScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "SASolverScheduler", "UnCLIPScheduler", "RePaintScheduler",
    "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler",
}
_FAMILY_CLASSES = {
    "ve": {"ScoreSdeVeScheduler"},
    "edm": {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"},
    "flow": {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"},
}
_CONSISTENCY = "a consistency model: its output obeys a boundary condition at the end of its schedule, not a denoiser"
_REFUSED = {
    "LCMScheduler": _CONSISTENCY, "TCDScheduler": _CONSISTENCY, "CMStochasticIterativeScheduler": _CONSISTENCY,
    "FlowMatchLCMScheduler": _CONSISTENCY, "FlowMapEulerDiscreteScheduler": "a distilled flow map (z_t -> z_r), not a denoiser", "SCMScheduler": _CONSISTENCY + " (sCM / TrigFlow parametrisation)",
    "VQDiffusionScheduler": "discrete (VQ) diffusion over tokens", "AmusedScheduler": "masked-token (VQ) generation",
    "DDPMWuerstchenScheduler": "Wuerstchen's own continuous cosine schedule, which the config does not record",
    "IPNDMScheduler": "a sampler whose config records no model time axis (beta table, sigmas or flow)",
    "KarrasVeScheduler": "KarrasVePipeline's own input/output preconditioning, which the config does not record",
    "ScoreSdeVpScheduler": "a continuous VP SDE whose model timestep no diffusers pipeline defines",
    "CosineDPMSolverMultistepScheduler": "EDM with arctan noise conditioning (Stable Audio), not EDM's ln(sigma)/4",
}
_FLOW_SWITCHES = ("use_flow_sigmas", "use_dynamic_shifting")
_OUR_CLASSES = {"VEScheduler", "VEHeunScheduler"}  # saved before model_family existed: a DDPM table
_SUPPORTED = (
    "vp (a DDPM beta table: DDPM, DDIM, PNDM, Euler, Heun, DPM-Solver, UniPC, DEIS, ...), ve (ScoreSdeVeScheduler: "
    "NCSN++ score models), edm (EDMEulerScheduler, EDMDPMSolverMultistepScheduler), flow (FlowMatchEuler/"
    "HeunDiscreteScheduler: SD3, Flux; or a DPM-Solver/UniPC config with use_flow_sigmas)"
)


def _getter(config):
    if isinstance(config, dict):
        return config.get
    return lambda k, d=None: getattr(config, k, d)


def detect_family(config) -> str:
    """The model family a scheduler config describes: ``"vp"``, ``"ve"``, ``"edm"`` or ``"flow"``.

    Our own configs carry it in ``model_family``; a foreign one is read from its ``_class_name`` (or, without
    one, from its keys). Raises :class:`UnsupportedConfigError`, naming what it found, for anything else.
    """
    get = _getter(config)
    if get("model_family", None) is not None:
        return check_choice("model_family", get("model_family"), FAMILIES)
    name = str(get("_class_name", "") or "") or _class_by_keys(config)
    if name in _REFUSED:
        raise UnsupportedConfigError(f"{name} configs are not supported: {_REFUSED[name]}. Supported: {_SUPPORTED}.")
    flow_on = any(bool(get(k, False)) for k in _FLOW_SWITCHES) or get("prediction_type", None) == "flow_prediction"
    if name in _VP_CLASSES or name in _OUR_CLASSES:
        family = "flow" if flow_on else "vp"
    elif name:
        family = _family_of_class(name)
        if family is None:
            raise UnsupportedConfigError(f"unknown scheduler class {name!r}: its model family cannot be read from its "
                                         f"config. Supported: {_SUPPORTED}.")
    else:  # a bare dict: read the keys
        keys = {k: get(k, None) for k in ("sigma_data", "shift", "snr", "sampling_eps")}
        family = ("edm" if keys["sigma_data"] is not None else "flow" if flow_on or keys["shift"] is not None
                  else "ve" if keys["snr"] is not None or keys["sampling_eps"] is not None else "vp")
    if family == "flow" and get("invert_sigmas", False):
        raise UnsupportedConfigError(f"{name or 'this flow config'} sets invert_sigmas=True (Mochi's inverted model "
                                     f"time), which is not supported. Supported: {_SUPPORTED}.")
    return family


@functools.lru_cache(maxsize=64)
def _classes_with_keys(keys: frozenset) -> tuple:
    import diffusers

    out = []
    for n in (n for n in dir(diffusers) if n.endswith("Scheduler")):
        try:  # a class whose optional backend is missing raises on any attribute
            params = set(inspect.signature(getattr(diffusers, n).__init__).parameters)
        except Exception:
            continue
        if params - {"self", "kwargs"} == keys:
            out.append(n)
    return tuple(out)


def _class_by_keys(config) -> str:
    """The diffusers scheduler class whose ``__init__`` takes exactly this config's keys (an in-memory config has
    no ``_class_name``); "" if none. UnsupportedConfigError if the candidates belong to different families."""
    keys = frozenset(k for k in (config if isinstance(config, dict) else vars(config)) if not k.startswith("_"))
    names = _classes_with_keys(keys)
    kinds = {"refused" if n in _REFUSED else _family_of_class(n) for n in names}
    if len(kinds) > 1:
        raise UnsupportedConfigError(
            f"this config has no `_class_name`, and its keys fit {', '.join(names)}, which are different model "
            "families: pass the config with its `_class_name` (as saved in scheduler_config.json) or say "
            f"`model_family=`. Supported: {_SUPPORTED}.")
    return names[0] if names else ""


def _family_of_class(name: str):
    if name in _VP_CLASSES:
        return "vp"
    return next((f for f, names in _FAMILY_CLASSES.items() if name in names), None)


class ModelFamily:
    """How one family of diffusers models sits on the VE axis ``z = y + sqrt(t) eps`` (math.md §"Model families").

    A family knows three things and nothing else needs to: the time axis (``t <-> model timestep``), the
    pipeline-visible state ``x = scale(t) z`` (with ``init_noise_sigma`` and the ``scale_model_input`` factor),
    and the output units (model output at state ``x`` <-> ``yhat``). Build one with :func:`model_family`.
    Times are float64 tensors (a ``t`` of ``inf`` is the flow family's pure-noise start).
    """

    name = ""
    scales_input = False  # does scale_model_input change the state (EDM's c_in)?
    reference_scheduler = ""  # the diffusers class whose config a portable folder carries
    sigma_schedules = ("karras", "log_t")  # grids the family supports (besides explicit sigmas/timesteps)

    def __init__(self, prediction_type: str, num_train_timesteps: int, t_min: float, t_max: float):
        allowed = FAMILY_PREDICTION_TYPES[self.name]
        if prediction_type not in allowed:
            raise ValueError(f"`prediction_type` of a {self.name!r}-family model must be one of {allowed}; "
                             f"got {prediction_type!r}.")
        if not (0 < t_min < t_max < math.inf):
            raise ValueError(f"the {self.name!r} family needs 0 < t_min < t_max < inf; got [{t_min!r}, {t_max!r}].")
        self.prediction_type, self.num_train_timesteps = prediction_type, int(num_train_timesteps)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def __repr__(self):
        return f"{type(self).__name__}({self.prediction_type!r}, t in [{self.t_min:.4g}, {self.t_max:.4g}])"

    def config_values(self) -> dict:
        """The config keys that define this family's model (written into saved configs, never left implicit)."""
        return {"model_family": self.name, "prediction_type": self.prediction_type}

    # time axis ------------------------------------------------------------------------------------------------
    @property
    def t_start(self) -> float:
        """VE time at which sampling starts by default (the top of the range; ``inf`` for flow)."""
        return self.t_max

    def t(self, timestep) -> torch.Tensor:
        """VE ``t`` (float64) of model timesteps."""
        raise NotImplementedError

    def timestep(self, t) -> torch.Tensor:
        """Model timestep (float64) at VE ``t``."""
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        """The family's own noise level at VE ``t`` (``sqrt(t)``; flow: ``s``), as its schedulers' ``sigmas``."""
        return _float64(t).sqrt()

    def t_of_sigma(self, sigma) -> torch.Tensor:
        return _float64(sigma) ** 2

    def train_t(self) -> torch.Tensor:
        """VE times of the ``num_train_timesteps`` training levels, increasing (for ``alphas_cumprod``)."""
        return torch.exp(torch.linspace(math.log(self.t_min), math.log(self.t_max), self.num_train_timesteps,
                                        dtype=torch.float64))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``abar = 1 / (1 + t)`` over :meth:`train_t`, float64 (the VP view of any family)."""
        return torch.sigmoid(-torch.log(self.train_t()))

    @property
    def betas(self) -> torch.Tensor:
        abar = self.alphas_cumprod
        return 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])

    def check_range(self, t_lo: float, t_hi: float, name: str = "t range", rtol: float = 1e-6) -> None:
        """ValueError unless ``t_min <= t_lo < t_hi <= t_max`` (the model was never trained outside)."""
        lo, hi = self.t_min * (1 - rtol), self.t_max * (1 + rtol)
        if not (math.isfinite(t_lo) and math.isfinite(t_hi) and lo <= t_lo < t_hi <= hi):
            raise ValueError(f"{name} must satisfy {self.t_min:.6g} <= t_lo < t_hi <= {self.t_max:.6g} (the "
                             f"model's range); got [{t_lo!r}, {t_hi!r}].")

    def check_inside(self, t, name: str = "t", rtol: float = 1e-6) -> None:
        """ValueError unless every VE time in ``t`` lies within ``[t_min, t_start]``."""
        t = np.asarray(t, dtype=np.float64)
        lo, hi = self.t_min * (1 - rtol), self.t_start * (1 + rtol)
        if t.size == 0 or np.isnan(t).any() or t.min() < lo or t.max() > hi:
            raise ValueError(f"{name} must lie within the model's range [{self.t_min:.6g}, {self.t_start:.6g}]; "
                             f"got {t.tolist()!r}.")

    # state and units ----------------------------------------------------------------------------------------
    def scale(self, t: TLike) -> TLike:
        """Pipeline state ``x = scale(t) z``."""
        return 1.0 if not isinstance(t, torch.Tensor) else torch.ones_like(t)

    def noise_std(self, t: TLike) -> TLike:
        """``scale(t) sqrt(t)``: the noise standard deviation in the state (finite at ``t = inf`` where it must be)."""
        return _sqrt(t)

    def input_scale(self, t: TLike) -> TLike:
        """What ``scale_model_input`` multiplies the state by (EDM's ``c_in``; 1 elsewhere)."""
        return 1.0 if not isinstance(t, torch.Tensor) else torch.ones_like(t)

    def init_noise_sigma(self, t: float) -> float:
        """Standard deviation of the pipeline's starting state at VE ``t``, as the family's schedulers give it."""
        return 1.0

    def state(self, z: torch.Tensor, t: TLike) -> torch.Tensor:
        """VE ``z`` -> pipeline state ``x``."""
        return z * _per_sample(self.scale(t), z)

    def ve(self, x: torch.Tensor, t: TLike) -> torch.Tensor:
        """Pipeline state ``x`` -> VE ``z`` (finite ``t``)."""
        return x / _per_sample(self.scale(t), x)

    def model_input(self, z: torch.Tensor, t: TLike) -> torch.Tensor:
        """VE ``z`` -> what the model reads: the state, scaled as ``scale_model_input`` scales it."""
        return self.state(z, t) * _per_sample(self.input_scale(t), z)

    def noisy_state(self, y: torch.Tensor, eps: torch.Tensor, t: TLike) -> torch.Tensor:
        """The forward process in the state: ``x = scale(t) y + noise_std(t) eps`` (also at ``t = inf``)."""
        return _per_sample(self.scale(t), y) * y + _per_sample(self.noise_std(t), y) * eps

    def yhat(self, output: torch.Tensor, x: torch.Tensor, t: TLike) -> torch.Tensor:
        """Model output at pipeline state ``x``, VE time ``t`` -> ``yhat`` (data space)."""
        return yhat_from_output(output, self.ve(x, t), t, self.prediction_type)

    def output(self, yhat: torch.Tensor, x: torch.Tensor, t: TLike) -> torch.Tensor:
        """Inverse of :meth:`yhat`: the output of a model whose denoiser is ``yhat`` (the regression target)."""
        return output_from_yhat(yhat, self.ve(x, t), t, self.prediction_type)

    # the exact reverse step in the state ----------------------------------------------------------------------
    def step_coefficients(self, t: float, s: float, reverse_noise: float) -> tuple[float, float, float]:
        """``x_s = c_x x_t + c_y yhat + c_n noise``: :func:`step_coefficients` written in the state (math.md §"The exact step").

        Stays finite at ``t = inf`` (flow, zero-terminal-SNR): ``A / scale(t) = sigma_s^(1+l) sigma_t^(-l) / noise_std(t)``.
        """
        if s == 0:
            return 0.0, 1.0, 0.0  # z_0 = yhat, and scale(0) = 1 in every family
        a, v = step_coefficients(t, s, reverse_noise) if math.isfinite(t) else (0.0, s if reverse_noise > 0 else 0.0)
        ln_ratio = 0.5 * (1 + reverse_noise) * math.log(s) - (0.5 * reverse_noise * math.log(t) if reverse_noise else 0.0)
        c_x = float(self.scale(s)) * math.exp(ln_ratio) / float(self.noise_std(t))
        return c_x, float(self.scale(s)) * (1 - a), float(self.scale(s)) * math.sqrt(v)


class VPFamily(ModelFamily):
    """A DDPM beta table (``x = z / sqrt(1 + t)``, eps / v / sample outputs): every DDPM-family scheduler."""

    name, reference_scheduler = "vp", "DDPMScheduler"
    sigma_schedules = ("karras", "log_t", "ddpm")

    def __init__(self, axis: TimeAxis, prediction_type: str = "epsilon"):
        self.axis = axis
        super().__init__(prediction_type, axis.num_train_timesteps, axis.t_min, axis.t_max)

    def t(self, timestep):
        return self.axis.t(timestep)

    def timestep(self, t):
        return self.axis.timestep(t)

    def train_t(self):
        return torch.exp(self.axis.log_t)

    def scale(self, t):
        return 1 / _sqrt(1 + t)

    def noise_std(self, t):
        return _sqrt(t / (1 + t)) if not (isinstance(t, float) and math.isinf(t)) else 1.0


class VEScoreFamily(ModelFamily):
    """Native VE score models (``ScoreSdeVeScheduler``, NCSN++): state ``z``, timestep ``sigma``, output the score."""

    name, reference_scheduler = "ve", "ScoreSdeVeScheduler"

    def config_values(self):
        return {**super().config_values(), "sigma_min": math.sqrt(self.t_min), "sigma_max": math.sqrt(self.t_max)}

    def t(self, timestep):
        return _float64(timestep) ** 2

    def timestep(self, t):
        return _float64(t).sqrt()

    def init_noise_sigma(self, t):
        return math.sqrt(t)

    def yhat(self, output, x, t):
        return x + _per_sample(t, x) * output  # score = (yhat - z) / t

    def output(self, yhat, x, t):
        return (yhat - x) / _per_sample(t, x)


class EDMFamily(ModelFamily):
    """EDM preconditioning (``EDMEulerScheduler``): state ``z``, input ``c_in z``, timestep ``ln(sigma)/4``,
    ``yhat = c_skip z + c_out F`` with ``c_out`` negated for ``v_prediction``."""

    name, reference_scheduler = "edm", "EDMEulerScheduler"
    scales_input = True

    def __init__(self, prediction_type, num_train_timesteps, t_min, t_max, sigma_data: float):
        super().__init__(prediction_type, num_train_timesteps, t_min, t_max)
        if not (isinstance(sigma_data, (int, float)) and sigma_data > 0):
            raise ValueError(f"`sigma_data` must be a number > 0; got {sigma_data!r}.")
        self.sigma_data = float(sigma_data)

    def config_values(self):
        return {**super().config_values(), "sigma_min": math.sqrt(self.t_min), "sigma_max": math.sqrt(self.t_max),
                "sigma_data": self.sigma_data}

    def t(self, timestep):
        return torch.exp(8.0 * _float64(timestep))

    def timestep(self, t):
        return torch.log(_float64(t)) / 8.0

    def input_scale(self, t):
        return 1 / _sqrt(t + self.sigma_data**2)

    def init_noise_sigma(self, t):
        return math.sqrt(t + 1)

    def _skip_out(self, t, like):
        t, sd2 = _per_sample(t, like), self.sigma_data**2
        c_out = _sqrt(t) * self.sigma_data / _sqrt(t + sd2)
        return sd2 / (t + sd2), (-c_out if self.prediction_type == "v_prediction" else c_out)

    def yhat(self, output, x, t):
        c_skip, c_out = self._skip_out(t, x)
        return c_skip * x + c_out * output

    def output(self, yhat, x, t):
        c_skip, c_out = self._skip_out(t, x)
        return (yhat - c_skip * x) / c_out


class FlowFamily(ModelFamily):
    """Rectified flow (``FlowMatchEulerDiscreteScheduler``): ``x = (1 - s) y + s eps``, timestep ``s K``, velocity
    output ``v = eps - y``. In VE terms ``sigma = s / (1 - s)``, ``t = sigma^2``, ``z = x / (1 - s)``."""

    name, reference_scheduler = "flow", "FlowMatchEulerDiscreteScheduler"
    sigma_schedules = ("flow", "karras", "log_t")

    def __init__(self, num_train_timesteps: int = 1000, prediction_type: str = "flow_prediction"):
        k = int(num_train_timesteps)
        # trained on s in (0, 1]: t from s = 1/K up; t_max (s = 1 - 1/K) bounds karras/log_t grids and likelihoods
        super().__init__(prediction_type, k, (1 / (k - 1)) ** 2, float(k - 1) ** 2)

    @property
    def t_start(self):
        return math.inf

    def sigma(self, t):
        return 1 / (1 + 1 / _float64(t).sqrt())  # s = sigma / (1 + sigma), exact at t = 0 and t = inf

    def t_of_sigma(self, s):
        s = _float64(s)
        return (s / (1 - s)) ** 2

    def t(self, timestep):
        return self.t_of_sigma(_float64(timestep) / self.num_train_timesteps)

    def timestep(self, t):
        return self.sigma(t) * self.num_train_timesteps

    def train_t(self):
        return self.t(torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float64))

    def scale(self, t):
        return 1 / (1 + _sqrt(t))

    def noise_std(self, t):
        if isinstance(t, torch.Tensor):
            return 1 / (1 + 1 / t.sqrt())
        return 1 / (1 + 1 / math.sqrt(t)) if t > 0 else 0.0

    def yhat(self, output, x, t):
        return x - _per_sample(self.noise_std(t), x) * output

    def output(self, yhat, x, t):
        return (x - yhat) / _per_sample(self.noise_std(t), x)


_DEFAULTS = {"ve": (0.01, 1348.0), "edm": (0.002, 80.0)}


def model_family(config) -> ModelFamily:
    """Read a scheduler config (ours, or any diffusers scheduler's, as a dict or ``.config``) into its family.

    Raises :class:`UnsupportedConfigError` for a config of no supported family (see :func:`detect_family`).
    """
    get, family = _getter(config), detect_family(config)
    ptype = get("prediction_type", None)
    if family == "vp":
        return VPFamily(TimeAxis.from_config(config), ptype or "epsilon")
    if family == "flow":
        return FlowFamily(get("num_train_timesteps", 1000) or 1000, ptype or "flow_prediction")
    lo, hi = (get("sigma_min", None) or _DEFAULTS[family][0]), (get("sigma_max", None) or _DEFAULTS[family][1])
    k = get("num_train_timesteps", None) or 1000
    if family == "ve":
        return VEScoreFamily(ptype or "score", k, lo**2, hi**2)
    return EDMFamily(ptype or "epsilon", k, lo**2, hi**2, get("sigma_data", None) or 0.5)


# ------------------------------------------------------------------------------------------------ grids
def karras_t(t_min: float, t_max: float, n: int, rho: float = 7.0) -> list[float]:
    """EDM rho-grid of ``n`` decreasing VE times from ``t_max`` to ``t_min`` (uniform in ``sigma^(1/rho)``)."""
    if n == 1:
        return [t_max]
    lo, hi = t_min ** (0.5 / rho), t_max ** (0.5 / rho)
    return [(hi + i / (n - 1) * (lo - hi)) ** (2 * rho) for i in range(n)]


DEFAULT_T_TOP = 625.0  # sigma = 25: 25x the scale of unit data (pixels in [-1, 1], scaled latents)
DEFAULT_T_TOP_3 = 40.0  # with 3 points: measured best on the trained digits (benchmarks.md)


def default_grid_range(t_min: float, t_max: float, n: int) -> tuple[float, float]:
    """``(t_lo, t_hi)`` of the default ``n``-point grid inside the table's ``[t_min, t_max]`` (benchmarks.md).

    It starts at ``min(t_max, 625)`` (40 for ``n = 3``): above sigma = 25, yhat of unit-scale data is its mean
    whatever the draw, so a call there is wasted, and the starting noise ``N(0, 1 + t)`` is already within 4% of
    the true ``z(t)``. It ends at ``max(t_min, 10^(2 - n))``: with 2-4 calls the last one is better spent at
    moderate noise, from where the final step returns yhat, than near ``t_min``, where a trained network's yhat
    is the identity. Measured on the mixture and on trained digits models; see the benchmarks page.
    """
    hi = min(t_max, DEFAULT_T_TOP_3 if n == 3 else DEFAULT_T_TOP)
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
    random permutation of ``range(n)`` as ``strata`` it is the stratified draw of math.md §"The stratified t draw".
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


FLOW_TIME_SHIFTS = ("exponential", "linear")


def flow_shift(s, shift: float = 1.0, mu: Optional[float] = None, time_shift_type: str = "exponential"):
    """FlowMatch's shift of noise levels ``s`` (flow units): ``shift s / (1 + (shift - 1) s)``, or with ``mu``
    (resolution-dependent, ``use_dynamic_shifting``) ``e^mu / (e^mu + 1/s - 1)`` (``"exponential"``) or
    ``mu / (mu + 1/s - 1)`` (``"linear"``). It moves the grid, never the model's time axis."""
    s = np.asarray(s, dtype=np.float64)
    if mu is None:
        return shift * s / (1 + (shift - 1) * s)
    m = math.exp(mu) if check_choice("time_shift_type", time_shift_type, FLOW_TIME_SHIFTS) == "exponential" else mu
    with np.errstate(divide="ignore"):
        return m / (m + (1 / s - 1))


def flow_grid(n: Optional[int], num_train_timesteps: int, shift: float = 1.0, mu: Optional[float] = None,
              time_shift_type: str = "exponential", shift_terminal: Optional[float] = None,
              sigmas: Optional[Sequence[float]] = None) -> np.ndarray:
    """Decreasing flow noise levels ``s`` laid out as ``FlowMatchEulerDiscreteScheduler.set_timesteps`` lays them
    (no trailing 0): ``n`` points linear in ``s`` between the shifted table ends, or the given pre-shift ``sigmas``,
    then shifted (``mu`` given: dynamic shift), then stretched to end at ``shift_terminal`` if set."""
    k = num_train_timesteps
    if sigmas is None:
        table = np.arange(k, 0, -1, dtype=np.float64) / k
        if mu is None:  # FlowMatch shifts its table in __init__ when the shift is static, and the grid again below
            table = flow_shift(table, shift)
        sigmas = np.linspace(table[0], table[-1], n)
    s = flow_shift(np.asarray(sigmas, dtype=np.float64), shift, mu, time_shift_type)
    if shift_terminal:
        s = 1 - (1 - s) / ((1 - s[-1]) / (1 - shift_terminal))
    return s

