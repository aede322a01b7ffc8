"""The probability-flow ODE on a trained network, not the exact mixture: its default tolerance against a tight
reference.

The model is ``tests/fixtures/tiny-digits``: the ``tiny`` preset trained for 800 steps on the digits by
``python training/train_ve.py --model_config tiny --max_train_steps 800`` (660 KB). The reference ``ln p`` of the
first held-out digit was computed once, by this file's ``_estimate`` at ``rtol = atol = 1e-6`` in float64, in sigma with
the state norm (the defaults then; 1874 model calls, about 8 minutes on a CPU: too slow to repeat in the suite). Rerun ``python -m tests.test_likelihood_ode_trained``
to print it again after a deliberate change to the estimator.
"""

import math
from pathlib import Path

import torch
from diffusers import UNet2DModel

from diffusers_ve import VEScheduler, data as ve_data
from diffusers_ve.denoiser import Denoiser
from diffusers_ve.likelihood import image_generators, ode_log_likelihood

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-digits"
REFERENCE = 35.97015439079951  # nats, rtol = atol = 1e-6 (see the module docstring)
MAX_CALLS = 80  # measured: 74 at the default on this image, error 0.0065 bits/dim (the state norm at 3e-3: 122, 0.001)


def _estimate(rtol=None, atol=None, **fields):
    unet = UNet2DModel.from_pretrained(FIXTURE, subfolder="unet").double().eval()
    den = Denoiser.from_scheduler(unet, VEScheduler.from_pretrained(FIXTURE, subfolder="scheduler"))
    x = ve_data.load_digits_images(8, "pad")
    held = x[ve_data.split_indices(len(x), 0.1, seed=0, min_held=8)[1]][:1].double()
    tol = {} if rtol is None else dict(rtol=rtol, atol=atol)
    return ode_log_likelihood(den, held, image_generators(0, range(1)), **tol, **fields)


def test_default_tolerance_on_a_trained_unet():
    est = _estimate()
    err_bits = abs(float(est.log_likelihood[0]) - REFERENCE) / (64 * math.log(2))
    assert err_bits < 0.01, err_bits
    assert int(est.nfe[0]) <= MAX_CALLS, int(est.nfe[0])


if __name__ == "__main__":
    tight = _estimate(1e-6, 1e-6, variable="sigma", error_norm="state")  # the solver the reference was made with
    print(float(tight.log_likelihood[0]), int(tight.nfe[0]))
