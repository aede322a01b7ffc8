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

import torch

import diffusers_ve
from diffusers_ve import checkpointing as ckpt
from diffusers_ve import data as ve_data
from diffusers_ve import training as T

CONFIGS = Path(__file__).resolve().parent / "configs"
CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
LAMBDA_SWEEP = (0.0, 0.5, 1.0, 2.0)
# flags left at None take these defaults: the built-in digits preset, or train_unconditional's for image data
DIGITS_DEFAULTS = dict(model_config="small", resolution=8, train_batch_size=64, max_train_steps=1500,
                       learning_rate=2e-3, lr_warmup_steps=100, use_ema=True, ema_max_decay=0.999,
                       save_images_epochs=20, num_levels=ve_data.DIGITS_LEVELS, eval_fraction=0.1)
IMAGE_DEFAULTS = dict(model_config="cifar", resolution=64, train_batch_size=16, num_epochs=100, learning_rate=1e-4,
                      lr_warmup_steps=500, use_ema=False, ema_max_decay=0.9999, save_images_epochs=10,
                      num_levels=256, eval_fraction=0.01)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data
    a("--dataset_name", default=None, help="a `datasets` name or local path (an `image`/`img` column)")
    a("--dataset_config_name", default=None)
    a("--image_column", default=None, help="image column of --dataset_name (default: image or img)")
    a("--train_data_dir", default=None, help="a folder of images (recursive)")
    a("--cache_dir", default=None)
    a("--resolution", type=int, default=None, help="side of the training images (digits: 8)")
    a("--center_crop", action="store_true", help="centre crop (else random crop)")
    a("--random_flip", action="store_true")
    a("--resample", default="bilinear", choices=ve_data.RESAMPLE, help="resize filter for image data")
    a("--digits_resize", default="pad", choices=("pad", "nearest"), help="digits to --resolution, never interpolated")
    a("--eval_fraction", type=float, default=None, help="held-out share for bits/dim (if the data has no test split)")
    a("--eval_num_images", type=int, default=256, help="held-out images for bits/dim")
    a("--num_levels", type=int, default=None, help="quantisation levels of the data (digits 17, 8-bit images 256)")
    a("--dataloader_num_workers", type=int, default=0)
    # model and objective
    a("--model_config", "--model_config_name_or_path", dest="model_config", default=None,
      help="UNet2DModel preset (tiny, small, cifar) or a config JSON path")
    a("--pretrained_model_name_or_path", default=None, help="fine-tune a diffusers UNet2DModel folder (or a pipeline folder)")
    a("--prediction_type", default=None, choices=("epsilon", "v_prediction", "sample"))
    a("--ddpm_num_steps", type=int, default=None)
    a("--ddpm_beta_schedule", default=None, choices=("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"))
    a("--loss_weighting", default="ddpm", choices=T.LOSS_WEIGHTINGS)
    a("--sigma_data", type=float, default=0.5, help="EDM's data std (--loss_weighting edm)")
    # optimisation
    a("--train_batch_size", type=int, default=None, help="per process")
    a("--eval_batch_size", type=int, default=16, help="sample grid size")
    a("--num_epochs", type=int, default=None)
    a("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=None)
    a("--lr_scheduler", default="cosine", choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                                   "constant_with_warmup"))
    a("--lr_warmup_steps", type=int, default=None)
    a("--adam_beta1", type=float, default=0.95)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-6)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", default=None, choices=("no", "fp16", "bf16"), help="default: accelerate's config")
    a("--use_ema", action=argparse.BooleanOptionalAction, default=None)
    a("--ema_inv_gamma", type=float, default=1.0)
    a("--ema_power", type=float, default=3 / 4)
    a("--ema_max_decay", type=float, default=None)
    a("--seed", type=int, default=0)
    # sampling and evaluation
    a("--reverse_noise", type=float, default=None, help="lambda of the saved VEScheduler (default 1, or the fine-tuned folder's)")
    a("--ddpm_num_inference_steps", "--num_inference_steps", dest="num_inference_steps", type=int, default=25)
    a("--save_images_epochs", type=int, default=None, help="sample grid and bits/dim every N epochs (and at the end)")
    a("--save_model_epochs", type=int, default=0, help="save the pipeline every N epochs (0: at the end only)")
    a("--eval_num_t_samples", type=int, default=64, help="t draws per image for the ELBO bits/dim")
    a("--no_final_eval", dest="final_eval", action="store_false", help="skip the final sample grids and bits/dim")
    a("--final_eval", dest="final_eval", action="store_true", default=True, help=argparse.SUPPRESS)
    # checkpoints, logging, output
    a("--output_dir", default="ve-digits")
    a("--overwrite_output_dir", action="store_true")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    a("--logger", "--report_to", dest="logger", default="tensorboard", choices=("tensorboard", "wandb", "none"))
    a("--logging_dir", default="logs", help="relative to --output_dir")
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", default=None)
    a("--hub_private_repo", action="store_true")
    a("--hub_token", default=None)
    a("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.digits = args.dataset_name is None and args.train_data_dir is None
    if args.dataset_name and args.train_data_dir:
        raise ValueError("pass one data source: `--dataset_name` or `--train_data_dir`, not both.")
    for k, v in (DIGITS_DEFAULTS if args.digits else IMAGE_DEFAULTS).items():
        if getattr(args, k, None) is None and not (k == "resolution" and args.pretrained_model_name_or_path):
            setattr(args, k, v)
    if args.pretrained_model_name_or_path and args.model_config in ("small", "cifar"):
        args.model_config = None  # fine-tuning: the architecture comes from the folder
    for k in ("train_batch_size", "gradient_accumulation_steps", "num_inference_steps", "eval_batch_size"):
        if getattr(args, k) < 1:
            raise ValueError(f"`--{k}` must be >= 1; got {getattr(args, k)}.")
    return args


# ------------------------------------------------------------------------------------------- setup
def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    log_with = None if args.logger == "none" else args.logger
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
    """The UNet2DModel (preset, config JSON or pretrained folder) and the scheduler config it was trained on."""
    from diffusers import UNet2DModel

    sched = {}
    if args.pretrained_model_name_or_path:
        root = Path(args.pretrained_model_name_or_path)
        sub = "unet" if (root / "unet").is_dir() else None
        unet = UNet2DModel.from_pretrained(str(root), subfolder=sub)
        if (root / "scheduler" / "scheduler_config.json").is_file():
            sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
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
    from diffusers_ve import VEScheduler

    scheduler = VEScheduler(
        num_train_timesteps=args.ddpm_num_steps or sched.get("num_train_timesteps", 1000),
        beta_schedule=args.ddpm_beta_schedule or sched.get("beta_schedule", "linear"),
        beta_start=sched.get("beta_start", 1e-4), beta_end=sched.get("beta_end", 0.02),
        prediction_type=args.prediction_type or sched.get("prediction_type", "epsilon"),
        reverse_noise=sched.get("reverse_noise", 1.0) if args.reverse_noise is None else args.reverse_noise,
    )
    args.reverse_noise = scheduler.config.reverse_noise
    return unet, scheduler


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


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, x, flip=False, seed=0):
        self.x, self.flip, self.seed, self.epoch = x, flip, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if not self.flip:
            return self.x[i]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
        return self.x[i].flip(-1) if bool(torch.rand(1, generator=g) < 0.5) else self.x[i]


def load_data(args, channels: int):
    """(training data set, held-out images in [-1, 1] (N, C, R, R), description)."""
    if args.digits:
        if channels != 1:
            raise ValueError(f"the built-in digits are 1-channel grey images but the UNet takes in_channels={channels}; "
                             "use a 1-channel model config (tiny, small) or pass --dataset_name / --train_data_dir.")
        x = ve_data.load_digits_images(args.resolution, args.digits_resize)
        train, held = ve_data.split_indices(len(x), args.eval_fraction, seed=0)
        return TensorImages(x[train], args.random_flip, args.seed), x[held][: args.eval_num_images], "sklearn digits (8x8, 17 levels)"
    tf = ve_data.ImageTransform(args.resolution, channels, args.center_crop, args.random_flip, args.resample)
    eval_tf = ve_data.ImageTransform(args.resolution, channels, True, False, args.resample)
    if args.train_data_dir:
        files = ve_data.list_images(args.train_data_dir)
        train, held = ve_data.split_indices(len(files), args.eval_fraction, seed=0)
        train_imgs, held_imgs, name = [files[i] for i in train], [files[i] for i in held], args.train_data_dir
    else:
        train_imgs, held_imgs, name = _hf_images(args)
    data = ve_data.ImageDataset(train_imgs, tf, args.seed)
    data[0]  # the channel and format checks, before any training step
    held = ve_data.ImageDataset(held_imgs, eval_tf)
    n = min(len(held), args.eval_num_images)
    return data, (torch.stack([held[i] for i in range(n)]) if n else None), name


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
    tr, he = ve_data.split_indices(len(train), args.eval_fraction, seed=0)
    return train.select(tr)[col], train.select(he[: args.eval_num_images])[col], args.dataset_name


def fingerprint(args, unet, scheduler, world_size):
    """What a checkpoint must share with the run that resumes it."""
    model = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    sched = {k: scheduler.config[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")}
    fp = dict(model=model, scheduler=sched, loss_weighting=args.loss_weighting, world_size=world_size,
              train_batch_size=args.train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
              use_ema=args.use_ema, seed=args.seed)
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


def sample_grids(unet, scheduler, args, tag=""):
    """Sample grid at the saved lambda and the lambda sweep (same seeds in every row); returns the file names."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    from diffusers_ve import VEPipeline

    pipe = VEPipeline(unet=unet, scheduler=scheduler)
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
    sweep = make_image_grid([im for lam in LAMBDA_SWEEP for im in run(lam, 8)], len(LAMBDA_SWEEP), 8)
    names = (f"samples{tag}.png", f"samples_lambda_sweep{tag}.png")
    grid.save(os.path.join(args.output_dir, names[0]))
    sweep.save(os.path.join(args.output_dir, names[1]))
    return names


def bits_per_dim(unet, scheduler, images, args):
    """Held-out bits/dim (ELBO) through the likelihood pipeline: (mean, standard error, protocol) or None."""
    try:
        from diffusers_ve import VELikelihoodPipeline
    except ImportError:
        return None
    pipe = VELikelihoodPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(images.to(unet.device), method="elbo", num_t_samples=args.eval_num_t_samples,
               generator=torch.Generator().manual_seed(args.seed), num_levels=args.num_levels)
    bpd = torch.as_tensor(out.bits_per_dim, dtype=torch.float64).reshape(-1)
    se = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    protocol = getattr(out, "protocol", None)
    return float(bpd.mean()), se, json.loads(json.dumps(protocol, default=str)) if protocol is not None else None


def evaluate(acc, model, ema, scheduler, held, args, step, tag=""):
    """Sample grids and held-out bits/dim on the main process (with the EMA weights); logs them."""
    result = {}
    if acc.is_main_process:
        unet = acc.unwrap_model(model)
        unet.eval()
        with torch.no_grad(), ema_weights(unet, ema):
            result["images"] = sample_grids(unet, scheduler, args, tag)
            if held is not None and len(held):
                bpd = bits_per_dim(unet, scheduler, held, args)
                if bpd is not None:
                    result.update(bits_per_dim=bpd[0], bits_per_dim_se=bpd[1], protocol=bpd[2],
                                  num_levels=args.num_levels, num_images=len(held))
                    acc.log({"eval/bits_per_dim": bpd[0]}, step=step)
        unet.train()
    acc.wait_for_everyone()
    return result


# ----------------------------------------------------------------------------------------------- run
def prepare_output_dir(acc, args):
    """Take the output-dir lock (main process) and tell every rank whether it worked; returns the lock."""
    from accelerate.utils import broadcast_object_list

    lock, msg = None, [None, uuid.uuid4().hex[:8]]
    if acc.is_main_process:
        try:
            lock = ckpt.OutputDirLock(args.output_dir).acquire()
            wipe = args.overwrite_output_dir and not args.resume_from_checkpoint
            for name in os.listdir(args.output_dir):  # partial saves of killed runs, or everything
                if name != ckpt.OutputDirLock.NAME and (wipe or ".tmp-" in name or name.endswith(".old")):
                    path = os.path.join(args.output_dir, name)
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        except ValueError as e:
            msg[0] = str(e)
    if acc.num_processes > 1:
        broadcast_object_list(msg)
    if msg[0]:
        raise ValueError(msg[0])
    return lock, msg[1]


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
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    main_proc = acc.is_main_process
    if main_proc:
        print(f"world size {acc.num_processes} ({acc.distributed_type.value}, device {acc.device}, "
              f"mixed precision {acc.mixed_precision}), output {args.output_dir}", flush=True)
    set_seed(args.seed)
    unet, scheduler = load_unet(args)
    check_unet(unet, args.resolution)
    data, held, data_name = load_data(args, unet.config.in_channels)
    objective = T.Objective.from_config(scheduler.config, args.loss_weighting, sigma_data=args.sigma_data)
    fp = fingerprint(args, unet, scheduler, acc.num_processes)
    resume = ckpt.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume:  # before any training step: a checkpoint of another configuration is an error
        ckpt.check_checkpoint_compatible(ckpt.read_checkpoint_state(resume)["fingerprint"], fp, resume)

    sampler = ve_data.ShardedEpochSampler(len(data), args.train_batch_size, acc.num_processes, acc.process_index,
                                    args.seed, args.gradient_accumulation_steps)
    loader = torch.utils.data.DataLoader(data, batch_size=args.train_batch_size, sampler=sampler,
                                         num_workers=args.dataloader_num_workers)
    steps_per_epoch = sampler.steps_per_epoch
    max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_sched = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_steps)
    ema = None
    if args.use_ema:
        from diffusers import UNet2DModel

        ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                       power=args.ema_power, model_cls=UNet2DModel, model_config=unet.config)
    model, optimizer = acc.prepare(unet, optimizer)
    acc.register_for_checkpointing(lr_sched)
    if ema is not None:
        ema.to(acc.device)
        acc.register_for_checkpointing(ema)
    gen = torch.Generator().manual_seed(args.seed * 7919 + acc.process_index + 1)  # t and eps draws, per rank
    set_seed(args.seed + acc.process_index)  # dropout etc.: distinct per rank, restored by accelerate on resume

    step = load_checkpoint(acc, resume, gen, fp) if resume else 0
    if main_proc:
        acc.init_trackers("train_ve", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        n_params = sum(p.numel() for p in unet.parameters())
        print(f"data {data_name}: {len(data)} train images at {args.resolution}px, {len(held) if held is not None else 0} held out; "
              f"UNet {n_params / 1e6:.2f}M params, {args.prediction_type or scheduler.config.prediction_type} on "
              f"{scheduler.config.num_train_timesteps} {scheduler.config.beta_schedule} steps, loss {args.loss_weighting}; "
              f"{max_steps} steps x {args.train_batch_size * acc.num_processes * args.gradient_accumulation_steps} images"
              + (f"; resumed from {resume} at step {step}" if resume else ""), flush=True)
    bar = tqdm(total=max_steps, initial=step, desc="train", disable=not main_proc, dynamic_ncols=True)
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    t0, images_seen, last = time.time(), 0, {}
    for epoch in range(step // steps_per_epoch, num_epochs):
        skip = (step % steps_per_epoch) * args.gradient_accumulation_steps if epoch == step // steps_per_epoch else 0
        sampler.set_epoch(epoch, skip)
        data.set_epoch(epoch)
        step_loss = torch.zeros((), device=acc.device)
        for y in loader:
            y = y.to(acc.device, non_blocking=True)
            with acc.accumulate(model):
                batch = objective.draw(y, gen)
                loss = objective.per_sample_loss(model(batch.x, batch.timestep).sample, batch).mean()
                acc.backward(loss)
                if acc.sync_gradients and args.max_grad_norm:
                    acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / args.gradient_accumulation_steps
            images_seen += y.shape[0]
            if not acc.sync_gradients:
                continue
            if not acc.optimizer_step_was_skipped:
                lr_sched.step()
            if ema is not None:
                ema.step(acc.unwrap_model(model).parameters())
            step += 1
            last = {"loss": acc.reduce(step_loss, "mean").item(), "lr": lr_sched.get_last_lr()[0]}
            step_loss.zero_()
            if ema is not None:
                last["ema_decay"] = ema.cur_decay_value
            acc.log(last, step=step)
            if main_proc:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "epoch": epoch, **last}) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(acc, args, step, gen, fp, run_id)
            if step >= max_steps:
                break
        epoch_end = step % steps_per_epoch == 0 and step < max_steps
        if epoch_end and args.save_images_epochs and (epoch + 1) % args.save_images_epochs == 0:
            ev = evaluate(acc, model, ema, scheduler, held, args, step)
            if main_proc and "bits_per_dim" in ev:
                bar.write(f"epoch {epoch + 1}: held-out {ev['bits_per_dim']:.3f} bits/dim ({args.num_levels} levels)")
        if epoch_end and args.save_model_epochs and (epoch + 1) % args.save_model_epochs == 0:
            save_pipeline(acc, model, ema, scheduler, args)
        if step >= max_steps:
            break
    bar.close()
    elapsed = time.time() - t0
    save_pipeline(acc, model, ema, scheduler, args)
    ev = evaluate(acc, model, ema, scheduler, held, args, step) if args.final_eval else {}
    summary = dict(step=step, final_loss=last.get("loss"), seconds=round(elapsed, 1), world_size=acc.num_processes,
                   images_per_second=round(images_seen * acc.num_processes / max(elapsed, 1e-9), 1),
                   peak_memory_mb=round(peak_memory_mb(acc.device), 1), **ev)
    if main_proc:
        Path(args.output_dir, "metrics.json").write_text(json.dumps(summary, indent=1, default=str))
        write_model_card(args, scheduler, summary, data_name)
        print(one_line_summary(args, summary), flush=True)
        if args.push_to_hub:
            repo = args.hub_model_id or Path(args.output_dir).name
            ckpt.push_folder_to_hub(args.output_dir, repo, args.hub_private_repo, args.hub_token)
            print(f"pushed {args.output_dir} to https://huggingface.co/{repo}", flush=True)
    acc.end_training()
    return summary


def peak_memory_mb(device) -> float:
    """This process's peak: CUDA max allocated, else peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_pipeline(acc, model, ema, scheduler, args):
    """The EMA (or raw) weights as a ``DDPMPipeline`` folder with our ``VEScheduler``."""
    from diffusers import DDPMPipeline

    if acc.is_main_process:
        unet = acc.unwrap_model(model)
        with ema_weights(unet, ema):
            DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(args.output_dir)
    acc.wait_for_everyone()


def one_line_summary(args, s):
    bpd = (f"held-out {s['bits_per_dim']:.3f} +- {s['bits_per_dim_se']:.3f} bits/dim ({args.num_levels} levels, ELBO)"
           if "bits_per_dim" in s else "bits/dim not computed")
    loss = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "n/a"
    imgs = f"; samples {', '.join(s['images'])}" if s.get("images") else ""
    return (f"done: {s['step']} steps in {s['seconds']:.0f} s ({s['images_per_second']:.0f} img/s, world size "
            f"{s['world_size']}), final loss {loss}, {bpd}; pipeline in {args.output_dir}{imgs}")


def write_model_card(args, scheduler, s, data_name):
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["diffusers", "unconditional-image-generation", "diffusers-ve", "variance-exploding", "ddpm"]
    data = ModelCardData(library_name="diffusers", license="apache-2.0", tags=tags, pipeline_tag="unconditional-image-generation")
    repo = args.hub_model_id or Path(args.output_dir).name
    card = ModelCard.from_template(
        data, template_path=str(CARD_TEMPLATE), repo_id=repo, dataset=data_name, args=vars(args),
        scheduler=dict(scheduler.config), summary=s, lambda_sweep=LAMBDA_SWEEP,
        version=diffusers_ve.__version__)
    card.save(os.path.join(args.output_dir, "README.md"))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
