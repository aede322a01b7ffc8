"""Configs users bring (Hub scheduler_config.json files, saved copies), training helpers and bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from diffusers_ve import VEScheduler

FIXTURES = Path(__file__).parent / "fixtures"
HUB = {  # file -> (prediction type, t_max of the table, clip_sample)
    "ddpm-cifar10-32.json": ("epsilon", 2.4777e4, True),
    "stable-diffusion-v1-5.json": ("epsilon", 213.6, False),
    "stable-diffusion-2-1.json": ("v_prediction", 213.6, False),
}


def _hub_config(name):
    return json.loads((FIXTURES / name).read_text())


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_configs_load_into_the_right_table_and_grid(name):
    cfg = _hub_config(name)
    ptype, t_max, clip = HUB[name]
    sched = VEScheduler.from_config(cfg)
    sched = VEScheduler.from_config(cfg, t_max=sched.family.t_max)  # the whole table (the default stops at t = 625)
    assert sched.config.prediction_type == ptype and sched.config.clip_sample == clip
    abar = DDPMScheduler.from_config(cfg).alphas_cumprod.double()
    np.testing.assert_allclose(sched.family.alphas_cumprod.numpy(), abar.numpy(), rtol=2e-5)
    assert sched.family.t_max == pytest.approx(t_max, rel=1e-3)
    sched.set_timesteps(10)
    assert sched.timesteps[0].item() == pytest.approx(999.0) and len(sched.timesteps) == 10
    assert (sched.timesteps.diff() < 0).all() and sched.timesteps[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert sched.sigmas[-1] == 0 and sched.sigmas[0].item() == pytest.approx(math.sqrt(t_max), rel=1e-3)
    ddpm_grid = VEScheduler.from_config(cfg, sigma_schedule="ddpm")
    ddpm_grid.set_timesteps(10)
    offset = cfg.get("steps_offset", 0)
    np.testing.assert_array_equal(ddpm_grid.timesteps.numpy(), np.arange(900, -1, -100) + offset)


@pytest.mark.parametrize("schedule", ["karras", "log_t", "ddpm"])
def test_in_memory_and_saved_configs_give_the_same_timesteps(tmp_path, schedule):
    ddpm = DDPMScheduler(timestep_spacing="trailing")
    live = VEScheduler.from_config(ddpm.config, sigma_schedule=schedule, reverse_noise=0.3)
    ddpm.save_config(tmp_path / "ddpm")
    from_ddpm_file = VEScheduler.from_config(VEScheduler.load_config(tmp_path / "ddpm"), sigma_schedule=schedule,
                                             reverse_noise=0.3)
    live.save_config(tmp_path / "ve")
    reloaded = VEScheduler.from_pretrained(tmp_path / "ve")
    assert reloaded.config.reverse_noise == 0.3 and reloaded.config.sigma_schedule == schedule
    grids = []
    for sched in (live, from_ddpm_file, reloaded):
        sched.set_timesteps(13)
        grids.append(sched.timesteps)
    torch.testing.assert_close(grids[1], grids[0], rtol=0, atol=0)
    torch.testing.assert_close(grids[2], grids[0], rtol=0, atol=0)


@pytest.mark.parametrize("tau", [0, 17, 250.5, 999, 10.25])
def test_add_noise_and_velocity_at_integer_and_float_timesteps(tau):
    ddpm = DDPMScheduler()
    ve = VEScheduler.from_config(ddpm.config)
    ve.set_timesteps(3)  # inference state must not matter
    g = torch.Generator().manual_seed(0)
    y, eps = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    taus = torch.tensor([tau, tau])
    if float(tau).is_integer():
        k = taus.long()
        torch.testing.assert_close(ve.add_noise(y, eps, k), ddpm.add_noise(y, eps, k), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ve.get_velocity(y, eps, k), ddpm.get_velocity(y, eps, k), atol=1e-5, rtol=1e-5)
    else:  # between table entries: abar interpolated in ln t, so it lies between its neighbours' values
        x = ve.add_noise(y, eps, taus)
        lo, hi = ddpm.add_noise(y, eps, taus.floor().long()), ddpm.add_noise(y, eps, taus.ceil().long())
        assert ((x - torch.minimum(lo, hi)) >= -1e-6).all() and ((torch.maximum(lo, hi) - x) >= -1e-6).all()


def test_learned_variance_output_is_split():
    sched = VEScheduler(variance_type="learned_range", reverse_noise=0.0)
    sched.set_timesteps(2)
    x = torch.randn(1, 3, 4, 4)
    out = torch.randn(1, 6, 4, 4)
    a = sched.step(out, sched.timesteps[0], x).prev_sample
    sched.set_timesteps(2)
    b = sched.step(out[:, :3], sched.timesteps[0], x).prev_sample
    torch.testing.assert_close(a, b)
    plain = VEScheduler()
    plain.set_timesteps(2)
    with pytest.raises(ValueError, match="variance_type"):
        plain.step(out, plain.timesteps[0], x)


def test_clip_sample_applies_to_yhat():
    sched = VEScheduler(clip_sample=True, clip_sample_range=0.5, prediction_type="sample")
    sched.set_timesteps(3)
    out = sched.step(torch.full((1, 1, 2, 2), 3.0), sched.timesteps[0], torch.zeros(1, 1, 2, 2))
    assert out.pred_original_sample.max().item() == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_reverse_noise(bad):
    with pytest.raises(ValueError, match="reverse_noise"):
        VEScheduler.from_config(DDPMScheduler().config, reverse_noise=bad)


@pytest.mark.parametrize("key,value", [
    ("prediction_type", "flow"), ("sigma_schedule", "cosine"), ("timestep_spacing", "middle"),
    ("variance_type", "huge"), ("final_sigmas_type", "one"), ("timestep_type", "fuzzy"), ("beta_schedule", "cos"),
    ("solver_order", 3), ("rho", -1.0), ("reverse_noise_window", [2.0, 1.0]),
])
def test_bad_config_values_name_the_argument(key, value):
    with pytest.raises(ValueError, match=key):
        VEScheduler(**{key: value})


@pytest.mark.parametrize("t_min,t_max", [(1.0, 1.0), (2.0, 1.0), (1e-6, 10.0), (1.0, 1e6)])
def test_bad_t_range(t_min, t_max):
    with pytest.raises(ValueError, match="t_min"):
        VEScheduler(t_min=t_min, t_max=t_max)


def test_flow_matching_config_is_read_as_a_flow_and_a_consistency_config_refused_by_name():
    assert VEScheduler.from_config(FlowMatchEulerDiscreteScheduler().config).config.model_family == "flow"
    with pytest.raises(ValueError, match="LCMScheduler.*consistency"):
        VEScheduler.from_config(LCMScheduler().config)


def test_step_errors():
    sched = VEScheduler()
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="not in the schedule"):
        sched.step(x, 123.0, x)
    with pytest.raises(ValueError, match="non-finite"):
        sched.step(torch.full_like(x, float("nan")), sched.timesteps[0], x)
    with pytest.raises(ValueError, match="reverse_noise"):
        sched.step(x, sched.timesteps[0], x, eta=0.3)
    with pytest.raises(TypeError, match="frobnicate"):
        sched.step(x, sched.timesteps[0], x, frobnicate=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(sigmas=[1.0, 2.0]), "sigmas"),
    (dict(sigmas=[1e4, 1.0]), "sigmas"),
    (dict(timesteps=[10, 20]), "timesteps"),
    (dict(timesteps=[1500, 20]), "timesteps"),
])
def test_bad_set_timesteps(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VEScheduler().set_timesteps(**kwargs)


def test_custom_sigmas_and_timesteps():
    sched = VEScheduler(reverse_noise=0.0)
    sched.set_timesteps(sigmas=[100.0, 10.0, 1.0, 0.1, 0.0])
    assert len(sched.timesteps) == 4 and sched.sigmas[-1] == 0
    torch.testing.assert_close(sched.sigmas[:4].double(), torch.tensor([100.0, 10.0, 1.0, 0.1], dtype=torch.float64))
    sched.set_timesteps(timesteps=[999, 500.5, 3])
    torch.testing.assert_close(sched.timesteps, torch.tensor([999, 500.5, 3]))
    assert len(sched) == 1000 and sched.init_noise_sigma == 1.0


def test_dynamic_thresholding_matches_ddpm():
    kw = dict(thresholding=True, sample_max_value=3.0, prediction_type="sample", clip_sample=False)
    sched = VEScheduler(**kw)
    sched.set_timesteps(3)
    ddpm = DDPMScheduler(**kw)
    ddpm.set_timesteps(1000)
    yhat = torch.linspace(-5, 5, 16).reshape(1, 1, 4, 4)
    ours = sched.step(yhat, sched.timesteps[0], torch.zeros(1, 1, 4, 4)).pred_original_sample
    theirs = ddpm.step(yhat, 999, torch.zeros(1, 1, 4, 4)).pred_original_sample
    torch.testing.assert_close(ours, theirs)
    assert ours.abs().max() <= 1 + 1e-6 and not torch.allclose(ours, yhat)


def test_register_to_config_changes_the_sampler_not_only_the_config():
    """The saved lambda is the lambda that samples: reverse_noise is read from the config at every step."""
    x = torch.randn(1, 1, 2, 2)
    runs = {}
    for lam0 in (0.0, 0.5):
        sched = VEScheduler(reverse_noise=lam0, solver_order=1)
        if lam0 == 0.0:
            sched.register_to_config(reverse_noise=0.5)
        assert sched.reverse_noise == 0.5
        sched.set_timesteps(3)
        runs[lam0] = sched.step(torch.zeros_like(x), sched.timesteps[0], x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(runs[0.0], runs[0.5], rtol=0, atol=0)


def test_from_config_rejects_misspelt_keys():
    with pytest.raises(TypeError, match="did you mean 'reverse_noise'"):
        VEScheduler.from_config(DDPMScheduler().config, revers_noise=0.5)
    with pytest.raises(TypeError, match="eta"):
        VEScheduler.from_config(DDPMScheduler().config, eta=0.5)


@pytest.mark.parametrize("bad", [True, "0.5"])
def test_reverse_noise_must_be_a_real_number(bad):
    with pytest.raises(ValueError, match="reverse_noise"):
        VEScheduler(reverse_noise=bad)
