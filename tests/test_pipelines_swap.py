"""VEScheduler swapped into the diffusers pipelines users already have (tiny random models, offline)."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from diffusers_ve import VEScheduler

from .tiny_sd import prompt_embeds, tiny_sd_components, tiny_unet


class _Bar:
    """Stands in for tqdm and counts what a pipeline's progress bar counts."""

    def __init__(self, iterable=None, total=None):
        self.iterable, self.total, self.n = iterable, total, 0

    def __iter__(self):
        for item in self.iterable:
            self.n += 1
            yield item

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.n += n


def _count_progress(pipe):
    bars = []

    def progress_bar(iterable=None, total=None):
        bars.append(_Bar(iterable, total))
        return bars[-1]

    pipe.progress_bar = progress_bar
    return bars


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_ddpm_pipeline_swap(ptype):
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(prediction_type=ptype))
    pipe.scheduler = VEScheduler.from_config(pipe.scheduler.config, reverse_noise=0.5)
    assert pipe.scheduler.config.prediction_type == ptype and pipe.scheduler.reverse_noise == 0.5
    bars = _count_progress(pipe)
    run = lambda: pipe(batch_size=2, num_inference_steps=7, generator=torch.Generator().manual_seed(0), output_type="np").images  # noqa: E731
    a, b = run(), run()
    assert a.shape == (2, 8, 8, 1) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert bars[0].n == 7
    c = pipe(batch_size=2, num_inference_steps=7, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert not np.allclose(a, c)


def test_generator_list_gives_per_image_reproducibility():
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=VEScheduler(reverse_noise=1.0))
    pipe.set_progress_bar_config(disable=True)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    two = pipe(batch_size=2, num_inference_steps=4, generator=gens([3, 4]), output_type="np").images
    one = pipe(batch_size=1, num_inference_steps=4, generator=gens([4]), output_type="np").images
    np.testing.assert_allclose(two[1], one[0], atol=1e-5)  # float32 batch-size rounding


def test_ddim_pipeline_swapped_after_construction():
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler())
    pipe.scheduler = VEScheduler.from_config(pipe.scheduler.config, reverse_noise=0.0)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=1, num_inference_steps=5, eta=0.0, use_clipped_model_output=True, output_type="np")
    assert np.isfinite(out.images).all()
    with pytest.raises(ValueError, match="reverse_noise"):
        pipe(batch_size=1, num_inference_steps=5, eta=0.5, output_type="np")


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_stable_diffusion_txt2img(sd_parts, ptype):
    parts = dict(sd_parts)
    parts["scheduler"] = parts["scheduler"].__class__.from_config(parts["scheduler"].config, prediction_type=ptype)
    pipe = StableDiffusionPipeline(**parts)
    pipe.scheduler = VEScheduler.from_config(pipe.scheduler.config, reverse_noise=0.5)
    bars = _count_progress(pipe)
    pe, ne = prompt_embeds()
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=4, height=16, width=16)
    a = pipe(**kw, output_type="np", generator=torch.Generator().manual_seed(0)).images
    b = pipe(**kw, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (1, 16, 16, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert bars[0].total == 4 and bars[0].n == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stable_diffusion_keeps_half_dtypes(tmp_path, dtype):
    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_path)).to(dtype=dtype)
    pipe.scheduler = VEScheduler.from_config(pipe.scheduler.config, reverse_noise=1.0)
    pipe.set_progress_bar_config(disable=True)
    pe, ne = prompt_embeds()
    lat = pipe(prompt_embeds=pe.to(dtype), negative_prompt_embeds=ne.to(dtype), num_inference_steps=3, height=16,
               width=16, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert lat.dtype == dtype and torch.isfinite(lat.float()).all()


def test_stable_diffusion_img2img(sd_parts):
    pipe = StableDiffusionImg2ImgPipeline(**sd_parts)
    pipe.scheduler = VEScheduler.from_config(pipe.scheduler.config, reverse_noise=0.5)
    bars = _count_progress(pipe)
    image = torch.rand(1, 3, 16, 16)
    pe, ne = prompt_embeds()
    out = pipe(image=image, strength=0.5, prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=8,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(out).all() and out.shape == (1, 16, 16, 3)
    assert pipe.scheduler.begin_index == 4 and bars[0].n == 4
    assert pipe.scheduler.step_index == len(pipe.scheduler.timesteps)
