"""Training a VP diffusers UNet on the VE process: the objective, the built-in digits data, image transforms
without torchvision, deterministic sharded sampling, and atomic checkpoints (shared by ``training/train_ve.py``
and the tests).

The model is a VP ``UNet2DModel`` (``epsilon`` / ``v_prediction`` / ``sample`` on a DDPM beta table), so every
diffusers scheduler can drive it; noise levels are drawn in VE time ``t`` and mapped to the model's timestep by
:class:`~diffusers_ve.process.TimeAxis`. Every loss is ``w(t) * mean ||epshat - eps||^2`` (per dimension):

* ``ddpm``: integer table timesteps, uniform; ``w = 1`` (the eps-MSE of diffusers' ``train_unconditional.py``).
* ``likelihood``: ``ln t ~ U[ln t_min, ln t_max]`` (stratified over the batch), ``w = ln(t_max / t_min) / 2``: the
  expectation is the diffusion term of McAllester's continuous ELBO (math.md §4.2), in nats per dimension.
* ``edm``: ``ln sigma ~ N(p_mean, p_std^2)`` truncated to the table, weight ``(t + sd^2) / (t sd^2)`` on
  ``||yhat - y||^2``, i.e. ``w = (t + sd^2) / sd^2`` on the eps-MSE.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from . import process

LOSS_WEIGHTINGS = ("ddpm", "likelihood", "edm")
DIGITS_LEVELS = 17  # scikit-learn digits: integers 0..16
CHECKPOINT_STATE = "train_ve_state.json"  # written last: a checkpoint without it is incomplete
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}.")
    return value


# ------------------------------------------------------------------------------------------ objective
@dataclass
class NoisyBatch:
    """One draw of the forward process for a batch of clean images ``y`` (VE data space).

    Args:
        t: VE times, float64 (B,) on the CPU.
        timestep: model timesteps ``tau(t)``, float32 (B,) on ``y``'s device.
        eps: standard-normal noise, shape of ``y``.
        z: VE state ``y + sqrt(t) eps``.
        x: VP model input ``z / sqrt(1 + t)``.
    """

    t: torch.Tensor
    timestep: torch.Tensor
    eps: torch.Tensor
    z: torch.Tensor
    x: torch.Tensor


class Objective:
    """Noise-level sampling and loss weighting for a VP model on a DDPM beta table.

    Args:
        axis: the model's time axis (``TimeAxis.from_config(scheduler_config)``).
        prediction_type: what the model outputs: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        weighting: ``"ddpm"``, ``"likelihood"`` or ``"edm"`` (see the module docstring).
        sigma_data: EDM's data std ``sd`` (``edm`` only).
        p_mean, p_std: EDM's log-normal ``ln sigma ~ N(p_mean, p_std^2)`` (``edm`` only).
    """

    def __init__(self, axis: process.TimeAxis, prediction_type: str = "epsilon", weighting: str = "ddpm",
                 sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2):
        self.axis = axis
        self.prediction_type = process.check_prediction_type(prediction_type)
        self.weighting = _check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
        if not (sigma_data > 0 and p_std > 0):
            raise ValueError(f"`sigma_data` and `p_std` must be > 0; got {sigma_data!r}, {p_std!r}.")
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)

    @classmethod
    def from_config(cls, scheduler_config, weighting: str = "ddpm", **kwargs) -> "Objective":
        """Build from a scheduler config (its beta table and ``prediction_type``)."""
        get = scheduler_config.get if isinstance(scheduler_config, dict) else scheduler_config.__getitem__
        return cls(process.TimeAxis.from_config(scheduler_config), get("prediction_type"), weighting, **kwargs)

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None):
        """Draw ``n`` VE times (float64, CPU) and their model timesteps (float64, CPU) for this weighting."""
        lo, hi = math.log(self.axis.t_min), math.log(self.axis.t_max)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        if self.weighting == "ddpm":
            tau = torch.floor(u * self.axis.num_train_timesteps).clamp(max=self.axis.num_train_timesteps - 1)
            return self.axis.t(tau), tau
        if self.weighting == "likelihood":  # stratified: one point per 1/n of [ln t_min, ln t_max], shuffled
            strata = torch.randperm(n, generator=generator)
            log_t = process.stratified_t(self.axis.t_min, self.axis.t_max, u, strata, n).log()
        else:  # truncated normal in ln sigma = ln(t) / 2, by the inverse CDF
            norm = torch.distributions.Normal(torch.tensor(self.p_mean, dtype=torch.float64),
                                              torch.tensor(self.p_std, dtype=torch.float64))
            a, b = norm.cdf(torch.tensor(lo / 2, dtype=torch.float64)), norm.cdf(torch.tensor(hi / 2, dtype=torch.float64))
            log_t = 2 * norm.icdf(a + (b - a) * u).clamp(lo / 2, hi / 2)
        t = torch.exp(log_t).clamp(self.axis.t_min, self.axis.t_max)
        return t, self.axis.timestep(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight on the per-dimension eps-MSE, float64 (B,)."""
        if self.weighting == "ddpm":
            return torch.ones_like(t)
        if self.weighting == "likelihood":
            return torch.full_like(t, 0.5 * math.log(self.axis.t_max / self.axis.t_min))
        sd2 = self.sigma_data**2
        return (t + sd2) / sd2

    def draw(self, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> NoisyBatch:
        """Noise a batch of clean images ``y`` (VE data space, float32). ``generator`` is a CPU generator:
        the same draws on every device, and its state is what a checkpoint saves."""
        t, tau = self.sample_t(y.shape[0], generator)
        eps = randn_tensor(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        y32, tt = y.float(), t.to(y.device, torch.float32)
        z = process.noisy(y32, eps, tt)
        return NoisyBatch(t, tau.to(y.device, torch.float32), eps, z, process.vp_from_ve(z, tt))

    def per_sample_loss(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """``w(t) * mean over dimensions of (epshat - eps)^2``, float32 (B,), for a model output in
        ``prediction_type`` units at ``batch.x``."""
        out = model_output.float()
        if self.prediction_type == "epsilon":
            epshat = out
        else:
            tt = batch.t.to(out.device, torch.float32)
            yhat = process.yhat_from_output(out, batch.z, tt, self.prediction_type)
            epshat = process.output_from_yhat(yhat, batch.z, tt, "epsilon")
        mse = (epshat - batch.eps).pow(2).flatten(1).mean(1)
        return self.weight(batch.t).to(mse.device, mse.dtype) * mse

    def loss(self, model, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean loss of a VP ``model`` (called as ``model(x, timestep).sample``) on clean images ``y``."""
        batch = self.draw(y, generator)
        out = model(batch.x, batch.timestep)
        return self.per_sample_loss(getattr(out, "sample", out), batch).mean()


# ------------------------------------------------------------------------------------------- data
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


def split_indices(n: int, eval_fraction: float, seed: int = 0):
    """A fixed random split of ``range(n)`` into (train, held-out) index arrays."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"`eval_fraction` must be in [0, 1); got {eval_fraction!r}.")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * eval_fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


_MODE_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "LA": 2, "P": 3, "RGB": 3, "RGBA": 4, "CMYK": 4}
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos")


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
        channels: the UNet's ``in_channels``; an image with another channel count is a ValueError.
        center_crop: centre crop (else a random crop).
        random_flip: flip left-right with probability 1/2.
        resample: ``"nearest"``, ``"bilinear"``, ``"bicubic"`` or ``"lanczos"``.
    """

    def __init__(self, resolution: int, channels: int, center_crop: bool = False, random_flip: bool = False,
                 resample: str = "bilinear"):
        from PIL import Image

        self.resolution, self.channels = int(resolution), int(channels)
        self.center_crop, self.random_flip = center_crop, random_flip
        self.resample = getattr(Image.Resampling, _check_choice("resample", resample, RESAMPLE).upper())

    def __call__(self, image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        c = image_channels(image)
        if c != self.channels:
            raise ValueError(
                f"an image of mode {image.mode!r} has {c} channel(s) but the UNet takes in_channels={self.channels}; "
                "use a model config with matching in_channels/out_channels or convert the images."
            )
        if image.mode == "P":
            image = image.convert("RGB")
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


class ImageDataset(torch.utils.data.Dataset):
    """Images from a list of paths or a ``datasets`` column, transformed with per-(seed, epoch, index) randomness
    so that crops and flips replay exactly on resume."""

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
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
        return self.transform(self.load(i), g)


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


# ------------------------------------------------------------------------------------------ checkpoints
def list_checkpoints(output_dir: str) -> List[int]:
    """Steps of the complete checkpoints ``checkpoint-<step>`` in ``output_dir`` (sorted); partial saves
    (temporary folders, or a folder without its state file) are ignored."""
    if not os.path.isdir(output_dir):
        return []
    steps = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, CHECKPOINT_STATE)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """The checkpoint folder to resume from: ``"latest"`` (the newest complete one in ``output_dir``, or None),
    or a path / ``checkpoint-<step>`` name, which must be complete."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        steps = list_checkpoints(output_dir)
        return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, os.path.basename(resume_from_checkpoint))
    if not os.path.isfile(os.path.join(path, CHECKPOINT_STATE)):
        raise ValueError(
            f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a complete checkpoint (no {CHECKPOINT_STATE}); "
            f"complete ones in {output_dir!r}: {list_checkpoints(output_dir)}; or pass 'latest'."
        )
    return path


def read_checkpoint_state(path: str) -> dict:
    with open(os.path.join(path, CHECKPOINT_STATE)) as f:
        return json.load(f)


def check_checkpoint_compatible(saved: dict, current: dict, path: str = "checkpoint") -> None:
    """ValueError naming every key of the run's fingerprint (model config, objective, world size) that differs."""
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        lines = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise ValueError(f"{path} comes from another training configuration ({lines}). Resume with the same "
                         "model config, objective and process count, or start a new output_dir.")


def prune_checkpoints(output_dir: str, keep: Optional[int]) -> List[str]:
    """Remove the oldest complete checkpoints so that at most ``keep`` remain; returns the removed folders."""
    steps = list_checkpoints(output_dir)
    if not keep or len(steps) <= keep:
        return []
    removed = [os.path.join(output_dir, f"checkpoint-{s}") for s in steps[: len(steps) - keep]]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def commit_checkpoint(tmp_dir: str, final_dir: str, state: dict) -> None:
    """Finish a checkpoint written into ``tmp_dir``: write its state file last, then rename it into place.

    The rename is atomic on one filesystem, so ``final_dir`` is either absent, the old checkpoint, or complete."""
    with open(os.path.join(tmp_dir, CHECKPOINT_STATE), "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if os.path.isdir(final_dir):
        old = final_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


class OutputDirLock:
    """An exclusive lock on ``output_dir`` held for a training run's lifetime (``fcntl.flock``; released by
    the kernel when the process dies, so a killed run leaves no stale lock).

    Only the main process of a launch takes it, so two uncoordinated copies of the script (two "rank 0"s)
    cannot write into one folder: the second one fails with a ValueError.
    """

    NAME = ".train_ve.lock"

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, self.NAME)
        self.fd = None

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): best effort
            pass
        except OSError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
            os.close(self.fd)
            self.fd = None
            raise ValueError(
                f"another training run ({holder or 'unknown'}) is writing into {os.path.dirname(self.path)!r}. "
                "Two uncoordinated copies of the script (e.g. `accelerate launch --multi_gpu` on a CPU machine "
                "without ACCELERATE_USE_CPU=1) must not share an output_dir."
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ------------------------------------------------------------------------------------------------ Hub
HUB_IGNORE_PATTERNS = ["checkpoint-*", "logs/*", ".train_ve.lock", "*.tmp-*", "*.old/*"]


def push_folder_to_hub(folder: str, repo_id: str, private: bool = False, token: Optional[str] = None,
                       commit_message: str = "Upload VE-trained diffusers pipeline"):
    """Create (or reuse) the model repo ``repo_id`` and upload ``folder`` (the saved pipeline and its card),
    leaving out checkpoints, logs and the lock file. Returns ``upload_folder``'s result."""
    import huggingface_hub

    repo_id = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return huggingface_hub.upload_folder(repo_id=repo_id, folder_path=folder, token=token,
                                         commit_message=commit_message, ignore_patterns=HUB_IGNORE_PATTERNS)


__all__ = [
    "LOSS_WEIGHTINGS", "DIGITS_LEVELS", "Objective", "NoisyBatch", "load_digits_images", "split_indices",
    "ImageTransform", "ImageDataset", "list_images", "ShardedEpochSampler", "list_checkpoints",
    "resolve_checkpoint", "check_checkpoint_compatible", "prune_checkpoints", "commit_checkpoint",
    "OutputDirLock", "push_folder_to_hub",
]
