"""Never silently wrong: the folder's data record, the level warnings, the off-grid error, the options object."""

import warnings

import pytest
import torch

import diffusers_ve
from diffusers_ve.likelihood import LikelihoodOptions, load_data_record, save_data_record
from diffusers_ve.likelihood.record import DATA_RECORD_NAME

from .gmm import MixtureUNet, image_mixture


def mixture_pipe():
    sch = diffusers_ve.VEScheduler()
    unet = MixtureUNet.from_mixture(image_mixture((1, 4, 4)), sch.config).double()
    return diffusers_ve.VELikelihoodPipeline(unet=unet, scheduler=sch)


def digits_levels(n=3, seed=0):
    return torch.randint(0, 17, (n, 1, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_a_recorded_folder_defaults_to_its_levels(tmp_path):
    pipe = mixture_pipe()
    pipe.save_pretrained(tmp_path / "plain")
    save_data_record(str(tmp_path / "plain"), 17, data="digits")  # what the training script writes
    loaded = diffusers_ve.VELikelihoodPipeline.from_pretrained(tmp_path / "plain")
    assert loaded.data_record["num_levels"] == 17 and loaded.default_num_levels() == 17
    x = digits_levels()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right count: no warning
        out = loaded(x, num_t_samples=8, seed=0)
    assert out.protocol["num_levels"] == 17
    same = pipe(x, num_t_samples=8, seed=0, num_levels=17)
    assert torch.allclose(out.log_likelihood, same.log_likelihood, rtol=1e-6)
    loaded.save_pretrained(tmp_path / "again")  # the record travels with save_pretrained
    assert load_data_record(tmp_path / "again")["num_levels"] == 17
    with pytest.warns(UserWarning, match="contradicts the model folder's record num_levels=17"):
        loaded(x, num_t_samples=8, seed=0, num_levels=256)


def test_a_folder_without_a_record_keeps_256_and_warns_on_few_levels(tmp_path):
    pipe = mixture_pipe()
    pipe.save_pretrained(tmp_path / "m")
    loaded = diffusers_ve.VELikelihoodPipeline.from_pretrained(tmp_path / "m")
    assert loaded.data_record is None and loaded.default_num_levels() == 256
    with pytest.warns(UserWarning, match="largest level in these uint8 images is 16.*num_levels=17"):
        out = loaded(digits_levels(), num_t_samples=8, seed=0)
    assert out.protocol["num_levels"] == 256


def test_off_grid_float_input_is_an_error_naming_num_levels():
    y = digits_levels().double() / 8 - 1  # on the 17-level grid
    with pytest.raises(ValueError, match="num_levels=256; they fit num_levels=17"):
        mixture_pipe()(y, num_t_samples=8, seed=0)
    with pytest.raises(ValueError, match="num_levels"):
        mixture_pipe()(y + 0.01, num_t_samples=8, seed=0, num_levels=17)


def test_bad_records_and_options_are_clear_errors(tmp_path):
    (tmp_path / DATA_RECORD_NAME).write_text('{"num_levels": 17, "scaling": "y = x / 255"}')
    with pytest.raises(ValueError, match="scaling"):
        load_data_record(tmp_path)
    with pytest.raises(ValueError, match="num_levels"):
        save_data_record(str(tmp_path), 1)
    with pytest.raises(TypeError, match="did you mean 'num_t_samples'"):
        LikelihoodOptions.build(num_t_sample=8)
    with pytest.raises(ValueError, match="`trace` must be one of"):
        LikelihoodOptions.build(trace="probes")
    with pytest.raises(TypeError, match="pass `method=` by name"):
        mixture_pipe()(digits_levels(), "ode")


def test_options_object_and_keywords_agree():
    pipe, x = mixture_pipe(), digits_levels()
    opts = LikelihoodOptions(num_levels=17, num_t_samples=8)
    a = pipe(x, opts, seed=3)
    b = pipe(x, num_levels=17, num_t_samples=8, seed=3)
    assert torch.equal(a.log_likelihood, b.log_likelihood) and a.protocol == b.protocol
    c = pipe(x, opts, seed=3, num_t_samples=16)  # a keyword overrides the object
    assert c.protocol["num_t_samples"] == 16


def test_both_methods_say_what_they_bound():
    pipe, x = mixture_pipe(), digits_levels(2)
    out = pipe(x, method="both", num_levels=17, num_t_samples=8, solver="fixed", num_steps=2, seed=0)
    assert out.protocol["method"] == "elbo" and out.ode.protocol["method"] == "ode"
    assert out.protocol["dequantization"] == "decoder" and out.ode.protocol["dequantization"] == "uniform"
    assert out.ode.protocol["t_min"] < out.protocol["t_min"]  # the rule is the ELBO decoder's; the ODE keeps t_0
    lines = out.summary().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ELBO: ") and lines[1].startswith("ODE: ")
    assert "upper bound on -log2 P(x)" in lines[0] and "different model" in lines[1]
    assert "prior" in lines[0] and "diffusion" in lines[0] and "decoder" in lines[0]
    total = out.terms["prior"] + out.terms["diffusion"] + out.terms["decoder"]
    assert torch.allclose(total, out.bits_per_dim, rtol=1e-12)
    cont = pipe(x.double() / 8 - 1, num_levels=None, num_t_samples=8, seed=0)
    assert "lower bound" not in cont.summary() and "-log2 p(y)" in cont.summary()
