"""An isotropic Gaussian-mixture population: exact denoiser, samples and densities at every ``t``.

It is the ground truth the tests, benchmarks and the demo measure samplers and likelihoods against
(math.md §"Gaussian-mixture ground truth"), and :class:`MixtureUNet` wraps its exact denoiser as a ``UNet2DModel``-shaped diffusers model.
All maths in float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from . import process


class GaussianMixture:
    """``pop(y) = sum_k w_k N(y; mu_k, s_k^2 I)`` on tensors of shape ``(B, *shape)`` (VE space).

    Args:
        means: ``(K, *shape)`` mode means.
        stds: ``(K,)`` per-mode standard deviations (0 allowed: atoms).
        weights: ``(K,)`` mode weights (normalised here).
    """

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.shape = tuple(self.means.shape[1:])
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(k)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.dim = int(self.means[0].numel())

    # --- internals: flatten to (B, d), per-mode quantities (B, K)
    def _flat(self, z):
        return z.to(torch.float64).reshape(z.shape[0], -1)

    def _t(self, t, n):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        return t.expand(n) if t.numel() == 1 else t

    def _log_terms(self, z, t):
        """``ln w_k N(z; mu_k, (s_k^2 + t) I)``, shape (B, K)."""
        v = self.stds**2 + t[:, None]  # (B, K)
        mu = self.means.reshape(len(self.weights), -1)
        d2 = torch.cdist(z, mu) ** 2
        return self.weights.log() - 0.5 * self.dim * torch.log(2 * math.pi * v) - 0.5 * d2 / v

    def responsibilities(self, z, t):
        """Posterior mode probabilities ``r_k(z, t)``, shape (B, K)."""
        zf = self._flat(z)
        return torch.softmax(self._log_terms(zf, self._t(t, len(zf))), dim=1)

    def log_prob(self, z, t=0.0):
        """``ln p_t(z)`` of the smoothed population (``t = 0``: ``ln pop``; atoms need ``t > 0``)."""
        zf = self._flat(z)
        return torch.logsumexp(self._log_terms(zf, self._t(t, len(zf))), dim=1)

    def _mode_means(self, zf, t):
        """``m_k = mu_k + s_k^2 / (s_k^2 + t) (z - mu_k)``, shape (B, K, d)."""
        mu = self.means.reshape(len(self.weights), -1)
        g = (self.stds**2 / (self.stds**2 + t[:, None]))[..., None]  # (B, K, 1)
        return mu[None] + g * (zf[:, None, :] - mu[None])

    def yhat(self, z, t):
        """Exact posterior mean ``E[y | z(t) = z]`` (VE space), float64."""
        zf = self._flat(z)
        tt = self._t(t, len(zf))
        r = torch.softmax(self._log_terms(zf, tt), dim=1)
        return torch.einsum("bk,bkd->bd", r, self._mode_means(zf, tt)).reshape(z.shape)

    def trace_grad_yhat(self, z, t):
        """Exact ``tr d yhat / d z = tr Cov[y | z] / t``, shape (B,)."""
        zf = self._flat(z)
        tt = self._t(t, len(zf))
        r = torch.softmax(self._log_terms(zf, tt), dim=1)
        m = self._mode_means(zf, tt)
        yh = torch.einsum("bk,bkd->bd", r, m)
        s2 = self.stds**2
        within = self.dim * s2[None] / (s2[None] + tt[:, None])
        return (r * (within + (m**2).sum(-1) / tt[:, None])).sum(1) - (yh**2).sum(1) / tt

    def sample(self, n: int, t: float = 0.0, generator: Optional[torch.Generator] = None, return_modes=False):
        """``n`` exact draws of ``z(t)`` (``t = 0``: the population), float64, shape ``(n, *shape)``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        sd = torch.sqrt(self.stds[k] ** 2 + t).reshape(-1, *([1] * len(self.shape)))
        z = self.means[k] + sd * eps
        return (z, k) if return_modes else z


_FAMILY_KEYS = ("model_family", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "timestep_type",
                "prediction_type", "sigma_min", "sigma_max", "sigma_data", "snr_shift_scale", "rescale_betas_zero_snr")


class MixtureUNet(ModelMixin, ConfigMixin):
    """The exact denoiser of a :class:`GaussianMixture`, speaking like a model of any supported family.

    ``forward(x, timestep)`` reads the family's model input ``x`` (its state, scaled as ``scale_model_input`` scales
    it) at model timestep ``tau`` and answers in the family's units (``UNet2DOutput.sample``), in ``x``'s dtype:
    eps / v / sample on a DDPM table, EDM's ``F``, a VE score model's score or a flow model's velocity.
    """

    @register_to_config
    def __init__(
        self,
        means=None,
        stds=None,
        weights=None,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        timestep_type: str = "discrete",
        sample_size: int = 8,
        in_channels: int = 1,
        out_channels: int = 1,
        model_family: Optional[str] = None,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        sigma_data: Optional[float] = None,
        snr_shift_scale: Optional[float] = None,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__()
        self.mixture = GaussianMixture(means, stds, weights)
        self.family = process.model_family({k: self.config[k] for k in _FAMILY_KEYS})
        self.anchor = torch.nn.Parameter(torch.zeros(0))  # gives the module a dtype and device

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, scheduler_config=None, **kwargs):
        """The mixture's denoiser as a model of the family that ``scheduler_config`` (any supported scheduler's,
        default a DDPM table) describes; ``kwargs`` override its keys (e.g. ``prediction_type``)."""
        cfg = {**dict(scheduler_config or {}), **kwargs}
        family = process.model_family(cfg)
        cfg = {k: v for k, v in cfg.items() if k in _FAMILY_KEYS}
        cfg.update(model_family=family.name, prediction_type=family.prediction_type)
        c, h, w = mixture.shape
        return cls(mixture.means.tolist(), mixture.stds.tolist(), mixture.weights.tolist(), sample_size=h,
                   in_channels=c, out_channels=c, **cfg)

    def forward(self, sample, timestep, return_dict: bool = True, **kwargs):
        fam = self.family
        tau = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        t = fam.t(tau)
        x = sample.double().cpu() / process._per_sample(fam.input_scale(t), sample.double().cpu())
        prior_mean = (self.mixture.weights[:, None] * self.mixture.means.flatten(1)).sum(0).reshape(self.mixture.shape)
        finite = torch.isfinite(t)  # t = inf (a flow's pure noise): the posterior mean is the prior mean
        yhat = prior_mean.expand_as(x).clone()
        if bool(finite.any()):
            yhat[finite] = self.mixture.yhat(fam.ve(x[finite], t[finite]), t[finite])
        out = fam.output(yhat, x, t).to(sample.device, sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def digits_mixture(std: float = 0.05, size: int = 8) -> GaussianMixture:
    """Ten modes at the class means of scikit-learn's digits, scaled to [-1, 1], ``(1, size, size)`` images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float64) / 16 * 2 - 1
    means = torch.stack([x[torch.as_tensor(data.target) == c].mean(0) for c in range(10)])[:, None]
    if size != 8:
        pad = (size - 8) // 2
        means = torch.nn.functional.pad(means, (pad, size - 8 - pad, pad, size - 8 - pad), value=-1.0)
    return GaussianMixture(means, [std] * 10)
