"""``VEHeunScheduler``: the exponential Heun step (math.md §"The exponential Heun step") for any reverse-noise level lambda."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (diffusers' loader looks it up here)

from .. import process
from .scheduling_ve import VESchedulerBase, VESchedulerOutput


class VEHeunScheduler(VESchedulerBase):
    """Reverse VE diffusion with reverse-noise level lambda, second order by a predictor-corrector (Heun) step.

    Each step ``t -> s`` costs two model calls. The predictor is the exact-linear step of ``VEScheduler``
    (``z~ = A z_t + (1 - A) yhat_t + sqrt(V) xi``); the corrector takes ``yhat`` linear in ``ln t`` between
    ``yhat_t`` and ``yhat(z~, s)`` and integrates it exactly: ``z_s = z~ + w (yhat(z~, s) - yhat_t)`` with
    ``w = 1 - (1 - A) / (c h)``, ``c = (1 + lambda) / 2``, ``h = ln(t / s)``, and the same noise ``xi``.
    The last step, to ``t = 0``, is one call that returns ``yhat``.

    At lambda = 0 this is the *exponential* Heun step, not EDM's Heun in sigma (``HeunDiscreteScheduler``):
    the predictor and the timestep layout are the same, the corrector weight differs (EDM's is
    ``(1 - r) / (2 r)`` with ``r = sigma_s / sigma_t``); both are second order and converge to the same ODE solution.

    ``timesteps`` are laid out as in ``HeunDiscreteScheduler``: ``[tau_0, tau_1, tau_1, tau_2, tau_2, ...]``, one
    entry per model call (``2N - 1`` for ``N`` grid points ending at ``t = 0``), and ``order = 2``.

    The config keys are those of :class:`~diffusers_ve.VEScheduler`, with the same meanings, except
    ``solver_order`` (Heun is second order by construction). With ``final_sigmas_type="sigma_min"`` a grid that
    already ends at the table's ``t_0`` gets a one-call null step, as in ``EulerDiscreteScheduler``.
    """

    order = 2

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
        self._calls: List[Tuple[int, bool]] = []
        self._reset()
        self._setup()

    def _layout(self, taus: torch.Tensor) -> torch.Tensor:
        """One timestep per model call: the predictor at ``t_i``, then (if ``0 < t_{i+1} < t_i``) the corrector
        at ``t_{i+1}``."""
        grid = self._t_grid
        last = self.family.timestep(torch.tensor(grid[-1], dtype=torch.float64)) if grid[-1] > 0 else None
        taus = list(taus.unbind()) + [last]
        self._calls, out = [], []
        for i in range(len(grid) - 1):
            self._calls.append((i, False))
            out.append(taus[i])
            if 0 < grid[i + 1] < grid[i]:  # no corrector for the exact last step to 0 (or a null step)
                self._calls.append((i, True))
                out.append(taus[i + 1])
        return torch.stack(out)

    def _reset(self):
        self._pending = None  # (x_t, yhat_t, noise, lambda) of the step whose corrector is due

    def _call_time(self, index: int) -> float:
        i, corrector = self._calls[index]
        return self._t_grid[i + 1] if corrector else self._t_grid[i]

    def _grid_points_for_calls(self, calls: int) -> int:
        return (calls + 1) // 2  # N grid points above 0 take 2N - 1 calls

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a predictor call (as ``HeunDiscreteScheduler``)."""
        return self._pending is None

    def index_for_timestep(self, timestep) -> int:
        """Position of ``timestep`` in ``timesteps``; of a repeated pair the second (a predictor), as in diffusers."""
        first = super().index_for_timestep(timestep)
        if self._calls[first][1] and first + 1 < len(self._calls):
            return first + 1  # the corrector ending step i and the predictor starting step i + 1 share a timestep
        return first

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
        """One model call's share of a Heun step ``t -> s``: the predictor (even calls) or the corrector.

        Args:
            model_output: the model's output at (``sample``, ``timestep``), in ``prediction_type`` units.
            timestep: the current entry of ``timesteps``.
            sample: the pipeline state at the current call's time.
            generator: a ``torch.Generator`` or a list of them (one per batch element) for the reverse noise,
                drawn once per step, on the predictor call.
            return_dict: return a ``SchedulerOutput`` rather than a tuple.
            variance_noise: standard-normal noise to use instead of drawing it (read on the predictor call).
            kwargs: DDIMPipeline's ``eta`` (None or 0 only; use ``reverse_noise``) and ``use_clipped_model_output``
                are accepted and ignored; anything else is a TypeError.

        Returns:
            ``VESchedulerOutput(prev_sample, pred_original_sample)``: the state at ``s`` (the predictor's
            ``z~`` after a predictor call, the corrected ``z_s`` after a corrector call) and this call's ``yhat``.
        """
        i, corrector = self._calls[self._begin_step(model_output, timestep, sample, kwargs)]
        t, s = self._t_grid[i], self._t_grid[i + 1]
        if corrector:
            if self._pending is None:
                raise ValueError(
                    f"timestep index {self._step_index} is a corrector call but no predictor call preceded it; "
                    "start at an even index (`set_begin_index(k * scheduler.order)`)."
                )
            x, yhat_t, noise, lam = self._pending
            yhat = self._yhat(model_output, sample, s)
            correction = process.heun_weight(t, s, lam) * (yhat - yhat_t)
            x_s = self._step_state(x, yhat_t, t, s, lam, noise, correction)
            self._pending = None
        else:
            yhat = self._yhat(model_output, sample, t)
            lam = self._lambda(t)
            noise = self._noise(yhat, generator, variance_noise) if lam > 0 and 0 < s < t else None
            x = sample.to(yhat.dtype)
            x_s = self._step_state(x, yhat, t, s, lam, noise)
            self._pending = (x, yhat, noise, lam) if 0 < s < t else None
        self._step_index += 1
        return self._output(x_s, yhat, sample, return_dict)


__all__ = ["VEHeunScheduler"]
