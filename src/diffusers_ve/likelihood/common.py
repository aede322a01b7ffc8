"""What every estimator shares: per-image generators, the result record, argument checks, chunked model calls."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class Estimate:
    """Per-image result of a likelihood estimator.

    Args:
        log_likelihood: (B,) float64, nats per image (of the discrete data when levels were given).
        stderr: (B,) float64, Monte-Carlo standard error of ``log_likelihood`` (0 where it is deterministic,
            NaN where the draws cannot estimate it, e.g. a single Hutchinson probe).
        nfe: (B,) int64, model calls spent on each image.
        extras: estimator-specific tensors (e.g. the ODE's latent ``z(T)``).
        protocol: the estimator's own settings as it resolved them (solver, trace, draws...), for the record.
    """

    log_likelihood: torch.Tensor
    stderr: torch.Tensor
    nfe: torch.Tensor
    extras: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a run seeded with ``seed`` (independent of batch and process)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def image_generators(seed: int, indices: Sequence[int]) -> List[torch.Generator]:
    """One CPU generator per image, seeded by ``(seed, global index)``."""
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]


def check_generators(generators, batch: int) -> List[torch.Generator]:
    """ValueError unless ``generators`` is a list of ``batch`` generators (CPU or CUDA: each draws on its device)."""
    if not isinstance(generators, (list, tuple)) or len(generators) != batch or \
            not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"`generators` must be a list of {batch} torch.Generator (one per image); got {generators!r}.")
    return list(generators)


def draw(kind: str, shape, generator: torch.Generator) -> torch.Tensor:
    """float64 ``rand`` / ``randn`` (or Rademacher ``+-1`` for ``"sign"``) on the generator's own device.

    A CUDA generator cannot draw CPU tensors (nor the reverse), so each draw follows its generator; callers
    move the result to the data's device. CPU generators give the same numbers whatever the model's device.
    """
    kw = dict(generator=generator, device=generator.device)
    if kind == "sign":
        return torch.randint(0, 2, tuple(shape), **kw).to(torch.float64) * 2 - 1
    return (torch.rand if kind == "rand" else torch.randn)(tuple(shape), dtype=torch.float64, **kw)


def check_t_range(axis, t_min: Optional[float], t_max: Optional[float]) -> tuple[float, float]:
    """Default to the table's ends; ValueError unless ``t_0 <= t_min < t_max <= t_{K-1}``."""
    lo = axis.t_min if t_min is None else float(t_min)
    hi = axis.t_max if t_max is None else float(t_max)
    axis.check_range(lo, hi, "[`t_min`, `t_max`]")
    return lo, hi


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def chunked(fn: Callable, z: torch.Tensor, t: torch.Tensor, size: int) -> torch.Tensor:
    """``fn(z, t)`` over the leading dimension in chunks of ``size`` (bounds memory, not results)."""
    return torch.cat([fn(z[i:i + size], t[i:i + size]) for i in range(0, z.shape[0], size)])


def dim_of(y: torch.Tensor) -> int:
    return int(math.prod(y.shape[1:]))
