"""A grid calibrated to the model: deterministic for a seed, saved with the scheduler, and better than the fixed
default on the Gaussian-mixture oracle at 5 calls."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from diffusers_ve import VEScheduler
from diffusers_ve.pipelines.pipeline_ve import portable_scheduler

from .gmm import MixtureUNet, image_mixture

MIX = image_mixture()
UNET = MixtureUNet.from_mixture(MIX)
FIT = dict(sample_shape=MIX.shape, num_draws=16, teacher_steps=60, max_evals=40, seed=3)


def _sample(sched, steps, x):
    sched.set_timesteps(steps)
    for tau in sched.timesteps:
        x = sched.step(UNET(x, tau).sample, tau, x).prev_sample
    return x


@pytest.fixture(scope="module")
def calibrated():
    sched = VEScheduler(reverse_noise=0.0)
    report = sched.calibrate(UNET, 5, **FIT)
    return sched, report


def test_calibration_is_deterministic_and_reports_its_cost(calibrated):
    sched, report = calibrated
    again = VEScheduler(reverse_noise=0.0).calibrate(UNET, 5, **FIT)
    assert again.t_grid == report.t_grid
    assert report.model_calls == 60 + 5 * (1 + 40) and report.seconds > 0
    assert report.error <= report.start_error
    sched.set_timesteps(5)
    assert sched._t_grid[:-1] == pytest.approx(report.t_grid, rel=1e-12) and sched._t_grid[0] == _grid_of(VEScheduler(), 5)[0]
    sched.set_timesteps(6)  # other budgets keep the sigma_schedule grid
    assert sched._t_grid[:-1] == _grid_of(VEScheduler(reverse_noise=0.0), 6)


def _grid_of(sched, n):
    sched.set_timesteps(n)
    return sched._t_grid[:-1]


def test_calibrated_grid_round_trips(calibrated, tmp_path):
    sched, report = calibrated
    sched.save_pretrained(tmp_path / "sched")
    loaded = VEScheduler.from_pretrained(tmp_path / "sched")
    assert _grid_of(loaded, 5) == _grid_of(sched, 5)
    DDPMPipeline(unet=UNET, scheduler=portable_scheduler(sched)).save_pretrained(tmp_path / "portable")
    config = json.loads((tmp_path / "portable" / "scheduler" / "scheduler_config.json").read_text())
    swapped = VEScheduler.from_config(DDPMScheduler.from_config(config).config)
    assert _grid_of(swapped, 5) == _grid_of(sched, 5)


def test_calibrated_grid_beats_the_default_at_5_calls(calibrated):
    """Compared with a 200-step ODE solution from the same noise, on draws the fit never saw."""
    sched, _ = calibrated
    x = torch.randn(2000, *MIX.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    ref = _sample(VEScheduler(reverse_noise=0.0, sigma_schedule="log_t"), 200, x)
    err = lambda s: (_sample(s, 5, x) - ref).flatten(1).norm(dim=1)  # noqa: E731
    e_cal, e_def = err(sched), err(VEScheduler(reverse_noise=0.0))
    diff = e_def - e_cal
    assert diff.mean() > 4 * diff.std() / len(diff) ** 0.5, (e_cal.mean(), e_def.mean())


@pytest.mark.parametrize("bad", [{"5": [1.0, 2.0, 0.5, 0.1, 0.01]}, {"3": [10.0, 1.0]}, {"x": [1.0]}, {"2": [1e9, 1.0]}])
def test_bad_calibrated_grids_are_clear_errors(bad):
    with pytest.raises(ValueError, match="calibrated_grids"):
        VEScheduler(calibrated_grids=bad)


def test_calibrate_checks_its_arguments():
    with pytest.raises(ValueError, match="num_inference_steps"):
        VEScheduler().calibrate(UNET, 1, sample_shape=MIX.shape)
    with pytest.raises(ValueError, match="num_draws"):
        VEScheduler().calibrate(UNET, 5, sample_shape=MIX.shape, num_draws=0)


# ------------------------------------------------------------------------------------------- window (lambda > 0)
@pytest.fixture(scope="module")
def windowed():
    sched = VEScheduler(reverse_noise=1.0)
    report = sched.calibrate(UNET, 5, **FIT)
    return sched, report


def test_window_is_fitted_for_lambda_above_0_deterministic_and_saved(windowed, tmp_path):
    sched, report = windowed
    w = report.window
    assert sched.config.reverse_noise_window == w.window and w.distance <= min(w.everywhere, w.nowhere)
    assert w.model_calls == 60 + 5 * (2 * 5 - 1) and w.seconds > 0
    again = VEScheduler(reverse_noise=1.0).calibrate(UNET, 5, **FIT)
    assert again.window.window == w.window
    sched.save_pretrained(tmp_path)
    assert VEScheduler.from_pretrained(tmp_path).window == tuple(w.window)
    assert VEScheduler(reverse_noise=0.0).calibrate(UNET, 5, **FIT).window is None  # lambda 0: no window to fit


def test_fitted_window_beats_noise_everywhere_and_nowhere_on_the_mixture(windowed):
    """Judged on draws the fit never saw, against exact population samples: the fitted window is closer to the
    population than lambda on every step and than lambda = 0 on the same grid (measured: 0.013 against 0.124 and
    0.091; the window's noise undoes the blur of the 5-call grid's last steps)."""
    from diffusers_ve.calibrate import energy_distance

    sched, _ = windowed
    x = torch.randn(3000, *MIX.shape, generator=torch.Generator().manual_seed(11))
    pop = MIX.sample(3000, generator=torch.Generator().manual_seed(12)).float()
    dist = lambda s: energy_distance(_sample(s, 5, x), pop)  # noqa: E731
    everywhere = VEScheduler.from_config(sched.config, reverse_noise_window=None)
    nowhere = VEScheduler.from_config(sched.config, reverse_noise=0.0)
    assert dist(sched) < 0.5 * min(dist(everywhere), dist(nowhere))


def test_energy_distance_is_exact_on_point_masses_and_zero_for_one_law():
    from diffusers_ve.calibrate import energy_distance

    a, b = torch.zeros(50, 1, 2, 2), torch.full((60, 1, 2, 2), 3.0)
    assert energy_distance(a + 0 * torch.randn_like(a), b) == pytest.approx(2 * 6.0)  # |a - b| = 3 * sqrt(4)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)
    assert abs(energy_distance(u, v)) < 0.01 < energy_distance(u, v + 0.5)


def test_window_fit_needs_reverse_noise():
    from diffusers_ve.calibrate import calibrate_window

    with pytest.raises(ValueError, match="reverse_noise"):
        calibrate_window(VEScheduler(reverse_noise=0.0), UNET, 5, sample_shape=MIX.shape)
