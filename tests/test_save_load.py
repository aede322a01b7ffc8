"""The three ways a user shares a model, each saved, loaded and checked to reproduce the same images."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

import diffusers_ve
from diffusers_ve import VEHeunScheduler, VEPipeline, VEScheduler
from diffusers_ve.pipelines.pipeline_ve import portable_scheduler

from .tiny_sd import tiny_unet

VE_SETTINGS = dict(reverse_noise=0.7, sigma_schedule="log_t", final_sigmas_type="sigma_min", t_min=1e-3, t_max=50.0)


def _images(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return pipe(**kw).images


def _ve_keys(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("scheduler", [VEScheduler(solver_order=1, **VE_SETTINGS), VEHeunScheduler(**VE_SETTINGS)])
def test_ve_pipeline_folder(tmp_path, scheduler):
    """Path 1: our pipeline class; loaded with ``diffusers_ve.VEPipeline.from_pretrained``."""
    pipe = VEPipeline(tiny_unet(), scheduler)
    before = _images(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "VEPipeline"
    assert index["scheduler"] == [type(scheduler).__module__, type(scheduler).__name__]  # a frozen module path
    loaded = VEPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is type(scheduler) and _ve_keys(loaded.scheduler.config) == _ve_keys(scheduler.config)
    torch.testing.assert_close(_images(loaded), before, rtol=0, atol=0)


@pytest.mark.parametrize("scheduler_cls", [VEScheduler, VEHeunScheduler])
def test_diffusers_pipeline_folder_with_our_scheduler(tmp_path, scheduler_cls):
    """Path 2: a DDPMPipeline folder whose scheduler is ours; ``DiffusionPipeline.from_pretrained`` after the import."""
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=scheduler_cls(**VE_SETTINGS))
    pipe.set_progress_bar_config(disable=True)
    before = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, DDPMPipeline) and type(loaded.scheduler) is scheduler_cls
    assert _ve_keys(loaded.scheduler.config) == _ve_keys(pipe.scheduler.config)
    loaded.set_progress_bar_config(disable=True)
    after = loaded(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(after.images, before.images, rtol=0, atol=0)


_PLAIN_DIFFUSERS = textwrap.dedent(
    """
    import json, sys
    sys.modules["diffusers_ve"] = None  # as if it were not installed: any import of it fails
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
    portable, ours = sys.argv[1:]
    pipe = DiffusionPipeline.from_pretrained(portable)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=3, output_type="np").images
    try:  # a folder naming our scheduler: diffusers cannot resolve it, even with the scheduler passed in
        DiffusionPipeline.from_pretrained(ours, scheduler=DDPMScheduler())
        refused = False
    except (ValueError, ImportError):  # diffusers >= 0.31 says ValueError, 0.30 fails on the import
        refused = True
    parts = DDPMPipeline(unet=UNet2DModel.from_pretrained(ours, subfolder="unet"),
                         scheduler=DDPMScheduler.from_pretrained(ours, subfolder="scheduler"))
    parts.set_progress_bar_config(disable=True)
    by_parts = parts(batch_size=1, num_inference_steps=3, output_type="np").images
    print(json.dumps(dict(cls=type(pipe).__name__, scheduler=type(pipe.scheduler).__name__,
                          config=dict(pipe.scheduler.config), finite=bool(abs(images).max() <= 1),
                          refused=refused, by_parts=bool(abs(by_parts).max() <= 1))))
    """
)


def test_portable_folder(tmp_path):
    """Path 3: a DDPMPipeline folder with a DDPMScheduler config that carries our keys. Plain diffusers (no
    diffusers-ve) loads and samples it as DDPM; ``VEScheduler.from_config`` restores our sampler exactly."""
    ve = VEScheduler(solver_order=1, **VE_SETTINGS)
    reference = VEPipeline(tiny_unet(), ve)
    before = _images(reference)
    DDPMPipeline(unet=reference.unet, scheduler=portable_scheduler(ve)).save_pretrained(tmp_path / "portable")
    config = json.loads((tmp_path / "portable" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDPMScheduler"
    DDPMPipeline(unet=reference.unet, scheduler=ve).save_pretrained(tmp_path / "ours")  # path 2, for comparison

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", _PLAIN_DIFFUSERS, str(tmp_path / "portable"), str(tmp_path / "ours")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    plain = json.loads(run.stdout.strip().splitlines()[-1])
    assert (plain["cls"], plain["scheduler"], plain["finite"]) == ("DDPMPipeline", "DDPMScheduler", True)
    assert plain["config"]["reverse_noise"] == 0.7 and plain["config"]["sigma_schedule"] == "log_t"
    assert plain["refused"] and plain["by_parts"]  # path 2 without diffusers-ve: only part by part

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "portable")
    assert type(pipe.scheduler) is DDPMScheduler
    restored = VEScheduler.from_config(pipe.scheduler.config)
    assert _ve_keys(restored.config) == _ve_keys(ve.config)
    torch.testing.assert_close(_images(VEPipeline(pipe.unet, restored)), before, rtol=0, atol=0)
    heun = VEHeunScheduler.from_config(pipe.scheduler.config)  # the same folder serves the Heun sampler
    assert heun.config.reverse_noise == 0.7 and heun.config.t_max == 50.0


def test_why_portable_scheduler_writes_every_key(tmp_path):
    """The shortcut ``DDPMScheduler.from_config(ve.config)`` leaves out the keys we left at their defaults, and the
    saved folder then gets *DDPMScheduler's* defaults for them: clipping comes back switched on."""
    ve = VEScheduler(reverse_noise=0.3)
    DDPMScheduler.from_config(ve.config).save_pretrained(tmp_path / "shortcut")
    portable_scheduler(ve).save_pretrained(tmp_path / "portable")
    shortcut = VEScheduler.from_pretrained(tmp_path / "shortcut")
    assert shortcut.config.clip_sample != ve.config.clip_sample
    assert _ve_keys(VEScheduler.from_pretrained(tmp_path / "portable").config) == _ve_keys(ve.config)
    with pytest.raises(ValueError, match="scheduler"):
        portable_scheduler(DDPMScheduler())


@pytest.mark.parametrize("scheduler", [VEScheduler(**VE_SETTINGS), VEHeunScheduler(**VE_SETTINGS)])
def test_scheduler_folder_round_trip(tmp_path, scheduler):
    scheduler.save_pretrained(tmp_path)
    loaded = type(scheduler).from_pretrained(tmp_path)
    assert _ve_keys(loaded.config) == _ve_keys(scheduler.config)
    loaded.set_timesteps(5)
    scheduler.set_timesteps(5)
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps, rtol=0, atol=0)


def test_saveable_classes_are_exported_from_their_frozen_modules():
    """diffusers imports the module named in model_index.json and looks the class up there."""
    for cls, module in [
        (VEScheduler, "diffusers_ve.schedulers.scheduling_ve"),
        (VEHeunScheduler, "diffusers_ve.schedulers.scheduling_ve_heun"),
        (VEPipeline, "diffusers_ve.pipelines.pipeline_ve"),
    ]:
        assert cls.__module__ == module and getattr(diffusers_ve, cls.__name__) is cls
