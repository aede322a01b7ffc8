"""The training objective of a diffusers UNet on the VE process (shared by ``training/train_ve.py`` and the tests).

The model belongs to a :class:`~diffusers_ve.process.ModelFamily` (usually a DDPM beta table: ``epsilon`` /
``v_prediction`` / ``sample``, so every diffusers scheduler can drive it); noise levels are drawn in VE time ``t``
and the family gives the model's input, timestep and output units. Every loss is ``w(t) * mean ||epshat - eps||^2``
(per dimension):

* ``ddpm``: integer table timesteps, uniform; ``w = 1`` (the eps-MSE of diffusers' ``train_unconditional.py``;
  DDPM tables only).
* ``likelihood``: ``ln t ~ U[ln t_min, ln t_max]`` (stratified over the batch), ``w = ln(t_max / t_min) / 2``: the
  expectation is the diffusion term of McAllester's continuous ELBO (math.md §"Training weights"), in nats per dimension.
* ``edm``: ``ln sigma ~ N(p_mean, p_std^2)`` truncated to the table, weight ``(t + sd^2) / (t sd^2)`` on
  ``||yhat - y||^2``, i.e. ``w = (t + sd^2) / sd^2`` on the eps-MSE.

Data and checkpoint helpers live in :mod:`diffusers_ve.data` and :mod:`diffusers_ve.checkpointing`.
"""

from __future__ import annotations

import contextlib
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
        x: the model input (the family's state, scaled as ``scale_model_input`` scales it).
    """

    t: torch.Tensor
    timestep: torch.Tensor
    eps: torch.Tensor
    z: torch.Tensor
    x: torch.Tensor


class Objective:
    """Noise-level sampling and loss weighting for a model of a given family.

    Args:
        family: the model's family and time axis (``process.model_family(scheduler_config)``).
        weighting: ``"ddpm"`` (DDPM tables only), ``"likelihood"`` or ``"edm"`` (see the module docstring).
        sigma_data: EDM's data std ``sd`` (``edm`` only).
        p_mean, p_std: EDM's log-normal ``ln sigma ~ N(p_mean, p_std^2)`` (``edm`` only).
    """

    def __init__(self, family: process.ModelFamily, weighting: str = "ddpm", sigma_data: float = 0.5,
                 p_mean: float = -1.2, p_std: float = 1.2):
        self.family = family
        self.weighting = _check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
        if weighting == "ddpm" and family.name != "vp":
            raise ValueError(f"`loss_weighting='ddpm'` draws integer DDPM-table timesteps; a {family.name!r}-family "
                             "model has none: use 'likelihood' or 'edm'.")
        if not (sigma_data > 0 and p_std > 0):
            raise ValueError(f"`sigma_data` and `p_std` must be > 0; got {sigma_data!r}, {p_std!r}.")
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)

    @classmethod
    def from_config(cls, scheduler_config, weighting: str = "ddpm", **kwargs) -> "Objective":
        """Build from a scheduler config (its family, time axis and ``prediction_type``)."""
        return cls(process.model_family(scheduler_config), weighting, **kwargs)

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None):
        """Draw ``n`` VE times (float64, CPU) and their model timesteps (float64, CPU) for this weighting."""
        lo, hi = math.log(self.family.t_min), math.log(self.family.t_max)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        if self.weighting == "ddpm":
            axis = self.family.axis  # "ddpm" is for DDPM tables only (checked in __init__)
            k = torch.floor(u * axis.num_train_timesteps).clamp(max=axis.num_train_timesteps - 1)
            t = torch.exp(axis.log_t[k.long()])  # the table's t_k (a continuous-timestep axis reads tau otherwise)
            return t, (axis.timestep(t) if axis.continuous else k)
        if self.weighting == "likelihood":  # stratified: one point per 1/n of [ln t_min, ln t_max], shuffled
            strata = torch.randperm(n, generator=generator)
            log_t = process.stratified_t(self.family.t_min, self.family.t_max, u, strata, n).log()
        else:  # truncated normal in ln sigma = ln(t) / 2, by the inverse CDF
            norm = torch.distributions.Normal(torch.tensor(self.p_mean, dtype=torch.float64),
                                              torch.tensor(self.p_std, dtype=torch.float64))
            a, b = norm.cdf(torch.tensor(lo / 2, dtype=torch.float64)), norm.cdf(torch.tensor(hi / 2, dtype=torch.float64))
            log_t = 2 * norm.icdf(a + (b - a) * u).clamp(lo / 2, hi / 2)
        t = torch.exp(log_t).clamp(self.family.t_min, self.family.t_max)
        return t, self.family.timestep(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight on the per-dimension eps-MSE, float64 (B,)."""
        if self.weighting == "ddpm":
            return torch.ones_like(t)
        if self.weighting == "likelihood":
            return torch.full_like(t, 0.5 * math.log(self.family.t_max / self.family.t_min))
        sd2 = self.sigma_data**2
        return (t + sd2) / sd2

    def draw(self, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> NoisyBatch:
        """Noise a batch of clean images ``y`` (VE data space, float32). ``generator`` is a CPU generator:
        the same draws on every device, and its state is what a checkpoint saves."""
        t, tau = self.sample_t(y.shape[0], generator)
        eps = randn_tensor(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        y32, tt = y.float(), t.to(y.device, torch.float32)
        z = process.noisy(y32, eps, tt)
        return NoisyBatch(t, tau.to(y.device, torch.float32), eps, z, self.family.model_input(z, tt))

    def per_sample_loss(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """``w(t) * mean over dimensions of (epshat - eps)^2``, float32 (B,), for a model output in the family's
        units at ``batch.x``."""
        out = model_output.float()
        fam = self.family
        if fam.name == "vp" and fam.prediction_type == "epsilon":
            epshat = out
        else:
            tt = batch.t.to(out.device, torch.float32)
            yhat = fam.yhat(out, fam.state(batch.z, tt), tt)
            epshat = process.output_from_yhat(yhat, batch.z, tt, "epsilon")
        mse = (epshat - batch.eps).pow(2).flatten(1).mean(1)
        return self.weight(batch.t).to(mse.device, mse.dtype) * mse

    def loss(self, model, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean loss of ``model`` (called as ``model(x, timestep).sample``) on clean images ``y``."""
        batch = self.draw(y, generator)
        out = model(batch.x, batch.timestep)
        return self.per_sample_loss(getattr(out, "sample", out), batch).mean()


@contextlib.contextmanager
def ema_weights(model, ema=None):
    """Within the block ``model`` holds the weights of ``ema`` (a diffusers ``EMAModel``; None: its own), and its
    training weights again after it, even on an error: sample or save the EMA weights mid-training."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


def peak_memory_mb(device) -> float:
    """This process's peak memory in MiB: CUDA max allocated on a CUDA ``device``, else the peak resident set
    size (``ru_maxrss``, KiB on Linux). Shared by ``training/train_ve.py`` and ``benchmarks/training.py``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


__all__ = ["LOSS_WEIGHTINGS", "Objective", "NoisyBatch", "ema_weights", "peak_memory_mb"]
