"""Summaries of per-image bits/dim: the mean with its two standard errors (the pipeline, evaluate, training)."""

from __future__ import annotations

import math

import torch


def mean_bits_per_dim(bits_per_dim, stderr_bits_per_dim) -> tuple:
    """Mean bits/dim of a set of images with two standard errors: the Monte-Carlo one (from the per-image errors)
    and the one over images (their spread). Each is NaN when unknown (an unknown per-image error, one image)."""
    bpd = torch.as_tensor(bits_per_dim, dtype=torch.float64)
    n = len(bpd)
    mc = float(torch.as_tensor(stderr_bits_per_dim, dtype=torch.float64).pow(2).sum().sqrt()) / n
    spread = float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(bpd.mean()), mc, spread


def format_stderr(value: float) -> str:
    """A standard error with 5 decimals, or ``n/a`` when it is unknown (NaN): never a false 0."""
    return f"{value:.5f}" if math.isfinite(value) else "n/a"
