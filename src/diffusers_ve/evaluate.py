"""Likelihood of a whole data set, on one process or many: ``python -m diffusers_ve.evaluate``.

    accelerate launch -m diffusers_ve.evaluate --model PIPELINE_DIR --data DATA --output-dir OUT \\
        --method elbo --num-t-samples 64 --num-levels 256

``--data`` is an image folder, a ``datasets`` folder saved with ``save_to_disk``, or a ``datasets`` name (with
``--split``). Images are dealt out in blocks of ``--batch-size`` to the processes (the model is never wrapped
in DDP: ODE solves take different numbers of steps per image). Each finished block is saved at once under
``OUT/parts``, so a rerun resumes where an interrupted one stopped. All randomness of image ``i`` comes from
a generator seeded with ``(seed, i)`` and ODE error control is per image, so per-image values do not depend
on batch size or process count. The end result: ``OUT/per_image.npz`` (and ``.csv``) and ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .pipelines.pipeline_ve_likelihood import VELikelihoodPipeline

FIELDS = ("log_likelihood", "bits_per_dim", "stderr", "stderr_bits_per_dim", "nfe")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------- data
class ImageFolder:
    """Images of a folder (sorted by name) as (C, H, W) uint8 tensors."""

    def __init__(self, root: str, channels: int = 3):
        self.files = sorted(p for p in Path(root).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.mode = "L" if channels == 1 else "RGB"
        if not self.files:
            raise ValueError(f"`--data` folder {root!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return to_chw(np.asarray(im.convert(self.mode)))


class DatasetColumn:
    """One column of a ``datasets`` split (PIL images, arrays or nested lists) as (C, H, W) tensors."""

    def __init__(self, ds, column: Optional[str] = None):
        names = ds.column_names
        column = column or next((c for c in ("image", "img", "pixel_values", "images") if c in names), None)
        if column not in names:
            raise ValueError(f"`--image-column` must be one of the data set's columns {names}; got {column!r}.")
        self.ds, self.column = ds, column

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return to_chw(np.asarray(self.ds[int(i)][self.column]))


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


def open_data(data: str, split: str = "test", column: Optional[str] = None, channels: int = 3):
    """An image folder, a ``save_to_disk`` folder or a ``datasets`` name -> an indexable image source."""
    p = Path(data)
    if p.is_dir() and not (p / "dataset_info.json").exists() and not (p / "state.json").exists() \
            and not (p / "dataset_dict.json").exists():
        return ImageFolder(data, channels)
    import datasets

    ds = datasets.load_from_disk(data) if p.is_dir() else datasets.load_dataset(data, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"`--split` must be one of {list(ds)}; got {split!r}.")
        ds = ds[split]
    return DatasetColumn(ds, column)


# ----------------------------------------------------------------------------------------------- runs
def _done_indices(parts: Path) -> set:
    done = set()
    for f in glob.glob(str(parts / "part-*.npz")):
        with np.load(f) as z:
            done.update(z["index"].tolist())
    return done


def _save_part(parts: Path, index: Sequence[int], out) -> None:
    arrays = {k: getattr(out, k).detach().cpu().numpy() for k in FIELDS}
    tmp = parts / f".tmp-{os.getpid()}.npz"
    np.savez(tmp, index=np.asarray(index, dtype=np.int64), **arrays)
    os.replace(tmp, parts / f"part-{index[0]:09d}-{len(index)}.npz")  # atomic: a part is whole or absent


def evaluate(pipe: VELikelihoodPipeline, data, output_dir: str, batch_size: int = 16, seed: int = 0,
             limit: Optional[int] = None, accelerator=None, stop_after_blocks: Optional[int] = None,
             **call_kwargs) -> Optional[dict]:
    """Evaluate every image of ``data`` with ``pipe(..., **call_kwargs)``, resumably, on all processes.

    Args:
        pipe: the likelihood pipeline (moved to the process's device here; never wrapped in DDP).
        data: indexable images, each a (C, H, W) uint8 (levels) or float (model space) tensor.
        output_dir: where parts, ``per_image.npz``, ``per_image.csv`` and ``summary.json`` go.
        batch_size: images per block (one pipeline call); results do not depend on it.
        seed: run seed; image ``i`` uses a generator seeded with ``(seed, i)``.
        limit: evaluate only the first ``limit`` images.
        accelerator: an ``accelerate.Accelerator`` (one is made if None).
        stop_after_blocks: stop (as if killed) after this many blocks of this process: for testing resume.

    Returns:
        The summary (on the main process; None elsewhere).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    acc = accelerator or Accelerator()
    out_dir, parts = Path(output_dir), Path(output_dir) / "parts"
    n = len(data) if limit is None else min(limit, len(data))
    protocol = {"seed": seed, "num_images": n, **{k: v for k, v in call_kwargs.items() if k != "batch_size"}}
    if acc.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
        if not (out_dir / "run.json").exists():
            (out_dir / "run.json").write_text(json.dumps(protocol, indent=1))
    acc.wait_for_everyone()
    _check_protocol(out_dir / "run.json", protocol)  # on every process, so that none waits for a dead one
    todo = sorted(set(range(n)) - _done_indices(parts))
    blocks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)][acc.process_index::acc.num_processes]
    pipe.to(acc.device)
    bar = tqdm(blocks, desc=f"likelihood [{acc.process_index}]", disable=not acc.is_local_main_process)
    for k, block in enumerate(bar):
        if stop_after_blocks is not None and k >= stop_after_blocks:
            os._exit(3)  # an abrupt stop, as a kill would leave it
        images = torch.stack([data[i] for i in block])
        out = pipe(images, seed=seed, indices=block, **call_kwargs)
        _save_part(parts, block, out)
        bar.set_postfix(bpd=f"{float(out.bits_per_dim.mean()):.4f}")
    acc.wait_for_everyone()
    summary = _merge(out_dir, parts, n, out.protocol if blocks else None, acc.num_processes) \
        if acc.is_main_process else None
    acc.wait_for_everyone()
    return summary


def _check_protocol(path: Path, protocol: dict) -> None:
    old = json.loads(path.read_text())
    if old != json.loads(json.dumps(protocol)):
        raise ValueError(f"{path.parent} holds a run with a different protocol ({old}); use another "
                         "`--output-dir` or delete it.")


def _merge(out_dir: Path, parts: Path, n: int, protocol: Optional[dict], world: int) -> dict:
    rows = {}
    for f in sorted(glob.glob(str(parts / "part-*.npz"))):
        with np.load(f) as z:
            for j, i in enumerate(z["index"].tolist()):
                rows[i] = {k: z[k][j] for k in FIELDS}
    missing = sorted(set(range(n)) - set(rows))
    if missing:
        raise RuntimeError(f"{len(missing)} images have no result (first: {missing[:5]}); run again to resume.")
    idx = np.arange(n)
    cols = {k: np.asarray([rows[i][k] for i in idx]) for k in FIELDS}
    np.savez(out_dir / "per_image.npz", index=idx, **cols)
    with open(out_dir / "per_image.csv", "w") as fh:
        fh.write("index," + ",".join(FIELDS) + "\n")
        for i in idx:
            fh.write(f"{i}," + ",".join(f"{cols[k][i]:.10g}" for k in FIELDS) + "\n")
    bpd, se = cols["bits_per_dim"], np.nan_to_num(cols["stderr_bits_per_dim"])
    run = json.loads((out_dir / "run.json").read_text())
    summary = {
        "num_images": int(n),
        "bits_per_dim": float(bpd.mean()),
        "stderr_over_images": float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "stderr_monte_carlo": float(np.sqrt((se**2).sum()) / n),
        "log_likelihood_nats": float(cols["log_likelihood"].mean()),
        "model_calls_per_image": float(cols["nfe"].mean()),
        "num_processes": int(world),
        "protocol": protocol or run,
        "run": run,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{summary['bits_per_dim']:.5f} bits/dim (s.e. {summary['stderr_over_images']:.5f} over images, "
          f"{summary['stderr_monte_carlo']:.5f} Monte-Carlo) on {n} images; protocol: {summary['protocol']}")
    return summary


# ----------------------------------------------------------------------------------------------- CLI
def load_pipeline(path: str, dtype: Optional[str] = None) -> VELikelihoodPipeline:
    """A folder saved with ``save_pretrained`` (any pipeline class with ``unet/`` and ``scheduler/``)."""
    from . import mixture  # noqa: F401  (diffusers resolves a saved MixtureUNet through sys.modules)

    kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    pipe = VELikelihoodPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffusers_ve.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="saved pipeline folder (unet/ and scheduler/)")
    p.add_argument("--data", required=True, help="image folder, save_to_disk folder or datasets name")
    p.add_argument("--split", default="test")
    p.add_argument("--image-column", default=None)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--method", default="elbo", choices=("elbo", "ode"))
    p.add_argument("--num-t-samples", type=int, default=64)
    p.add_argument("--num-levels", default="256", help="n of n-level data, or 'none' for continuous data")
    p.add_argument("--prior", default="vp", choices=("vp", "ve"))
    p.add_argument("--dequantization", default=None, choices=("decoder", "uniform"))
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--trace", default="auto", choices=("auto", "exact", "hutchinson"))
    p.add_argument("--num-probes", type=int, default=4)
    p.add_argument("--num-dequant", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "float64", "float16", "bfloat16"))
    p.add_argument("--stop-after-blocks", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    levels = None if a.num_levels.lower() == "none" else int(a.num_levels)
    pipe = load_pipeline(a.model, a.dtype)
    data = open_data(a.data, a.split, a.image_column, pipe.unet.config.get("in_channels", 3))
    kwargs = dict(method=a.method, num_levels=levels, prior=a.prior, dequantization=a.dequantization)
    if a.method == "elbo":
        kwargs.update(num_t_samples=a.num_t_samples)
    else:
        kwargs.update(rtol=a.rtol, atol=a.atol, trace=a.trace, num_probes=a.num_probes, num_dequant=a.num_dequant)
    return evaluate(pipe, data, a.output_dir, a.batch_size, a.seed, a.limit, stop_after_blocks=a.stop_after_blocks,
                    **kwargs)


if __name__ == "__main__":
    main()
