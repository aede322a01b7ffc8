"""``python -m diffusers_ve.evaluate``: sharding, resume after a kill, and 1 vs 2 processes (gloo on CPU)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_ve
from diffusers_ve.evaluate import evaluate, open_data
from diffusers_ve.mixture import MixtureUNet, digits_mixture

from .launch import accelerate_launch

N = 10
ARGS = ["--num-levels", "17", "--num-t-samples", "16", "--seed", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("evaluate")
    sch = diffusers_ve.VEScheduler()
    pipe = diffusers_ve.VELikelihoodPipeline(unet=MixtureUNet.from_mixture(digits_mixture(), sch.config), scheduler=sch)
    pipe.save_pretrained(root / "model")
    images = load_digits().images[:N].astype(np.uint8)  # 17 levels, 0..16
    (root / "folder").mkdir()
    for i, a in enumerate(images):
        Image.fromarray(a).save(root / "folder" / f"{i:03d}.png")
    import datasets

    datasets.Dataset.from_dict({"image": images.tolist()}).save_to_disk(str(root / "ds"))
    return root, pipe, torch.as_tensor(images)[:, None]


def run_cli(args, launcher=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")
    cmd = [*launcher, "-m", "diffusers_ve.evaluate", *args] if launcher else [sys.executable, "-m",
                                                                              "diffusers_ve.evaluate", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_in_process_matches_the_pipeline_and_loaders_agree(setup, tmp_path):
    root, pipe, images = setup
    data = open_data(str(root / "folder"), channels=1)
    assert torch.equal(torch.stack([data[i] for i in range(N)]), images)
    assert torch.equal(open_data(str(root / "ds"))[3], images[3])
    summary = evaluate(pipe, data, str(tmp_path / "a"), batch_size=3, seed=4, method="elbo", num_t_samples=16,
                       num_levels=17)
    direct = pipe(images, method="elbo", num_t_samples=16, num_levels=17, seed=4, indices=range(N))
    saved = np.load(tmp_path / "a" / "per_image.npz")
    assert np.allclose(saved["log_likelihood"], direct.log_likelihood.numpy(), rtol=0, atol=1e-6)
    assert summary["num_images"] == N and summary["bits_per_dim"] == pytest.approx(float(direct.bits_per_dim.mean()))
    assert summary["protocol"]["num_levels"] == 17 and summary["num_processes"] == 1


def test_resume_after_a_kill_and_two_processes(setup, tmp_path):
    root, pipe, images = setup
    common = ["--model", str(root / "model"), "--data", str(root / "ds"), *ARGS]
    killed = run_cli([*common, "--output-dir", str(tmp_path / "r"), "--batch-size", "2", "--stop-after-blocks", "2"])
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert len(list((tmp_path / "r" / "parts").glob("part-*.npz"))) == 2
    assert not (tmp_path / "r" / "summary.json").exists()
    resumed = run_cli([*common, "--output-dir", str(tmp_path / "r"), "--batch-size", "4"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    launcher = accelerate_launch(2)
    two = run_cli([*common, "--output-dir", str(tmp_path / "two"), "--batch-size", "3"], launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["num_processes"] == 2  # a real 2-process run, not one process in disguise
    direct = pipe(images, method="elbo", num_t_samples=16, num_levels=17, seed=4, indices=range(N)).log_likelihood
    for out in ("r", "two"):
        got = np.load(tmp_path / out / "per_image.npz")
        assert got["index"].tolist() == list(range(N))
        assert np.allclose(got["log_likelihood"], direct.numpy(), rtol=0, atol=1e-6)
    rerun = run_cli([*common, "--output-dir", str(tmp_path / "two"), "--method", "ode"])
    assert rerun.returncode != 0 and "different protocol" in rerun.stderr
