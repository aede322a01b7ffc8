"""VELikelihoodPipeline: inputs, outputs, protocol, invariances and clear errors."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

import diffusers_ve
from diffusers_ve.likelihood import make_prior, prior_kl

from .gmm import MixtureUNet, image_mixture


def mixture_pipe(prediction_type="epsilon", shape=(1, 4, 4), dtype=torch.float64):
    sch = diffusers_ve.VEScheduler(prediction_type=prediction_type)
    unet = MixtureUNet.from_mixture(image_mixture(shape), sch.config).to(dtype)
    return diffusers_ve.VELikelihoodPipeline(unet=unet, scheduler=sch)


def levels(n, num_levels=256, seed=0):
    return torch.randint(0, num_levels, (n, 1, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_inputs_outputs_and_protocol():
    pipe = mixture_pipe()
    x = levels(3)
    out = pipe(x, method="elbo", num_t_samples=16, generator=torch.Generator().manual_seed(0))
    assert out.log_likelihood.shape == out.bits_per_dim.shape == out.stderr.shape == out.nfe.shape == (3,)
    assert torch.allclose(out.bits_per_dim, -out.log_likelihood / (16 * math.log(2)))
    p = out.protocol
    assert (p["method"], p["num_levels"], p["dequantization"], p["num_t_samples"]) == ("elbo", 256, "decoder", 16)
    assert p["prior"] == "N(0, (1+T) I)" and p["t_min"] == pytest.approx(1.0001e-4, rel=1e-3)
    assert "method=elbo" in out.summary() and "bits/dim" in out.summary()
    # the same images as float model space and as PIL give the same numbers
    same = dict(method="elbo", num_t_samples=16, seed=1)
    ref = pipe(x, **same).log_likelihood
    assert torch.equal(pipe(x.double() / 127.5 - 1, **same).log_likelihood, ref)
    pil = [Image.fromarray(a[0].numpy()) for a in x]
    assert torch.equal(pipe(pil, **same).log_likelihood, ref)
    digits = pipe(levels(2, 17) .double() / 8 - 1, num_levels=17, method="ode", seed=0)
    assert digits.protocol["num_levels"] == 17 and digits.protocol["dequantization"] == "uniform"
    cont = pipe(torch.randn(2, 1, 4, 4) * 0.3, num_levels=None, method="ode", seed=0)
    assert cont.protocol["dequantization"] == "none" and bool((cont.stderr == 0).all())


@pytest.mark.parametrize("method", ["elbo", "ode"])
def test_batch_size_and_seeding_do_not_change_values(method):
    pipe = mixture_pipe("v_prediction")
    x = levels(4)
    kw = dict(method=method, num_t_samples=16, trace="hutchinson", num_probes=2, seed=3)
    together = pipe(x, indices=[10, 11, 12, 13], **kw)
    alone = torch.cat([pipe(x[i:i + 1], indices=[10 + i], **kw).log_likelihood for i in range(4)])
    assert torch.allclose(together.log_likelihood, alone, rtol=0, atol=1e-6)
    if method == "elbo":
        small = pipe(x, indices=[10, 11, 12, 13], batch_size=3, **kw).log_likelihood
        assert torch.allclose(small, together.log_likelihood, rtol=0, atol=1e-6)
        g1 = pipe(x, method="elbo", generator=torch.Generator().manual_seed(5)).log_likelihood
        g2 = pipe(x, method="elbo", generator=torch.Generator().manual_seed(5)).log_likelihood
        g3 = pipe(x, method="elbo", generator=torch.Generator().manual_seed(6)).log_likelihood
        assert torch.equal(g1, g2) and not torch.equal(g1, g3)


def test_tiny_unet_and_prior_options():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = diffusers_ve.VELikelihoodPipeline(unet=unet, scheduler=DDPMScheduler())
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    out = pipe(x, num_t_samples=8, seed=0)
    assert bool(torch.isfinite(out.log_likelihood).all()) and out.nfe.tolist() == [8 + 8, 8 + 8]  # K + R decoder
    ode = pipe(x, method="ode", solver="fixed", num_steps=2, trace="hutchinson", num_probes=1, seed=0)
    assert ode.nfe.tolist() == [13, 13] and bool(torch.isfinite(ode.log_likelihood).all())
    mom = pipe(x, num_t_samples=8, seed=0, prior="moment", prior_moments=(0.1, 0.2))
    assert mom.protocol["prior"] == "N(m, (T+v) I)"


def test_prior_kl_matches_monte_carlo():
    t_max, y = 50.0, torch.randn(3, 1, 2, 2, dtype=torch.float64)
    prior = make_prior("moment", t_max, (torch.tensor(0.3), torch.tensor(0.5)))
    z = y + math.sqrt(t_max) * torch.randn(200000, 1, 1, 2, 2, dtype=torch.float64)
    log_q = -0.5 * (math.log(2 * math.pi * t_max) + (z - y) ** 2 / t_max)
    log_p = -0.5 * (torch.log(2 * math.pi * prior.var) + (z - prior.mean) ** 2 / prior.var)
    mc = (log_q - log_p).flatten(2).sum(-1).mean(0)
    assert torch.allclose(prior_kl(y, t_max, prior), mc, atol=5e-3)


def test_integrand_plot(tmp_path):
    pipe = mixture_pipe()
    img = pipe.integrand_plot(levels(3), num_t=12, num_eps=2)
    assert isinstance(img, Image.Image) and img.size == (640, 400)
    img.save(tmp_path / "integrand.png")
    assert np.asarray(img).std() > 0


def blank_gaps(text, font, min_width=3):
    """Runs of at least ``min_width`` blank pixel columns inside ``text`` as drawn with ``font``."""
    from PIL import ImageDraw

    img = Image.new("L", (400, 40), 255)
    ImageDraw.Draw(img).text((2, 2), text, fill=0, font=font)
    ink = (np.asarray(img) < 160).any(0)
    ink = ink[ink.argmax():len(ink) - ink[::-1].argmax()]
    runs = np.diff(np.flatnonzero(np.diff(np.r_[1, ink.astype(int), 1]) != 0))[::2]  # lengths of blank runs
    return int((runs >= min_width).sum())


def test_plot_title_keeps_its_spaces():
    """Pillow's 10 px default font closes some word gaps ("where the bitsgo"): the title font keeps all three."""
    from diffusers_ve.likelihood.plot import title_font

    assert blank_gaps("where the bits go", title_font()) == 3


def test_unknown_stderr_is_reported_as_unknown():
    """K = 2 gives one stratum: no error estimate. It must print as n/a, never as a Monte-Carlo error of 0."""
    y = levels(2).double() / 127.5 - 1
    out = mixture_pipe()(y, num_t_samples=2, num_levels=None, seed=0)
    assert bool(torch.isnan(out.stderr).all())
    assert "s.e. n/a Monte-Carlo" in out.summary()
    ok = mixture_pipe()(y, num_t_samples=8, num_levels=None, seed=0)
    assert "s.e. n/a Monte-Carlo" not in ok.summary() and bool((ok.stderr > 0).all())
    # the ODE on discrete data with one dequantisation draw is random too: unknown error, not 0
    ode = mixture_pipe()(levels(2), method="ode", solver="fixed", num_steps=4, seed=0)
    assert bool(torch.isnan(ode.stderr).all()) and "s.e. n/a Monte-Carlo" in ode.summary()
    exact = mixture_pipe()(y, method="ode", solver="fixed", num_steps=4, num_levels=None, trace="exact", seed=0)
    assert bool((exact.stderr == 0).all())


BAD = [
    (dict(images=levels(1, 256)), dict(num_levels=17), "levels 0..num_levels-1"),
    (dict(images=torch.full((1, 1, 4, 4), 1.5)), dict(), "model space"),
    (dict(images=torch.zeros(1, 3, 4, 4)), dict(num_levels=None), "channels"),
    (dict(images=torch.zeros(1, 1, 8, 8)), dict(num_levels=None), "sample_size"),
    (dict(images=levels(1)), dict(t_min=1.0, t_max=0.5), "t_lo < t_hi"),
    (dict(images=levels(1)), dict(t_min=1e-6), "t_lo < t_hi"),
    (dict(images=levels(1)), dict(num_t_samples=0), "num_t_samples"),
    (dict(images=levels(1)), dict(method="vlb"), "method"),
    (dict(images=levels(1)), dict(prediction_type="sample"), "prediction_type"),
    (dict(images=levels(1)), dict(num_levels=1), "num_levels"),
    (dict(images=levels(1)), dict(prior="flat"), "prior"),
    (dict(images=levels(1)), dict(prior="moment"), "prior_moments"),
    (dict(images=levels(1)), dict(method="ode", dequantization="decoder"), "dequantization"),
    (dict(images=levels(0)), dict(), "empty"),
    (dict(images=[]), dict(), "empty"),
    (dict(images=levels(1)), dict(num_decoder_samples=0), "num_decoder_samples"),
]


@pytest.mark.parametrize("inputs,kwargs,message", BAD)
def test_bad_input_is_a_clear_value_error(inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixture_pipe()(inputs["images"], seed=0, **kwargs)


def test_output_channels_must_match_variance_type():
    sch = DDPMScheduler(variance_type="learned_range")
    unet = MixtureUNet.from_mixture(image_mixture((1, 4, 4)), sch.config)
    with pytest.raises(ValueError, match="variance_type"):
        diffusers_ve.VELikelihoodPipeline(unet=unet, scheduler=sch)(levels(1), seed=0)
