"""Training throughput: ``training/train_ve.py`` beside a plain diffusers DDPM loop, 1 and 2 CPU processes.

    python benchmarks/training.py [--steps 150] [--batch 64] [--model_config tiny] [--repeats 3]

Both sides train the same UNet preset on the same digits with the same per-process batch, AdamW, launcher,
process count and threads; the plain loop is ``DDPMScheduler.add_noise`` + eps-MSE (train_unconditional's core,
no EMA, no logging). Each run is a fresh launch; a row shows the best of ``--repeats`` interleaved runs.
images/s counts every step from the first (the same clock on both sides); peak memory is rank 0's peak RSS
(CUDA: max allocated). Prints one table with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_ve.py"


def plain_worker(args):
    """The reference: a plain diffusers DDPM training loop under accelerate."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusers_ve.data import ShardedEpochSampler, load_digits_images
    from diffusers_ve.training import peak_memory_mb

    acc = Accelerator(mixed_precision="no")
    torch.manual_seed(0)
    cfg = json.loads((ROOT / "training" / "configs" / f"unet_{args.model_config}.json").read_text())
    unet = UNet2DModel.from_config(cfg)
    sched = DDPMScheduler(num_train_timesteps=1000)
    data = load_digits_images(8)
    sampler = ShardedEpochSampler(len(data), args.batch, acc.num_processes, acc.process_index)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, sampler=sampler)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6)
    model, opt = acc.prepare(unet, opt)
    step, seen, t0 = 0, 0, time.time()
    while step < args.steps:
        sampler.set_epoch(step)
        for y in loader:
            y = y.to(acc.device)
            noise = torch.randn_like(y)
            tau = torch.randint(0, 1000, (y.shape[0],), device=y.device)
            loss = F.mse_loss(model(sched.add_noise(y, noise, tau), tau).sample, noise)
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step, seen = step + 1, seen + y.shape[0]
            if step >= args.steps:
                break
    elapsed = time.time() - t0
    if acc.is_main_process:
        Path(args.result).write_text(json.dumps(dict(images_per_second=seen * acc.num_processes / elapsed,
                                                     peak_memory_mb=peak_memory_mb(acc.device), world_size=acc.num_processes)))


def launch(kind, procs, threads, args, out):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), ACCELERATE_USE_CPU="1")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads)]
    launcher += ["--multi_gpu"] if procs > 1 else ["--cpu"]
    if kind == "ve":
        cmd = [str(SCRIPT), "--output_dir", out, "--model_config", args.model_config, "--train_batch_size", str(args.batch),
               "--max_train_steps", str(args.steps), "--checkpointing_steps", "0", "--no_final_eval", "--logger", "none",
               "--save_images_epochs", "0", "--no-use_ema", "--learning_rate", "1e-3", "--lr_scheduler", "constant"]
        result = Path(out, "metrics.json")
    else:
        result = Path(out, "plain.json")
        cmd = [__file__, "--worker", "--model_config", args.model_config, "--batch", str(args.batch), "--steps",
               str(args.steps), "--result", str(result)]
    res = subprocess.run(launcher + cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    if res.returncode:
        raise RuntimeError(f"{kind} x{procs} failed:\n{res.stderr[-2000:]}")
    r = json.loads(result.read_text())
    if r["world_size"] != procs:
        raise RuntimeError(f"{kind}: asked for {procs} processes, got world size {r['world_size']}")
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64, help="per process")
    p.add_argument("--model_config", default="tiny", choices=("tiny", "small"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return plain_worker(args)
    rows = []
    for procs, threads in ((1, 1), (2, 1), (1, 2)):
        runs = {"plain": [], "ve": []}
        for _ in range(args.repeats):  # interleaved; the best of the repeats (a shared machine only slows runs down)
            for kind in runs:
                with tempfile.TemporaryDirectory() as out:
                    runs[kind].append(launch(kind, procs, threads, args, out))
        r = {k: max(v, key=lambda x: x["images_per_second"]) for k, v in runs.items()}
        rows.append((procs, threads, r))
        print(f"{procs} proc x {threads} thr: plain {r['plain']['images_per_second']:.0f} img/s, "
              f"train_ve {r['ve']['images_per_second']:.0f} img/s", flush=True)
    print(f"\n{args.model_config} UNet, digits 8x8, batch {args.batch}/process, {args.steps} steps, CPU, "
          f"best of {args.repeats}\n")
    print("| processes x threads | plain DDPM img/s | train_ve img/s | train_ve / plain | peak MB plain | peak MB train_ve |")
    print("|---|---|---|---|---|---|")
    for procs, threads, r in rows:
        a, b = r["plain"], r["ve"]
        print(f"| {procs} x {threads} | {a['images_per_second']:.0f} | {b['images_per_second']:.0f} | "
              f"{b['images_per_second'] / a['images_per_second']:.2f} | {a['peak_memory_mb']:.0f} | {b['peak_memory_mb']:.0f} |")
    one, two, thr = (r for _, _, r in rows)
    for kind in ("plain", "ve"):
        print(f"{kind}: 2 processes / 1 process (1 thread each) = "
              f"{two[kind]['images_per_second'] / one[kind]['images_per_second']:.2f}x (target >= 1.5x); "
              f"2 processes x 1 thread / 1 process x 2 threads = "
              f"{two[kind]['images_per_second'] / thr[kind]['images_per_second']:.2f}x")


if __name__ == "__main__":
    main()
