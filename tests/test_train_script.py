"""training/train_ve.py end to end, on a tiny 8x8 UNet and the built-in digits: one process (in-process) and two
real gloo processes, exact resume after a kill, the Hub upload (intercepted), and clear errors on bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from .launch import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_ve.py"
FAST = ["--model_config", "tiny", "--logger", "none", "--no_final_eval", "--save_images_epochs", "0",
        "--train_batch_size", "32", "--lr_warmup_steps", "2"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_ve", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def run(script):
    """Call the script's main() in this process, with a fresh accelerate state each time."""
    from accelerate.state import AcceleratorState, GradientState

    def _run(out, *argv):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return script.main(["--output_dir", str(out), *FAST, *argv])

    yield _run
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def losses(out):
    return [json.loads(line) for line in Path(out, "train_log.jsonl").read_text().splitlines()]


def test_pipeline_saves_loads_samples_and_pushes(tmp_path, run, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    pushed = {}

    def fake_create_repo(repo_id, **kw):
        pushed["create"] = dict(repo_id=repo_id, **kw)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(*, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kw):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        pushed["files"] = set(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        pushed["folder"] = folder_path

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    out = tmp_path / "ve"
    s = run(out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--eval_batch_size", "4",
            "--num_inference_steps", "4", "--reverse_noise", "0.5", "--eval_num_t_samples", "8", "--push_to_hub", "--hub_model_id", "me/ve-digits",
            "--hub_private_repo", "--final_eval")
    assert s["step"] == 3 and s["world_size"] == 1
    assert s["num_levels"] == 17 and s["num_images"] == 180 and s["protocol"]["num_levels"] == 17
    assert 0 < s["bits_per_dim"] < 30 and s["bits_per_dim_se"] > 0
    assert pushed["create"]["repo_id"] == "me/ve-digits" and pushed["create"]["private"] is True
    files = pushed["files"]
    assert {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "README.md"} <= files
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert not any(f.startswith(("checkpoint-", "logs/", ".train_ve")) for f in files)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["scheduler"][1] == "VEScheduler"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "VEScheduler" and sched["reverse_noise"] == 0.5 and "solver_order" in sched
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "reverse noise lambda = 0.5" in card and "from_pretrained" in card
    assert f"{s['bits_per_dim']:.3f}" in card and "17 quantisation levels" in card and '"method": "elbo"' in card
    sweep = Image.open(out / "samples_lambda_sweep.png")
    assert sweep.size == (8 * 64, 4 * 64)  # 4 lambdas x 8 seeds, 8x8 digits shown at 64 px
    # the saved folder loads through diffusers and samples
    import diffusers_ve  # noqa: F401  (registers VEScheduler)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.scheduler).__name__ == "VEScheduler" and pipe.scheduler.config.reverse_noise == 0.5
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (2, 8, 8, 1) and np.isfinite(img).all()
    # fine-tuning the saved folder: its architecture, beta table, prediction type and lambda carry over
    s2 = run(tmp_path / "ft", "--pretrained_model_name_or_path", str(out), "--max_train_steps", "2")
    assert s2["step"] == 2
    assert json.loads((tmp_path / "ft" / "scheduler" / "scheduler_config.json").read_text())["reverse_noise"] == 0.5


def test_loss_goes_down_on_digits(tmp_path, run):
    run(tmp_path, "--max_train_steps", "60", "--train_batch_size", "64", "--learning_rate", "3e-3",
        "--checkpointing_steps", "0")
    log = [r["loss"] for r in losses(tmp_path)]
    assert len(log) == 60 and np.isfinite(log).all()
    assert np.mean(log[-15:]) < 0.5 * np.mean(log[:5]), (np.mean(log[:5]), np.mean(log[-15:]))


def test_resume_after_kill_equals_uninterrupted(tmp_path, run, script, monkeypatch):
    """Kill mid-save of checkpoint-6 (after checkpoint-3), resume `latest`: the same losses and weights as an
    uninterrupted run (EMA, cosine lr, random flips, 2-step accumulation, an epoch boundary at step 6)."""
    args = ["--max_train_steps", "8", "--checkpointing_steps", "3", "--train_batch_size", "128",
            "--gradient_accumulation_steps", "2", "--random_flip", "--loss_weighting", "likelihood"]
    run(tmp_path / "a", *args)
    ref = losses(tmp_path / "a")

    commit = script.ckpt.commit_checkpoint

    def killed(tmp, final, state):
        if final.endswith("checkpoint-6"):
            raise KeyboardInterrupt("killed mid-save")
        return commit(tmp, final, state)

    monkeypatch.setattr(script.ckpt, "commit_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *args)
    monkeypatch.setattr(script.ckpt, "commit_checkpoint", commit)
    assert script.ckpt.list_checkpoints(str(tmp_path / "b")) == [3]
    assert any(".tmp-" in n for n in os.listdir(tmp_path / "b"))  # the partial save is there, and ignored
    run(tmp_path / "b", *args, "--resume_from_checkpoint", "latest")
    resumed = losses(tmp_path / "b")[-5:]
    assert [r["step"] for r in resumed] == [4, 5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref[3:]]
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "b"))
    from safetensors.torch import load_file

    w = [load_file(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors") for d in ("a", "b")]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])


def test_two_processes(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [*accelerate_launch(2), str(SCRIPT), "--output_dir", str(tmp_path), *FAST,
           "--max_train_steps", "3", "--checkpointing_steps", "2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2 (MULTI_CPU" in res.stdout and "world size 2)" in res.stdout, res.stdout
    ckpt = tmp_path / "checkpoint-2"
    for r in (0, 1):  # every rank's RNG states, not only rank 0's
        assert (ckpt / f"objective_rng_{r}.pt").is_file() and (ckpt / f"random_states_{r}.pkl").is_file()
    g = [torch.load(ckpt / f"objective_rng_{r}.pt") for r in (0, 1)]
    assert not torch.equal(g[0], g[1])
    assert [r["step"] for r in losses(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def _rgb_folder(path, n=4):
    path.mkdir()
    for i in range(n):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8), "RGB").save(path / f"{i}.png")
    return path


def test_bad_input_fails_before_training(tmp_path, run):
    with pytest.raises(ValueError, match="train_data_dir"):
        run(tmp_path / "o1", "--train_data_dir", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        run(tmp_path / "o2", "--train_data_dir", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="one data source"):
        run(tmp_path / "o3", "--train_data_dir", "x", "--dataset_name", "y")
    with pytest.raises(ValueError, match="multiple of 2"):
        run(tmp_path / "o4", "--resolution", "9")
    with pytest.raises(ValueError, match="in_channels=1"):  # RGB images, 1-channel UNet
        run(tmp_path / "o5", "--train_data_dir", str(_rgb_folder(tmp_path / "rgb")), "--resolution", "8")
    cfg = json.loads((ROOT / "training" / "configs" / "unet_tiny.json").read_text())
    cfg.update(in_channels=3, out_channels=3)
    (tmp_path / "rgb.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="1-channel grey"):  # digits, 3-channel UNet
        run(tmp_path / "o6", "--model_config", str(tmp_path / "rgb.json"))
    with pytest.raises(ValueError, match="--model_config"):
        run(tmp_path / "o7", "--model_config", "huge")
    assert not any((tmp_path / f"o{i}" / "train_log.jsonl").exists() for i in range(1, 8))


def test_checkpoint_from_another_config_is_refused(tmp_path, run):
    run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    n = len(losses(tmp_path))
    with pytest.raises(ValueError, match="another training configuration.*prediction_type"):
        run(tmp_path, "--max_train_steps", "4", "--prediction_type", "v_prediction", "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match="block_out_channels"):
        run(tmp_path, "--max_train_steps", "4", "--model_config", "small", "--resume_from_checkpoint", "latest")
    assert len(losses(tmp_path)) == n  # no training step ran


def test_uncoordinated_copies_are_refused(tmp_path, run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher started 2 copies, but they formed no process group
    with pytest.raises(ValueError, match="launched as 2 processes"):
        run(tmp_path, "--max_train_steps", "1")
