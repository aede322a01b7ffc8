"""Discrete n-level data: the level grid, uniform dequantisation, the discretised decoder, nats <-> bits.

Pixels ``x in {0..n-1}`` live in model space as ``y = 2x/(n-1) - 1`` (math.md §"Discrete data and bits per dimension"): a bin has half-width
``delta = 1/(n-1)``, so ``P(x) ~ p(y) (2 delta)^d`` and the offset is ``log2((n-1)/2)`` bits/dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

LN2 = math.log(2.0)


def check_num_levels(num_levels) -> Optional[int]:
    """``None`` (continuous data) or an integer number of levels >= 2."""
    if num_levels is None:
        return None
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"`num_levels` must be an integer >= 2 (256 for 8-bit, 17 for the digits) or None for "
                         f"continuous data; got {num_levels!r}.")
    return num_levels


def half_width(num_levels: int) -> float:
    """Bin half-width ``delta = 1/(n-1)`` in model space [-1, 1]."""
    return 1.0 / (num_levels - 1)


def levels_to_model(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Integer levels ``x in {0..n-1}`` -> model space ``y = 2x/(n-1) - 1`` (float64)."""
    return x.to(torch.float64) * (2.0 / (num_levels - 1)) - 1.0


def model_to_levels(y: torch.Tensor, num_levels: int, atol: float = 1e-3) -> torch.Tensor:
    """Model-space ``y`` on the n-level grid -> integer levels; ValueError if a value is off the grid."""
    x = (y.to(torch.float64) + 1.0) * (0.5 * (num_levels - 1))
    k = x.round()
    if bool(((x - k).abs() > atol).any()) or bool(((k < 0) | (k > num_levels - 1)).any()):
        raise ValueError(f"`images` are not on the {num_levels}-level grid y = 2x/({num_levels}-1) - 1; pass the "
                         "right `num_levels`, or `num_levels=None` for continuous data.")
    return k.to(torch.long)


def dequantize(y: torch.Tensor, num_levels: int, u: torch.Tensor) -> torch.Tensor:
    """Uniform dequantisation in model space: ``y' = y + delta u`` with ``u ~ U[-1, 1]^d`` (VE data space)."""
    return y + half_width(num_levels) * u


def dequantization_offset(num_levels: int, dim: int) -> float:
    """``d ln(2 delta)`` (nats): ``ln P(x) >= E_u ln p(y + delta u) + d ln(2 delta)``."""
    return dim * math.log(2.0 * half_width(num_levels))


def _log_diff_ndtr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``ln(Phi(b) - Phi(a))`` for ``a < b``, computed on the side where both tails are small."""
    flip = (a + b) > 0  # both mostly in the upper tail: use Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp((log_lo - log_hi).clamp(max=0.0)))


def discretized_log_prob(y: torch.Tensor, mean: torch.Tensor, t: float, num_levels: int) -> torch.Tensor:
    """``ln P(x | z_1)`` of the discretised Gaussian decoder ``N(mean, t)`` over n-level bins, shape (B,).

    Args:
        y: the data on the level grid, VE data space ``(B, ...)``.
        mean: the decoder mean (``yhat(z_1, t_1)``), VE data space, same shape.
        t: decoder variance (``t_1 = t_min``).
        num_levels: n; the edge bins (levels 0 and n-1) are open.
    """
    delta, sd = half_width(num_levels), math.sqrt(t)
    y, mean = y.to(torch.float64), mean.to(torch.float64)
    inf = torch.full_like(y, math.inf)
    a = torch.where(y <= -1 + 0.5 * delta, -inf, (y - delta - mean) / sd)
    b = torch.where(y >= 1 - 0.5 * delta, inf, (y + delta - mean) / sd)
    return _log_diff_ndtr(a, b).reshape(y.shape[0], -1).sum(1)


def bits_per_dim(log_likelihood: torch.Tensor, dim: int) -> torch.Tensor:
    """Nats per image -> bits per dimension: ``-ln p / (d ln 2)``."""
    return -log_likelihood / (dim * LN2)


def nats_from_bits_per_dim(bpd: torch.Tensor, dim: int) -> torch.Tensor:
    """Bits per dimension -> nats per image (inverse of :func:`bits_per_dim`)."""
    return -bpd * dim * LN2
