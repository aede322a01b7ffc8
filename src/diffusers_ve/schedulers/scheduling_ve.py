"""``VEScheduler``: McAllester's reverse process with a tunable reverse-noise level, as a diffusers scheduler."""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import process

SIGMA_SCHEDULES = ("karras", "log_t", "ddpm")
VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
_IGNORED_STEP_KWARGS = ("use_clipped_model_output",)


@dataclass
class VESchedulerOutput(SchedulerOutput):
    """Output of a VE scheduler's ``step``.

    Args:
        prev_sample: the VP sample at the next grid time (the input of the next model call).
        pred_original_sample: ``yhat``, the denoised estimate at the current time (data space).
    """

    pred_original_sample: Optional[torch.Tensor] = None


class VESchedulerBase(SchedulerMixin, ConfigMixin):
    """Config validation, grids, VP <-> VE at the boundary and step bookkeeping shared by the VE schedulers.

    Pipeline-visible state is in VP coordinates (``init_noise_sigma = 1``, ``scale_model_input`` is the identity,
    ``timesteps`` are model-table timesteps); the arithmetic of a step runs in VE space through
    :mod:`diffusers_ve.process`.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    init_noise_sigma = 1.0

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        name = str(dict(config or {}).get("_class_name", "")) if not isinstance(config, str) else ""
        if "FlowMatch" in name or (isinstance(config, dict) and "use_dynamic_shifting" in config):
            raise ValueError(
                f"{cls.__name__} cannot take the config of a flow-matching scheduler ({name or 'shift keys'}): "
                "it needs a DDPM-family beta table (linear, scaled_linear, squaredcos_cap_v2, sigmoid or trained_betas)."
            )
        unknown = set(kwargs) - set(inspect.signature(cls.__init__).parameters)
        if unknown:  # diffusers would drop them silently: a typo must not pass for a setting
            allowed = sorted(set(inspect.signature(cls.__init__).parameters) - {"self"})
            hints = {k: difflib.get_close_matches(k, allowed, 1) for k in sorted(unknown)}
            raise TypeError(
                f"{cls.__name__}.from_config() got unknown keyword arguments "
                + ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
                + f"; the config keys are {allowed}."
            )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _setup(self):
        """Validate the config and build the float64 time axis; called at the end of ``__init__``."""
        cfg = self.config
        self.reverse_noise, self.window  # validate now; both are read from the config at every step
        process.check_prediction_type(cfg.prediction_type)
        process.check_choice("sigma_schedule", cfg.sigma_schedule, SIGMA_SCHEDULES)
        process.check_choice("timestep_spacing", cfg.timestep_spacing, process.TIMESTEP_SPACINGS)
        process.check_choice("variance_type", cfg.variance_type, VARIANCE_TYPES)
        process.check_choice("final_sigmas_type", cfg.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if not (isinstance(cfg.rho, (int, float)) and math.isfinite(cfg.rho) and cfg.rho > 0):
            raise ValueError(f"`rho` must be a finite number > 0; got {cfg.rho!r}.")
        self.axis = process.TimeAxis.from_config(cfg)
        self.t_lo = self.axis.t_min if cfg.t_min is None else float(cfg.t_min)
        self.t_hi = self.axis.t_max if cfg.t_max is None else float(cfg.t_max)
        self.axis.check_range(self.t_lo, self.t_hi, "[`t_min`, `t_max`]")
        self.calibrated_grids  # validate now
        self.alphas_cumprod = self.axis.alphas_cumprod.float()  # for pipelines and training code that read it
        self.timesteps = None
        self.num_inference_steps = None
        self._t_grid: List[float] = []
        self._step_index = None
        self._begin_index = None

    @property
    def reverse_noise(self) -> float:
        """lambda, read from the config (so ``register_to_config(reverse_noise=...)`` takes effect)."""
        return process.check_reverse_noise(self.config.reverse_noise)

    @property
    def window(self):
        """``reverse_noise_window`` as ``(t_lo, t_hi)`` or None, read from the config."""
        return self._check_window(self.config.reverse_noise_window)

    @property
    def calibrated_grids(self) -> dict:
        """``{num_inference_steps: [t, ...]}`` from the config key ``calibrated_grids`` (JSON keys are strings)."""
        grids = self.config.get("calibrated_grids", None) or {}
        out = {}
        for key, grid in dict(grids).items():
            t = np.asarray(grid, dtype=np.float64) if isinstance(grid, (list, tuple)) else np.array([np.nan])
            if not (str(key).isdigit() and int(key) == len(t) and t.ndim == 1):
                raise ValueError(
                    "`calibrated_grids` must map a number of steps n (e.g. \"5\") to a list of n VE times; "
                    f"got {key!r}: {grid!r}."
                )
            _check_decreasing(f"calibrated_grids[{key!r}]", t)
            self.axis.check_inside(t, f"`calibrated_grids[{key!r}]`")
            out[int(key)] = t.tolist()
        return out

    def _check_window(self, window):
        if window is None:
            return None
        try:
            lo, hi = (float(w) for w in window)
        except (TypeError, ValueError):
            lo = hi = float("nan")
        if not (0 <= lo < hi and not math.isnan(hi)):
            raise ValueError(f"`reverse_noise_window` must be null or [t_lo, t_hi] with 0 <= t_lo < t_hi; got {window!r}.")
        return (lo, hi)

    # ------------------------------------------------------------------------------------ diffusers API
    def __len__(self):
        return self.config.num_train_timesteps

    @property
    def step_index(self):
        """Index of the next step in ``timesteps`` (None before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Where the first ``step`` starts in ``timesteps`` (img2img pipelines call this)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: the model input is the VP sample, as for DDPM/DDIM."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[float]] = None,
        sigmas: Optional[Sequence[float]] = None,
    ):
        """Lay out the reverse grid.

        Args:
            num_inference_steps: number of grid points (model calls for a first-order scheduler); the grid comes
                from ``sigma_schedule``.
            device: where ``timesteps`` live.
            timesteps: model-table timesteps, strictly decreasing, within ``[0, num_train_timesteps - 1]``.
            sigmas: VE noise levels ``sqrt(t)``, strictly decreasing, within the table (a trailing 0 is allowed).
        """
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of `num_inference_steps`, `timesteps` or `sigmas` to `set_timesteps`.")
        t_grid, taus = self._grid(num_inference_steps, timesteps, sigmas)
        final = 0.0 if self.config.final_sigmas_type == "zero" else self.axis.t_min
        t_grid = [float(x) for x in t_grid]
        if t_grid[-1] > 0:
            t_grid.append(min(final, t_grid[-1]))
        if taus is None:
            taus = self.axis.timestep(torch.tensor(t_grid[:-1], dtype=torch.float64))
        self._t_grid = t_grid
        self.num_inference_steps = len(t_grid) - 1
        self.sigmas = torch.tensor(t_grid, dtype=torch.float64).sqrt().float()
        self.timesteps = self._layout(torch.as_tensor(taus, dtype=torch.float64)).float().to(device)
        self._step_index = None
        self._begin_index = None
        self._reset()

    def _grid(self, n, timesteps, sigmas):
        """Decreasing VE times of the grid and, where they are given, the model timesteps."""
        if sigmas is not None:
            t = np.asarray(sigmas, dtype=np.float64) ** 2
            _check_decreasing("sigmas", t)
            self.axis.check_inside(t[:-1] if t[-1] == 0 else t, "`sigmas`**2")
            return t.tolist(), None
        if timesteps is not None:
            tau = np.asarray(timesteps, dtype=np.float64)
            _check_decreasing("timesteps", tau)
            k = self.config.num_train_timesteps
            if not self.axis.continuous and (tau.min() < 0 or tau.max() > k - 1):
                raise ValueError(f"`timesteps` must lie in [0, {k - 1}]; got [{tau.min()}, {tau.max()}].")
            return self.axis.t(torch.as_tensor(tau)).tolist(), tau
        if not (isinstance(n, (int, np.integer)) and n >= 1):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1; got {n!r}.")
        cfg = self.config
        if int(n) in self.calibrated_grids:
            return self.calibrated_grids[int(n)], None
        if cfg.sigma_schedule in ("karras", "log_t"):
            lo, hi = process.default_grid_range(self.axis.t_min, self.axis.t_max, int(n))
            lo = lo if cfg.t_min is None else self.t_lo  # a t_min / t_max of the config is used as given
            hi = hi if cfg.t_max is None else self.t_hi
            if cfg.sigma_schedule == "karras":
                return process.karras_t(lo, hi, int(n), cfg.rho), None
            return process.log_t_grid(lo, hi, int(n)), None
        tau = process.ddpm_timesteps(cfg.num_train_timesteps, int(n), cfg.timestep_spacing, cfg.steps_offset)
        return self.axis.t(torch.as_tensor(tau)).tolist(), tau

    def _layout(self, taus: torch.Tensor) -> torch.Tensor:
        """Model timesteps as the pipeline iterates them (one per model call)."""
        return taus

    def _reset(self):
        """Clear per-trajectory state (solver history)."""

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        self._step_index = self.index_for_timestep(timestep)

    def index_for_timestep(self, timestep) -> int:
        """Position of ``timestep`` in ``timesteps``; ValueError if it is not in the schedule."""
        tau = float(torch.as_tensor(timestep).reshape(-1)[0])
        hits = (self.timesteps.cpu().double() - tau).abs() <= 1e-4 * max(1.0, abs(tau))
        idx = hits.nonzero().flatten()
        if len(idx) == 0:
            raise ValueError(
                f"timestep {tau} is not in the schedule set by `set_timesteps` "
                f"({self.timesteps[:3].tolist()} ... {self.timesteps[-1:].tolist()})."
            )
        return int(idx[0])

    # -------------------------------------------------------------------------------------- step helpers
    def _begin_step(self, model_output, timestep, sample, kwargs):
        """Validate a ``step`` call; returns the grid index of the model call this is."""
        for key, value in kwargs.items():
            if key == "eta":
                if value not in (None, 0, 0.0):
                    raise ValueError(
                        f"{type(self).__name__} does not take `eta` ({value!r}); set the reverse-noise level with "
                        "`reverse_noise` (lambda >= 0, 0 = deterministic), e.g. "
                        f"`pipe.scheduler = {type(self).__name__}.from_config(pipe.scheduler.config, reverse_noise=0.5)`."
                    )
            elif key not in _IGNORED_STEP_KWARGS:
                raise TypeError(f"{type(self).__name__}.step() got an unexpected keyword argument {key!r}.")
        if self.timesteps is None:
            raise ValueError("call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError("`step` was called more times than the schedule has timesteps; call `set_timesteps` again.")
        return self._step_index

    def _yhat(self, model_output: torch.Tensor, sample: torch.Tensor, t: float):
        """VP sample + model output at VE time ``t`` -> (VE ``z``, ``yhat``) in the compute dtype."""
        dtype = process.compute_dtype(sample)
        model_output = process.mean_output(model_output, sample, self.config.variance_type)
        if not bool(torch.isfinite(model_output.sum(dtype=torch.float32))):  # one reduction: NaN/inf propagate
            raise ValueError("the model output has non-finite values (NaN or inf); check the model and its dtype.")
        z = process.ve_from_vp(sample.to(dtype), t)
        yhat = process.yhat_from_output(model_output.to(dtype), z, t, self.config.prediction_type)
        return z, self._clip(yhat)

    def _clip(self, yhat):
        cfg = self.config
        if cfg.thresholding:
            return DDPMScheduler._threshold_sample(self, yhat)
        if cfg.clip_sample:
            return yhat.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return yhat

    def _noise(self, like, generator, variance_noise):
        if variance_noise is not None:
            return variance_noise.to(like.device, like.dtype)
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def _lambda(self, t: float) -> float:
        return process.reverse_noise_at(t, self.reverse_noise, self.window)

    def _output(self, z_s, s, yhat, sample, return_dict):
        prev = process.vp_from_ve(z_s, s).to(sample.dtype)
        yhat = yhat.to(sample.dtype)
        if not return_dict:
            return (prev, yhat)
        return VESchedulerOutput(prev_sample=prev, pred_original_sample=yhat)

    # --------------------------------------------------------------------------------- training helpers
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """VP ``x = (y + sqrt(t) eps) / sqrt(1 + t)`` at model timesteps (integer or fractional)."""
        t = self._t_of(timesteps, original_samples)
        dtype = process.compute_dtype(original_samples)
        z = process.noisy(original_samples.to(dtype), noise.to(dtype), t)
        return process.vp_from_ve(z, t).to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target for clean ``sample`` and ``noise`` at model timesteps."""
        t = self._t_of(timesteps, sample)
        dtype = process.compute_dtype(sample)
        return process.velocity(sample.to(dtype), noise.to(dtype), t).to(sample.dtype)

    def _t_of(self, timesteps, like):
        t = self.axis.t(torch.as_tensor(timesteps).reshape(-1))
        if t.numel() == 1:
            t = t.expand(like.shape[0])
        return t.to(like.device, process.compute_dtype(like))


class VEScheduler(VESchedulerBase):
    """Reverse VE diffusion with reverse-noise level lambda, first order (exact-linear) or 2M multistep.

    Each step freezes ``yhat`` and solves the reverse SDE ``dz = -((1+lambda)/2) (yhat - z)/t dt + sqrt(lambda) dW``
    exactly (``solver_order=1``), or adds the DPM-Solver++ second-order correction (``solver_order=2``).
    lambda = 1 at order 1 is DDPM's ancestral step, lambda = 0 is DDIM (eta = 0); the last step lands on ``t = 0``.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            the model's DDPM beta table (as in ``DDPMScheduler``); it defines the time axis ``t <-> timestep``.
        prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        reverse_noise: lambda, a finite real >= 0. 0 = probability-flow ODE, 1 = reverse noise equal to the
            forward noise (DDPM), larger = more.
        reverse_noise_window: ``[t_lo, t_hi]`` in VE time or null; lambda is 0 for steps that start outside it.
        solver_order: 1 (exact-linear step) or 2 (2M multistep; first and last steps are order 1).
        sigma_schedule: the grid: ``"karras"`` (EDM rho-grid in sigma = sqrt(t)), ``"log_t"`` (uniform in ln t) or
            ``"ddpm"`` (the integer timesteps of ``DDPMScheduler``, laid out by ``timestep_spacing``).
        rho: the Karras grid exponent.
        t_min, t_max: VE-time range of the grid (default: the table's ``t_0`` and ``t_{K-1}``).
        timestep_spacing, steps_offset: diffusers' meaning, read only for ``sigma_schedule="ddpm"``.
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value: applied to yhat,
            with DDPMScheduler's meaning.
        variance_type: a DDPM config's variance choice. ``learned``/``learned_range`` drop the variance half of the
            model output; the ``fixed_*`` values are accepted and replaced by ``reverse_noise``.
        final_sigmas_type: ``"zero"`` (last step returns yhat) or ``"sigma_min"`` (stop at the table's ``t_0``; as in
            ``EulerDiscreteScheduler``, a grid that already ends there gets a null step t_0 -> t_0).
        timestep_type: ``"discrete"`` (table index, interpolated in ln t) or ``"continuous"`` (``0.25 ln sigma``).
        calibrated_grids: ``{"n": [t_1, ..., t_n]}``, grids fitted to the model by :meth:`calibrate`; for those
            ``num_inference_steps`` they replace ``sigma_schedule``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        prediction_type: str = "epsilon",
        reverse_noise: float = 1.0,
        reverse_noise_window: Optional[Tuple[float, float]] = None,
        solver_order: int = 2,
        sigma_schedule: str = "karras",
        rho: float = 7.0,
        t_min: Optional[float] = None,
        t_max: Optional[float] = None,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        variance_type: Optional[str] = None,
        final_sigmas_type: str = "zero",
        timestep_type: str = "discrete",
        rescale_betas_zero_snr: bool = False,
        calibrated_grids: Optional[Dict[str, List[float]]] = None,
    ):
        if solver_order not in (1, 2):
            raise ValueError(f"`solver_order` must be 1 or 2; got {solver_order!r}.")
        self._setup()

    def _reset(self):
        self._history = None  # (t, yhat) of the previous model call, for the 2M step

    def calibrate(self, model, num_inference_steps: int, **kwargs):
        """Fit the grid of ``num_inference_steps`` points to ``model`` and keep it in the config key
        ``calibrated_grids`` (so ``save_pretrained`` saves it); ``set_timesteps(num_inference_steps)`` then uses it.

        ``pipe.scheduler.calibrate(pipe.unet, 5)``, then ``pipe(num_inference_steps=5)``. The fit runs a
        ``teacher_steps``-step ODE solution and at most ``max_evals`` few-step runs on ``num_draws`` starting
        noises; see :func:`diffusers_ve.calibrate.calibrate_grid` for those arguments. Returns its report.
        """
        from ..calibrate import calibrate_grid

        report = calibrate_grid(self, model, num_inference_steps, **kwargs)
        grids = {str(k): v for k, v in self.calibrated_grids.items()}
        grids[str(report.num_inference_steps)] = report.t_grid
        self.register_to_config(calibrated_grids=grids)
        return report

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        return_dict: bool = True,
        variance_noise: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> Union[VESchedulerOutput, Tuple]:
        """One reverse step from the current grid time ``t`` to the next one ``s``.

        Args:
            model_output: the model's output at (``sample``, ``timestep``), in ``prediction_type`` units.
            timestep: the current entry of ``timesteps``.
            sample: the VP sample ``x = z / sqrt(1 + t)``.
            generator: a ``torch.Generator`` or a list of them (one per batch element) for the reverse noise.
            return_dict: return a ``SchedulerOutput`` rather than a tuple.
            variance_noise: standard-normal noise to use instead of drawing it (shape of ``sample``).
            kwargs: DDIMPipeline's ``eta`` (None or 0 only; use ``reverse_noise``) and ``use_clipped_model_output``
                are accepted and ignored; anything else is a TypeError.

        Returns:
            ``VESchedulerOutput(prev_sample, pred_original_sample)``: the VP sample at ``s`` and ``yhat``.
        """
        i = self._begin_step(model_output, timestep, sample, kwargs)
        t, s = self._t_grid[i], self._t_grid[i + 1]
        z, yhat = self._yhat(model_output, sample, t)
        lam = self._lambda(t)
        a, v = process.step_coefficients(t, s, lam)
        correction = None
        if self.config.solver_order == 2 and self._history is not None and s > 0:
            t_prev, yhat_prev = self._history
            correction = process.multistep_weight(t, s, t_prev, lam) * (yhat - yhat_prev)
        noise = self._noise(z, generator, variance_noise) if v > 0 else None
        z_s = process.linear_step(z, yhat, a, v, noise, correction)
        self._history = (t, yhat)
        self._step_index += 1
        return self._output(z_s, s, yhat, sample, return_dict)


def _check_decreasing(name, values):
    if values.ndim != 1 or len(values) < 1 or not np.all(np.isfinite(values)) or np.any(np.diff(values) >= 0):
        raise ValueError(f"`{name}` must be a non-empty, finite, strictly decreasing sequence; got {values.tolist()!r}.")


__all__ = ["VEScheduler", "VESchedulerBase", "VESchedulerOutput"]
