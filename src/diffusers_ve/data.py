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


def _colour_error(mode: str, c: int, channels: int) -> ChannelMismatchError:
    return ChannelMismatchError(
        f"a colour image (mode {mode!r}, {c} channels) does not fit a UNet with in_channels={channels} "
        "without dropping its colour; use a model with 3 input channels."
    )


def convert_channels(image, channels: Optional[int]):
    """The channel policy of training and evaluation alike: a PIL ``image`` with ``channels`` channels.

    Grey to RGB replicates the grey level and alpha is dropped (as ``train_unconditional.py`` converts everything to
    RGB), so a mixed grey/colour folder trains as one; a colour image for a 1- or 2-channel model is a
    :class:`ChannelMismatchError` (converting would drop the colour). ``channels=None`` keeps the image as stored.
    """
    if channels is None:
        return image
    c = image_channels(image)
    if c == channels and image.mode != "P":  # keep the mode (and the levels) as they are
        return image
    if image.mode in _COLOUR_MODES and channels < 3:
        raise _colour_error(image.mode, c, channels)
    if channels not in _CHANNEL_MODES:
        raise ValueError(f"`channels` must be one of {sorted(_CHANNEL_MODES)}; got {channels!r}.")
    return image.convert(_CHANNEL_MODES[channels])


class ImageTransform:
    """PIL image -> float32 tensor (C, R, R) in [-1, 1] (``y = 2x/255 - 1``), without torchvision.

    Resize the short side to R (``resample``), crop R x R (centre or random) and optionally flip left-right.
    PIL resizes 8-bit images to 8-bit images, so the 256 levels (and bits/dim) survive any filter.

    Args:
        resolution: output side R.
        channels: the UNet's ``in_channels`` (1 to 4); other channel counts follow :func:`convert_channels`.
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
        """``image`` with ``channels`` channels (see :func:`convert_channels`)."""
        return convert_channels(image, self.channels)

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


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")  # looked for, in this order, when no column is named


def list_images(folder: str, flag: str = "train_data_dir") -> List[str]:
    """Image files under ``folder`` (recursive, sorted); ``flag`` names the argument in errors."""
    if not os.path.isdir(folder):
        raise ValueError(f"`{flag}` must be an existing folder of images; got {folder!r}.")
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise ValueError(f"`{flag}` {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return found


def image_column(column_names, column: Optional[str] = None, flag: str = "image_column") -> str:
    """The image column of a ``datasets`` split: ``column``, or the first of :data:`IMAGE_COLUMNS` present."""
    column = column or next((c for c in IMAGE_COLUMNS if c in column_names), None)
    if column not in column_names:
        raise ValueError(f"`{flag}` must be one of the data set's columns {list(column_names)}; got {column!r}.")
    return column


class ImageSource:
    """The one reader of image data for training and ``python -m diffusers_ve.evaluate``: the files of a folder
    (recursive, sorted by path) or one column of a ``datasets`` split (PIL images, arrays or nested lists).

    ``source[i]`` is a PIL image with the model's channel count (:func:`convert_channels`) or, for array columns,
    the array as stored (converted through PIL by the same policy when its channel count differs); a bad item is a
    ValueError naming its file or index.

    Args:
        items: a list of paths, or a ``datasets`` split (indexed lazily, one row at a time).
        channels: the model's ``in_channels`` (None: keep images as stored).
        column: the image column of a ``datasets`` split.
    """

    def __init__(self, items, channels: Optional[int] = None, column: Optional[str] = None):
        self.items, self.channels, self.column = items, channels, column

    @classmethod
    def from_folder(cls, folder: str, channels: Optional[int] = None, flag: str = "train_data_dir") -> "ImageSource":
        return cls(list_images(folder, flag), channels)

    @classmethod
    def from_split(cls, split, channels: Optional[int] = None, column: Optional[str] = None,
                   flag: str = "image_column") -> "ImageSource":
        return cls(split, channels, image_column(split.column_names, column, flag))

    def __len__(self):
        return len(self.items)

    def select(self, indices) -> "ImageSource":
        """The images at ``indices`` (a split's rows are selected lazily)."""
        if self.column is None:
            return ImageSource([self.items[int(i)] for i in indices], self.channels)
        return ImageSource(self.items.select([int(i) for i in indices]), self.channels, self.column)

    def name(self, i: int) -> str:
        return os.fspath(self.items[int(i)]) if self.column is None else f"image {int(i)}"

    def __getitem__(self, i):
        from PIL import Image

        try:
            if self.column is not None:
                item = self.items[int(i)][self.column]
                if not hasattr(item, "convert"):  # an array: as stored, unless the channel policy must convert it
                    item = np.asarray(item)
                    if self.channels is None or to_chw(item).shape[0] == self.channels:
                        return item
                    item = to_pil(item)
                return convert_channels(item, self.channels)
            with Image.open(self.items[int(i)]) as im:
                im.load()
                return convert_channels(im, self.channels)
        except (ValueError, OSError) as e:  # name the file: one bad image in 50,000 must be findable
            cls = ChannelMismatchError if isinstance(e, ChannelMismatchError) else ValueError
            raise cls(f"{self.name(i)}: {e}") from e


def image_splits(train_data_dir: Optional[str] = None, dataset_name: Optional[str] = None, channels: Optional[int] = None,
                 eval_fraction: float = 0.0, max_held: Optional[int] = None, min_held: int = 0,
                 image_column: Optional[str] = None, **load_dataset_kwargs):
    """(train, held-out) :class:`ImageSource` of an image folder or a ``datasets`` name, as the training script
    splits them: a ``datasets`` test (or validation) split is the held-out set, else a fixed random split
    (:func:`split_indices`, seed 0) holds out ``eval_fraction`` (at least ``min_held``); at most ``max_held`` held out.
    ``load_dataset_kwargs`` (e.g. ``name``, ``cache_dir``) go to ``datasets.load_dataset``."""
    if train_data_dir:
        train = ImageSource.from_folder(train_data_dir, channels)
    else:
        import datasets

        try:
            ds = datasets.load_dataset(dataset_name, **load_dataset_kwargs)
        except Exception as e:  # noqa: BLE001: the message names the data source
            raise ValueError(f"`--dataset_name` {dataset_name!r} could not be loaded: {e}") from e
        if "train" not in ds:
            raise ValueError(f"`--dataset_name` {dataset_name!r} has no 'train' split (splits: {list(ds)}).")
        train = ImageSource.from_split(ds["train"], channels, image_column, flag="--image_column")
        held_split = next((s for s in ("test", "validation") if s in ds), None)
        if held_split:
            held = ImageSource.from_split(ds[held_split], channels, train.column)
            return train, held.select(range(min(len(held), max_held if max_held is not None else len(held))))
    tr, he = split_indices(len(train), eval_fraction, seed=0, min_held=min_held)
    return train.select(tr), train.select(he[:max_held])


def to_chw(a: np.ndarray) -> torch.Tensor:
    """(H, W), (H, W, C) or (C, H, W) -> (C, H, W); integer arrays become uint8 levels, floats stay floats."""
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4):
        a = a.transpose(2, 0, 1)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"integer images must hold levels in 0..255; got [{a.min()}, {a.max()}].")
        return torch.as_tensor(a.astype(np.uint8))
    return torch.as_tensor(a.astype(np.float32))


def to_pil(a: np.ndarray):
    """An integer array (any layout :func:`to_chw` takes) -> a PIL image, for resizing."""
    from PIL import Image

    x = to_chw(a)
    if x.dtype != torch.uint8:
        raise ValueError("`--resolution` resizes 8-bit images only; these images are floats.")
    hwc = x.permute(1, 2, 0).numpy()
    return Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)


class LevelImages:
    """An :class:`ImageSource` as (C, H, W) tensors: uint8 levels as stored, or resized and cropped by the training
    script's ``transform`` (levels kept; a random crop is fixed per index). Without a transform every image must have
    the size of the first one: a mixed-size folder is a ValueError that says to pass a resolution."""

    def __init__(self, source: ImageSource, transform: Optional["ImageTransform"] = None, flag: str = "--resolution"):
        self.source, self.transform, self.flag, self._size = source, transform, flag, None

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        item = self.source[i]
        if self.transform is not None:
            y = self.transform(item if hasattr(item, "convert") else to_pil(item), torch.Generator().manual_seed(int(i)))
            return torch.round((y + 1) * 127.5).to(torch.uint8)  # the transform keeps 8-bit levels exactly
        x = to_chw(np.asarray(item))
        if self._size is None:
            self._size = tuple((x if int(i) == 0 else to_chw(np.asarray(self.source[0]))).shape[1:])
        if tuple(x.shape[1:]) != self._size:
            raise ValueError(check_sizes_message(self.source.name(i), tuple(x.shape[1:]), self.source.name(0),
                                                 self._size, self.flag))
        return x


def check_sizes_message(name: str, size, first_name: str, first_size, flag: str = "--resolution") -> str:
    """The one error for images of different sizes (training and evaluation say the same)."""
    return (f"images of different sizes: {name} is {size[0]}x{size[1]} but {first_name} is "
            f"{first_size[0]}x{first_size[1]}; pass `{flag}` to resize and crop every image to one square size.")


class ImageDataset(torch.utils.data.Dataset):
    """Images from an :class:`ImageSource`, a list of paths or a tensor (N, C, R, R), transformed with
    per-(seed, epoch, index) randomness so that crops and flips replay exactly on resume.

    Args:
        images: an :class:`ImageSource`, paths, PIL images (a ``datasets`` column) or a tensor of images.
        transform: called as ``transform(item, generator)``: an :class:`ImageTransform` for PIL images and
            paths, a :class:`TensorFlip` for tensors.
        seed: the run's seed.
    """

    def __init__(self, images, transform: ImageTransform, seed: int = 0):
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
            images = ImageSource(list(images))
        self.images, self.transform, self.seed, self.epoch = images, transform, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        g = None
        if getattr(self.transform, "random", True):  # a generator per item costs as much as a small transform
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
        item = self.images[int(i)]  # an ImageSource names a bad file itself
        try:
            return self.transform(to_pil(item) if isinstance(item, np.ndarray) else item, g)
        except (ValueError, OSError) as e:
            name = self.images.name(i) if isinstance(self.images, ImageSource) else f"image {int(i)}"
            cls = ChannelMismatchError if isinstance(e, ChannelMismatchError) else ValueError
            raise cls(f"{name}: {e}") from e


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
