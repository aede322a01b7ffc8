"""``Denoiser``: any VP diffusers model as ``yhat(z, t)`` in VE terms, the one door to a model for
likelihoods and training."""

from __future__ import annotations

from typing import Optional

import torch

from . import process


class Denoiser(torch.nn.Module):
    """Wrap a ``UNet2DModel``-like module (``model(x, timestep).sample``) and its time axis as ``yhat(z, t)``.

    Args:
        model: called as ``model(x, tau)`` with the VP input ``x = z / sqrt(1 + t)`` and float32 timesteps of
            shape (B,); its output is in ``prediction_type`` units (a ``.sample`` attribute or a tensor).
        axis: the model's :class:`~diffusers_ve.process.TimeAxis` (build it with ``TimeAxis.from_config``).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        learned_variance: the model outputs ``2C`` channels (``variance_type="learned"/"learned_range"``);
            the second half is dropped.
    """

    def __init__(self, model, axis: process.TimeAxis, prediction_type: str = "epsilon", learned_variance: bool = False):
        super().__init__()
        self.model = model
        self.axis = axis
        self.prediction_type = process.check_prediction_type(prediction_type)
        self.learned_variance = learned_variance

    @classmethod
    def from_scheduler(cls, model, scheduler, prediction_type: Optional[str] = None) -> "Denoiser":
        """Build from a model and any DDPM-family scheduler (its config gives the table and prediction type)."""
        cfg = scheduler.config
        ptype = cfg.get("prediction_type", "epsilon")
        if prediction_type is not None and prediction_type != ptype:
            raise ValueError(
                f"`prediction_type={prediction_type!r}` disagrees with the scheduler config ({ptype!r}); "
                "fix the scheduler config instead of overriding it."
            )
        learned = cfg.get("variance_type", None) in process.LEARNED_VARIANCE
        return cls(model, process.TimeAxis.from_config(cfg), ptype, learned)

    def model_output(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw model output (``prediction_type`` units) at VE ``(z, t)``; ``t`` of shape (B,) or a scalar.

        The VP input is formed in at least float32 (``1 + t`` overflows half precision), then cast to the model's dtype.
        """
        t = self._t(t, z)
        dtype = getattr(self.model, "dtype", z.dtype)
        x = process.vp_from_ve(z.to(process.compute_dtype(z)), t)
        tau = self.axis.timestep(t).to(z.device, torch.float32)  # float tensors: a Python float is cast to long
        out = self.model(x.to(dtype), tau)
        out = getattr(out, "sample", out)
        if isinstance(out, tuple):
            out = out[0]
        return process.mean_output(out, z, "learned" if self.learned_variance else None)

    def forward(self, z: torch.Tensor, t) -> torch.Tensor:
        """``yhat(z, t) = E[y | z(t) = z]`` in VE data space, in ``z``'s dtype (computed in at least float32)."""
        t = self._t(t, z)
        cd = process.compute_dtype(z)
        out = self.model_output(z, t).to(cd)
        return process.yhat_from_output(out, z.to(cd), t.to(cd), self.prediction_type).to(z.dtype)

    @staticmethod
    def _t(t, z):
        """``t`` as float64 (B,) on ``z``'s device."""
        return torch.as_tensor(t, dtype=torch.float64).to(z.device).reshape(-1).expand(z.shape[0])
