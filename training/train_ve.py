#!/usr/bin/env python
"""Train a VP diffusers UNet2DModel on McAllester's VE process, under ``accelerate launch``.

    python training/train_ve.py                      # built-in digits, small UNet, a few minutes on a CPU
    accelerate launch training/train_ve.py --dataset_name ... --model_config cifar --resolution 32

The flags follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py``; the objective,
data helpers and checkpoint bookkeeping live in :mod:`diffusers_ve.training`. Output: a ``DDPMPipeline`` folder
with a ``VEScheduler``, sample grids, held-out bits/dim and a model card. See docs/guides/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import torch

import diffusers_ve
from diffusers_ve import checkpointing as ckpt
from diffusers_ve import data as ve_data
from diffusers_ve import training as T
from diffusers_ve.pipelines.pipeline_ve_likelihood import mean_bits_per_dim

CONFIGS = Path(__file__).resolve().parent / "configs"
CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
LAMBDA_SWEEP = (0.0, 0.5, 1.0, 2.0)
ROW_GAP = 4  # white pixels between the lambda rows of the sweep grid, so the rows read as rows
MIN_HELD_OUT = 8  # a split keeps at least this many held-out images (a small folder would round to 0)
logger = logging.getLogger("train_ve")
# flags left at None take these defaults: the built-in digits preset, or train_unconditional's for image data
DIGITS_DEFAULTS = dict(model_config="small", resolution=8, train_batch_size=64, learning_rate=2e-3, lr_warmup_steps=100,
                       use_ema=True, ema_max_decay=0.999, save_images_epochs=20, num_levels=ve_data.DIGITS_LEVELS,
                       eval_fraction=0.1)
DIGITS_MAX_TRAIN_STEPS = 1500  # the digits' length, only where neither --max_train_steps nor --num_epochs is given
IMAGE_DEFAULTS = dict(model_config="cifar", resolution=64, train_batch_size=16, num_epochs=100, learning_rate=1e-4,
                      lr_warmup_steps=500, use_ema=False, ema_max_decay=0.9999, save_images_epochs=10,
                      num_levels=256, eval_fraction=0.01)
# numeric flags: the smallest allowed value (checked when the flag is set)
AT_LEAST = dict(train_batch_size=1, eval_batch_size=1, gradient_accumulation_steps=1, num_inference_steps=1,
                num_epochs=1, max_train_steps=1, num_levels=2, ddpm_num_steps=2, resolution=1, eval_num_images=0,
                eval_num_t_samples=1, dataloader_num_workers=0, lr_warmup_steps=0, save_images_epochs=0,
                save_model_epochs=0, checkpointing_steps=0, checkpoints_total_limit=1, max_grad_norm=0,
                adam_weight_decay=0, reverse_noise=0)
POSITIVE = ("learning_rate", "sigma_data", "adam_epsilon", "ema_inv_gamma", "ema_power")
IN_0_1 = ("adam_beta1", "adam_beta2", "eval_fraction")  # [0, 1)


def _flags(defaults: dict, extra: str = "") -> str:
    """A preset as the flags it stands for, wrapped for --help."""
    items = [f"--{k}" if v is True else f"--no-{k}" if v is False else f"--{k} {v}" for k, v in defaults.items()]
    lines = [""]
    for item in items + ([extra] if extra else []):  # a flag and its value stay on one line
        lines[-1:] = [f"{lines[-1]} {item}"] if len(lines[-1]) + len(item) < 96 else [lines[-1], f" {item}"]
    return "\n".join("   " + line for line in lines)


EPILOG = f"""presets (flags left unset take these):
  built-in digits (no --dataset_name / --train_data_dir):
{_flags(DIGITS_DEFAULTS, f"--max_train_steps {DIGITS_MAX_TRAIN_STEPS} (unless --num_epochs is given)")}
  image data (train_unconditional.py's):
{_flags(IMAGE_DEFAULTS)}
  --model_config: tiny, small (1 channel), cifar (3 channels): training/configs/unet_*.json, or a config JSON

quick start (README): OMP_NUM_THREADS=1 python training/train_ve.py
guide: docs/guides/training.md"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default only where it says something: not for None (the help says what unset means),
    on/off switches, or a help text that already names its default; keeps the epilog's line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.default is None or switch or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=EPILOG, formatter_class=HelpFormatter)
    a = p.add_argument
    # data
    a("--dataset_name", default=None, help="a `datasets` name or local path (an `image`/`img` column)")
    a("--dataset_config_name", default=None, help="the `datasets` configuration of --dataset_name")
    a("--image_column", default=None, help="image column of --dataset_name (default: image or img)")
    a("--train_data_dir", default=None, help="a folder of images (recursive)")
    a("--cache_dir", default=None, help="`datasets` cache folder")
    a("--resolution", type=int, default=None, help="side of the training images (default: the preset's, or the "
      "fine-tuned UNet's sample_size)")
    a("--center_crop", action="store_true", help="centre crop (else random crop)")
    a("--random_flip", action="store_true", help="flip images left-right with probability 1/2")
    a("--resample", default="bilinear", choices=ve_data.RESAMPLE, help="resize filter for image data")
    a("--digits_resize", default="pad", choices=("pad", "nearest"), help="digits to --resolution, never interpolated")
    a("--eval_fraction", type=float, default=None, help=f"held-out share for bits/dim if the data has no test split "
      f"(at least {MIN_HELD_OUT} images when > 0; default: the preset's)")
    a("--eval_num_images", type=int, default=256, help="held-out images for bits/dim")
    a("--num_levels", type=int, default=None, help="quantisation levels of the data (default: digits 17, images 256)")
    a("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes")
    # model and objective
    a("--model_config", "--model_config_name_or_path", dest="model_config", default=None,
      help="UNet2DModel preset (tiny, small, cifar) or a config JSON path (default: digits small, images cifar)")
    a("--pretrained_model_name_or_path", default=None,
      help="fine-tune a diffusers UNet2DModel folder (or a pipeline folder, whose scheduler config is kept)")
    a("--prediction_type", default=None, choices=("epsilon", "v_prediction", "sample"),
      help="what the UNet predicts (default: epsilon, or the fine-tuned folder's)")
    a("--ddpm_num_steps", type=int, default=None, help="beta table length (default: 1000, or the fine-tuned folder's)")
    a("--ddpm_beta_schedule", default=None, choices=("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
      help="beta schedule (default: linear, or the fine-tuned folder's)")
    a("--loss_weighting", default="ddpm", choices=T.LOSS_WEIGHTINGS, help="noise-level sampling and loss weight "
      "(docs/guides/training.md); ddpm is the eps-MSE for every prediction type")
    a("--sigma_data", type=float, default=0.5, help="EDM's data std (--loss_weighting edm)")
    # optimisation
    a("--train_batch_size", type=int, default=None, help="per process (default: digits 64, images 16)")
    a("--eval_batch_size", type=int, default=16, help="sample grid size")
    a("--num_epochs", type=int, default=None, help="passes over the data (default: images 100)")
    a("--max_train_steps", type=int, default=None,
      help=f"optimizer steps; overrides --num_epochs (default: digits {DIGITS_MAX_TRAIN_STEPS} if no --num_epochs)")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--learning_rate", type=float, default=None, help="peak learning rate (default: digits 2e-3, images 1e-4)")
    a("--lr_scheduler", default="cosine", choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                                   "constant_with_warmup"), help="diffusers' get_scheduler")
    a("--lr_warmup_steps", type=int, default=None, help="linear warmup steps (default: digits 100, images 500)")
    a("--adam_beta1", type=float, default=0.95, help="AdamW beta1")
    a("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    a("--adam_weight_decay", type=float, default=1e-6, help="AdamW weight decay")
    a("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    a("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    a("--mixed_precision", default=None, choices=("no", "fp16", "bf16"), help="default: accelerate's config")
    a("--use_ema", action=argparse.BooleanOptionalAction, default=None,
      help="keep an EMA of the weights and save it (default: on with the digits, off for image data)")
    a("--ema_inv_gamma", type=float, default=1.0, help="EMA warmup inv_gamma")
    a("--ema_power", type=float, default=3 / 4, help="EMA warmup power")
    a("--ema_max_decay", type=float, default=None, help="EMA max decay (default: digits 0.999, images 0.9999)")
    a("--seed", type=int, default=0, help="seed of data order, noise draws and sample grids")
    # sampling and evaluation
    a("--reverse_noise", type=float, default=None,
      help="lambda of the saved VEScheduler (default: 1, or the fine-tuned folder's)")
    a("--ddpm_num_inference_steps", "--num_inference_steps", dest="num_inference_steps", type=int, default=25,
      help="sampling steps of the sample grids")
    a("--save_images_epochs", type=int, default=None,
      help="sample grid and bits/dim every N epochs and at the end (0: at the end only; default: digits 20, images 10)")
    a("--save_model_epochs", type=int, default=0, help="save the pipeline every N epochs (0: at the end only)")
    a("--eval_num_t_samples", type=int, default=64, help="t draws per image for the ELBO bits/dim")
    a("--no_final_eval", dest="final_eval", action="store_false", help="skip the final sample grids and bits/dim")
    a("--final_eval", dest="final_eval", action="store_true", default=True, help=argparse.SUPPRESS)
    # checkpoints, logging, output
    a("--output_dir", default="ve-digits", help="the pipeline, checkpoints, logs and model card")
    a("--overwrite_output_dir", action="store_true", help="delete an earlier run in --output_dir and start over")
    a("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps (0: never)")
    a("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints (default: all)")
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    a("--logger", "--report_to", dest="logger", default="tensorboard", choices=("tensorboard", "wandb", "none"),
      help="tracker (train_log.jsonl is always written)")
    a("--logging_dir", default="logs", help="relative to --output_dir")
    a("--push_to_hub", action="store_true", help="create the Hub repo at the start and upload the pipeline at the end")
    a("--hub_model_id", default=None, help="Hub repo id (default: --output_dir's name under your account)")
    a("--hub_private_repo", action="store_true", help="create the Hub repo as private")
    a("--hub_token", default=None, help="Hub token (default: the one of `huggingface-cli login`)")
    a("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def check_numbers(args) -> None:
    """ValueError naming the first numeric flag outside its allowed range."""
    for k, lo in AT_LEAST.items():
        v = getattr(args, k)
        if v is not None and v < lo:
            raise ValueError(f"`--{k}` must be >= {lo}; got {v}.")
    for k in POSITIVE:
        if not getattr(args, k) > 0:
            raise ValueError(f"`--{k}` must be > 0; got {getattr(args, k)}.")
    for k in IN_0_1:
        if not 0 <= getattr(args, k) < 1:
            raise ValueError(f"`--{k}` must be in [0, 1); got {getattr(args, k)}.")
    if not 0 <= args.ema_max_decay <= 1:
        raise ValueError(f"`--ema_max_decay` must be in [0, 1]; got {args.ema_max_decay}.")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.digits = args.dataset_name is None and args.train_data_dir is None
    if args.dataset_name and args.train_data_dir:
        raise ValueError("pass one data source: `--dataset_name` or `--train_data_dir`, not both.")
    for k, v in (DIGITS_DEFAULTS if args.digits else IMAGE_DEFAULTS).items():
        if getattr(args, k, None) is None and not (k == "resolution" and args.pretrained_model_name_or_path):
            setattr(args, k, v)
    if args.digits and args.max_train_steps is None and args.num_epochs is None:
        args.max_train_steps = DIGITS_MAX_TRAIN_STEPS  # a given --num_epochs must not lose to the preset's length
    if args.pretrained_model_name_or_path and args.model_config in ("small", "cifar"):
        args.model_config = None  # fine-tuning: the architecture comes from the folder
    check_numbers(args)
    return args


# ------------------------------------------------------------------------------------------- setup
def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

    log_with = None if args.logger == "none" else args.logger
    if log_with == "wandb" and not is_wandb_available():  # up front, not when the trackers start
        raise ValueError("`--logger wandb` needs the wandb package (`pip install wandb`, then `wandb login`); "
                         "or pass `--logger tensorboard` or `--logger none`.")
    if log_with == "tensorboard" and not is_tensorboard_available():
        print("tensorboard is not installed (pip install 'diffusers-ve[train]'): logging to train_log.jsonl only")
        log_with = None
    acc = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
                      log_with=log_with, project_config=ProjectConfiguration(
                          project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise ValueError(
            f"launched as {launched} processes but accelerate formed a group of {acc.num_processes} "
            f"({acc.distributed_type}): the copies would train independently into one folder. On a CPU machine use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`."
        )
    return acc


def load_unet(args):
    """The UNet2DModel (preset, config JSON or pretrained folder) and its ``VEScheduler``."""
    from diffusers import UNet2DModel

    source = {}
    if args.pretrained_model_name_or_path:
        root = Path(args.pretrained_model_name_or_path)
        sub = "unet" if (root / "unet").is_dir() else None
        unet = UNet2DModel.from_pretrained(str(root), subfolder=sub)
        if (root / "scheduler" / "scheduler_config.json").is_file():
            source = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        args.resolution = args.resolution or unet.config.sample_size
    else:
        path = Path(args.model_config)
        if not path.is_file():
            path = CONFIGS / f"unet_{args.model_config}.json"
        if not path.is_file():
            presets = sorted(p.stem[5:] for p in CONFIGS.glob("unet_*.json"))
            raise ValueError(f"`--model_config` must be a preset {presets} or a JSON file; got {args.model_config!r}.")
        cfg = json.loads(path.read_text())
        cfg["sample_size"] = args.resolution
        unet = UNet2DModel.from_config(cfg)
    return unet, make_scheduler(args, source)


def make_scheduler(args, source: dict):
    """The ``VEScheduler`` of the run: the fine-tuned folder's scheduler config whole (its beta table, zero-SNR
    rescaling, timestep type and sampler settings: every timestep must keep meaning the same noise level), with
    the flags given on the command line on top."""
    from diffusers_ve import VEScheduler

    flags = dict(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                 prediction_type=args.prediction_type, reverse_noise=args.reverse_noise)
    overrides = {k: v for k, v in flags.items() if v is not None}
    if source.get("trained_betas") is not None and {"num_train_timesteps", "beta_schedule"} & set(overrides):
        overrides["trained_betas"] = None  # a table given on the command line replaces the folder's explicit one
    was = source.get("prediction_type", "epsilon")
    if source and args.prediction_type and args.prediction_type != was:
        logger.warning(f"--prediction_type {args.prediction_type} changes what the fine-tuned model predicts (it was "
                       f"trained for {was}): its first steps start from a mismatched output.")
    scheduler = VEScheduler.from_config(source, **overrides)
    args.reverse_noise = scheduler.config.reverse_noise
    return scheduler


def check_unet(unet, resolution: int):
    """ValueError unless the UNet takes ``resolution`` (each down block halves it) and runs on it."""
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution < factor or resolution % factor:
        raise ValueError(
            f"`--resolution` {resolution} does not fit this UNet: its {len(unet.config.block_out_channels)} levels halve "
            f"the image {len(unet.config.block_out_channels) - 1} times, so the resolution must be a multiple of {factor}."
        )
    if unet.config.sample_size != resolution:
        unet.register_to_config(sample_size=resolution)
    with torch.no_grad():
        unet(torch.zeros(1, unet.config.in_channels, resolution, resolution), torch.zeros(1))


def load_data(args, channels: int):
    """(training data set, held-out images in [-1, 1] (N, C, R, R) or None, description)."""
    if args.digits:
        if channels != 1:
            raise ValueError(f"the built-in digits are 1-channel grey images but the UNet takes in_channels={channels}; "
                             "use a 1-channel model config (tiny, small) or pass --dataset_name / --train_data_dir.")
        x = ve_data.load_digits_images(args.resolution, args.digits_resize)
        train, held = ve_data.split_indices(len(x), args.eval_fraction, seed=0, min_held=MIN_HELD_OUT)
        data = ve_data.ImageDataset(x[train], ve_data.TensorFlip(args.random_flip), args.seed)
        held_x = x[held][: args.eval_num_images]
        return data, held_x if len(held_x) else None, "sklearn digits (8x8, 17 levels)"
    tf = ve_data.ImageTransform(args.resolution, channels, args.center_crop, args.random_flip, args.resample)
    eval_tf = ve_data.ImageTransform(args.resolution, channels, True, False, args.resample)
    if args.train_data_dir:
        files = ve_data.list_images(args.train_data_dir)
        train, held = ve_data.split_indices(len(files), args.eval_fraction, seed=0, min_held=MIN_HELD_OUT)
        train_imgs, held_imgs, name = [files[i] for i in train], [files[i] for i in held], args.train_data_dir
    else:
        train_imgs, held_imgs, name = _hf_images(args)
    data = ve_data.ImageDataset(train_imgs, tf, args.seed)
    try:
        data[0]  # the channel and format checks, before any training step
    except ve_data.ChannelMismatchError as e:
        raise ValueError(f"{e} For colour images pass `--model_config cifar` (3 channels) or a UNet config JSON "
                         "with in_channels and out_channels 3.") from e
    held = ve_data.ImageDataset(held_imgs, eval_tf)
    n = min(len(held), args.eval_num_images)
    return data, (torch.stack([held[i] for i in range(n)]) if n else None), name


def no_held_out_reason(args) -> str:
    """Why there are no held-out images (so "bits/dim not computed" says why)."""
    if args.eval_num_images == 0:
        return "--eval_num_images 0"
    if args.eval_fraction == 0:
        return "--eval_fraction 0"
    return "the data set is too small to hold any image out"


def _hf_images(args):
    import datasets

    try:
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as e:  # noqa: BLE001: the message names the data source
        raise ValueError(f"`--dataset_name` {args.dataset_name!r} could not be loaded: {e}") from e
    if "train" not in ds:
        raise ValueError(f"`--dataset_name` {args.dataset_name!r} has no 'train' split (splits: {list(ds)}).")
    train = ds["train"]
    col = args.image_column or next((c for c in ("image", "img") if c in train.column_names), None)
    if col not in train.column_names:
        raise ValueError(f"`--image_column` must be one of {train.column_names}; got {col!r}.")
    held_split = next((s for s in ("test", "validation") if s in ds), None)
    if held_split:
        return train[col], ds[held_split][col][: args.eval_num_images], args.dataset_name  # columns decode lazily
    tr, he = ve_data.split_indices(len(train), args.eval_fraction, seed=0, min_held=MIN_HELD_OUT)
    return train.select(tr)[col], train.select(he[: args.eval_num_images])[col], args.dataset_name


# the scheduler keys that fix what a timestep means (the time axis) and what the model outputs
TIME_AXIS_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                  "rescale_betas_zero_snr", "timestep_type", "prediction_type")


def fingerprint(args, unet, scheduler, world_size):
    """What a checkpoint must share with the run that resumes it: model, time axis, objective, data order."""
    model = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    sched = {k: scheduler.config.get(k) for k in TIME_AXIS_KEYS}
    fp = dict(model=model, scheduler=sched, loss_weighting=args.loss_weighting,
              sigma_data=args.sigma_data if args.loss_weighting == "edm" else None,  # only edm's weight reads it
              world_size=world_size, train_batch_size=args.train_batch_size,
              gradient_accumulation_steps=args.gradient_accumulation_steps, use_ema=args.use_ema, seed=args.seed)
    return json.loads(json.dumps(fp))


# ----------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(acc, args, step, gen, fp, run_id):
    """All ranks write into a temporary folder (each its own RNG states); the main process then commits it
    atomically, so a kill mid-save leaves nothing that `--resume_from_checkpoint latest` would pick up."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = f"{final}.tmp-{run_id}"
    acc.save_state(tmp)
    torch.save(gen.get_state(), os.path.join(tmp, f"objective_rng_{acc.process_index}.pt"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if args.checkpoints_total_limit:
            ckpt.prune_checkpoints(args.output_dir, args.checkpoints_total_limit - 1)
        ckpt.commit_checkpoint(tmp, final, dict(step=step, fingerprint=fp))
    acc.wait_for_everyone()


def load_checkpoint(acc, path, gen, fp):
    ckpt.check_checkpoint_compatible(ckpt.read_checkpoint_state(path)["fingerprint"], fp, path)
    acc.load_state(path)
    gen.set_state(torch.load(os.path.join(path, f"objective_rng_{acc.process_index}.pt")))
    return ckpt.read_checkpoint_state(path)["step"]


# -------------------------------------------------------------------------------------- evaluation
@contextlib.contextmanager
def ema_weights(unet, ema):
    if ema is None:
        yield unet
        return
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        yield unet
    finally:
        ema.restore(unet.parameters())


def stack_rows(rows, gap: int = ROW_GAP):
    """Equal-size images stacked top to bottom with ``gap`` white pixels between them."""
    from PIL import Image

    w, h = rows[0].size
    out = Image.new(rows[0].mode, (w, len(rows) * h + (len(rows) - 1) * gap), "white")
    for i, row in enumerate(rows):
        out.paste(row, (0, i * (h + gap)))
    return out


def sample_grids(unet, scheduler, args, tag=""):
    """Sample grid at the saved lambda and the lambda sweep (one row per lambda, the same seed in each column);
    returns the file names."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    pipe = diffusers_ve.VEPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def run(lam, n):
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(n)]
        imgs = pipe(batch_size=n, generator=gens, num_inference_steps=args.num_inference_steps, reverse_noise=lam).images
        scale = max(1, 64 // args.resolution)
        return [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in imgs]

    n = args.eval_batch_size
    cols = math.ceil(math.sqrt(n))
    imgs = run(args.reverse_noise, n)
    imgs += [Image.new(imgs[0].mode, imgs[0].size)] * (cols * math.ceil(n / cols) - n)
    grid = make_image_grid(imgs, math.ceil(n / cols), cols)
    sweep = stack_rows([make_image_grid(run(lam, 8), 1, 8) for lam in LAMBDA_SWEEP])
    names = (f"samples{tag}.png", f"samples_lambda_sweep{tag}.png")
    grid.save(os.path.join(args.output_dir, names[0]))
    sweep.save(os.path.join(args.output_dir, names[1]))
    return names


def bits_per_dim(unet, scheduler, images, args):
    """Held-out bits/dim (ELBO) through the likelihood pipeline: (mean, standard error over images, protocol)."""
    pipe = diffusers_ve.VELikelihoodPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(images.to(unet.device), method="elbo", num_t_samples=args.eval_num_t_samples,
               generator=torch.Generator().manual_seed(args.seed), num_levels=args.num_levels)
    mean, _, spread = mean_bits_per_dim(out.bits_per_dim, out.stderr_bits_per_dim)
    return mean, spread, json.loads(json.dumps(out.protocol, default=str))


def evaluate(run, tag=""):
    """Sample grids and held-out bits/dim on the main process (with the EMA weights); logs them. Without
    bits/dim the result says why (``bits_per_dim_skipped``)."""
    acc, args, held, result = run.acc, run.args, run.held, {}
    if acc.is_main_process:
        unet = acc.unwrap_model(run.model)
        unet.eval()
        with torch.no_grad(), ema_weights(unet, run.ema):
            result["images"] = sample_grids(unet, run.scheduler, args, tag)
            bpd = bits_per_dim(unet, run.scheduler, held, args) if held is not None else None
        unet.train()
        if bpd is not None:
            result.update(bits_per_dim=bpd[0], bits_per_dim_se=bpd[1], protocol=bpd[2], num_levels=args.num_levels,
                          num_images=len(held))
            acc.log({"eval/bits_per_dim": bpd[0]}, step=run.step)
        else:
            result["bits_per_dim_skipped"] = "no held-out images: " + no_held_out_reason(args)
    acc.wait_for_everyone()
    return result


# ------------------------------------------------------------------------------------------- output dir
def on_main(acc, fn):
    """``fn()`` on the main process, its result sent to every rank; a ValueError there is raised on every rank
    (no rank is left waiting at the next collective)."""
    from accelerate.utils import broadcast_object_list

    msg = [None, None]
    if acc.is_main_process:
        try:
            msg[1] = fn()
        except ValueError as e:
            msg[0] = str(e)
    if acc.num_processes > 1:
        broadcast_object_list(msg)
    if msg[0]:
        raise ValueError(msg[0])
    return msg[1]


def check_previous_run(args):
    """ValueError if ``--output_dir`` holds an earlier run that this one would silently overwrite."""
    if args.overwrite_output_dir:
        return
    steps = ckpt.list_checkpoints(args.output_dir)
    if args.resume_from_checkpoint and (steps or args.resume_from_checkpoint != "latest"):
        return  # resuming: from `latest` only when there is a checkpoint, else a finished run would be replaced
    found = [f"checkpoints at steps {steps}"] if steps else []
    if os.path.isfile(os.path.join(args.output_dir, "model_index.json")):
        found.append("a saved pipeline")
    if found:
        raise ValueError(
            f"`--output_dir` {args.output_dir!r} holds an earlier run ({', '.join(found)}); pass "
            "`--resume_from_checkpoint latest` to continue it, `--overwrite_output_dir` to replace it, "
            "or another `--output_dir`."
        )


def clean_output_dir(args):
    """Remove partial saves of killed runs (``*.tmp-*``, ``*.old``), or everything with ``--overwrite_output_dir``."""
    wipe = args.overwrite_output_dir and not args.resume_from_checkpoint
    for name in os.listdir(args.output_dir):
        if name != ckpt.OutputDirLock.NAME and (wipe or ".tmp-" in name or name.endswith(".old")):
            path = os.path.join(args.output_dir, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def prepare_output_dir(acc, args):
    """Main process: take the output-dir lock, refuse to overwrite an earlier run, create the Hub repo (a push
    that cannot work fails now, not after training), clean partial saves. Returns (lock or None, run id)."""
    held = {}

    def setup():
        held["lock"] = ckpt.OutputDirLock(args.output_dir).acquire()
        check_previous_run(args)
        repo = None
        if args.push_to_hub:
            repo = ckpt.create_hub_repo(args.hub_model_id or Path(args.output_dir).name, args.hub_private_repo,
                                        args.hub_token)
        clean_output_dir(args)
        return dict(run_id=uuid.uuid4().hex[:8], hub_repo_id=repo)

    try:
        info = on_main(acc, setup)
    except ValueError:
        if "lock" in held:
            held["lock"].release()
        raise
    args.hub_repo_id = info["hub_repo_id"]
    return held.get("lock"), info["run_id"]


# ----------------------------------------------------------------------------------------------- run
def main(argv=None):
    args = parse_args(argv)
    acc = make_accelerator(args)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    lock, run_id = prepare_output_dir(acc, args)
    try:
        return train(args, acc, run_id)
    finally:
        if lock is not None:
            lock.release()


def train(args, acc, run_id):
    run = setup(args, acc, run_id)
    for epoch in range(run.step // run.steps_per_epoch, run.num_epochs):
        train_epoch(run, epoch)
        if run.step >= run.max_steps:
            break
        end_of_epoch(run, epoch)
    return finish(run)


def resolve_resume(args, acc):
    """The checkpoint to resume from, or None (saying so when `latest` finds none)."""
    resume = ckpt.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint == "latest" and resume is None and acc.is_main_process:
        print(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}, starting fresh", flush=True)
    return resume


def make_optimization(args, unet, max_steps):
    """AdamW, the lr schedule and the EMA (or None)."""
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_sched = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                             num_training_steps=max_steps)
    ema = None
    if args.use_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                       power=args.ema_power, model_cls=UNet2DModel, model_config=unet.config)
    return optimizer, lr_sched, ema


def setup(args, acc, run_id):
    """Model, data, objective, optimizer and the checkpoint to resume, all checked before any training step."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if acc.is_main_process:
        print(f"world size {acc.num_processes} ({acc.distributed_type.value}, device {acc.device}, "
              f"mixed precision {acc.mixed_precision}), output {args.output_dir}", flush=True)
    set_seed(args.seed)
    unet, scheduler = load_unet(args)
    check_unet(unet, args.resolution)
    data, held, data_name = load_data(args, unet.config.in_channels)
    r = SimpleNamespace(args=args, acc=acc, run_id=run_id, scheduler=scheduler, data=data, held=held,
                        data_name=data_name, fp=fingerprint(args, unet, scheduler, acc.num_processes))
    r.objective = T.Objective.from_config(scheduler.config, args.loss_weighting, sigma_data=args.sigma_data)
    r.resume = resolve_resume(args, acc)
    if r.resume:  # before any training step: a checkpoint of another configuration is an error
        ckpt.check_checkpoint_compatible(ckpt.read_checkpoint_state(r.resume)["fingerprint"], r.fp, r.resume)
    r.sampler = ve_data.ShardedEpochSampler(len(data), args.train_batch_size, acc.num_processes, acc.process_index,
                                            args.seed, args.gradient_accumulation_steps)
    r.loader = torch.utils.data.DataLoader(data, batch_size=args.train_batch_size, sampler=r.sampler,
                                           num_workers=args.dataloader_num_workers)
    r.steps_per_epoch = r.sampler.steps_per_epoch
    r.max_steps = args.max_train_steps or args.num_epochs * r.steps_per_epoch
    r.num_epochs = math.ceil(r.max_steps / r.steps_per_epoch)
    optimizer, r.lr_sched, r.ema = make_optimization(args, unet, r.max_steps)
    r.model, r.optimizer = acc.prepare(unet, optimizer)
    acc.register_for_checkpointing(r.lr_sched)
    if r.ema is not None:
        r.ema.to(acc.device)
        acc.register_for_checkpointing(r.ema)
    r.gen = torch.Generator().manual_seed(args.seed * 7919 + acc.process_index + 1)  # t and eps draws, per rank
    set_seed(args.seed + acc.process_index)  # dropout etc.: distinct per rank, restored by accelerate on resume
    r.step = load_checkpoint(acc, r.resume, r.gen, r.fp) if r.resume else 0
    r.log_path = os.path.join(args.output_dir, "train_log.jsonl")
    if acc.is_main_process:
        ckpt.trim_log(r.log_path, r.step)  # a resume logs the steps after its checkpoint again
        acc.init_trackers("train_ve", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        print(header(r, unet), flush=True)
    r.bar = tqdm(total=r.max_steps, initial=r.step, desc="train", disable=not acc.is_main_process, dynamic_ncols=True)
    r.t0, r.images_seen, r.last = time.time(), 0, {}
    return r


def header(r, unet) -> str:
    args, acc, sc = r.args, r.acc, r.scheduler.config
    n_params = sum(p.numel() for p in unet.parameters())
    held = f"{len(r.held)} held out" if r.held is not None else f"0 held out ({no_held_out_reason(args)}: no bits/dim)"
    return (f"data {r.data_name}: {len(r.data)} train images at {args.resolution}px, {held}; "
            f"UNet {n_params / 1e6:.2f}M params, {sc.prediction_type} on {sc.num_train_timesteps} {sc.beta_schedule} "
            f"steps, loss {args.loss_weighting}; "
            f"{r.max_steps} steps x {args.train_batch_size * acc.num_processes * args.gradient_accumulation_steps} images"
            + (f"; resumed from {r.resume} at step {r.step}" if r.resume else ""))


def train_epoch(r, epoch):
    """One pass over the (sharded) data, or what is left of it after a resume, stopping at ``max_steps``."""
    args, acc = r.args, r.acc
    skip = (r.step % r.steps_per_epoch) * args.gradient_accumulation_steps if epoch == r.step // r.steps_per_epoch else 0
    r.sampler.set_epoch(epoch, skip)
    r.data.set_epoch(epoch)
    step_loss = torch.zeros((), device=acc.device)
    for y in r.loader:
        y = y.to(acc.device, non_blocking=True)
        with acc.accumulate(r.model):
            loss = r.objective.loss(r.model, y, r.gen)
            acc.backward(loss)
            if acc.sync_gradients and args.max_grad_norm:
                acc.clip_grad_norm_(r.model.parameters(), args.max_grad_norm)
            r.optimizer.step()
            r.optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach() / args.gradient_accumulation_steps
        r.images_seen += y.shape[0]
        if not acc.sync_gradients:
            continue
        after_step(r, epoch, step_loss)
        step_loss.zero_()
        if r.step >= r.max_steps:
            break


def after_step(r, epoch, step_loss):
    """lr schedule, EMA, the step's log line and checkpoint."""
    args, acc = r.args, r.acc
    if not acc.optimizer_step_was_skipped:
        r.lr_sched.step()
    if r.ema is not None:
        r.ema.step(acc.unwrap_model(r.model).parameters())
    r.step += 1
    # this process's loss, as diffusers' scripts log it: a cross-process mean would add a collective to every step
    r.last = {"loss": step_loss.item(), "lr": r.lr_sched.get_last_lr()[0]}
    if r.ema is not None:
        r.last["ema_decay"] = r.ema.cur_decay_value
    acc.log(r.last, step=r.step)
    if acc.is_main_process:
        with open(r.log_path, "a") as f:
            f.write(json.dumps({"step": r.step, "epoch": epoch, **r.last}) + "\n")
        if r.step % 10 == 0 or r.step == r.max_steps:  # a postfix per step costs ~1% of a tiny model's step
            r.bar.set_postfix(loss=f"{r.last['loss']:.4f}", lr=f"{r.last['lr']:.2e}", refresh=False)
        r.bar.update(1)
    if args.checkpointing_steps and r.step % args.checkpointing_steps == 0:
        save_checkpoint(acc, args, r.step, r.gen, r.fp, r.run_id)


def end_of_epoch(r, epoch):
    """The periodic sample grids, bits/dim and pipeline saves."""
    args = r.args
    if r.step % r.steps_per_epoch:
        return
    if args.save_images_epochs and (epoch + 1) % args.save_images_epochs == 0:
        ev = evaluate(r)
        if r.acc.is_main_process and "bits_per_dim" in ev:
            r.bar.write(f"epoch {epoch + 1}: held-out {ev['bits_per_dim']:.3f} bits/dim ({args.num_levels} levels)")
    if args.save_model_epochs and (epoch + 1) % args.save_model_epochs == 0:
        save_pipeline(r)


def finish(r):
    """Save the pipeline, evaluate, write metrics and the model card, push; returns the summary."""
    args, acc = r.args, r.acc
    r.bar.close()
    elapsed = time.time() - r.t0
    save_pipeline(r)
    ev = evaluate(r) if args.final_eval else {"bits_per_dim_skipped": "--no_final_eval"}
    summary = dict(step=r.step, final_loss=r.last.get("loss"), seconds=round(elapsed, 1), world_size=acc.num_processes,
                   images_per_second=round(r.images_seen * acc.num_processes / max(elapsed, 1e-9), 1),
                   peak_memory_mb=round(T.peak_memory_mb(acc.device), 1), mixed_precision=acc.mixed_precision, **ev)
    if acc.is_main_process:
        Path(args.output_dir, "metrics.json").write_text(json.dumps(summary, indent=1, default=str))
        write_model_card(args, r.scheduler, summary, r.data_name)
        print(one_line_summary(args, summary), flush=True)
        if args.push_to_hub:
            ckpt.push_folder_to_hub(args.output_dir, args.hub_repo_id, args.hub_private_repo, args.hub_token)
            print(f"pushed {args.output_dir} to https://huggingface.co/{args.hub_repo_id}", flush=True)
    acc.end_training()
    return summary


def save_pipeline(r):
    """The EMA (or raw) weights as a ``DDPMPipeline`` folder with our ``VEScheduler``."""
    from diffusers import DDPMPipeline

    if r.acc.is_main_process:
        unet = r.acc.unwrap_model(r.model)
        with ema_weights(unet, r.ema):
            DDPMPipeline(unet=unet, scheduler=r.scheduler).save_pretrained(r.args.output_dir)
    r.acc.wait_for_everyone()


def one_line_summary(args, s):
    bpd = (f"held-out {s['bits_per_dim']:.3f} +- {s['bits_per_dim_se']:.3f} bits/dim ({args.num_levels} levels, ELBO)"
           if "bits_per_dim" in s else f"bits/dim not computed ({s.get('bits_per_dim_skipped', 'unknown reason')})")
    loss = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "n/a"
    imgs = f"; samples {', '.join(s['images'])}" if s.get("images") else ""
    return (f"done: {s['step']} steps in {s['seconds']:.0f} s ({s['images_per_second']:.0f} img/s, world size "
            f"{s['world_size']}), final loss {loss}, {bpd}; pipeline in {args.output_dir}{imgs}")


def write_model_card(args, scheduler, s, data_name):
    """README.md of the output folder; the load snippet names the Hub repo (when pushed) or the folder's path."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["diffusers", "unconditional-image-generation", "diffusers-ve", "variance-exploding", "ddpm"]
    base = {"base_model": args.pretrained_model_name_or_path} if args.pretrained_model_name_or_path else {}
    data = ModelCardData(library_name="diffusers", license="apache-2.0", tags=tags,
                         pipeline_tag="unconditional-image-generation", **base)
    load_id = args.hub_repo_id or args.output_dir
    card = ModelCard.from_template(
        data, template_path=str(CARD_TEMPLATE), repo_id=args.hub_repo_id or Path(args.output_dir).name,
        load_id=load_id, dataset=data_name, args=vars(args), scheduler=dict(scheduler.config), summary=s,
        lambda_sweep=LAMBDA_SWEEP, version=diffusers_ve.__version__)
    card.save(os.path.join(args.output_dir, "README.md"))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
