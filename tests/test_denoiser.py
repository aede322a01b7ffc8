"""Denoiser: a VP model read as yhat(z, t) in VE terms, against the mixture's exact posterior mean."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_ve.denoiser import Denoiser

from .gmm import MixtureUNet, image_mixture

MIX = image_mixture()


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_yhat_is_the_exact_posterior_mean(ptype):
    sched = DDPMScheduler(prediction_type=ptype)
    den = Denoiser.from_scheduler(MixtureUNet.from_mixture(MIX, sched.config), sched)
    t = torch.tensor([1e-3, 0.05, 1.0, 30.0, 2e4], dtype=torch.float64)
    z = MIX.sample(5, generator=torch.Generator().manual_seed(0)) + t.sqrt().reshape(-1, 1, 1, 1) * torch.randn(
        5, *MIX.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # the model sees float32 timesteps: compare at the t they encode
    t_seen = den.family.t(den.family.timestep(t).float())
    torch.testing.assert_close(den(z, t), MIX.yhat(z, t_seen), rtol=1e-5, atol=3e-5)  # float32 model output x sqrt(t)


def test_half_precision_input_at_large_t_stays_finite():
    """1 + t overflows float16 on a cosine table (t_max = 4e8): the VP input is formed in float32."""
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    den = Denoiser.from_scheduler(MixtureUNet.from_mixture(MIX, sched.config), sched)
    t_max = den.family.t_max
    assert t_max > 1e5
    z = (torch.randn(2, *MIX.shape, generator=torch.Generator().manual_seed(0)).clamp(-3, 3) * t_max**0.5).half()
    assert torch.isfinite(z).all()  # the input itself fits float16; 1 + t does not
    out = den(z, t_max)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_prediction_type_must_agree_with_the_scheduler():
    sched = DDPMScheduler(prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser.from_scheduler(MixtureUNet.from_mixture(MIX, sched.config), sched, prediction_type="sample")


def test_learned_variance_channels():
    class TwiceChannels(torch.nn.Module):
        def forward(self, x, tau):
            return torch.cat([torch.zeros_like(x), torch.ones_like(x)], 1)

    z = torch.randn(2, 1, 4, 4)
    learned = Denoiser.from_scheduler(TwiceChannels(), DDPMScheduler(variance_type="learned_range"))
    torch.testing.assert_close(learned(z, 1.0), z)  # eps = 0: yhat = z
    with pytest.raises(ValueError, match="variance_type"):
        Denoiser.from_scheduler(TwiceChannels(), DDPMScheduler())(z, 1.0)
