"""The ODE on a trained network (a tiny UNet trained here in seconds on 4x4 digits): the default tolerances stay
within 0.01 bits/dim of a 1e-6 reference at a bounded number of model calls."""

import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

import diffusers_ve
from diffusers_ve.data import load_digits_images
from diffusers_ve.likelihood import LikelihoodOptions, image_generators, ode_log_likelihood
from diffusers_ve.training import Objective

MAX_CALLS = 100  # the default's budget per image (the likelihood guide's ODE table)


def trained_denoiser(steps=300):
    torch.manual_seed(0)
    sch = diffusers_ve.VEScheduler()
    unet = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    x = load_digits_images(8)  # 17 levels in [-1, 1]; 2x2 means of them lie on the 65-level grid
    y = F.avg_pool2d(x, 2)
    objective, opt = Objective.from_config(sch.config), torch.optim.Adam(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = y[torch.randint(0, len(y) - 8, (64,), generator=g)]
        loss = objective.loss(unet, batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pipe = diffusers_ve.VELikelihoodPipeline(unet=unet.eval().double(), scheduler=sch)
    return pipe.denoiser(), y[-8:].double()


def test_default_tolerance_on_a_trained_unet_is_within_a_hundredth_of_a_bit():
    den, y = trained_denoiser()
    y = y[:4]
    d, gens = y[0].numel(), lambda: image_generators(0, range(len(y)))  # noqa: E731
    ref = ode_log_likelihood(den, y, gens(), rtol=1e-6, atol=1e-6, num_levels=65)
    got = ode_log_likelihood(den, y, gens(), num_levels=65)
    err = (got.log_likelihood - ref.log_likelihood).abs() / (d * math.log(2))
    print("default", LikelihoodOptions().rtol, LikelihoodOptions().atol, "calls", got.nfe.tolist(), "reference calls",
          ref.nfe.tolist(), "|err| bpd", err.tolist())
    assert bool((err < 0.01).all())
    assert int(got.nfe.max()) <= MAX_CALLS < int(ref.nfe.min())
