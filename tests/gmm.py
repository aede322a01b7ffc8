"""Shared Gaussian-mixture fixtures: exact populations in image shape (math.md §"Gaussian-mixture ground truth")."""

import torch

from diffusers_ve.mixture import GaussianMixture, MixtureUNet  # noqa: F401


def image_mixture(shape=(1, 4, 4)) -> GaussianMixture:
    """Three modes of unequal weight and width in image shape: a mean of -0.6, one of +0.5, and a ramp."""
    n = int(torch.tensor(shape).prod())
    means = torch.stack([torch.full(shape, -0.6), torch.full(shape, 0.5), torch.linspace(-1, 1, n).reshape(shape)])
    return GaussianMixture(means.double(), [0.1, 0.2, 0.05], [0.5, 0.3, 0.2])
