#!/usr/bin/env python
"""Train a VP diffusers UNet2DModel on McAllester's VE process, under ``accelerate launch``.

    python training/train_ve.py                      # built-in digits, small UNet, a few minutes on a CPU
    accelerate launch training/train_ve.py --dataset_name ... --model_config cifar --resolution 32

The flags follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py``. This script holds
the flags and the loop; the library holds what a custom loop can reuse: the objective (:mod:`diffusers_ve.training`),
the data (:mod:`diffusers_ve.data`), the output folder with its checkpoints, lock and log
(:mod:`diffusers_ve.run_directory`), the sample grids and model card (:mod:`diffusers_ve.report`). Output: a
``DDPMPipeline`` folder with a ``VEScheduler``, sample grids, held-out bits/dim and a model card. See
docs/guides/training.md.
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import diffusers_ve
from diffusers_ve import checkpointing as ckpt
from diffusers_ve import data as ve_data
from diffusers_ve import report
from diffusers_ve import training as T
from diffusers_ve.likelihood import mean_bits_per_dim, save_data_record
from diffusers_ve.run_directory import RunDirectory, run_fingerprint

CONFIGS = Path(__file__).resolve().parent / "configs"
CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
MIN_HELD_OUT = 8  # a split keeps at least this many held-out images (a small folder would round to 0)
logger = logging.getLogger("train_ve")
# flags left at None take these defaults: the built-in digits preset, or train_unconditional's for image data
DIGITS_DEFAULTS = dict(model_config="small", resolution=8, train_batch_size=64, learning_rate=2e-3, lr_warmup_steps=100,
                       use_ema=True, ema_max_decay=0.999, save_images_epochs=20, num_levels=ve_data.DIGITS_LEVELS,
                       eval_fraction=0.1, loss_weighting="ddpm")
DIGITS_MAX_TRAIN_STEPS = 1500  # the digits' length, only where neither --max_train_steps nor --num_epochs is given
IMAGE_DEFAULTS = dict(model_config="cifar", resolution=64, train_batch_size=16, num_epochs=100, learning_rate=1e-4,
                      lr_warmup_steps=500, use_ema=False, ema_max_decay=0.9999, save_images_epochs=10,
                      num_levels=256, eval_fraction=0.01, loss_weighting="ddpm")
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
    a("--image_column", default=None, help="image column of --dataset_name (default: the first of "
      f"{', '.join(ve_data.IMAGE_COLUMNS)})")
    a("--train_data_dir", default=None, help="a folder of images (recursive)")
    a("--cache_dir", default=None, help="`datasets` cache folder")
    a("--resolution", type=int, default=None, help="side of the training images (default: digits 8, image data 64, "
      "or the fine-tuned UNet's sample_size)")
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
      help="what the UNet predicts (default from scratch: v_prediction, which gave lower held-out bits/dim on digits "
      "than epsilon with samples alike; fine-tuning: the folder's, epsilon for a bare UNet folder)")
    a("--ddpm_num_steps", type=int, default=None, help="beta table length (default: 1000, or the fine-tuned folder's)")
    a("--ddpm_beta_schedule", default=None, choices=("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
      help="beta schedule (default: linear, or the fine-tuned folder's)")
    a("--loss_weighting", default=None, choices=T.LOSS_WEIGHTINGS, help="noise-level sampling and loss weight "
      "(docs/guides/training.md; default ddpm, the eps-MSE for every prediction type: on digits likelihood gives "
      "lower bits/dim but worse samples)")
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
    a("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: off; a non-finite norm stops the "
      "run either way)")
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


class EveryRankError(ValueError):
    """A user error that every process raises alike (flags, data, output folder, divergence): the main process
    prints it, the others leave quietly."""


# ------------------------------------------------------------------------------------------------ config
def check_numbers(cfg) -> None:
    """ValueError naming the first numeric flag outside its allowed range."""
    for k, lo in AT_LEAST.items():
        v = getattr(cfg, k)
        if v is not None and v < lo:
            raise ValueError(f"`--{k}` must be >= {lo}; got {v}.")
    for k in POSITIVE:
        if not getattr(cfg, k) > 0:
            raise ValueError(f"`--{k}` must be > 0; got {getattr(cfg, k)}.")
    for k in IN_0_1:
        if not 0 <= getattr(cfg, k) < 1:
            raise ValueError(f"`--{k}` must be in [0, 1); got {getattr(cfg, k)}.")
    if not 0 <= cfg.ema_max_decay <= 1:
        raise ValueError(f"`--ema_max_decay` must be in [0, 1]; got {cfg.ema_max_decay}.")


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(d, Any) for d in dict.fromkeys(a.dest for a in build_parser()._actions if a.dest != "help")]
    + [("digits", bool)], frozen=True)
TrainConfig.__doc__ = "Every setting of the run, resolved once from argv, the preset and the fine-tuned folder."


def finetune_source(path: str):
    """(UNet subfolder or None, the folder's scheduler config or {}) of ``--pretrained_model_name_or_path``."""
    root = Path(path)
    sched = root / "scheduler" / "scheduler_config.json"
    return ("unet" if (root / "unet").is_dir() else None), (json.loads(sched.read_text()) if sched.is_file() else {})


def resolve_config(argv=None) -> TrainConfig:
    """Flags, then the preset's values for flags left unset, then the fine-tuned folder's (resolution, reverse
    noise, architecture): the one place where a setting gets its value."""
    ns = vars(build_parser().parse_args(argv))
    ns["digits"] = ns["dataset_name"] is None and ns["train_data_dir"] is None
    if ns["dataset_name"] and ns["train_data_dir"]:
        raise ValueError("pass one data source: `--dataset_name` or `--train_data_dir`, not both.")
    finetune = ns["pretrained_model_name_or_path"]
    for k, v in (DIGITS_DEFAULTS if ns["digits"] else IMAGE_DEFAULTS).items():
        if ns.get(k) is None and not (k == "resolution" and finetune):
            ns[k] = v
    if ns["digits"] and ns["max_train_steps"] is None and ns["num_epochs"] is None:
        ns["max_train_steps"] = DIGITS_MAX_TRAIN_STEPS  # a given --num_epochs must not lose to the preset's length
    if finetune:
        from diffusers import UNet2DModel

        if ns["model_config"] in ("small", "cifar"):
            ns["model_config"] = None  # the architecture comes from the folder
        sub, source = finetune_source(finetune)
        try:
            ns["resolution"] = ns["resolution"] or UNet2DModel.load_config(finetune, subfolder=sub)["sample_size"]
        except OSError as e:  # no such folder or Hub repo, or no UNet config in it
            raise ValueError(f"`--pretrained_model_name_or_path` {finetune!r} holds no UNet2DModel: {e}") from e
        if ns["reverse_noise"] is None:
            ns["reverse_noise"] = source.get("reverse_noise")
    if ns["reverse_noise"] is None:
        ns["reverse_noise"] = 1.0  # VEScheduler's default
    cfg = TrainConfig(**ns)
    check_numbers(cfg)
    return cfg


# ------------------------------------------------------------------------------------------- setup
def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

    log_with = None if cfg.logger == "none" else cfg.logger
    if log_with == "wandb" and not is_wandb_available():  # up front, not when the trackers start
        raise ValueError("`--logger wandb` needs the wandb package (`pip install wandb`, then `wandb login`); "
                         "or pass `--logger tensorboard` or `--logger none`.")
    if log_with == "tensorboard" and not is_tensorboard_available():
        print("tensorboard is not installed (pip install 'diffusers-ve[train]'): logging to train_log.jsonl only")
        log_with = None
    acc = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
                      log_with=log_with, project_config=ProjectConfiguration(
                          project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, cfg.logging_dir)))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise ValueError(
            f"launched as {launched} processes but accelerate formed a group of {acc.num_processes} "
            f"({acc.distributed_type}): the copies would train independently into one folder. On a CPU machine use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`."
        )
    return acc


def load_unet(cfg):
    """The UNet2DModel (preset, config JSON or pretrained folder) and its ``VEScheduler``."""
    from diffusers import UNet2DModel

    source = {}
    if cfg.pretrained_model_name_or_path:
        sub, source = finetune_source(cfg.pretrained_model_name_or_path)
        unet = UNet2DModel.from_pretrained(cfg.pretrained_model_name_or_path, subfolder=sub)
    else:
        path = Path(cfg.model_config)
        if not path.is_file():
            path = CONFIGS / f"unet_{cfg.model_config}.json"
        if not path.is_file():
            presets = sorted(p.stem[5:] for p in CONFIGS.glob("unet_*.json"))
            raise ValueError(f"`--model_config` must be a preset {presets} or a JSON file; got {cfg.model_config!r}.")
        unet = UNet2DModel.from_config(dict(json.loads(path.read_text()), sample_size=cfg.resolution))
    return unet, make_scheduler(cfg, source)


def make_scheduler(cfg, source: dict):
    """The ``VEScheduler`` of the run: the fine-tuned folder's scheduler config whole (its beta table, zero-SNR
    rescaling, timestep type and sampler settings: every timestep must keep meaning the same noise level), with
    the flags given on the command line on top."""
    from diffusers_ve import VEScheduler

    flags = dict(num_train_timesteps=cfg.ddpm_num_steps, beta_schedule=cfg.ddpm_beta_schedule,
                 prediction_type=cfg.prediction_type, reverse_noise=cfg.reverse_noise)
    overrides = {k: v for k, v in flags.items() if v is not None}
    if not cfg.pretrained_model_name_or_path:
        overrides.setdefault("prediction_type", "v_prediction")  # docs/guides/likelihood.md, "Trained digits models"
    if source.get("trained_betas") is not None and {"num_train_timesteps", "beta_schedule"} & set(overrides):
        overrides["trained_betas"] = None  # a table given on the command line replaces the folder's explicit one
    was = source.get("prediction_type", "epsilon")
    if source and cfg.prediction_type and cfg.prediction_type != was:
        logger.warning(f"--prediction_type {cfg.prediction_type} changes what the fine-tuned model predicts (it was "
                       f"trained for {was}): its first steps start from a mismatched output.")
    return VEScheduler.from_config(source, **overrides)


def check_unet(unet, resolution: int):
    """ValueError unless the UNet takes ``resolution`` (each down block halves it) and runs on it."""
    levels = len(unet.config.block_out_channels)
    factor = 2 ** (levels - 1)
    if resolution < factor or resolution % factor:
        raise ValueError(f"`--resolution` {resolution} does not fit this UNet: its {levels} levels halve the image "
                         f"{levels - 1} times, so the resolution must be a multiple of {factor}.")
    if unet.config.sample_size != resolution:
        unet.register_to_config(sample_size=resolution)
    with torch.no_grad():
        unet(torch.zeros(1, unet.config.in_channels, resolution, resolution), torch.zeros(1))


def load_data(cfg, channels: int):
    """(training data set, held-out images in [-1, 1] (N, C, R, R) or None, description)."""
    if cfg.digits:
        if channels != 1:
            raise ValueError(f"the built-in digits are 1-channel grey images but the UNet takes in_channels={channels}; "
                             "use a 1-channel model config (tiny, small) or pass --dataset_name / --train_data_dir.")
        x = ve_data.load_digits_images(cfg.resolution, cfg.digits_resize)
        train, held = ve_data.split_indices(len(x), cfg.eval_fraction, seed=0, min_held=MIN_HELD_OUT)
        data = ve_data.ImageDataset(x[train], ve_data.TensorFlip(cfg.random_flip), cfg.seed)
        held_x = x[held][: cfg.eval_num_images]
        return data, held_x if len(held_x) else None, "sklearn digits (8x8, 17 levels)"
    train, held = ve_data.image_splits(cfg.train_data_dir, cfg.dataset_name, channels, cfg.eval_fraction,
                                       cfg.eval_num_images, MIN_HELD_OUT, cfg.image_column,
                                       name=cfg.dataset_config_name, cache_dir=cfg.cache_dir)
    data = ve_data.ImageDataset(train, ve_data.ImageTransform(cfg.resolution, channels, cfg.center_crop,
                                                              cfg.random_flip, cfg.resample), cfg.seed)
    try:
        data[0]  # the channel and format checks, before any training step
    except ve_data.ChannelMismatchError as e:
        raise ValueError(f"{e} For colour images pass `--model_config cifar` (3 channels) or a UNet config JSON "
                         "with in_channels and out_channels 3.") from e
    held = ve_data.ImageDataset(held, ve_data.ImageTransform(cfg.resolution, channels, True, False, cfg.resample))
    n = min(len(held), cfg.eval_num_images)
    return data, (torch.stack([held[i] for i in range(n)]) if n else None), cfg.train_data_dir or cfg.dataset_name


def no_held_out_reason(cfg) -> str:
    """Why there are no held-out images (so "bits/dim not computed" says why)."""
    if cfg.eval_num_images == 0:
        return "--eval_num_images 0"
    if cfg.eval_fraction == 0:
        return "--eval_fraction 0"
    return "the data set is too small to hold any image out"


def fingerprint(cfg, unet, scheduler, world_size):
    """What a checkpoint must share with the run that resumes it: model, time axis, objective, data order."""
    return run_fingerprint(unet.config, scheduler.config, world_size, loss_weighting=cfg.loss_weighting,
                           sigma_data=cfg.sigma_data if cfg.loss_weighting == "edm" else None,  # only edm's reads it
                           train_batch_size=cfg.train_batch_size, seed=cfg.seed, use_ema=cfg.use_ema,
                           gradient_accumulation_steps=cfg.gradient_accumulation_steps)


# ----------------------------------------------------------------------------------------------- run
@dataclasses.dataclass
class Run:
    """The state of a training run: what setup builds and the loop advances."""

    cfg: Any  # TrainConfig
    acc: Any  # accelerate.Accelerator
    out: RunDirectory
    scheduler: Any  # VEScheduler
    objective: T.Objective
    data: ve_data.ImageDataset
    held: Optional[torch.Tensor]
    data_name: str
    fp: dict
    sampler: ve_data.ShardedEpochSampler
    loader: torch.utils.data.DataLoader
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_sched: Any
    ema: Any  # diffusers EMAModel or None
    gen: torch.Generator  # t and eps draws, per rank
    max_steps: int
    step: int = 0
    bar: Any = None
    t0: float = 0.0
    images_seen: int = 0
    last: dict = dataclasses.field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.max_steps / self.steps_per_epoch)


@contextlib.contextmanager
def every_rank():
    """Errors of set-up happen alike on every process (same flags, same data, folder checks broadcast from the
    main process): mark them so."""
    try:
        yield
    except EveryRankError:
        raise
    except ValueError as e:
        raise EveryRankError(str(e)) from e


def main(argv=None):
    with every_rank():
        cfg = resolve_config(argv)
        acc = make_accelerator(cfg)
        logging.basicConfig(format="%(message)s", level=logging.WARNING)

        def create_repo():  # a push that cannot work fails now, not after training
            if cfg.push_to_hub:
                return ckpt.create_hub_repo(cfg.hub_model_id or Path(cfg.output_dir).name, cfg.hub_private_repo,
                                            cfg.hub_token)

        out = RunDirectory(cfg.output_dir, acc).open(cfg.overwrite_output_dir, cfg.resume_from_checkpoint, create_repo)
    with out:
        with every_rank():
            run = setup(cfg, acc, out)
        return train(run)


def train(run: Run):
    for epoch in range(run.step // run.steps_per_epoch, run.num_epochs):
        train_epoch(run, epoch)
        if run.step >= run.max_steps:
            break
        end_of_epoch(run, epoch)
    return finish(run)


def make_optimization(cfg, unet, max_steps):
    """AdamW, the lr schedule and the EMA (or None)."""
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_sched = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                             num_training_steps=max_steps)
    ema = None
    if cfg.use_ema:
        ema = EMAModel(unet.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, inv_gamma=cfg.ema_inv_gamma,
                       power=cfg.ema_power, model_cls=UNet2DModel, model_config=unet.config)
    return optimizer, lr_sched, ema


def setup(cfg, acc, out: RunDirectory) -> Run:
    """Model, data, objective, optimizer and the checkpoint to resume, all checked before any training step."""
    from accelerate.utils import set_seed

    if acc.is_main_process:
        print(f"world size {acc.num_processes} ({acc.distributed_type.value}, device {acc.device}, "
              f"mixed precision {acc.mixed_precision}), output {cfg.output_dir}", flush=True)
    set_seed(cfg.seed)
    unet, scheduler = load_unet(cfg)
    check_unet(unet, cfg.resolution)
    data, held, data_name = load_data(cfg, unet.config.in_channels)
    fp = fingerprint(cfg, unet, scheduler, acc.num_processes)
    out.check_resume(fp)  # before any training step: a checkpoint of another configuration is an error
    sampler = ve_data.ShardedEpochSampler(len(data), cfg.train_batch_size, acc.num_processes, acc.process_index,
                                          cfg.seed, cfg.gradient_accumulation_steps)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train_batch_size, sampler=sampler,
                                         num_workers=cfg.dataloader_num_workers)
    max_steps = cfg.max_train_steps or cfg.num_epochs * sampler.steps_per_epoch
    optimizer, lr_sched, ema = make_optimization(cfg, unet, max_steps)
    model, optimizer = acc.prepare(unet, optimizer)
    acc.register_for_checkpointing(lr_sched)
    if ema is not None:
        ema.to(acc.device)
        acc.register_for_checkpointing(ema)
    run = Run(cfg, acc, out, scheduler, T.Objective.from_config(scheduler.config, cfg.loss_weighting,
              sigma_data=cfg.sigma_data), data, held, data_name, fp, sampler, loader, model, optimizer, lr_sched, ema,
              torch.Generator().manual_seed(cfg.seed * 7919 + acc.process_index + 1), max_steps)
    set_seed(cfg.seed, device_specific=True)  # dropout etc.: distinct per rank, restored by accelerate on resume
    run.step = out.load_checkpoint(run.gen, fp) if out.resume_path else 0
    start(run, unet)
    return run


def start(run: Run, unet):
    """The log cut back to the resumed step, trackers, the header line and the progress bar."""
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.acc
    run.out.start_log(run.step)
    if acc.is_main_process:
        acc.init_trackers("train_ve", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                              if isinstance(v, (int, float, str, bool))})
        print(header(run, unet), flush=True)
    run.bar = tqdm(total=run.max_steps, initial=run.step, desc="train", disable=not acc.is_main_process,
                   dynamic_ncols=True)
    run.t0 = time.time()


def header(run: Run, unet) -> str:
    cfg, acc, sc = run.cfg, run.acc, run.scheduler.config
    n_params = sum(p.numel() for p in unet.parameters())
    held = f"{len(run.held)} held out" if run.held is not None else f"0 held out ({no_held_out_reason(cfg)}: no bits/dim)"
    return (f"data {run.data_name}: {len(run.data)} train images at {cfg.resolution}px, {held}; "
            f"UNet {n_params / 1e6:.2f}M params, {sc.prediction_type} on {sc.num_train_timesteps} {sc.beta_schedule} "
            f"steps, loss {cfg.loss_weighting}; "
            f"{run.max_steps} steps x {cfg.train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps} "
            f"images" + (f"; resumed from {run.out.resume_path} at step {run.step}" if run.out.resume_path else ""))


def train_epoch(run: Run, epoch: int):
    """One pass over the (sharded) data, or what is left of it after a resume, stopping at ``max_steps``."""
    cfg, acc = run.cfg, run.acc
    skip = (run.step % run.steps_per_epoch) * cfg.gradient_accumulation_steps if epoch == run.step // run.steps_per_epoch else 0
    run.sampler.set_epoch(epoch, skip)
    run.data.set_epoch(epoch)
    step_loss = torch.zeros((), device=acc.device)
    for y in run.loader:
        y = y.to(acc.device, non_blocking=True)
        with acc.accumulate(run.model):
            loss = run.objective.loss(run.model, y, run.gen)
            acc.backward(loss)
            step_loss += loss.detach() / cfg.gradient_accumulation_steps
            if acc.sync_gradients:  # the norm is the same on every rank (gradients are all-reduced)
                norm = acc.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm or math.inf)
                check_finite(run, step_loss, norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.images_seen += y.shape[0]
        if not acc.sync_gradients:
            continue
        after_step(run, epoch, step_loss)
        step_loss.zero_()
        if run.step >= run.max_steps:
            break


def check_finite(run: Run, step_loss, norm):
    """EveryRankError before the optimizer step if the loss or gradient norm is not finite: the weights would turn
    to NaN, and every later save would hold them. fp16's loss scaler skips steps with inf gradients by design."""
    acc = run.acc
    bad = norm is not None and not bool(torch.isfinite(norm))
    if norm is None or (bad and acc.scaler is not None):  # an all-reduce only here, never on a healthy step
        bad = bool(acc.reduce((~torch.isfinite(step_loss)).float(), "sum") > 0) if acc.num_processes > 1 \
            else not bool(torch.isfinite(step_loss))
    if not bad:
        return
    run.bar.close()
    cfg, last = run.cfg, run.out.last_checkpoint()
    clip = f"a smaller `--max_grad_norm` (now {cfg.max_grad_norm:g})" if cfg.max_grad_norm else "`--max_grad_norm`"
    fp16 = ", or `--mixed_precision bf16` / `no` instead of fp16" if acc.mixed_precision == "fp16" else ""
    norm = float("nan") if norm is None else float(norm)
    raise EveryRankError(
        f"training diverged at step {run.step + 1}: the loss is {step_loss.item():.4g} and the gradient norm "
        f"{norm:.4g}. Lower `--learning_rate` (now {cfg.learning_rate:g}) or clip with {clip}{fp16}. The last good "
        f"checkpoint is {last or 'none (no checkpoint was saved before)'}; no pipeline, model card or metrics were "
        "written.")


def after_step(run: Run, epoch: int, step_loss):
    """lr schedule, EMA, the step's log line and checkpoint."""
    cfg, acc = run.cfg, run.acc
    if not acc.optimizer_step_was_skipped:
        run.lr_sched.step()
    if run.ema is not None:
        run.ema.step(acc.unwrap_model(run.model).parameters())
    run.step += 1
    # this process's loss, as diffusers' scripts log it: a cross-process mean would add a collective to every step
    run.last = {"loss": step_loss.item(), "lr": run.lr_sched.get_last_lr()[0]}
    if run.ema is not None:
        run.last["ema_decay"] = run.ema.cur_decay_value
    acc.log(run.last, step=run.step)
    run.out.log({"step": run.step, "epoch": epoch, **run.last})
    if acc.is_main_process:
        if run.step % 10 == 0 or run.step == run.max_steps:  # a postfix per step costs ~1% of a tiny model's step
            run.bar.set_postfix(loss=f"{run.last['loss']:.4f}", lr=f"{run.last['lr']:.2e}", refresh=False)
        run.bar.update(1)
    if cfg.checkpointing_steps and run.step % cfg.checkpointing_steps == 0:
        run.out.save_checkpoint(run.step, run.gen, run.fp, cfg.checkpoints_total_limit)


def end_of_epoch(run: Run, epoch: int):
    """The periodic sample grids, bits/dim and pipeline saves."""
    cfg = run.cfg
    if run.step % run.steps_per_epoch:
        return
    if cfg.save_images_epochs and (epoch + 1) % cfg.save_images_epochs == 0:
        ev = evaluate(run)
        if run.acc.is_main_process and "bits_per_dim" in ev:
            run.bar.write(f"epoch {epoch + 1}: held-out {ev['bits_per_dim']:.3f} bits/dim ({cfg.num_levels} levels)")
    if cfg.save_model_epochs and (epoch + 1) % cfg.save_model_epochs == 0:
        save_pipeline(run)


def finish(run: Run):
    """Save the pipeline, evaluate, write metrics and the model card, push; returns the summary."""
    cfg, acc = run.cfg, run.acc
    run.bar.close()
    elapsed = time.time() - run.t0
    save_pipeline(run)
    ev = evaluate(run) if cfg.final_eval else {"bits_per_dim_skipped": "--no_final_eval"}
    summary = dict(step=run.step, final_loss=run.last.get("loss"), seconds=round(elapsed, 1),
                   world_size=acc.num_processes, mixed_precision=acc.mixed_precision,
                   images_per_second=round(run.images_seen * acc.num_processes / max(elapsed, 1e-9), 1),
                   peak_memory_mb=round(T.peak_memory_mb(acc.device), 1), **ev)
    if acc.is_main_process:
        run.out.write_metrics(summary)
        repo = run.out.setup_result
        report.write_model_card(cfg.output_dir, CARD_TEMPLATE, repo, cfg.pretrained_model_name_or_path,
                                dataset=run.data_name, args=dataclasses.asdict(cfg), summary=summary,
                                scheduler=dict(run.scheduler.config), lambda_sweep=report.LAMBDA_SWEEP)
        print(one_line_summary(cfg, summary), flush=True)
        if cfg.push_to_hub:
            ckpt.push_folder_to_hub(cfg.output_dir, repo, cfg.hub_private_repo, cfg.hub_token)
            print(f"pushed {cfg.output_dir} to https://huggingface.co/{repo}", flush=True)
    acc.end_training()
    return summary


def save_pipeline(run: Run):
    """The EMA (or raw) weights as a ``DDPMPipeline`` folder with our ``VEScheduler``."""
    from diffusers import DDPMPipeline

    if run.acc.is_main_process:
        unet = run.acc.unwrap_model(run.model)
        with T.ema_weights(unet, run.ema):
            DDPMPipeline(unet=unet, scheduler=run.scheduler).save_pretrained(run.cfg.output_dir)
            save_data_record(run.cfg.output_dir, run.cfg.num_levels, data=data_name(run.cfg))  # bits/dim defaults
    run.acc.wait_for_everyone()


def data_name(cfg) -> str:
    return "sklearn digits" if cfg.digits else (cfg.dataset_name or cfg.train_data_dir)


def one_line_summary(cfg, s):
    bpd = (f"held-out {s['bits_per_dim']:.3f} +- {s['bits_per_dim_se']:.3f} bits/dim ({cfg.num_levels} levels, ELBO)"
           if "bits_per_dim" in s else f"bits/dim not computed ({s.get('bits_per_dim_skipped', 'unknown reason')})")
    loss = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "n/a"
    imgs = f"; samples {', '.join(s['images'])}" if s.get("images") else ""
    return (f"done: {s['step']} steps in {s['seconds']:.0f} s ({s['images_per_second']:.0f} img/s, world size "
            f"{s['world_size']}), final loss {loss}, {bpd}; pipeline in {cfg.output_dir}{imgs}")


# -------------------------------------------------------------------------------------- evaluation
def bits_per_dim(unet, scheduler, images, cfg):
    """Held-out bits/dim (ELBO) through the likelihood pipeline: (mean, standard error over images, protocol)."""
    pipe = diffusers_ve.VELikelihoodPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(images.to(unet.device), method="elbo", num_t_samples=cfg.eval_num_t_samples,
               generator=torch.Generator().manual_seed(cfg.seed), num_levels=cfg.num_levels)
    mean, _, spread = mean_bits_per_dim(out.bits_per_dim, out.stderr_bits_per_dim)
    return mean, spread, json.loads(json.dumps(out.protocol, default=str))


def evaluate(run: Run):
    """Sample grids and held-out bits/dim on the main process (with the EMA weights); logs them. Without
    bits/dim the result says why (``bits_per_dim_skipped``)."""
    acc, cfg, held, result = run.acc, run.cfg, run.held, {}
    if acc.is_main_process:
        unet = acc.unwrap_model(run.model)
        unet.eval()
        with torch.no_grad(), T.ema_weights(unet, run.ema):
            result["images"] = report.save_sample_grids(unet, run.scheduler, cfg.output_dir, cfg.eval_batch_size,
                                                        cfg.reverse_noise, cfg.num_inference_steps, cfg.seed)
            bpd = bits_per_dim(unet, run.scheduler, held, cfg) if held is not None else None
        unet.train()
        if bpd is not None:
            result.update(bits_per_dim=bpd[0], bits_per_dim_se=bpd[1], protocol=bpd[2], num_levels=cfg.num_levels,
                          num_images=len(held))
            acc.log({"eval/bits_per_dim": bpd[0]}, step=run.step)
        else:
            result["bits_per_dim_skipped"] = "no held-out images: " + no_held_out_reason(cfg)
    acc.wait_for_everyone()
    return result


def cli(argv=None) -> int:
    """``main`` with user errors as one ``error:`` line and exit status 2: printed once, by the main process, when
    every process raises it alike; a rank's own error (e.g. a bad file in its shard) is printed by that rank."""
    try:
        main(argv)
        return 0
    except ValueError as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not isinstance(e, EveryRankError):
            print(f"error: {e}" if rank == 0 else f"error (process {rank}): {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(2)  # let the main process print before the launcher stops the group
        return 2


if __name__ == "__main__":
    sys.exit(cli())
