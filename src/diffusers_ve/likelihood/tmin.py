"""The lower end ``t_min`` of the ELBO for n-level data (the likelihood guide, "The t_min rule").

For n levels the bin half-width in model space is ``delta = 1/(n-1)``. Below ``t ~ delta^2`` a network that
has not learned the exact level grid pays up to ``1/(2 ln 2)`` bits/dim per unit ``ln t`` (halving
``sqrt(t_min)`` costs up to 1 bit/dim); above it the decoder ``N(yhat, t_min)`` spreads over neighbouring
levels. The rule puts ``t_min`` at the crossover, ``t_min = c delta^2``, clamped to the model's table.
The move to ``process.py`` is the lead's call (it is a formula of the data's quantisation, not of the process).
"""

from __future__ import annotations

from typing import Optional

from .discrete import half_width

# c in t_min = c delta^2: measured on the 17-level digits mixture and on the trained digits networks (the guide)
T_MIN_FACTOR = 0.6


def quantisation_t_min(num_levels: int, factor: float = T_MIN_FACTOR) -> float:
    """``c delta^2`` with ``delta = 1/(n-1)``: the ELBO's lower end for n-level data in model space [-1, 1]."""
    return factor * half_width(num_levels) ** 2


def default_t_min(axis, num_levels: Optional[int]) -> float:
    """The default ``t_min``: the table's first entry for continuous data (``num_levels=None``), else
    :func:`quantisation_t_min` clamped into the table (8-bit data on a DDPM table sit at the table's end)."""
    if num_levels is None:
        return axis.t_min
    return min(max(quantisation_t_min(num_levels), axis.t_min), axis.t_max)
