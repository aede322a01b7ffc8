"""Atomic training checkpoints, the output-folder lock and the Hub upload of ``training/train_ve.py``; the folder
that uses them is :class:`diffusers_ve.run_directory.RunDirectory`."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import List, Optional

CHECKPOINT_STATE = "train_ve_state.json"  # written last: a checkpoint without it is incomplete
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# the scheduler keys that fix what a timestep means (the time axis) and what the model outputs: part of a
# checkpoint's fingerprint (see diffusers_ve.run_directory.run_fingerprint)
TIME_AXIS_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                  "rescale_betas_zero_snr", "timestep_type", "prediction_type")


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


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a difference is reported as one leaf, not as two whole configs."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_checkpoint_compatible(saved: dict, current: dict, path: str = "checkpoint") -> None:
    """ValueError naming every leaf of the run's fingerprint (model config, time axis, objective, world size)
    that differs, e.g. ``scheduler.prediction_type``; equal keys are not printed."""
    saved, current = _flatten(saved), _flatten(current)
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


def trim_log(path: str, step: int) -> None:
    """Keep the JSON lines of ``path`` whose ``"step"`` is at most ``step`` (a resumed run logs the steps after its
    checkpoint again; a fresh run keeps none). Atomic: a temporary file renamed over the old one."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def create_hub_repo(repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Create (or reuse) the model repo ``repo_id``; returns its full id (``user/name``). Call it before training,
    as diffusers' scripts do: no network or no token is then a ValueError at the start, not after hours."""
    import huggingface_hub

    try:
        return huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except Exception as e:  # noqa: BLE001: offline, no token, no write access... all mean "cannot push"
        raise ValueError(
            f"`--push_to_hub`: could not create or reach the Hub repo {repo_id!r} ({type(e).__name__}: {e}). "
            "Log in (`huggingface-cli login`) or pass `--hub_token`, check the network and `--hub_model_id`, "
            "or train without `--push_to_hub`."
        ) from e


def push_folder_to_hub(folder: str, repo_id: str, private: bool = False, token: Optional[str] = None,
                       commit_message: str = "Upload VE-trained diffusers pipeline"):
    """Create (or reuse) the model repo ``repo_id`` and upload ``folder`` (the saved pipeline and its card),
    leaving out checkpoints, logs and the lock file. Returns ``upload_folder``'s result."""
    import huggingface_hub

    repo_id = create_hub_repo(repo_id, private, token)
    return huggingface_hub.upload_folder(repo_id=repo_id, folder_path=folder, token=token,
                                         commit_message=commit_message, ignore_patterns=HUB_IGNORE_PATTERNS)
