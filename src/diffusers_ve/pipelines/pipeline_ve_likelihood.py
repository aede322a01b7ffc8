"""``VELikelihoodPipeline``: ln p(y) and bits/dim of images under a VP diffusers model, by the ELBO or the ODE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput

from .. import process
from ..denoiser import Denoiser
from ..likelihood import common, discrete, ode
from ..likelihood.elbo import elbo_integrand, elbo_log_likelihood
from ..likelihood.plot import line_plot
from ..likelihood.prior import make_prior

METHODS = ("elbo", "ode")


@dataclass
class VELikelihoodPipelineOutput(BaseOutput):
    """Per-image likelihoods and the protocol that produced them.

    Args:
        log_likelihood: (B,) nats per image: ``ln P(x)`` of the discrete data when ``num_levels`` was used,
            else ``ln p(y)`` of the continuous model-space tensor.
        bits_per_dim: (B,) ``-log_likelihood / (d ln 2)``.
        stderr: (B,) Monte-Carlo standard error of ``log_likelihood`` (nats; 0 where deterministic, NaN where
            the draws cannot estimate it: fewer than 3 ELBO samples, one Hutchinson probe, one decoder draw).
        stderr_bits_per_dim: (B,) the same in bits/dim.
        nfe: (B,) model calls per image.
        protocol: method, t range, prior, samples or tolerances, trace, dequantisation, levels, dimension.
    """

    log_likelihood: torch.Tensor
    bits_per_dim: torch.Tensor
    stderr: torch.Tensor
    stderr_bits_per_dim: torch.Tensor
    nfe: torch.Tensor
    protocol: dict

    def summary(self) -> str:
        """One line: mean bits/dim, its standard errors (Monte-Carlo; over images) and the protocol.

        An unknown standard error (NaN for any image, or one image for the spread) prints as ``n/a``.
        """
        n = len(self.bits_per_dim)
        mean, mc, spread = mean_bits_per_dim(self.bits_per_dim, self.stderr_bits_per_dim)
        proto = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.protocol.items())
        return (f"{mean:.5f} bits/dim over {n} images (s.e. {format_stderr(mc)} Monte-Carlo, "
                f"{format_stderr(spread)} over images; {float(self.nfe.double().mean()):.1f} model calls/image) "
                f"[{proto}]")


def mean_bits_per_dim(bits_per_dim, stderr_bits_per_dim) -> tuple:
    """Mean bits/dim of a set of images with two standard errors: the Monte-Carlo one (from the per-image errors)
    and the one over images (their spread). Each is NaN when unknown (an unknown per-image error, one image)."""
    bpd = torch.as_tensor(bits_per_dim, dtype=torch.float64)
    n = len(bpd)
    mc = float(torch.as_tensor(stderr_bits_per_dim, dtype=torch.float64).pow(2).sum().sqrt()) / n
    spread = float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(bpd.mean()), mc, spread


def format_stderr(value: float) -> str:
    """A standard error with 5 decimals, or ``n/a`` when it is unknown (NaN): never a false 0."""
    return f"{value:.5f}" if math.isfinite(value) else "n/a"


class VELikelihoodPipeline(DiffusionPipeline):
    """Log-likelihood and bits/dim of images under an unconditional VP diffusion model (eps, v or sample
    prediction on a DDPM beta table), by McAllester's VAE expression (``method="elbo"``) or the probability-flow
    ODE (``method="ode"``). See the likelihood guide for when each is a bound.

    Args:
        unet: a ``UNet2DModel``-like model (``unet(x, timestep).sample``).
        scheduler: ``VEScheduler`` or any DDPM-family diffusers scheduler: its config gives the beta table,
            ``prediction_type`` and ``variance_type``.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def denoiser(self, prediction_type: Optional[str] = None) -> Denoiser:
        """The model as ``yhat(z, t)`` in VE terms, after checking its output channels against the config."""
        den = Denoiser.from_scheduler(self.unet, self.scheduler, prediction_type)
        cfg = getattr(self.unet, "config", {})
        c_in, c_out = cfg.get("in_channels", None), cfg.get("out_channels", None)
        if c_in is not None and c_out is not None and c_out != (2 * c_in if den.learned_variance else c_in):
            vt = self.scheduler.config.get("variance_type", None)
            raise ValueError(
                f"the unet has out_channels={c_out} for in_channels={c_in}, which contradicts the scheduler's "
                f"variance_type={vt!r} (learned variance needs 2 x in_channels, the others in_channels)."
            )
        return den

    def preprocess(self, images, num_levels: Optional[int]) -> torch.Tensor:
        """Images -> (B, C, H, W) float64 in model space [-1, 1], checked against the unet and the level grid.

        Args:
            images: a float tensor in model space (n-level data: on the grid ``2x/(n-1) - 1`` in [-1, 1];
                continuous data: any finite values); a uint8 tensor or array of levels ``0..n-1``
                (B, C, H, W); a PIL image or a list of them.
            num_levels: n (uint8 and PIL input need it); None: the input is continuous.
        """
        num_levels = discrete.check_num_levels(num_levels)
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image):
            arrays = [np.asarray(im) for im in images]
            images = torch.as_tensor(np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])).permute(0, 3, 1, 2)
        if isinstance(images, (list, tuple)) and not images:
            raise ValueError("`images` is empty: pass at least one image.")
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"`images` must have shape (B, C, H, W); got {tuple(x.shape)}.")
        if x.shape[0] == 0:
            raise ValueError("`images` is empty (a batch of 0 images): pass at least one image.")
        if x.dtype == torch.uint8:
            if num_levels is None or int(x.max()) > num_levels - 1:
                raise ValueError(f"uint8 `images` must hold levels 0..num_levels-1 with `num_levels` set; got max "
                                 f"{int(x.max())} with num_levels={num_levels!r}.")
            y = discrete.levels_to_model(x, num_levels)
        elif x.is_floating_point():
            y = x.to(torch.float64)
            if not bool(torch.isfinite(y).all()):
                raise ValueError("float `images` must be finite.")
            if num_levels is not None:
                if float(y.abs().max()) > 1.0 + 1e-6:
                    raise ValueError(f"float `images` of {num_levels}-level data must lie in model space [-1, 1]; "
                                     f"got values in [{float(y.min()):.4g}, {float(y.max()):.4g}].")
                y = discrete.levels_to_model(discrete.model_to_levels(y, num_levels), num_levels)
        else:
            raise ValueError(f"`images` must be float (model space) or uint8 (levels); got dtype {x.dtype}.")
        self._check_shape(y)
        return y

    def _check_shape(self, y: torch.Tensor) -> None:
        cfg = getattr(self.unet, "config", {})
        c, size = cfg.get("in_channels", None), cfg.get("sample_size", None)
        if c is not None and y.shape[1] != c:
            raise ValueError(f"`images` have {y.shape[1]} channels but the unet takes in_channels={c}.")
        if size is not None:
            hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            if tuple(y.shape[2:]) != hw:
                raise ValueError(f"`images` are {tuple(y.shape[2:])} but the unet was built for sample_size={hw}.")

    def generators(self, batch: int, generator=None, seed: Optional[int] = None,
                   indices: Optional[Sequence[int]] = None) -> List[torch.Generator]:
        """One CPU generator per image, seeded by ``(seed, global index)``; a single ``generator`` (CPU or CUDA)
        draws ``seed``; a list of generators (CPU or CUDA) is used as given."""
        if isinstance(generator, (list, tuple)):
            return common.check_generators(list(generator), batch)
        if seed is None:  # on the generator's own device: a CUDA generator cannot draw a CPU tensor
            dev = generator.device if generator is not None else "cpu"
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))
        indices = range(batch) if indices is None else list(indices)
        if len(indices) != batch:
            raise ValueError(f"`indices` must give one global index per image ({batch}); got {len(indices)}.")
        return common.image_generators(seed, indices)

    @torch.no_grad()
    def __call__(
        self,
        images,
        method: str = "elbo",
        num_t_samples: int = 64,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        num_levels: Optional[int] = 256,
        t_min: Optional[float] = None,
        t_max: Optional[float] = None,
        prior: str = "vp",
        prior_moments: Optional[Sequence] = None,
        dequantization: Optional[str] = None,
        control_variate: bool = True,
        rtol: float = 1e-4,
        atol: float = 1e-4,
        solver: str = "dopri5",
        num_steps: int = 16,
        trace: str = "auto",
        num_probes: int = 4,
        num_dequant: int = 1,
        prediction_type: Optional[str] = None,
        seed: Optional[int] = None,
        indices: Optional[Sequence[int]] = None,
        batch_size: int = 256,
        num_decoder_samples: int = 8,
        return_dict: bool = True,
    ) -> Union[VELikelihoodPipelineOutput, tuple]:
        """Estimate ``ln p`` and bits/dim per image.

        Args:
            images: see :meth:`preprocess` (float in [-1, 1], uint8 levels, or PIL).
            method: ``"elbo"`` (McAllester's VAE expression, a bound, stochastic) or ``"ode"`` (probability flow).
            num_t_samples: ELBO: model calls per image for the integral over ``t``.
            generator: a generator (draws the run seed) or one generator per image; CPU or CUDA (noise is drawn
                on the generator's device, so CPU generators give the same numbers on every device).
            num_levels: n of n-level data (256 for 8-bit; 17 for the digits); ``None``: continuous data, no
                dequantisation, ``ln p(y)`` of the tensor itself.
            t_min, t_max: VE range of the integral (default: the model table's ends).
            prior: ``"vp"`` (``N(0, (1+T) I)``, where the sampling pipelines start), ``"ve"`` (``N(0, T I)``)
                or ``"moment"`` (``N(m, (T+v) I)`` with ``prior_moments=(m, v)``).
            dequantization: n-level data: ``"decoder"`` (ELBO only; default there) or ``"uniform"``
                (default for the ODE).
            control_variate: ELBO: use the cross-fitted control variate.
            rtol, atol, solver, num_steps: ODE solver (adaptive ``"dopri5"`` or ``"fixed"`` steps).
            trace, num_probes: ODE divergence: ``"exact"``, ``"hutchinson"`` or ``"auto"`` (exact up to d = 64).
            num_dequant: ODE: dequantisation repeats per image.
            prediction_type: optional check against the scheduler config (a mismatch is an error).
            seed, indices: run seed and global image indices (``python -m diffusers_ve.evaluate`` uses them).
            batch_size: ELBO model batch; memory scales with it (values do not depend on it).
            num_decoder_samples: ELBO with the discretised decoder: draws of ``z(t_min)`` per image (model calls),
                averaged; their spread enters the standard error (1: NaN standard error).
            return_dict: return a :class:`VELikelihoodPipelineOutput` (else a tuple of its fields).

        Returns:
            :class:`VELikelihoodPipelineOutput`; ``summary()`` prints the mean with the protocol.
        """
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
        den = self.denoiser(prediction_type)
        y = self.preprocess(images, num_levels).to(self._execution_device)
        lo, hi = common.check_t_range(den.axis, t_min, t_max)
        pri = make_prior(prior, hi, prior_moments)
        gens = self.generators(y.shape[0], generator, seed, indices)
        deq = self._dequantization(method, num_levels, dequantization)
        if method == "elbo":
            est = elbo_log_likelihood(den, y, gens, num_t_samples, lo, hi, pri, num_levels, deq or "decoder",
                                      control_variate, batch_size, num_decoder_samples)
        else:
            est = ode.ode_log_likelihood(den, y, gens, lo, hi, pri, rtol, atol, solver, num_steps, trace, num_probes,
                                         num_levels, num_dequant)
        d = common.dim_of(y)
        protocol = {"method": method, "t_min": lo, "t_max": hi, "prior": pri.describe(), **est.protocol,
                    "dequantization": deq or "none", "num_levels": num_levels, "dim": d}
        out = VELikelihoodPipelineOutput(est.log_likelihood, discrete.bits_per_dim(est.log_likelihood, d), est.stderr,
                                         est.stderr / (d * discrete.LN2), est.nfe, protocol)
        return out if return_dict else tuple(out.values())

    @staticmethod
    def _dequantization(method: str, num_levels, dequantization):
        if num_levels is None:
            if dequantization not in (None, "none"):
                raise ValueError("`dequantization` needs `num_levels` (continuous data are not dequantised).")
            return None
        allowed = ("decoder", "uniform") if method == "elbo" else ("uniform",)
        deq = dequantization or allowed[0]
        if deq not in allowed:
            raise ValueError(f"`dequantization` for method={method!r} must be one of {allowed}; got {deq!r}.")
        return deq

    @torch.no_grad()
    def integrand_plot(self, images, num_levels: Optional[int] = 256, num_t: int = 48, num_eps: int = 4,
                       generator: Optional[torch.Generator] = None, labels: Optional[Sequence[str]] = None):
        """Where the bits go: the ELBO integrand per unit ``ln t`` (bits/dim) against ``log10 t``, as a PIL image.

        One curve per image when ``labels`` are given, else the average over the set. The dashed line,
        ``1/(2 ln 2)``, is a denoiser that has learned nothing about that noise level.
        """
        den = self.denoiser()
        y = self.preprocess(images, num_levels).to(self._execution_device)
        t = torch.tensor(process.log_t_grid(den.axis.t_min, den.axis.t_max, num_t)[::-1], dtype=torch.float64)
        gen = generator or torch.Generator().manual_seed(0)
        groups = {lab: y[i:i + 1] for i, lab in enumerate(labels)} if labels else {f"mean over {len(y)} images": y}
        curves = {lab: elbo_integrand(den, yy, t, gen, num_eps).tolist() for lab, yy in groups.items()}
        return line_plot(torch.log10(t).tolist(), curves, "ELBO integrand: where the bits go", "log10 t",
                         "bits/dim per unit ln t", reference=1 / (2 * math.log(2)))
