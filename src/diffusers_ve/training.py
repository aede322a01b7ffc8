"""The training objective of a VP diffusers UNet on the VE process (shared by ``training/train_ve.py`` and the tests).

The model is a VP ``UNet2DModel`` (``epsilon`` / ``v_prediction`` / ``sample`` on a DDPM beta table), so every
diffusers scheduler can drive it; noise levels are drawn in VE time ``t`` and mapped to the model's timestep by
:class:`~diffusers_ve.process.TimeAxis`. Every loss is ``w(t) * mean ||epshat - eps||^2`` (per dimension):

* ``ddpm``: integer table timesteps, uniform; ``w = 1`` (the eps-MSE of diffusers' ``train_unconditional.py``).
* ``likelihood``: ``ln t ~ U[ln t_min, ln t_max]`` (stratified over the batch), ``w = ln(t_max / t_min) / 2``: the
  expectation is the diffusion term of McAllester's continuous ELBO (math.md §"Training weights"), in nats per dimension.
* ``edm``: ``ln sigma ~ N(p_mean, p_std^2)`` truncated to the table, weight ``(t + sd^2) / (t sd^2)`` on
  ``||yhat - y||^2``, i.e. ``w = (t + sd^2) / sd^2`` on the eps-MSE.

Data and checkpoint helpers live in :mod:`diffusers_ve.data` and :mod:`diffusers_ve.checkpointing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from . import process
from .process import check_choice as _check_choice

LOSS_WEIGHTINGS = ("ddpm", "likelihood", "edm")


@dataclass
class NoisyBatch:
    """One draw of the forward process for a batch of clean images ``y`` (VE data space).

    Args:
        t: VE times, float64 (B,) on the CPU.
        timestep: model timesteps ``tau(t)``, float32 (B,) on ``y``'s device.
        eps: standard-normal noise, shape of ``y``.
        z: VE state ``y + sqrt(t) eps``.
        x: VP model input ``z / sqrt(1 + t)``.
    """

    t: torch.Tensor
    timestep: torch.Tensor
    eps: torch.Tensor
    z: torch.Tensor
    x: torch.Tensor


class Objective:
    """Noise-level sampling and loss weighting for a VP model on a DDPM beta table.

    Args:
        axis: the model's time axis (``TimeAxis.from_config(scheduler_config)``).
        prediction_type: what the model outputs: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        weighting: ``"ddpm"``, ``"likelihood"`` or ``"edm"`` (see the module docstring).
        sigma_data: EDM's data std ``sd`` (``edm`` only).
        p_mean, p_std: EDM's log-normal ``ln sigma ~ N(p_mean, p_std^2)`` (``edm`` only).
    """

    def __init__(self, axis: process.TimeAxis, prediction_type: str = "epsilon", weighting: str = "ddpm",
                 sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2):
        self.axis = axis
        self.prediction_type = process.check_prediction_type(prediction_type)
        self.weighting = _check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
        if not (sigma_data > 0 and p_std > 0):
            raise ValueError(f"`sigma_data` and `p_std` must be > 0; got {sigma_data!r}, {p_std!r}.")
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)

    @classmethod
    def from_config(cls, scheduler_config, weighting: str = "ddpm", **kwargs) -> "Objective":
        """Build from a scheduler config (its beta table and ``prediction_type``)."""
        get = scheduler_config.get if isinstance(scheduler_config, dict) else scheduler_config.__getitem__
        return cls(process.TimeAxis.from_config(scheduler_config), get("prediction_type"), weighting, **kwargs)

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None):
        """Draw ``n`` VE times (float64, CPU) and their model timesteps (float64, CPU) for this weighting."""
        lo, hi = math.log(self.axis.t_min), math.log(self.axis.t_max)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        if self.weighting == "ddpm":
            k = torch.floor(u * self.axis.num_train_timesteps).clamp(max=self.axis.num_train_timesteps - 1)
            t = torch.exp(self.axis.log_t[k.long()])  # the table's t_k (a continuous-timestep axis reads tau otherwise)
            return t, (self.axis.timestep(t) if self.axis.continuous else k)
        if self.weighting == "likelihood":  # stratified: one point per 1/n of [ln t_min, ln t_max], shuffled
            strata = torch.randperm(n, generator=generator)
            log_t = process.stratified_t(self.axis.t_min, self.axis.t_max, u, strata, n).log()
        else:  # truncated normal in ln sigma = ln(t) / 2, by the inverse CDF
            norm = torch.distributions.Normal(torch.tensor(self.p_mean, dtype=torch.float64),
                                              torch.tensor(self.p_std, dtype=torch.float64))
            a, b = norm.cdf(torch.tensor(lo / 2, dtype=torch.float64)), norm.cdf(torch.tensor(hi / 2, dtype=torch.float64))
            log_t = 2 * norm.icdf(a + (b - a) * u).clamp(lo / 2, hi / 2)
        t = torch.exp(log_t).clamp(self.axis.t_min, self.axis.t_max)
        return t, self.axis.timestep(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight on the per-dimension eps-MSE, float64 (B,)."""
        if self.weighting == "ddpm":
            return torch.ones_like(t)
        if self.weighting == "likelihood":
            return torch.full_like(t, 0.5 * math.log(self.axis.t_max / self.axis.t_min))
        sd2 = self.sigma_data**2
        return (t + sd2) / sd2

    def draw(self, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> NoisyBatch:
        """Noise a batch of clean images ``y`` (VE data space, float32). ``generator`` is a CPU generator:
        the same draws on every device, and its state is what a checkpoint saves."""
        t, tau = self.sample_t(y.shape[0], generator)
        eps = randn_tensor(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        y32, tt = y.float(), t.to(y.device, torch.float32)
        z = process.noisy(y32, eps, tt)
        return NoisyBatch(t, tau.to(y.device, torch.float32), eps, z, process.vp_from_ve(z, tt))

    def per_sample_loss(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """``w(t) * mean over dimensions of (epshat - eps)^2``, float32 (B,), for a model output in
        ``prediction_type`` units at ``batch.x``."""
        out = model_output.float()
        if self.prediction_type == "epsilon":
            epshat = out
        else:
            tt = batch.t.to(out.device, torch.float32)
            yhat = process.yhat_from_output(out, batch.z, tt, self.prediction_type)
            epshat = process.output_from_yhat(yhat, batch.z, tt, "epsilon")
        mse = (epshat - batch.eps).pow(2).flatten(1).mean(1)
        return self.weight(batch.t).to(mse.device, mse.dtype) * mse

    def loss(self, model, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean loss of a VP ``model`` (called as ``model(x, timestep).sample``) on clean images ``y``."""
        batch = self.draw(y, generator)
        out = model(batch.x, batch.timestep)
        return self.per_sample_loss(getattr(out, "sample", out), batch).mean()


def peak_memory_mb(device) -> float:
    """This process's peak memory in MiB: CUDA max allocated on a CUDA ``device``, else the peak resident set
    size (``ru_maxrss``, KiB on Linux). Shared by ``training/train_ve.py`` and ``benchmarks/training.py``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


__all__ = ["LOSS_WEIGHTINGS", "Objective", "NoisyBatch", "peak_memory_mb"]
