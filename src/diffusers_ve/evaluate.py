"""Likelihood of a whole data set, on one process or many: ``python -m diffusers_ve.evaluate``.

    accelerate launch -m diffusers_ve.evaluate --model PIPELINE_DIR --data DATA --output-dir OUT \\
        --method elbo --num-t-samples 64 --num-levels 256

``--data`` is an image folder, a ``datasets`` folder saved with ``save_to_disk``, or a ``datasets`` name (with
``--split``); ``--resolution`` (with ``--center-crop``, ``--resample``) resizes and crops as the training script
did, keeping 8-bit levels. Images are dealt out in blocks of ``--batch-size`` to the processes (the model is never
wrapped in DDP: ODE solves take different numbers of steps per image). Each finished block is saved at once under
``OUT/parts``, so a rerun resumes where an interrupted one stopped. All randomness of image ``i`` comes from
a generator seeded with ``(seed, i)`` and ODE error control is per image, so per-image values do not depend
on batch size or process count. The end result: ``OUT/per_image.npz`` (and ``.csv``) and ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .data import RESAMPLE, ImageSource, ImageTransform, LevelImages
from .likelihood.discrete import warn_if_few_levels
from .likelihood.options import LikelihoodOptions
from .likelihood.stats import format_stderr, mean_bits_per_dim
from .pipelines.pipeline_ve_likelihood import VELikelihoodPipeline

FIELDS = ("log_likelihood", "bits_per_dim", "stderr", "stderr_bits_per_dim", "nfe")
LEVEL_CHECK_IMAGES = 64  # images looked at for the level-count warning


# ----------------------------------------------------------------------------------------------- data
# image folders and `datasets` columns are read by diffusers_ve.data, as the training script reads them


def open_data(data: str, split: str = "test", column: Optional[str] = None, channels: Optional[int] = None,
              transform: Optional[ImageTransform] = None):
    """An image folder, a ``save_to_disk`` folder or a ``datasets`` name -> indexable (C, H, W) images.

    The reader is the training script's (:class:`~diffusers_ve.data.ImageSource`): folders are read recursively,
    the image column is the first of ``image``, ``img``, ``pixel_values``, ``images``, grey images are replicated
    for a colour model and a colour image for a grey model is an error; without ``transform``, images of different
    sizes are an error that says to pass ``--resolution``.

    Args:
        data: the folder or name.
        split: ``datasets`` split (ignored for a plain image folder).
        column: the image column (default: the first of :data:`~diffusers_ve.data.IMAGE_COLUMNS` present).
        channels: the model's ``in_channels`` (None: images as stored).
        transform: an :class:`~diffusers_ve.data.ImageTransform` to resize and crop as the training script did.
    """
    p = Path(data)
    if p.is_dir() and not any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return LevelImages(ImageSource.from_folder(data, channels, flag="--data"), transform)
    import datasets

    ds = datasets.load_from_disk(data) if p.is_dir() else datasets.load_dataset(data, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"`--split` must be one of {list(ds)}; got {split!r}.")
        ds = ds[split]
    return LevelImages(ImageSource.from_split(ds, channels, column, flag="--image-column"), transform)


def check_levels(data, num_levels: Optional[int], n: int) -> Optional[int]:
    """Warn when the largest level in the first images is far below ``num_levels - 1``.

    17-level PNGs evaluated as 256 levels give 8.8 instead of 3.1 bits/dim: the count of levels is part of the
    answer. Returns the largest level seen (None for float images or continuous data).
    """
    if num_levels is None:
        return None
    images = [data[i] for i in range(min(n, LEVEL_CHECK_IMAGES))]
    if not images or any(x.dtype != torch.uint8 for x in images):
        return None
    top = max(int(x.max()) for x in images)
    warn_if_few_levels(top, num_levels, f"the first {len(images)} images", stacklevel=3, flag="`--num-levels {}`")
    return top


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
    # the pipeline's full protocol travels with every part, so a rerun with nothing left to do can report it
    np.savez(tmp, index=np.asarray(index, dtype=np.int64), protocol=np.asarray(json.dumps(out.protocol)), **arrays)
    os.replace(tmp, parts / f"part-{index[0]:09d}-{len(index)}.npz")  # atomic: a part is whole or absent


def evaluate(pipe: VELikelihoodPipeline, data, output_dir: str, batch_size: int = 16, seed: int = 0,
             limit: Optional[int] = None, accelerator=None, stop_after_blocks: Optional[int] = None,
             options: Optional[LikelihoodOptions] = None, **fields) -> Optional[dict]:
    """Evaluate every image of ``data`` with ``pipe(..., options, **fields)``, resumably, on all processes.

    Args:
        pipe: the likelihood pipeline (moved to the process's device here; never wrapped in DDP).
        data: indexable images, each a (C, H, W) uint8 (levels) or float (model space) tensor.
        output_dir: where parts, ``per_image.npz``, ``per_image.csv`` and ``summary.json`` go.
        batch_size: images per block (one pipeline call); results do not depend on it.
        seed: run seed; image ``i`` uses a generator seeded with ``(seed, i)``.
        limit: evaluate only the first ``limit`` images (>= 1; None: all).
        accelerator: an ``accelerate.Accelerator`` (one is made if None).
        stop_after_blocks: stop (as if killed) after this many blocks of this process: for testing resume.
        options, fields: the :class:`~diffusers_ve.likelihood.options.LikelihoodOptions` of every block (fields
            by name override it; ``num_levels`` defaults to the model folder's record, as in the pipeline).

    Returns:
        The summary (on the main process; None elsewhere).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be an integer >= 1 (the number of leading images to evaluate) or None for "
                         f"all; got {limit!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
    acc = accelerator or Accelerator()
    out_dir, parts = Path(output_dir), Path(output_dir) / "parts"
    n = len(data) if limit is None else min(limit, len(data))
    opts = pipe.options(options, **fields)
    if opts.method == "both":
        raise ValueError("`method` must be 'elbo' or 'ode' here: run each into its own `--output-dir`.")
    resolved = {k: v for k, v in dataclasses.asdict(opts).items() if k != "batch_size"}
    protocol = {"seed": seed, "num_images": n, **getattr(data, "protocol", {}), **json.loads(json.dumps(
        resolved, default=str))}
    if acc.is_main_process:
        check_levels(data, opts.num_levels, n)
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
        with warnings.catch_warnings():  # the level warning was given once, above, for the data set
            warnings.filterwarnings("ignore", message="the largest level")
            out = pipe(images, opts, seed=seed, indices=block)
        _save_part(parts, block, out)
        bar.set_postfix(bpd=f"{float(out.bits_per_dim.mean()):.4f}")
    acc.wait_for_everyone()
    summary = _merge(out_dir, parts, n, acc.num_processes) if acc.is_main_process else None
    acc.wait_for_everyone()
    return summary


def _check_protocol(path: Path, protocol: dict) -> None:
    old = json.loads(path.read_text())
    if old != json.loads(json.dumps(protocol)):
        raise ValueError(f"{path.parent} holds a run with a different protocol ({old}); use another "
                         "`--output-dir` or delete it.")


def _merge(out_dir: Path, parts: Path, n: int, world: int) -> dict:
    rows, protocol = {}, None
    for f in sorted(glob.glob(str(parts / "part-*.npz"))):
        with np.load(f) as z:
            if protocol is None and "protocol" in z.files:
                protocol = json.loads(str(z["protocol"]))
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
    bpd, se = cols["bits_per_dim"], cols["stderr_bits_per_dim"]
    run = json.loads((out_dir / "run.json").read_text())
    mean, mc, spread = mean_bits_per_dim(bpd, se)
    summary = {
        "num_images": int(n),
        "bits_per_dim": mean,
        "stderr_over_images": spread if math.isfinite(spread) else None,  # None: unknown, never a false 0
        "stderr_monte_carlo": mc if math.isfinite(mc) else None,
        "log_likelihood_nats": float(cols["log_likelihood"].mean()),
        "model_calls_per_image": float(cols["nfe"].mean()),
        "num_processes": int(world),
        "protocol": protocol or run,
        "run": run,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    se_img, se_mc = (format_stderr(float("nan") if v is None else v)
                     for v in (summary["stderr_over_images"], summary["stderr_monte_carlo"]))
    print(f"{summary['bits_per_dim']:.5f} bits/dim (s.e. {se_img} over images, {se_mc} Monte-Carlo) on {n} images; "
          f"protocol: {json.dumps({**run, **(protocol or {})})}")
    return summary


# ----------------------------------------------------------------------------------------------- CLI
def load_pipeline(path: str, dtype: Optional[str] = None) -> VELikelihoodPipeline:
    """A folder saved with ``save_pretrained`` (any pipeline class with ``unet/`` and ``scheduler/``)."""
    from . import mixture  # noqa: F401  (diffusers resolves a saved MixtureUNet through sys.modules)

    kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    pipe = VELikelihoodPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m diffusers_ve.evaluate`` (every flag with its help and default)."""
    p = argparse.ArgumentParser(prog="python -m diffusers_ve.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="saved pipeline folder (unet/ and scheduler/)")
    a("--data", required=True, help="image folder, save_to_disk folder or datasets name")
    a("--split", default="test", help="datasets split (ignored for an image folder)")
    a("--image-column", default=None,
      help="datasets image column (None: the first of image, img, pixel_values, images)")
    a("--output-dir", required=True, help="results, resumable parts and summary.json go here")
    _option_flags(p)
    a("--resolution", type=int, default=None,
      help="resize the short side to this and crop square, as the training script does (None: as stored)")
    a("--center-crop", "--center_crop", dest="center_crop", action="store_true",
      help="with --resolution: centre crop (else a random crop, fixed per image index)")
    a("--resample", default="bilinear", choices=RESAMPLE, help="with --resolution: resize filter")
    a("--batch-size", type=int, default=16, help="images per block (one pipeline call; a unit of resume)")
    a("--seed", type=int, default=0, help="run seed: image i draws its noise from (seed, i)")
    a("--limit", type=int, default=None,
      help="evaluate only the first LIMIT images, e.g. for a quick estimate (>= 1; None: all)")
    a("--dtype", default=None, choices=("float32", "float64", "float16", "bfloat16"),
      help="model dtype (None: as saved)")
    a("--stop-after-blocks", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`LikelihoodOptions` field (``--num-t-samples`` for ``num_t_samples``), same help."""
    from .likelihood import options as lo

    choices = {"method": ("elbo", "ode"), "prior": ("vp", "ve"), "dequantization": lo.DEQUANTIZATIONS,
               "decoder": lo.DECODERS, "trace": lo.TRACES, "solver": lo.SOLVERS, "variable": lo.VARIABLES,
               "error_norm": lo.ERROR_NORMS}
    for f in LikelihoodOptions().cli_fields():
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=f.default, help=f.metadata["help"])
        if f.name == "num_levels":
            kw.update(default="auto", help=f.metadata["help"] + "; auto: the model folder's record, else 256")
        elif f.name in ("t_min", "t_max"):
            kw.update(type=float)
        elif f.name in choices:
            kw.update(choices=choices[f.name])
        elif isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            kw.update(type=type(f.default))
        p.add_argument(flag, **kw)


def option_fields(args) -> dict:
    """The parsed flags that are :class:`LikelihoodOptions` fields (``num_levels`` left out when ``auto``)."""
    names = [f.name for f in LikelihoodOptions().cli_fields()]
    return {k: getattr(args, k) for k in names if not (k == "num_levels" and args.num_levels == "auto")}


def parse_args(argv=None):
    """Parse and check the flags; a bad value exits with status 2 and a one-line ``error: ...``."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        fail(f"--limit must be >= 1 (the number of leading images to evaluate); got {args.limit}. "
                "Leave it out to evaluate all images.")
    for name in ("num_t_samples", "num_decoder_samples", "num_probes", "num_dequant", "batch_size", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1; got {value}.")
    if args.num_levels == "auto":
        return args
    try:
        args.num_levels = None if args.num_levels.lower() == "none" else int(args.num_levels)
    except ValueError:
        fail(f"--num-levels must be an integer >= 2 or 'none'; got {args.num_levels!r}.")
    if args.num_levels is not None and args.num_levels < 2:
        fail(f"--num-levels must be an integer >= 2 or 'none'; got {args.num_levels}.")
    return args


def main(argv=None):
    """Run the CLI; bad input (data, model folder, protocol clash) ends as one ``error: ...`` line, status 2."""
    a = parse_args(argv)
    if not Path(a.model).is_dir():
        fail(f"--model must be a folder saved with save_pretrained (unet/ and scheduler/); got {a.model!r}.")
    try:
        pipe = load_pipeline(a.model, a.dtype)
        channels = pipe.unet.config.get("in_channels", 3)
        transform = None if a.resolution is None else ImageTransform(a.resolution, channels, a.center_crop,
                                                                     resample=a.resample)
        data = open_data(a.data, a.split, a.image_column, channels, transform)
        if transform is not None:
            data.protocol = {"resolution": a.resolution, "center_crop": a.center_crop, "resample": a.resample}
        return evaluate(pipe, data, a.output_dir, a.batch_size, a.seed, a.limit, stop_after_blocks=a.stop_after_blocks,
                        **option_fields(a))
    except (ValueError, OSError) as err:  # OSError: a missing or unreadable model, data or output folder
        fail(str(err))


def fail(message: str):
    """Exit with status 2 and one line ``<prog>: error: message`` on stderr (no traceback, no usage block)."""
    build_parser().exit(2, f"{build_parser().prog}: error: {' '.join(message.split())}\n")


if __name__ == "__main__":
    main()
