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
from diffusers_ve.data import ImageTransform
from diffusers_ve.evaluate import evaluate, main, open_data
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


def test_resume_after_a_kill_and_two_processes(setup, tmp_path, capsys):
    root, pipe, images = setup
    common = ["--model", str(root / "model"), "--data", str(root / "ds"), *ARGS]
    killed = run_cli([*common, "--output-dir", str(tmp_path / "r"), "--batch-size", "2", "--stop-after-blocks", "2"])
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert len(list((tmp_path / "r" / "parts").glob("part-*.npz"))) == 2
    assert not (tmp_path / "r" / "summary.json").exists()
    main([*common, "--output-dir", str(tmp_path / "r"), "--batch-size", "4"])  # resume, in this process
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
    capsys.readouterr()
    main([*common, "--output-dir", str(tmp_path / "two")])  # finished: prints the pipeline's full protocol
    printed = capsys.readouterr().out
    assert '"t_sampling"' in printed and '"dim": 64' in printed and '"num_decoder_samples": 8' in printed
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--output-dir", str(tmp_path / "two"), "--method", "ode"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error:" in err and "different protocol" in err and "Traceback" not in err


def cli_error(capsys, argv):
    """The exit status and stderr of ``main(argv)`` that must fail with one line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]  # (loading bars may precede it)
    assert len(lines) == 1 and "Traceback" not in err, err
    return exit_.value.code, lines[0]


def test_bad_input_is_one_line_and_levels_are_checked(setup, tmp_path, capsys):
    root, pipe, images = setup
    base = ["--model", str(root / "model"), "--data", str(root / "folder")]
    code, err = cli_error(capsys, [*base, "--output-dir", str(tmp_path / "a"), "--limit", "0"])
    assert code == 2 and "--limit must be >= 1" in err
    code, err = cli_error(capsys, [*base, "--output-dir", str(tmp_path / "b"), "--num-levels", "1"])
    assert code == 2 and "--num-levels" in err
    code, err = cli_error(capsys, ["--model", str(tmp_path / "nothing"), "--data", str(root / "folder"),
                                   "--output-dir", str(tmp_path / "c")])
    assert code == 2 and "--model" in err
    (tmp_path / "empty").mkdir()
    code, err = cli_error(capsys, [*base[:2], "--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "d")])
    assert code == 2 and "holds no images" in err
    # 17-level PNGs read as 8-bit: warned (bits/dim would be about 8.8 instead of 3.1)
    with pytest.warns(UserWarning, match="--num-levels 17"):
        main([*base, "--output-dir", str(tmp_path / "e"), "--num-t-samples", "2", "--limit", "2"])


def test_resolution_resizes_as_the_training_script(setup, tmp_path):
    """--resolution uses data.ImageTransform and keeps the levels: 4x4 PNGs, nearest-upsampled to the model's 8x8,
    give exactly the pipeline's numbers for the repeated images."""
    root, pipe, images = setup
    (tmp_path / "small").mkdir()
    for i, a in enumerate(images[:3, 0, ::2, ::2].numpy()):
        Image.fromarray(a).save(tmp_path / "small" / f"{i}.png")
    data = open_data(str(tmp_path / "small"), channels=1,
                     transform=ImageTransform(8, 1, center_crop=True, resample="nearest"))
    up = images[:3, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(torch.stack([data[i] for i in range(3)]), up)
    main(["--model", str(root / "model"), "--data", str(tmp_path / "small"), "--output-dir", str(tmp_path / "o"),
          "--resolution", "8", "--center_crop", "--resample", "nearest", *ARGS])
    got = np.load(tmp_path / "o" / "per_image.npz")["log_likelihood"]
    direct = pipe(up, method="elbo", num_t_samples=16, num_levels=17, seed=4, indices=range(3)).log_likelihood
    assert np.allclose(got, direct.numpy(), rtol=0, atol=1e-6)
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert (run["resolution"], run["center_crop"], run["resample"]) == (8, True, "nearest")
