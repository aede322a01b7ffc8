"""Few-step sampling on trained digits models, scored by a classifier nobody here wrote.

    OMP_NUM_THREADS=1 python benchmarks/samplers_trained.py [--quick] [--models eps v] [--only default UniPC]

The models are the README's main job (``training/train_ve.py``: digits, 1500 steps, epsilon and v-prediction),
read from ``--eps-dir``/``--v-dir`` and trained there first if absent. Every sampler runs the standard pipeline
loop (``set_timesteps``, ``scale_model_input``, model, ``step``) from the same ``--n`` starting noises, all of them
in one model call per step. The samples are clamped to [-1, 1] (as a pipeline returns them) and scored by
:class:`diffusers_ve.sample_quality.DigitsJudge`: Fréchet distance in the hidden layer of an ``MLPClassifier``
fitted on the training split (± its bootstrap sd), class-frequency total variation (%) and mean confidence (%),
against the 1617 training digits. The floor row scores the 180 held-out digits.

Results are cached in ``--cache`` (one JSON entry per model, sampler, budget and sample count), so an
interrupted run resumes and a later run only computes missing cells; ``--only`` restricts the samplers to names
containing any of the given words (run the cells a decision needs first, then fill the table).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffusers.utils import logging  # noqa: E402

import diffusers_ve  # noqa: E402
from diffusers_ve.calibrate import calibrate_window  # noqa: E402
from diffusers_ve.sample_quality import DigitsJudge  # noqa: E402
from samplers import steps_for_budget  # noqa: E402  (a script's own folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (2, 3, 5, 8, 10, 20, 50)
QUICK_BUDGETS = (2, 5, 10, 20)
GRIDS = {"karras": {}, "log_t": {"sigma_schedule": "log_t"}, "trailing": {"sigma_schedule": "ddpm", "timestep_spacing": "trailing"}}
GOLD = "DDPM 1000 steps (gold)"
CALIBRATED = "VE calibrated o2 λ=0"
CALIBRATE_BUDGETS = (2, 3, 5, 8, 10)
WINDOWED = "VE default λ=1, window calibrated"
WINDOW_BUDGETS = (5, 10, 20)


# --------------------------------------------------------------------------------------------- samplers
def samplers(quick: bool = False) -> Dict[str, Callable[[dict], object]]:
    """Sampler name -> factory taking the pipeline's scheduler config."""
    ve, heun = diffusers_ve.VEScheduler, diffusers_ve.VEHeunScheduler
    out: Dict[str, Callable] = {}
    lams = (0.0, 1.0) if quick else (0.0, 0.5, 1.0)
    out["VE default λ=0"] = lambda c: ve.from_config(c, reverse_noise=0.0)
    out["VE old default (karras on the whole table) λ=0"] = lambda c: ve.from_config(
        c, reverse_noise=0.0, t_min=ve.from_config(c).family.t_min, t_max=ve.from_config(c).family.t_max)
    for grid, kw in GRIDS.items():
        for order in (2,) if quick else (2, 1):
            for lam in lams:
                out[f"VE {grid} o{order} λ={lam:g}"] = lambda c, kw=kw, o=order, l=lam: ve.from_config(
                    c, reverse_noise=l, solver_order=o, **kw)
    for lam in lams:
        out[f"VEHeun karras λ={lam:g}"] = lambda c, l=lam: heun.from_config(c, reverse_noise=l)
    dpm = DPMSolverMultistepScheduler
    out.update({
        "DPM-Solver++ 2M": lambda c: dpm.from_config(c),
        "DPM-Solver++ 2M trailing": lambda c: dpm.from_config(c, timestep_spacing="trailing"),
        "DPM-Solver++ 2M Karras": lambda c: dpm.from_config(c, use_karras_sigmas=True),
        "SDE-DPM-Solver++ 2M Karras": lambda c: dpm.from_config(c, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
        "UniPC": lambda c: UniPCMultistepScheduler.from_config(c),
        "UniPC trailing": lambda c: UniPCMultistepScheduler.from_config(c, timestep_spacing="trailing"),
        "DDIM": lambda c: DDIMScheduler.from_config(c),
        "DDIM trailing": lambda c: DDIMScheduler.from_config(c, timestep_spacing="trailing"),
        "Euler": lambda c: EulerDiscreteScheduler.from_config(c),
        "EulerAncestral": lambda c: EulerAncestralDiscreteScheduler.from_config(c),
    })
    return out


@torch.no_grad()
def sample(scheduler, unet, steps: int, x: torch.Tensor, seed: int):
    """The pipeline loop from VP noise ``x``; returns (samples clamped to [-1, 1], model calls)."""
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    calls = 0
    for tau in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, tau), tau.expand(len(x))).sample
        calls += 1
        x = scheduler.step(out, tau, x, **kw).prev_sample
    return x.clamp(-1, 1), calls


# ----------------------------------------------------------------------------------------------- models
def ensure_model(folder: Path, prediction_type: str) -> Path:
    """The main job's pipeline in ``folder``; trained there with ``training/train_ve.py`` if absent."""
    if not (folder / "model_index.json").exists():
        print(f"training {prediction_type} digits model into {folder} (a few minutes on a CPU)", flush=True)
        cmd = [sys.executable, str(ROOT / "training/train_ve.py"), "--output_dir", str(folder),
               "--prediction_type", prediction_type, "--logger", "none"]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return folder


def load(folder: Path):
    """(UNet in eval mode, the pipeline's scheduler config): every scheduler is built from that config, as a user
    swapping schedulers builds it."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    return unet, dict(diffusers_ve.VEScheduler.from_pretrained(folder / "scheduler").config)


# ------------------------------------------------------------------------------------------------ cache
class Cache:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value: dict):
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def cell(cache, judge, key, make, unet, budget, x, seed) -> dict:
    hit = cache.get(key)
    if hit is not None:
        return hit
    sched = make()
    steps = 1000 if budget is None else steps_for_budget(sched, budget)
    t0 = time.time()
    y, calls = sample(sched, unet, steps, x, seed)
    s = judge.score(y)
    res = dict(fd=s.fd, fd_sd=judge.bootstrap_fd(y), tv=s.tv, conf=s.conf, calls=calls, seconds=time.time() - t0)
    cache.put(key, res)
    return res


def calibrated(cache, key, cfg, unet, budget, args):
    """A ``VEScheduler(reverse_noise=0)`` with its grid for ``budget`` calibrated to ``unet`` (cached)."""
    hit = cache.get(key)
    sched = diffusers_ve.VEScheduler.from_config(cfg, reverse_noise=0.0)
    if hit is None:
        rep = sched.calibrate(unet, budget, num_draws=args.calibrate_draws, seed=args.seed + 1)
        hit = dict(t_grid=rep.t_grid, calls=rep.model_calls, seconds=rep.seconds, error=rep.error,
                   start_error=rep.start_error, draws=args.calibrate_draws)
        print(f"  calibrated {budget} calls: {hit}", flush=True)
        cache.put(key, hit)
    sched.register_to_config(calibrated_grids={str(budget): hit["t_grid"]})
    return sched


def windowed(cache, key, cfg, unet, budget, args):
    """The default ``VEScheduler(reverse_noise=1)`` with its ``reverse_noise_window`` fitted to ``unet`` at
    ``budget`` calls (cached)."""
    hit = cache.get(key)
    sched = diffusers_ve.VEScheduler.from_config(cfg, reverse_noise=1.0)
    if hit is None:
        rep = calibrate_window(sched, unet, budget, num_draws=args.window_draws, seed=args.seed + 1)
        hit = dict(window=rep.window, calls=rep.model_calls, seconds=rep.seconds, draws=args.window_draws,
                   distance=rep.distance, everywhere=rep.everywhere, nowhere=rep.nowhere)
        print(f"  window for {budget} calls: {hit}", flush=True)
        cache.put(key, hit)
    sched.register_to_config(reverse_noise_window=hit["window"])
    return sched


def fmt(r: Optional[dict], budget) -> str:
    if r is None:
        return ""
    extra = "" if budget is None or r["calls"] == budget else f" ({r['calls']})"
    return f"{r['fd']:.2f}±{r['fd_sd']:.2f} · {r['tv']:.1f} · {r['conf']:.0f}{extra}"


# ------------------------------------------------------------------------------------------------- main
def run(args) -> str:
    torch.set_num_threads(1)
    logging.set_verbosity_error()  # diffusers' schedulers name our config keys they ignore: that is expected
    cache = Cache(Path(args.cache))
    judge = DigitsJudge()
    floor, floor_sd = judge.floor()
    specs = samplers(args.quick)
    names = [k for k in specs if not args.only or any(w in k for w in args.only)]
    extra = ([CALIBRATED, WINDOWED] if args.calibrate else []) + ([GOLD] if args.gold else [])
    lines = []
    for kind in args.models:
        folder = ensure_model(Path(args.eps_dir if kind == "eps" else args.v_dir), "epsilon" if kind == "eps" else "v_prediction")
        unet, cfg = load(folder)
        stamp = int((folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime)
        x = torch.randn((args.n, 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
        head = f"| {kind} model: sampler | " + " | ".join(f"{b} calls" for b in args.budgets) + " |"
        rows = [head, "|" + "---|" * (len(args.budgets) + 1),
                f"| held-out digits (floor, 180 images) | {floor.fd:.2f}±{floor_sd:.2f} · {floor.tv:.1f} · {floor.conf:.0f} |"]
        for name in names + extra:
            cells = []
            for b in ([None] if name == GOLD else args.budgets):
                key = f"{folder.name}@{stamp}|{name}|{b}|n={args.n}|seed={args.seed}"
                if b not in {CALIBRATED: CALIBRATE_BUDGETS, WINDOWED: WINDOW_BUDGETS}.get(name, [b]):
                    cells.append("")
                    continue
                if name == CALIBRATED:
                    ckey = f"{folder.name}@{stamp}|calibration|{b}|draws={args.calibrate_draws}|seed={args.seed}"
                    make = lambda b=b, ckey=ckey: calibrated(cache, ckey, cfg, unet, b, args)  # noqa: E731
                elif name == WINDOWED:
                    ckey = f"{folder.name}@{stamp}|window|{b}|draws={args.window_draws}|seed={args.seed}"
                    make = lambda b=b, ckey=ckey: windowed(cache, ckey, cfg, unet, b, args)  # noqa: E731
                elif name == GOLD:
                    make = lambda: DDPMScheduler.from_config(cfg, variance_type="fixed_small")  # noqa: E731
                else:
                    make = lambda name=name: specs[name](cfg)  # noqa: E731
                r = cell(cache, judge, key, make, unet, b, x, args.seed)
                print(f"  {kind} {name} {b}: {fmt(r, b)}  ({r['seconds']:.0f} s)", flush=True)
                cells.append(fmt(r, b))
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += rows + [""]
    note = (f"Cells: FD ± bootstrap sd · class-frequency TV (%) · mean confidence (%); {args.n} samples against the "
            f"1617 training digits; classifier held-out accuracy {judge.held_accuracy:.3f}. A number in parentheses "
            "is the model calls used when they differ from the budget.\n")
    return "\n".join(lines) + note


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["eps", "v"], choices=["eps", "v"])
    p.add_argument("--eps-dir", default="ve-digits-eps", help="epsilon model folder (trained there if absent)")
    p.add_argument("--v-dir", default="ve-digits-v", help="v-prediction model folder (trained there if absent)")
    p.add_argument("--n", type=int, default=2000, help="samples per cell")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="model-call budgets")
    p.add_argument("--only", nargs="+", default=None, help="samplers whose name contains one of these words")
    p.add_argument("--calibrate", action="store_true", help=f"add a grid calibrated to each model at {CALIBRATE_BUDGETS} "
                   f"calls, and the default grid at lambda 1 with its reverse-noise window calibrated at {WINDOW_BUDGETS}")
    p.add_argument("--calibrate-draws", type=int, default=64, help="starting noises of a calibration")
    p.add_argument("--window-draws", type=int, default=1024, help="samples per set in a window calibration")
    p.add_argument("--gold", action="store_true", help="add DDPM at 1000 steps (1000 model calls per model)")
    p.add_argument("--quick", action="store_true", help="500 samples, budgets 2 5 10 20, fewer samplers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="samplers_trained_cache.json", help="JSON file of computed cells (resumes)")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.quick and args.n == 2000:
        args.n = 500
    args.budgets = tuple(args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS))
    t0 = time.time()
    table = run(args)
    print(table)
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
