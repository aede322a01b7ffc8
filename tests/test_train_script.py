"""training/train_ve.py end to end, on a tiny 8x8 UNet and the built-in digits: one process (in-process) and two
real gloo processes, exact resume after a kill, the Hub upload (intercepted), and clear errors on bad input."""

import importlib.util
import json
import logging
import os
import re
import signal
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


def run_group(cmd, timeout, **kw):
    """subprocess.run in its own process group: on timeout the whole group (launcher and every rank) is killed,
    so a hung rank cannot outlive the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tiny_rgb_config(tmp_path):
    cfg = json.loads((ROOT / "training" / "configs" / "unet_tiny.json").read_text())
    cfg.update(in_channels=3, out_channels=3)
    (tmp_path / "rgb.json").write_text(json.dumps(cfg))
    return str(tmp_path / "rgb.json")


def test_pipeline_saves_loads_samples_and_pushes(tmp_path, run, script, monkeypatch, caplog):
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
    assert "library_name: diffusers" in card and "reverse noise lambda = 0.5" in card
    assert 'from_pretrained("me/ve-digits")' in card and "| mixed precision | no |" in card  # resolved, not "default"
    assert f"{s['bits_per_dim']:.3f}" in card and "17 quantisation levels" in card and '"method": "elbo"' in card
    assert "pip install" in card and "portable_scheduler" in card  # an install line, and the no-import option
    assert "| VP-state schedulers" in card and "scale_model_input" in card and "**no**: blobs" in card
    sweep = np.asarray(Image.open(out / "samples_lambda_sweep.png"))
    gap, label = script.report.ROW_GAP, script.report.LABEL_WIDTH
    # 4 lambdas x 8 seeds, 8x8 digits at 64 px, a label column on the left
    assert gap > 0 and sweep.shape[:2] == (4 * 64 + 3 * gap, label + 8 * 64 + 7 * gap)
    for row in range(1, 4):  # a white band between lambda rows
        assert (sweep[row * (64 + gap) - gap: row * (64 + gap)] == 255).all()
    for col in range(1, 8):  # and between the tiles of a row
        assert (sweep[:, label + col * (64 + gap) - gap: label + col * (64 + gap)] == 255).all()
    assert (sweep[:64, :label] < 128).any()  # the row's label is written
    grid = np.asarray(Image.open(out / "samples.png"))  # 4 samples, 2 x 2, tiles apart
    assert grid.shape[:2] == (2 * 64 + gap, 2 * 64 + gap)
    assert (grid[64:64 + gap] == 255).all() and (grid[:, 64:64 + gap] == 255).all()
    # the saved folder loads through diffusers and samples
    import diffusers_ve  # noqa: F401  (registers VEScheduler)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.scheduler).__name__ == "VEScheduler" and pipe.scheduler.config.reverse_noise == 0.5
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the default from scratch
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (2, 8, 8, 1) and np.isfinite(img).all()
    # the folder records its data's levels: the likelihood pipeline, given nothing else, reproduces the run's figure
    from diffusers_ve import VELikelihoodPipeline, data as ve_data
    from diffusers_ve.likelihood import mean_bits_per_dim

    assert json.loads((out / "likelihood_data.json").read_text())["num_levels"] == 17
    x = ve_data.load_digits_images(8, "pad")
    held = x[ve_data.split_indices(len(x), 0.1, seed=0, min_held=script.MIN_HELD_OUT)[1]]
    lik = VELikelihoodPipeline.from_pretrained(str(out))
    lik.set_progress_bar_config(disable=True)
    again = lik(held, generator=torch.Generator().manual_seed(0), num_t_samples=8)
    assert mean_bits_per_dim(again.bits_per_dim, again.stderr_bits_per_dim)[0] == pytest.approx(s["bits_per_dim"], abs=1e-4)
    with pytest.warns(UserWarning, match="num_levels"):  # 17 uint8 levels called 256 levels
        lik(((held[:4] + 1) * 8).round().to(torch.uint8), num_levels=256, num_t_samples=2)
    # fine-tuning the saved folder: its architecture and its whole scheduler config carry over (a zero-SNR
    # table must stay zero-SNR: every timestep keeps meaning the same noise level); flags override
    source = dict(sched, rescale_betas_zero_snr=True, timestep_type="continuous", solver_order=1, rho=5.0,
                  sigma_schedule="log_t", clip_sample=True, prediction_type="epsilon")
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(source))
    with caplog.at_level(logging.WARNING, logger="train_ve"):
        s2 = run(tmp_path / "ft", "--pretrained_model_name_or_path", str(out), "--max_train_steps", "2",
                 "--checkpointing_steps", "2", "--prediction_type", "v_prediction")
    assert s2["step"] == 2
    assert any("--prediction_type v_prediction" in r.message and "epsilon" in r.message for r in caplog.records)
    ft = json.loads((tmp_path / "ft" / "scheduler" / "scheduler_config.json").read_text())
    kept = ("rescale_betas_zero_snr", "timestep_type", "solver_order", "rho", "sigma_schedule", "clip_sample",
            "reverse_noise")
    assert {k: ft[k] for k in kept} == {k: source[k] for k in kept} and ft["prediction_type"] == "v_prediction"
    from diffusers_ve.process import TimeAxis

    assert TimeAxis.from_config(ft).t_max > 1e7  # the zero-SNR table, not the plain linear one (t_max ~ 156)
    fp = script.ckpt.read_checkpoint_state(str(tmp_path / "ft" / "checkpoint-2"))["fingerprint"]
    assert fp["scheduler"]["rescale_betas_zero_snr"] is True and fp["scheduler"]["timestep_type"] == "continuous"
    card = (tmp_path / "ft" / "README.md").read_text()
    assert f'from_pretrained("{tmp_path / "ft"}")' in card  # the path, not "ft"
    # a bare UNet folder says nothing of its prediction type: diffusers' UNets (google/ddpm-*) predict epsilon
    run(tmp_path / "bare", "--pretrained_model_name_or_path", str(out / "unet"), "--max_train_steps", "1",
        "--checkpointing_steps", "1")
    assert json.loads((tmp_path / "bare" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert "base_model:" in card and "fine-tuned from" in card  # provenance of a fine-tune


@pytest.mark.parametrize("prediction, factor", [("epsilon", 0.5), ("v_prediction", 0.75)])
def test_loss_goes_down_on_digits(tmp_path, run, prediction, factor):
    """The logged loss is the eps-MSE for every prediction type; a v model's untrained output (v ~ 0) already
    gives a smaller eps-MSE (0.28 against 1), so its 60-step drop is smaller (to 0.17 measured)."""
    run(tmp_path, "--max_train_steps", "60", "--train_batch_size", "64", "--learning_rate", "3e-3",
        "--checkpointing_steps", "0", "--prediction_type", prediction)
    log = [r["loss"] for r in losses(tmp_path)]
    assert len(log) == 60 and np.isfinite(log).all()
    assert np.mean(log[-15:]) < factor * np.mean(log[:5]), (np.mean(log[:5]), np.mean(log[-15:]))


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
    assert [r["step"] for r in losses(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]  # logged up to the kill
    run(tmp_path / "b", *args, "--resume_from_checkpoint", "latest")
    log = losses(tmp_path / "b")  # cut back to checkpoint-3, then 4..8: no step twice
    assert [r["step"] for r in log] == list(range(1, 9))
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "b"))
    from safetensors.torch import load_file

    w = [load_file(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors") for d in ("a", "b")]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])


def test_two_processes(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [*accelerate_launch(2), str(SCRIPT), "--output_dir", str(tmp_path), *FAST,
           "--max_train_steps", "3", "--checkpointing_steps", "2"]
    res = run_group(cmd, 240, env=env, cwd=str(ROOT))
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
    with pytest.raises(ValueError, match=r"rgb/\d\.png: a colour image.*in_channels=1.*--model_config cifar"):
        run(tmp_path / "o5", "--train_data_dir", str(_rgb_folder(tmp_path / "rgb")), "--resolution", "8")
    with pytest.raises(ValueError, match="1-channel grey"):  # digits, 3-channel UNet
        run(tmp_path / "o6", "--model_config", _tiny_rgb_config(tmp_path))
    with pytest.raises(ValueError, match="--model_config"):
        run(tmp_path / "o7", "--model_config", "huge")
    bad = {"--max_train_steps": ("0", ">= 1"), "--num_epochs": ("0", ">= 1"), "--num_levels": ("1", ">= 2"),
           "--learning_rate": ("0", "> 0"), "--eval_fraction": ("1", r"in \[0, 1\)"),
           "--checkpointing_steps": ("-1", ">= 0"), "--ddpm_num_steps": ("1", ">= 2")}
    for flag, (value, allowed) in bad.items():
        with pytest.raises(ValueError, match=f"`{flag}` must be {allowed}; got"):
            run(tmp_path / "o8", flag, value)
    assert not any((tmp_path / f"o{i}" / "train_log.jsonl").exists() for i in range(1, 9))


def test_push_and_wandb_fail_before_training(tmp_path, run, monkeypatch):
    import accelerate.utils
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    with pytest.raises(ValueError, match=r"could not create.*me/x.*--hub_token"):
        run(tmp_path / "a", "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "me/x")
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ValueError, match="pip install wandb"):
        run(tmp_path / "b", "--max_train_steps", "1", "--logger", "wandb")
    assert not (tmp_path / "a" / "train_log.jsonl").exists() and not (tmp_path / "b").exists()


def test_rerun_into_an_earlier_run_is_refused(tmp_path, run, capsys):
    run(tmp_path / "new", "--max_train_steps", "1", "--checkpointing_steps", "0", "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr().out
    assert "no checkpoint" in printed and "starting fresh" in printed
    with pytest.raises(ValueError, match="earlier run.*a saved pipeline"):  # `latest` with nothing to resume
        run(tmp_path / "new", "--max_train_steps", "1", "--checkpointing_steps", "0", "--resume_from_checkpoint", "latest")
    out = tmp_path / "ve"
    run(out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    for extra in ([], ["--checkpointing_steps", "0"]):
        with pytest.raises(ValueError, match=r"earlier run.*checkpoints at steps \[2\].*--resume_from_checkpoint "
                                             r"latest.*--overwrite_output_dir"):
            run(out, "--max_train_steps", "4", *extra)
    assert [r["step"] for r in losses(out)] == [1, 2]
    # start over; the digits preset's length does not override --num_epochs: one epoch = 1617 // 256 steps
    s = run(out, "--overwrite_output_dir", "--num_epochs", "1", "--train_batch_size", "256", "--checkpointing_steps", "0")
    assert s["step"] == 1617 // 256 and [r["step"] for r in losses(out)] == list(range(1, 7))
    assert not (out / "checkpoint-2").exists()


def test_mixed_grey_and_colour_folder_trains_and_keeps_a_held_out_set(tmp_path, run, script):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):  # 40 images: eval_fraction 0.01 rounds to 0 held out
        shape, mode = ((10, 12), "L") if i % 2 else ((10, 12, 3), "RGB")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
    s = run(tmp_path / "out", "--train_data_dir", str(folder), "--model_config", _tiny_rgb_config(tmp_path),
            "--resolution", "8", "--train_batch_size", "8", "--max_train_steps", "1", "--final_eval",
            "--eval_batch_size", "1", "--num_inference_steps", "1", "--eval_num_t_samples", "2")
    assert s["step"] == 1 and s["num_images"] == script.MIN_HELD_OUT > 0 and np.isfinite(s["bits_per_dim"])
    s = run(tmp_path / "out0", "--train_data_dir", str(folder), "--model_config", _tiny_rgb_config(tmp_path),
            "--resolution", "8", "--train_batch_size", "8", "--max_train_steps", "1", "--eval_fraction", "0",
            "--final_eval", "--eval_batch_size", "1", "--num_inference_steps", "1")
    assert s["bits_per_dim_skipped"] == "no held-out images: --eval_fraction 0"


def test_help_shows_each_flag_once_with_its_default(script):
    parser = script.build_parser()
    fmt = parser._get_formatter()
    shown = [a for a in parser._actions if a.help != "==SUPPRESS==" and a.dest != "help"]
    assert all(a.help for a in shown), [a.dest for a in shown if not a.help]
    helps = {a.option_strings[0]: fmt._expand_help(a) for a in shown}
    assert "(default" not in helps["--no_final_eval"]  # a switch that turns it off is not "default: True"
    assert helps["--image_column"].count("default") == 1
    assert helps["--adam_beta1"].endswith("(default: 0.95)")
    text = parser.format_help()
    assert "presets" in text and "tiny, small" in text and "python training/train_ve.py" in text


def test_checkpoint_from_another_config_is_refused(tmp_path, run):
    run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    n = len(losses(tmp_path))
    with pytest.raises(ValueError, match="another training configuration") as e:
        run(tmp_path, "--max_train_steps", "4", "--prediction_type", "epsilon", "--resume_from_checkpoint", "latest")
    msg = str(e.value)  # the one key that differs, not both configs
    assert "(scheduler.prediction_type: checkpoint 'v_prediction' vs now 'epsilon')" in msg and len(msg) < 400, msg
    with pytest.raises(ValueError, match="loss_weighting: checkpoint 'ddpm' vs now 'edm'.*sigma_data"):
        run(tmp_path, "--max_train_steps", "4", "--loss_weighting", "edm", "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match="block_out_channels"):
        run(tmp_path, "--max_train_steps", "4", "--model_config", "small", "--resume_from_checkpoint", "latest")
    assert len(losses(tmp_path)) == n  # no training step ran


def test_uncoordinated_copies_are_refused(tmp_path, run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher started 2 copies, but they formed no process group
    with pytest.raises(ValueError, match="launched as 2 processes"):
        run(tmp_path, "--max_train_steps", "1")


def _last_checkpoint_loads(out):
    """The newest checkpoint of ``out`` holds finite weights that load into a UNet."""
    from diffusers_ve.checkpointing import list_checkpoints
    from safetensors.torch import load_file

    step = list_checkpoints(str(out))[-1]
    weights = load_file(out / f"checkpoint-{step}" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    return step


DIVERGE = ["--learning_rate", "1e6", "--lr_warmup_steps", "0", "--lr_scheduler", "constant", "--max_train_steps", "30",
           "--checkpointing_steps", "1", "--max_grad_norm", "0", "--final_eval"]


def test_divergence_stops_at_the_first_non_finite_step(tmp_path, run):
    with pytest.raises(ValueError, match=r"training diverged at step (\d+): the loss is .*--learning_rate.*"
                                         r"checkpoint-(\d+).*no pipeline, model card or metrics") as e:
        run(tmp_path, *DIVERGE)
    bad, last = (int(x) for x in re.search(r"step (\d+).*checkpoint-(\d+)", str(e.value)).groups())
    log = losses(tmp_path)
    assert bad == last + 1 == len(log) + 1 and np.isfinite([r["loss"] for r in log]).all()  # the first bad step
    assert _last_checkpoint_loads(tmp_path) == last
    assert not any((tmp_path / f).exists() for f in ("model_index.json", "unet", "metrics.json", "README.md"))


def test_errors_are_printed_once_under_two_processes(tmp_path):
    """A divergence under two processes: one `error:` line (the main process's), exit status 2, no traceback of ours
    (torch's launcher adds its own ChildFailedError report), and nothing saved from the broken weights."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    res = run_group([*accelerate_launch(2), str(SCRIPT), "--output_dir", str(tmp_path), *FAST, *DIVERGE], 240,
                    env=env, cwd=str(ROOT))
    lines = [line for line in res.stderr.splitlines() if "error" in line.lower() and "training diverged" in line]
    assert res.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: training diverged at step"), \
        res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr and "EveryRankError" not in res.stderr and "train_ve.py\", line" not in res.stderr
    assert not (tmp_path / "model_index.json").exists() and _last_checkpoint_loads(tmp_path) >= 1
