"""The output folder of a training run: every name on disk, defined once, and what happens to them.

``RunDirectory`` owns the lock, the refusal to overwrite an earlier run, the clean-up of partial saves, the
checkpoints (atomic, with every rank's objective generator), the resume and its fingerprint check, the step log and
the metrics. ``training/train_ve.py`` uses it; a custom loop can too::

    fp = run_fingerprint(unet.config, scheduler.config, accelerator.num_processes, seed=0)
    with RunDirectory("ve-run", accelerator).open(resume="latest") as out:
        step = out.load_checkpoint(generator, fp) if out.resume_path else 0
        out.start_log(step)
        ...
        out.save_checkpoint(step, generator, fp)

Layout (kept stable within a release)::

    model_index.json, unet/, scheduler/   the saved DDPMPipeline
    checkpoint-<step>/                    accelerate's state + objective_rng_<rank>.pt + train_ve_state.json
    train_log.jsonl, metrics.json, README.md, samples*.png, logs/, .train_ve.lock
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpointing

LOG = "train_log.jsonl"
METRICS = "metrics.json"
CARD = "README.md"
PIPELINE_INDEX = "model_index.json"
OBJECTIVE_RNG = "objective_rng_{rank}.pt"


def on_main(accelerator, fn: Callable):
    """``fn()`` on the main process, its result sent to every rank; a ValueError there is raised on every rank
    (no rank is left waiting at the next collective)."""
    from accelerate.utils import broadcast_object_list

    msg = [None, None]
    if accelerator.is_main_process:
        try:
            msg[1] = fn()
        except ValueError as e:
            msg[0] = str(e)
    if accelerator.num_processes > 1:
        broadcast_object_list(msg)
    if msg[0]:
        raise ValueError(msg[0])
    return msg[1]


def run_fingerprint(unet_config, scheduler_config, world_size: int, **settings) -> dict:
    """What a checkpoint must share with the run that resumes it: the model config, the time axis
    (:data:`~diffusers_ve.checkpointing.TIME_AXIS_KEYS`), the process count and ``settings`` (objective, batch,
    seed...), as plain JSON values."""
    model = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    sched = {k: scheduler_config.get(k) for k in checkpointing.TIME_AXIS_KEYS}
    return json.loads(json.dumps(dict(model=model, scheduler=sched, world_size=world_size, **settings)))


class RunDirectory:
    """One training run's output folder (see the module docstring for the layout).

    Args:
        path: the folder (created by :meth:`open`).
        accelerator: the run's ``accelerate.Accelerator``; the main process does the folder's bookkeeping, every rank
            writes its own random states into a checkpoint.
    """

    def __init__(self, path: str, accelerator):
        self.path, self.acc = str(path), accelerator
        self.run_id, self.resume_path, self._lock = uuid.uuid4().hex[:8], None, None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def checkpoint_dir(self, step: int) -> str:
        return self.file(f"checkpoint-{step}")

    # ------------------------------------------------------------------------------------------- opening
    def open(self, overwrite: bool = False, resume: Optional[str] = None, setup: Optional[Callable] = None):
        """On the main process: take the lock, refuse to overwrite an earlier run, run ``setup()`` (e.g. create the
        Hub repo, so that a push that cannot work fails now), clean partial saves. Then, on every rank, find the
        checkpoint to resume (``resume_path``). Returns ``self`` (a context manager that releases the lock) and
        keeps ``setup``'s result as ``setup_result``; a ValueError is raised on every rank."""

        def main_side():
            self._lock = checkpointing.OutputDirLock(self.path).acquire()
            self.check_previous_run(overwrite, resume)
            result = setup() if setup else None
            self.clean(wipe=overwrite and not resume)
            return dict(run_id=self.run_id, setup=result)

        try:
            info = on_main(self.acc, main_side)
            self.resume_path = self._resolve_resume(resume)
        except ValueError:
            self.close()
            raise
        self.run_id, self.setup_result = info["run_id"], info["setup"]
        return self

    def check_previous_run(self, overwrite: bool, resume: Optional[str]) -> None:
        """ValueError if the folder holds an earlier run that this one would silently overwrite."""
        if overwrite:
            return
        steps = checkpointing.list_checkpoints(self.path)
        if resume and (steps or resume != "latest"):
            return  # resuming: from `latest` only when there is a checkpoint, else a finished run would be replaced
        found = [f"checkpoints at steps {steps}"] if steps else []
        if os.path.isfile(self.file(PIPELINE_INDEX)):
            found.append("a saved pipeline")
        if found:
            raise ValueError(
                f"`--output_dir` {self.path!r} holds an earlier run ({', '.join(found)}); pass "
                "`--resume_from_checkpoint latest` to continue it, `--overwrite_output_dir` to replace it, "
                "or another `--output_dir`."
            )

    def clean(self, wipe: bool = False) -> None:
        """Remove partial saves of killed runs (``*.tmp-*``, ``*.old``), or everything but the lock if ``wipe``."""
        for name in os.listdir(self.path):
            if name != checkpointing.OutputDirLock.NAME and (wipe or ".tmp-" in name or name.endswith(".old")):
                path = self.file(name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)

    def _resolve_resume(self, resume: Optional[str]) -> Optional[str]:
        path = checkpointing.resolve_checkpoint(self.path, resume)
        if resume == "latest" and path is None and self.acc.is_main_process:
            print(f"--resume_from_checkpoint latest: no checkpoint in {self.path}, starting fresh", flush=True)
        return path

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, generator: torch.Generator, fingerprint: dict,
                        total_limit: Optional[int] = None) -> str:
        """All ranks write into a temporary folder (each its own RNG states); the main process then commits it
        atomically, so a kill mid-save leaves nothing that ``resume="latest"`` would pick up."""
        final = self.checkpoint_dir(step)
        tmp = f"{final}.tmp-{self.run_id}"
        self.acc.save_state(tmp)
        torch.save(generator.get_state(), os.path.join(tmp, OBJECTIVE_RNG.format(rank=self.acc.process_index)))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            if total_limit:
                checkpointing.prune_checkpoints(self.path, total_limit - 1)
            checkpointing.commit_checkpoint(tmp, final, dict(step=step, fingerprint=fingerprint))
        self.acc.wait_for_everyone()
        return final

    def check_resume(self, fingerprint: dict) -> None:
        """ValueError naming what differs if the checkpoint to resume comes from another configuration."""
        if self.resume_path:
            saved = checkpointing.read_checkpoint_state(self.resume_path)["fingerprint"]
            checkpointing.check_checkpoint_compatible(saved, fingerprint, self.resume_path)

    def load_checkpoint(self, generator: torch.Generator, fingerprint: dict) -> int:
        """Restore ``resume_path`` (accelerate's registered state and this rank's ``generator``); returns its step."""
        self.check_resume(fingerprint)
        self.acc.load_state(self.resume_path)
        rng = os.path.join(self.resume_path, OBJECTIVE_RNG.format(rank=self.acc.process_index))
        generator.set_state(torch.load(rng))
        return checkpointing.read_checkpoint_state(self.resume_path)["step"]

    def last_checkpoint(self) -> Optional[str]:
        steps = checkpointing.list_checkpoints(self.path)
        return self.checkpoint_dir(steps[-1]) if steps else None

    # --------------------------------------------------------------------------------------- logs, metrics
    def start_log(self, step: int) -> None:
        """Main process: cut ``train_log.jsonl`` back to ``step`` (a resume logs the steps after it again)."""
        if self.acc.is_main_process:
            checkpointing.trim_log(self.file(LOG), step)

    def log(self, record: dict) -> None:
        """Main process: append one JSON line to ``train_log.jsonl``."""
        if self.acc.is_main_process:
            with open(self.file(LOG), "a") as f:
                f.write(json.dumps(record) + "\n")

    def write_metrics(self, summary: dict) -> None:
        Path(self.file(METRICS)).write_text(json.dumps(summary, indent=1, default=str))


__all__ = ["RunDirectory", "run_fingerprint", "on_main", "LOG", "METRICS", "CARD", "OBJECTIVE_RNG"]
