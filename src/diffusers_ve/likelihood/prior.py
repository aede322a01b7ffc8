"""The prior at ``t_max = T`` is part of the model (math.md §"The prior"): Gaussian priors and their two uses.

* ``"vp"`` (default): ``z ~ N(0, (1+T) I)``, i.e. ``x ~ N(0, I)``, where the VP sampling pipelines start.
* ``"ve"``: ``z ~ N(0, T I)``.
* ``"moment"``: ``z ~ N(m, (T + v) I)`` with the data mean ``m`` and per-dimension variance ``v`` you give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

PRIORS = ("vp", "ve", "moment")
Number = Union[float, torch.Tensor]


@dataclass(frozen=True)
class Prior:
    """``N(mean, var I)`` in VE space; ``mean`` and ``var`` are floats or tensors broadcastable to one image."""

    name: str
    mean: Number
    var: Number

    def describe(self) -> str:
        return {"vp": "N(0, (1+T) I)", "ve": "N(0, T I)", "moment": "N(m, (T+v) I)"}[self.name]


def make_prior(kind: str, t_max: float, moments: Optional[Sequence[Number]] = None) -> Prior:
    """Build the prior at VE time ``t_max``; ``moments = (m, v)`` is needed (only) for ``"moment"``."""
    if kind not in PRIORS:
        raise ValueError(f"`prior` must be one of {PRIORS}; got {kind!r}.")
    if kind == "vp":
        return Prior(kind, 0.0, 1.0 + t_max)
    if kind == "ve":
        return Prior(kind, 0.0, t_max)
    if moments is None or len(moments) != 2:
        raise ValueError("`prior='moment'` needs `prior_moments=(mean, variance)` of the data (model space).")
    m, v = (torch.as_tensor(a, dtype=torch.float64) for a in moments)
    if bool((v < 0).any()):
        raise ValueError(f"the prior variance in `prior_moments` must be >= 0; got {moments[1]!r}.")
    return Prior(kind, m, t_max + v)


def _per_image(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.broadcast_to(torch.as_tensor(x, dtype=torch.float64, device=like.device), like.shape)


def prior_log_prob(z: torch.Tensor, prior: Prior) -> torch.Tensor:
    """``ln N(z; m, P)`` per image, shape (B,) (VE ``z``, float64)."""
    z = z.to(torch.float64)
    m, p = _per_image(prior.mean, z), _per_image(prior.var, z)
    out = -0.5 * (torch.log(2 * math.pi * p) + (z - m) ** 2 / p)
    return out.reshape(z.shape[0], -1).sum(1)


def prior_kl(y: torch.Tensor, t_max: float, prior: Prior) -> torch.Tensor:
    """``KL(N(y, T I) || prior)`` per image, shape (B,): the ELBO's prior term (VE data ``y``, float64)."""
    y = y.to(torch.float64)
    m, p = _per_image(prior.mean, y), _per_image(prior.var, y)
    out = 0.5 * (torch.log(p / t_max) + (t_max + (y - m) ** 2) / p - 1.0)
    return out.reshape(y.shape[0], -1).sum(1)
