"""Images for training and evaluation without torchvision: the built-in digits (17 exact levels), PIL transforms
that keep 8-bit levels, image folders and deterministic sharded sampling."""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch

from .process import check_choice as _check_choice

DIGITS_LEVELS = 17  # scikit-learn digits: integers 0..16


def load_digits_images(resolution: int = 8, resize: str = "pad") -> torch.Tensor:
    """scikit-learn's digits as (1797, 1, R, R) float32 images in [-1, 1], on the 17 exact levels ``2x/16 - 1``.

    Args:
        resolution: side length R >= 8.
        resize: ``"pad"`` (centre the 8x8 digit on background -1) or ``"nearest"`` (repeat pixels;
            R a multiple of 8). Never interpolated, so bits/dim stays defined with 17 levels.
    """
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().images, dtype=torch.float32)[:, None] / 8 - 1
    _check_choice("resize", resize, ("pad", "nearest"))
    if resize == "nearest":
        if resolution % 8:
            raise ValueError(f"`resolution` must be a multiple of 8 for nearest-neighbour digits; got {resolution}.")
        return x.repeat_interleave(resolution // 8, 2).repeat_interleave(resolution // 8, 3)
    if resolution < 8:
        raise ValueError(f"`resolution` must be >= 8 for the digits (8x8 images); got {resolution}.")
    lo = (resolution - 8) // 2
    return torch.nn.functional.pad(x, (lo, resolution - 8 - lo, lo, resolution - 8 - lo), value=-1.0)


def split_indices(n: int, eval_fraction: float, seed: int = 0, min_held: int = 0):
    """A fixed random split of ``range(n)`` into (train, held-out) index arrays.

    Args:
        n: number of items.
        eval_fraction: held-out share in [0, 1); 0 holds nothing out.
        seed: seed of the permutation.
        min_held: hold out at least this many (but never more than half of ``n``) when ``eval_fraction > 0``,
            so that a small data set still gets a held-out set instead of ``round(n * eval_fraction) = 0``.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"`eval_fraction` must be in [0, 1); got {eval_fraction!r}.")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * eval_fraction))
    if eval_fraction > 0:
        k = max(k, min(int(min_held), n // 2))
    return np.sort(perm[k:]), np.sort(perm[:k])


_MODE_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "LA": 2, "P": 3, "RGB": 3, "RGBA": 4, "CMYK": 4}
_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # what an image is converted to for a UNet of C channels
_COLOUR_MODES = ("P", "RGB", "RGBA", "CMYK")
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos")


class ChannelMismatchError(ValueError):
    """An image that cannot be converted to the UNet's channel count without losing information."""


def image_channels(image) -> int:
    """Channel count of a PIL image, from its mode (palette images count as RGB)."""
    if image.mode not in _MODE_CHANNELS:
        raise ValueError(f"unsupported image mode {image.mode!r}; supported: {sorted(_MODE_CHANNELS)}.")
    return _MODE_CHANNELS[image.mode]


class ImageTransform:
    """PIL image -> float32 tensor (C, R, R) in [-1, 1] (``y = 2x/255 - 1``), without torchvision.

    Resize the short side to R (``resample``), crop R x R (centre or random) and optionally flip left-right.
    PIL resizes 8-bit images to 8-bit images, so the 256 levels (and bits/dim) survive any filter.

    Args:
        resolution: output side R.
        channels: the UNet's ``in_channels`` (1 to 4). An image with another channel count is converted, as
            ``train_unconditional.py`` converts everything to RGB (grey to RGB replicates, alpha is dropped);
            a colour image for a 1- or 2-channel UNet is a ValueError (converting would drop the colour).
        center_crop: centre crop (else a random crop).
        random_flip: flip left-right with probability 1/2.
        resample: ``"nearest"``, ``"bilinear"``, ``"bicubic"`` or ``"lanczos"``.
    """

    def __init__(self, resolution: int, channels: int, center_crop: bool = False, random_flip: bool = False,
                 resample: str = "bilinear"):
        from PIL import Image

        self.resolution, self.channels = int(resolution), int(channels)
        if self.channels not in _CHANNEL_MODES:
            raise ValueError(f"`channels` must be one of {sorted(_CHANNEL_MODES)}; got {channels!r}.")
        self.center_crop, self.random_flip = center_crop, random_flip
        self.resample = getattr(Image.Resampling, _check_choice("resample", resample, RESAMPLE).upper())

    def convert(self, image):
        """``image`` with ``channels`` channels (a mixed grey/colour folder trains as one); ValueError if that would
        drop colour."""
        c = image_channels(image)
        if c == self.channels and image.mode != "P":  # keep the mode (and the levels) as they are
            return image
        if image.mode in _COLOUR_MODES and self.channels < 3:
            raise ChannelMismatchError(
                f"a colour image (mode {image.mode!r}, {c} channels) does not fit a UNet with in_channels={self.channels} "
                "without dropping its colour; use a model with 3 input channels."
            )
        return image.convert(_CHANNEL_MODES[self.channels])

    def __call__(self, image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        image = self.convert(image)
        r, (w, h) = self.resolution, image.size
        scale = r / min(w, h)
        image = image.resize((max(r, round(w * scale)), max(r, round(h * scale))), self.resample)
        w, h = image.size
        if self.center_crop:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left, top = (int(torch.randint(0, n - r + 1, (1,), generator=generator)) for n in (w, h))
        image = image.crop((left, top, left + r, top + r))
        x = torch.as_tensor(np.array(image, dtype=np.float32)).reshape(r, r, -1).permute(2, 0, 1)
        if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
            x = x.flip(-1)
        return x / 127.5 - 1


class TensorFlip:
    """The transform of images that are already tensors (C, R, R) at the training resolution: a left-right flip
    with probability 1/2 if ``random_flip``, else the identity."""

    def __init__(self, random_flip: bool = False):
        self.random_flip = random_flip

    @property
    def random(self) -> bool:
        """Whether the transform draws random numbers (a dataset makes a generator per item only then)."""
        return self.random_flip

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
            return x.flip(-1)
        return x


class ImageDataset(torch.utils.data.Dataset):
    """Images from a list of paths, a ``datasets`` column or a tensor (N, C, R, R), transformed with
    per-(seed, epoch, index) randomness so that crops and flips replay exactly on resume.

    Args:
        images: paths, PIL images (a ``datasets`` column) or a tensor of images.
        transform: called as ``transform(item, generator)``: an :class:`ImageTransform` for PIL images and
            paths, a :class:`TensorFlip` for tensors.
        seed: the run's seed.
    """

    def __init__(self, images, transform: ImageTransform, seed: int = 0):
        self.images, self.transform, self.seed, self.epoch = images, transform, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def load(self, i: int):
        from PIL import Image

        item = self.images[int(i)]
        if isinstance(item, (str, os.PathLike)):
            with Image.open(item) as im:
                im.load()
                return im
        return item

    def __getitem__(self, i):
        g = None
        if getattr(self.transform, "random", True):  # a generator per item costs as much as a small transform
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
        try:
            return self.transform(self.load(i), g)
        except (ValueError, OSError) as e:  # name the file: one bad image in 50,000 must be findable
            item = self.images[int(i)]
            name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"image {int(i)}"
            cls = ChannelMismatchError if isinstance(e, ChannelMismatchError) else ValueError
            raise cls(f"{name}: {e}") from e


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(folder: str) -> List[str]:
    """Image files under ``folder`` (recursive, sorted)."""
    if not os.path.isdir(folder):
        raise ValueError(f"`train_data_dir` must be an existing folder of images; got {folder!r}.")
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise ValueError(f"`train_data_dir` {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return found


class ShardedEpochSampler(torch.utils.data.Sampler):
    """Deterministic shuffling by (seed, epoch), sharded over ranks, whole optimizer steps only.

    Each optimizer step takes ``world_size * batch_size * accumulation`` distinct indices; rank ``r`` gets its
    slice of every micro-batch. ``skip`` drops the first micro-batches of the epoch (exact resume).
    """

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, accumulation: int = 1):
        self.n, self.batch, self.world, self.rank, self.seed, self.accum = n, batch_size, world_size, rank, seed, accumulation
        self.epoch, self.skip = 0, 0
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set has {n} images, fewer than one optimizer step needs "
                f"(train_batch_size {batch_size} x {world_size} processes x {accumulation} accumulation steps)."
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.batch * self.world * self.accum)

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self):
        return (self.steps_per_epoch * self.accum - self.skip) * self.batch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        micro = perm[: self.steps_per_epoch * self.accum * self.world * self.batch].view(-1, self.world, self.batch)
        return iter(micro[self.skip:, self.rank].reshape(-1).tolist())
