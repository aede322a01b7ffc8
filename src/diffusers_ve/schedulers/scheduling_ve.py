"""``VEScheduler``: McAllester's reverse process with a tunable reverse-noise level, as a diffusers scheduler."""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import process

SIGMA_SCHEDULES = ("karras", "log_t", "exponential", "ddpm", "flow")  # exponential: EDM's name for log_t
VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
_IGNORED_STEP_KWARGS = ("use_clipped_model_output",)


@dataclass
class VESchedulerOutput(SchedulerOutput):
    """Output of a VE scheduler's ``step``.

    Args:
        prev_sample: the pipeline state at the next grid time (the input of the next model call).
        pred_original_sample: ``yhat``, the denoised estimate at the current time (data space).
    """

    pred_original_sample: Optional[torch.Tensor] = None


class VESchedulerBase(SchedulerMixin, ConfigMixin):
    """Config validation, grids, the family's state at the boundary and step bookkeeping shared by the VE schedulers.

    The model family (``model_family``: a DDPM table, a native VE score model, EDM or rectified flow) is read from
    the config once, by :func:`diffusers_ve.process.model_family`; it fixes what the pipeline sees (the state,
    ``init_noise_sigma``, ``scale_model_input``, ``timesteps`` in the model's units). The arithmetic of a step is the
    exact VE step of :mod:`diffusers_ve.process`, written in that state.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from any supported scheduler config: its model family is detected (and refused by name if we
        cannot read it) and stored as ``model_family``; keyword arguments override config keys."""
        unknown = set(kwargs) - set(inspect.signature(cls.__init__).parameters)
        if unknown:  # diffusers would drop them silently: a typo must not pass for a setting
            allowed = sorted(set(inspect.signature(cls.__init__).parameters) - {"self"})
            hints = {k: difflib.get_close_matches(k, allowed, 1) for k in sorted(unknown)}
            raise TypeError(
                f"{cls.__name__}.from_config() got unknown keyword arguments "
                + ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
                + f"; the config keys are {allowed}."
            )
        if config is not None and not isinstance(config, str):
            kwargs = {**_family_keys(config, kwargs), **kwargs}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def compatibles(self):
        """The diffusers schedulers that read this model's family (a DDPM-table config is not an EDM one)."""
        names = _FAMILY_COMPATIBLES.get(self.family.name) or self._compatibles
        return [c for c in (getattr(diffusers, n, None) for n in names) if c is not None]

    def _setup(self):
        """Validate the config and read the model family; called at the end of ``__init__``."""
        cfg = self.config
        self.reverse_noise, self.window  # validate now; both are read from the config at every step
        self.family = process.model_family({**cfg, "_class_name": "VEScheduler"})  # ours, whatever the subclass
        defining = {k: v for k, v in self.family.config_values().items() if cfg.get(k) != v}
        if defining:  # saved configs name their family and its range, whatever defaults filled them
            self.register_to_config(**defining)
        process.check_choice("sigma_schedule", cfg.sigma_schedule, SIGMA_SCHEDULES)
        if _grid_name(cfg.sigma_schedule) not in self.family.sigma_schedules:
            raise ValueError(f"`sigma_schedule={cfg.sigma_schedule!r}` does not apply to a {self.family.name!r}-family "
                             f"model; use one of {self.family.sigma_schedules}.")
        process.check_choice("timestep_spacing", cfg.timestep_spacing, process.TIMESTEP_SPACINGS)
        process.check_choice("variance_type", cfg.variance_type, VARIANCE_TYPES)
        process.check_choice("final_sigmas_type", cfg.final_sigmas_type, FINAL_SIGMAS_TYPES)
        process.check_choice("time_shift_type", cfg.time_shift_type, process.FLOW_TIME_SHIFTS)
        if not (isinstance(cfg.rho, (int, float)) and math.isfinite(cfg.rho) and cfg.rho > 0):
            raise ValueError(f"`rho` must be a finite number > 0; got {cfg.rho!r}.")
        if not (isinstance(cfg.shift, (int, float)) and cfg.shift > 0):
            raise ValueError(f"`shift` must be a number > 0; got {cfg.shift!r}.")
        self.t_lo = self.family.t_min if cfg.t_min is None else float(cfg.t_min)
        self.t_hi = self.family.t_max if cfg.t_max is None else float(cfg.t_max)
        self.family.check_range(self.t_lo, self.t_hi, "[`t_min`, `t_max`]")
        self.calibrated_grids  # validate now
        # what DDPM-family schedulers expose and training code reads (any family: abar = 1 / (1 + t))
        self.alphas_cumprod = self.family.alphas_cumprod.float()
        self.betas = self.family.betas.float()
        self.alphas = 1.0 - self.betas
        self.timesteps = None
        self.num_inference_steps = None
        self._t_grid: List[float] = []
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting state the pipeline draws (1 for DDPM tables and flows)."""
        return self.family.init_noise_sigma(self._t_grid[0] if self._t_grid else self._t_start())

    def _t_start(self) -> float:
        cfg = self.config
        return self.family.t_start if cfg.sigma_schedule == "flow" and cfg.t_max is None else self.t_hi

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
            self.family.check_inside(t, f"`calibrated_grids[{key!r}]`")
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
        """The model input for the state ``sample`` at ``timestep``: EDM's ``c_in x``; the identity in the other
        families (the DDPM, VE-score and flow models read their state as it is)."""
        if not self.family.scales_input:
            return sample
        index = self._step_index if self._step_index is not None else self._start_index(timestep)
        c_in = self.family.input_scale(self._call_time(index))
        return (sample.to(process.compute_dtype(sample)) * c_in).to(sample.dtype)

    def _call_time(self, index: int) -> float:
        """VE time at which model call ``index`` (a position in ``timesteps``) evaluates the model."""
        return self._t_grid[index]

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[float]] = None,
        sigmas: Optional[Sequence[float]] = None,
        mu: Optional[float] = None,
    ):
        """Lay out the reverse grid.

        Args:
            num_inference_steps: number of grid points (model calls for a first-order scheduler); the grid comes
                from ``sigma_schedule``.
            device: where ``timesteps`` live.
            timesteps: model timesteps, strictly decreasing, within the model's range. The ``timesteps`` this
                scheduler laid out itself (float32) give back exactly its own grid.
            sigmas: noise levels in the family's own units, strictly decreasing, within the model's range (a
                trailing 0 is allowed): ``sqrt(t)`` (DDPM table, VE score, EDM) or, for a flow model, the pre-shift
                ``s`` that FlowMatch schedulers take (shifted by ``shift`` or ``mu`` as they shift them).
            mu: the resolution-dependent shift of flow models with ``use_dynamic_shifting`` (Flux pipelines pass it).
        """
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of `num_inference_steps`, `timesteps` or `sigmas` to `set_timesteps`.")
        t_grid, taus = self._grid(num_inference_steps, timesteps, sigmas, mu)
        final = 0.0 if self.config.final_sigmas_type == "zero" else self.family.t_min
        t_grid = [float(x) for x in t_grid]
        if t_grid[-1] > 0:
            t_grid.append(min(final, t_grid[-1]))
        if taus is None:
            taus = self.family.timestep(torch.tensor(t_grid[:-1], dtype=torch.float64))
        self._t_grid = t_grid
        self.num_inference_steps = len(t_grid) - 1
        self.sigmas = self.family.sigma(torch.tensor(t_grid, dtype=torch.float64)).float()
        self.timesteps = self._layout(torch.as_tensor(taus, dtype=torch.float64)).float().to(device)
        self._step_index = None
        self._begin_index = None
        self._reset()

    def _grid(self, n, timesteps, sigmas, mu=None):
        """Decreasing VE times of the grid and, where they are given, the model timesteps."""
        fam, cfg = self.family, self.config
        if sigmas is not None:
            sig = np.asarray(sigmas, dtype=np.float64)
            _check_decreasing("sigmas", sig)
            if fam.name == "flow":
                sig = self._flow_s(None, sig, mu)
            t = fam.t_of_sigma(torch.as_tensor(sig)).numpy()
            fam.check_inside(t[:-1] if t[-1] == 0 else t, "`sigmas` (as VE times)")
            return t.tolist(), None
        if timesteps is not None:
            tau = np.asarray(torch.as_tensor(timesteps).cpu(), dtype=np.float64)
            own = self._own_grid(tau)
            if own is not None:
                return own
            _check_decreasing("timesteps", tau)
            lo, hi = (float(fam.timestep(torch.tensor(x, dtype=torch.float64))) for x in (fam.t_min, fam.t_start))
            if tau.min() < lo - 1e-6 * abs(lo) or tau.max() > hi + 1e-6 * abs(hi):
                raise ValueError(f"`timesteps` must lie in the model's range [{lo:.6g}, {hi:.6g}]; "
                                 f"got [{tau.min()}, {tau.max()}].")
            t = fam.t(torch.as_tensor(tau)).numpy()
            fam.check_inside(t, "`timesteps` (as VE times)")
            return t.tolist(), tau
        if not (isinstance(n, (int, np.integer)) and n >= 1):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1; got {n!r}.")
        calibrated = self.calibrated_grids  # validated on every read: read it once
        if int(n) in calibrated:
            return calibrated[int(n)], None
        grid = _grid_name(cfg.sigma_schedule)
        if grid in ("karras", "log_t"):
            lo, hi = self.t_lo, self.t_hi
            if fam.name == "vp":  # DDPM tables: the budget's range (other families keep their reference grids)
                lo, hi = process.default_grid_range(fam.t_min, fam.t_max, int(n))
                lo = lo if cfg.t_min is None else self.t_lo  # a t_min / t_max of the config is used as given
                hi = hi if cfg.t_max is None else self.t_hi
            if grid == "karras":
                return process.karras_t(lo, hi, int(n), cfg.rho), None
            return process.log_t_grid(lo, hi, int(n)), None
        if grid == "flow":
            return fam.t_of_sigma(torch.as_tensor(self._flow_s(int(n), None, mu))).tolist(), None
        tau = process.ddpm_timesteps(cfg.num_train_timesteps, int(n), cfg.timestep_spacing, cfg.steps_offset)
        return fam.t(torch.as_tensor(tau)).tolist(), tau

    def _flow_s(self, n, sigmas, mu):
        """FlowMatch's shifted grid in ``s`` (``mu`` is required with ``use_dynamic_shifting``, as there)."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed to `set_timesteps` when `use_dynamic_shifting` is True (the "
                             "resolution-dependent shift that Flux-type pipelines compute from the image size).")
        return process.flow_grid(n, cfg.num_train_timesteps, cfg.shift, mu if cfg.use_dynamic_shifting else None,
                                 cfg.time_shift_type, cfg.shift_terminal, sigmas)

    def _own_grid(self, tau):
        """The grid whose float32 ``timesteps`` are ``tau`` (the current one, or the default one of that length),
        so that a pipeline passing ``scheduler.timesteps`` back gets the same run; else None."""
        def same(ts):
            return ts is not None and len(ts) == len(tau) and np.array_equal(ts.cpu().numpy(), tau.astype(np.float32))

        if same(self.timesteps):
            return list(self._t_grid), None
        try:
            probe = copy.copy(self)
            probe.set_timesteps(self._grid_points_for_calls(len(tau)))
        except ValueError:
            return None
        return (list(probe._t_grid), None) if same(probe.timesteps) else None

    def _grid_points_for_calls(self, calls: int) -> int:
        return calls

    def _layout(self, taus: torch.Tensor) -> torch.Tensor:
        """Model timesteps as the pipeline iterates them (one per model call)."""
        return taus

    def _reset(self):
        """Clear per-trajectory state (solver history)."""

    def _init_step_index(self, timestep):
        self._step_index = self._start_index(timestep)

    def _start_index(self, timestep) -> int:
        return self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

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

    def _yhat(self, model_output: torch.Tensor, sample: torch.Tensor, t: float) -> torch.Tensor:
        """Pipeline state + model output at VE time ``t`` -> ``yhat`` in the compute dtype."""
        dtype = process.compute_dtype(sample)
        model_output = process.mean_output(model_output, sample, self.config.variance_type)
        if not bool(torch.isfinite(model_output.sum(dtype=torch.float32))):  # one reduction: NaN/inf propagate
            raise ValueError("the model output has non-finite values (NaN or inf); check the model and its dtype.")
        return self._clip(self.family.yhat(model_output.to(dtype), sample.to(dtype), t))

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

    def _step_state(self, x, yhat, t, s, lam, noise=None, correction=None):
        """The exact reverse step ``t -> s`` in the pipeline state; ``correction`` is a VE-space term."""
        c_x, c_y, c_n = self.family.step_coefficients(t, s, lam)
        out = c_x * x + c_y * yhat
        if correction is not None:
            out = out + float(self.family.scale(s)) * correction
        return out + c_n * noise if c_n > 0 else out

    def _output(self, x_s, yhat, sample, return_dict):
        prev, yhat = x_s.to(sample.dtype), yhat.to(sample.dtype)
        if not return_dict:
            return (prev, yhat)
        return VESchedulerOutput(prev_sample=prev, pred_original_sample=yhat)

    # --------------------------------------------------------------------------------- training helpers
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The family's state at model timesteps: ``x = scale(t) (y + sqrt(t) eps)`` (VP: ``z / sqrt(1 + t)``;
        flow: ``(1 - s) y + s eps``; VE and EDM: ``z``)."""
        t = self._t_of(timesteps, original_samples)
        dtype = process.compute_dtype(original_samples)
        return self.family.noisy_state(original_samples.to(dtype), noise.to(dtype), t).to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """FlowMatch's name (and argument order) for :meth:`add_noise`, as its img2img pipelines call it."""
        return self.add_noise(sample, noise, timestep)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target of a DDPM-table model for clean ``sample`` and ``noise`` at model timesteps."""
        if self.family.name != "vp":
            raise ValueError(f"`get_velocity` is the v-prediction target of a DDPM table; this is a "
                             f"{self.family.name!r}-family scheduler.")
        t = self._t_of(timesteps, sample)
        dtype = process.compute_dtype(sample)
        return process.velocity(sample.to(dtype), noise.to(dtype), t).to(sample.dtype)

    def _t_of(self, timesteps, like):
        """VE times of model timesteps, per sample: the grid's own ``t`` for a timestep of the current schedule
        (no float32 round trip), else the family's map."""
        tau = torch.as_tensor(timesteps).reshape(-1)
        t = self.family.t(tau)
        if self.timesteps is not None:  # one comparison of every timestep with the schedule (a training hot path)
            ts, v = self.timesteps.cpu().double(), tau.cpu().double()
            hit = (ts[None, :] - v[:, None]).abs() <= 1e-6 * v.abs().clamp(min=1.0)[:, None]
            rows = hit.any(1)
            if bool(rows.any()):
                grid = torch.tensor([self._call_time(i) for i in range(len(ts))], dtype=torch.float64)
                t = torch.where(rows.to(t.device), grid[hit.int().argmax(1)].to(t.device), t)  # first hit
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
        sigma_schedule: the grid: ``"karras"`` (EDM rho-grid in sigma = sqrt(t)), ``"log_t"`` (uniform in ln t;
            ``"exponential"`` is EDM's name for it), ``"ddpm"`` (the integer timesteps of ``DDPMScheduler``, laid out
            by ``timestep_spacing``; DDPM tables only) or ``"flow"`` (FlowMatch's shifted grid; flow models, and
            their default).
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
        model_family: ``"vp"`` (a DDPM beta table), ``"ve"`` (a native VE score model, ``ScoreSdeVeScheduler``),
            ``"edm"`` (EDM preconditioning) or ``"flow"`` (rectified flow); ``from_config`` reads it from any
            supported diffusers config and refuses the rest by name. See the swap guide's family sections.
        sigma_min, sigma_max, sigma_data: the model's range in ``sigma = sqrt(t)`` (VE score, EDM; EulerDiscrete's
            continuous-timestep models) and EDM's data standard deviation, as their diffusers schedulers name them.
        shift, shift_terminal, time_shift_type: a flow model's grid (``sigma_schedule="flow"``), with
            ``FlowMatchEulerDiscreteScheduler``'s meaning.
        use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len: the resolution-dependent
            shift, as in ``FlowMatchEulerDiscreteScheduler``; pipelines read them to compute ``mu``.
        snr_shift_scale: CogVideoX's table reshaping, ``t -> snr_shift_scale * t``.
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
        model_family: Optional[str] = None,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        sigma_data: Optional[float] = None,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: Optional[float] = None,
        time_shift_type: str = "exponential",
        snr_shift_scale: Optional[float] = None,
    ):
        if solver_order not in (1, 2):
            raise ValueError(f"`solver_order` must be 1 or 2; got {solver_order!r}.")
        self._setup()

    def _reset(self):
        self._history = None  # (t, yhat) of the previous model call, for the 2M step

    def calibrate(self, model, num_inference_steps: int, fit_window: Optional[bool] = None, window_draws: int = 1024,
                  **kwargs):
        """Fit the grid of ``num_inference_steps`` points to ``model`` and keep it in the config key
        ``calibrated_grids`` (so ``save_pretrained`` saves it); ``set_timesteps(num_inference_steps)`` then uses it.
        With ``reverse_noise`` > 0 it then fits ``reverse_noise_window`` on that grid and keeps it in the config
        (one window, in VE time, for every budget: fit it at the budget you sample with).

        ``pipe.scheduler.calibrate(pipe.unet, 5)``, then ``pipe(num_inference_steps=5)``. The grid fit runs a
        ``teacher_steps``-step ODE solution and at most ``max_evals`` few-step runs on ``num_draws`` starting
        noises; see :func:`diffusers_ve.calibrate.calibrate_grid` for those arguments. The window fit
        (:func:`diffusers_ve.calibrate.calibrate_window`) compares ``window_draws`` samples with a
        ``teacher_steps``-step sampler at the same lambda, at most 17 few-step runs.

        Args:
            model: the denoising network, called as ``model(x, timesteps)``.
            num_inference_steps: the budget (>= 2).
            fit_window: fit ``reverse_noise_window`` too; default: when ``reverse_noise`` > 0.
            window_draws: samples per set in the window fit.

        Returns:
            The grid's :class:`~diffusers_ve.calibrate.CalibrationReport`, with the window's report as ``.window``.
        """
        from ..calibrate import calibrate_grid, calibrate_window

        fit_window = self.reverse_noise > 0 if fit_window is None else fit_window
        report = calibrate_grid(self, model, num_inference_steps, **kwargs)
        grids = {str(k): v for k, v in self.calibrated_grids.items()}
        grids[str(report.num_inference_steps)] = report.t_grid
        self.register_to_config(calibrated_grids=grids)
        if fit_window:
            kwargs = {k: v for k, v in kwargs.items() if k in ("sample_shape", "teacher_steps", "seed", "device")}
            report.window = calibrate_window(self, model, num_inference_steps, num_draws=window_draws, **kwargs)
            self.register_to_config(reverse_noise_window=report.window.window)
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
            sample: the pipeline state at ``t`` (the family's: ``z / sqrt(1 + t)`` for a DDPM table).
            generator: a ``torch.Generator`` or a list of them (one per batch element) for the reverse noise.
            return_dict: return a ``SchedulerOutput`` rather than a tuple.
            variance_noise: standard-normal noise to use instead of drawing it (shape of ``sample``).
            kwargs: DDIMPipeline's ``eta`` (None or 0 only; use ``reverse_noise``) and ``use_clipped_model_output``
                are accepted and ignored; anything else is a TypeError.

        Returns:
            ``VESchedulerOutput(prev_sample, pred_original_sample)``: the state at ``s`` and ``yhat``.
        """
        i = self._begin_step(model_output, timestep, sample, kwargs)
        t, s = self._t_grid[i], self._t_grid[i + 1]
        yhat = self._yhat(model_output, sample, t)
        lam = self._lambda(t)
        correction = None
        if self.config.solver_order == 2 and self._history is not None and s > 0:
            t_prev, yhat_prev = self._history
            correction = process.multistep_weight(t, s, t_prev, lam) * (yhat - yhat_prev)
        noise = self._noise(yhat, generator, variance_noise) if lam > 0 and 0 < s < t else None
        x_s = self._step_state(sample.to(yhat.dtype), yhat, t, s, lam, noise, correction)
        self._history = (t, yhat)
        self._step_index += 1
        return self._output(x_s, yhat, sample, return_dict)


def _check_decreasing(name, values):
    if values.ndim != 1 or len(values) < 1 or not np.all(np.isfinite(values)) or np.any(np.diff(values) >= 0):
        raise ValueError(f"`{name}` must be a non-empty, finite, strictly decreasing sequence; got {values.tolist()!r}.")




def _grid_name(sigma_schedule: str) -> str:
    return "log_t" if sigma_schedule == "exponential" else sigma_schedule


# diffusers schedulers that read each family's config (a DDPM-table config is no EDM or flow config)
_FAMILY_COMPATIBLES = {
    "vp": [e.name for e in KarrasDiffusionSchedulers if not e.name.startswith("EDM")],
    "edm": ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"],
    "flow": ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"],
    "ve": ["ScoreSdeVeScheduler"],
}


def _family_keys(config, kwargs) -> dict:
    """What ``from_config`` adds to a foreign config: its family, and the units its model answers in where the
    config does not say (a VE score model returns the score; a flow model the velocity) or its grid."""
    family = process.detect_family({**dict(config), **kwargs})
    out = {"model_family": family}
    get = dict(config).get
    if family in ("ve", "flow") and "prediction_type" not in kwargs and get("model_family") is None:
        out["prediction_type"] = process.FAMILY_PREDICTION_TYPES[family][0]
    if family == "flow" and "sigma_schedule" not in kwargs and get("sigma_schedule") is None:
        out["sigma_schedule"] = "flow"
    if family == "flow" and get("flow_shift") is not None and "shift" not in kwargs and get("shift") is None:
        out["shift"] = get("flow_shift")  # DPM-Solver / UniPC flow configs name FlowMatch's shift flow_shift
    if "solver_order" not in kwargs and isinstance(get("solver_order"), int) and get("solver_order") > 2:
        out["solver_order"] = 2  # a DPM-Solver/UniPC order 3: ours is at most 2
    return out


__all__ = ["VEScheduler", "VESchedulerBase", "VESchedulerOutput"]
