"""``Denoiser``: any diffusers model of a supported family as ``yhat(z, t)`` in VE terms, the one door to a model
for likelihoods and training."""

from __future__ import annotations

from typing import Optional

import torch

from . import process


class Denoiser(torch.nn.Module):
    """Wrap a ``UNet2DModel``-like module (``model(x, timestep).sample``) and its family as ``yhat(z, t)``.

    Args:
        model: called as ``model(x, tau)`` with the family's model input at VE ``(z, t)`` (the pipeline state,
            scaled as ``scale_model_input`` scales it) and float32 timesteps of shape (B,); its output is in the
            family's units (a ``.sample`` attribute or a tensor).
        family: the model's :class:`~diffusers_ve.process.ModelFamily` (``process.model_family(scheduler_config)``):
            time axis, state and output units.
        learned_variance: the model outputs ``2C`` channels (``variance_type="learned"/"learned_range"``);
            the second half is dropped.
    """

    def __init__(self, model, family: process.ModelFamily, learned_variance: bool = False):
        super().__init__()
        self.model = model
        self.family = family
        self.learned_variance = learned_variance

    @property
    def axis(self) -> process.ModelFamily:
        return self.family

    @classmethod
    def from_scheduler(cls, model, scheduler, prediction_type: Optional[str] = None) -> "Denoiser":
        """Build from a model and its scheduler (ours or any supported diffusers scheduler): the config gives the
        family, the time axis and the prediction type."""
        cfg = scheduler.config
        family = getattr(scheduler, "family", None) or process.model_family(cfg)
        if prediction_type is not None and prediction_type != family.prediction_type:
            raise ValueError(
                f"`prediction_type={prediction_type!r}` disagrees with the scheduler config "
                f"({family.prediction_type!r}); fix the scheduler config instead of overriding it."
            )
        return cls(model, family, cfg.get("variance_type", None) in process.LEARNED_VARIANCE)

    def model_output(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw model output (the family's units) at VE ``(z, t)``; ``t`` of shape (B,) or a scalar.

        The model input is formed in at least float32 (``1 + t`` overflows half precision), then cast to the model's dtype.
        """
        t = self._t(t, z)
        cd = process.compute_dtype(z)
        tc = t.to(cd)
        x = self.family.model_input(z.to(cd), tc)
        tau = self.family.timestep(t).to(z.device, torch.float32)  # float tensors: a Python float is cast to long
        out = self.model(x.to(getattr(self.model, "dtype", z.dtype)), tau)
        out = getattr(out, "sample", out)
        if isinstance(out, tuple):
            out = out[0]
        return process.mean_output(out, z, "learned" if self.learned_variance else None)

    def forward(self, z: torch.Tensor, t) -> torch.Tensor:
        """``yhat(z, t) = E[y | z(t) = z]`` in VE data space, in ``z``'s dtype (computed in at least float32)."""
        t = self._t(t, z)
        cd = process.compute_dtype(z)
        tc, zc = t.to(cd), z.to(cd)
        out = self.model_output(z, t).to(cd)
        return self.family.yhat(out, self.family.state(zc, tc), tc).to(z.dtype)

    @staticmethod
    def _t(t, z):
        """``t`` as float64 (B,) on ``z``'s device."""
        return torch.as_tensor(t, dtype=torch.float64).to(z.device).reshape(-1).expand(z.shape[0])
