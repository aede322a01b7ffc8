"""``VELikelihoodPipeline``: ln p(y) and bits/dim of images under a VP diffusers model, by the ELBO or the ODE."""

from __future__ import annotations

import math
import warnings
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
from ..likelihood.options import LikelihoodOptions
from ..likelihood.plot import line_plot
from ..likelihood.record import load_data_record, save_data_record
from ..likelihood.stats import format_stderr, mean_bits_per_dim

DEFAULT_NUM_LEVELS = 256  # a folder without a data record: 8-bit images


@dataclass
class VELikelihoodPipelineOutput(BaseOutput):
    """Per-image likelihoods and the protocol that produced them.

    Args:
        log_likelihood: (B,) nats per image: ``ln P(x)`` of the discrete data when ``num_levels`` was used,
            else ``ln p(y)`` of the continuous model-space tensor (for the ELBO: its lower bound).
        bits_per_dim: (B,) ``-log_likelihood / (d ln 2)``.
        stderr: (B,) Monte-Carlo standard error of ``log_likelihood`` (nats; 0 where deterministic, NaN where
            the draws cannot estimate it: fewer than 3 ELBO samples, one Hutchinson probe, one decoder draw).
            With Hutchinson probes it is the per-image noise the probes add.
        stderr_bits_per_dim: (B,) the same in bits/dim.
        nfe: (B,) model calls per image.
        protocol: method, t range, prior, samples or tolerances, trace, dequantisation, levels, dimension, and
            ``estimand``: what the number bounds or estimates.
        terms: ELBO only: per-image ``prior``, ``diffusion`` and ``decoder`` terms in bits/dim (as VDM reports
            them); they add up to ``bits_per_dim``.
        ode: with ``method="both"``: the ODE's output (this one holds the ELBO's).
    """

    log_likelihood: torch.Tensor
    bits_per_dim: torch.Tensor
    stderr: torch.Tensor
    stderr_bits_per_dim: torch.Tensor
    nfe: torch.Tensor
    protocol: dict
    terms: Optional[dict] = None
    ode: Optional["VELikelihoodPipelineOutput"] = None

    def summary(self) -> str:
        """Mean bits/dim, its standard errors (Monte-Carlo; over images), what it bounds, and the protocol;
        one line per method (two with ``method="both"``).

        An unknown standard error (NaN for any image, or one image for the spread) prints as ``n/a``.
        """
        n = len(self.bits_per_dim)
        mean, mc, spread = mean_bits_per_dim(self.bits_per_dim, self.stderr_bits_per_dim)
        proto = {k: v for k, v in self.protocol.items() if k != "estimand"}
        proto = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in proto.items())
        terms = "" if not self.terms else " = " + " + ".join(
            f"{k} {float(v.mean()):.4f}" for k, v in self.terms.items())
        line = (f"{self.protocol.get('method', '?').upper()}: {mean:.5f} bits/dim over {n} images{terms} "
                f"(s.e. {format_stderr(mc)} Monte-Carlo, {format_stderr(spread)} over images; "
                f"{float(self.nfe.double().mean()):.1f} model calls/image): {self.protocol.get('estimand', '')} "
                f"[{proto}]")
        return line if self.ode is None else line + "\n" + self.ode.summary()


def estimand(method: str, num_levels: Optional[int]) -> str:
    """What the number of ``method`` is, for n-level or continuous data (the guide's "Which number to trust")."""
    if method == "elbo":
        return ("an upper bound on -log2 P(x) (bits) of the diffusion model with its decoder at t_min"
                if num_levels is not None else "an upper bound on -log2 p(y) of the diffusion model (a density)")
    if num_levels is not None:
        return ("an upper bound on -log2 P(x) (bits) of a different model, the probability flow with uniform "
                "dequantisation (in expectation over the dequantisation draw)")
    return "-log2 p(y) of the probability-flow model (a density; exact up to the solver's error)"


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
        self.data_record = None  # what the folder says about the data (likelihood.record); set by from_pretrained

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, plus the folder's data record (``likelihood_data.json``): a call without
        ``num_levels`` then uses the recorded one."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.data_record = _find_data_record(pretrained_model_name_or_path, kwargs)
        return pipe

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained``, plus the data record when the pipeline has one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.data_record is not None:
            save_data_record(save_directory, self.data_record["num_levels"], self.data_record.get("data"))

    def default_num_levels(self) -> Optional[int]:
        """The recorded ``num_levels`` of the folder this pipeline was loaded from, else 256 (8-bit images)."""
        return DEFAULT_NUM_LEVELS if self.data_record is None else self.data_record["num_levels"]

    def options(self, options: Optional[LikelihoodOptions] = None, **fields) -> LikelihoodOptions:
        """The options of a call: ``options`` (or the defaults) with ``fields`` replaced; without either naming
        ``num_levels``, the folder's recorded one (else 256). Warns when a given ``num_levels`` contradicts the
        record."""
        if options is not None and not isinstance(options, LikelihoodOptions):
            raise TypeError(f"`options` must be a LikelihoodOptions (pass `method=` by name); got {options!r}.")
        if options is None and "num_levels" not in fields:
            fields["num_levels"] = self.default_num_levels()
        opts = LikelihoodOptions.build(options, **fields)
        rec = self.data_record
        if rec is not None and opts.num_levels != rec["num_levels"]:
            warnings.warn(f"num_levels={opts.num_levels} contradicts the model folder's record "
                          f"num_levels={rec['num_levels']} (likelihood_data.json): bits/dim of the wrong level "
                          "count are not comparable with anything.", stacklevel=4)
        return opts

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
            images: a float tensor in model space (n-level data: on the grid ``2x/(n-1) - 1`` in [-1, 1], else an
                error naming ``num_levels``; continuous data: any finite values); a uint8 tensor or array of
                levels ``0..n-1`` (B, C, H, W), with a warning when its largest level is far below ``n - 1``; a
                PIL image or a list of them.
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
            discrete.warn_if_few_levels(int(x.max()), num_levels, "these uint8 images", stacklevel=5)
            y = discrete.levels_to_model(x, num_levels)
        elif x.is_floating_point():
            y = x.to(torch.float64)
            if not bool(torch.isfinite(y).all()):
                raise ValueError("float `images` must be finite.")
            if num_levels is not None:
                if float(y.abs().max()) > 1.0 + 1e-6:
                    raise ValueError(f"float `images` of {num_levels}-level data (num_levels={num_levels}) must lie "
                                     f"in model space [-1, 1]; got values in [{float(y.min()):.4g}, "
                                     f"{float(y.max()):.4g}].")
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
        options: Optional[LikelihoodOptions] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        seed: Optional[int] = None,
        indices: Optional[Sequence[int]] = None,
        prediction_type: Optional[str] = None,
        return_dict: bool = True,
        **fields,
    ) -> Union[VELikelihoodPipelineOutput, tuple]:
        """Estimate ``ln p`` and bits/dim per image.

        Args:
            images: see :meth:`preprocess` (float in [-1, 1], uint8 levels, or PIL).
            options: a :class:`~diffusers_ve.likelihood.options.LikelihoodOptions`; any of its fields can also be
                passed by name (``method="ode"``, ``num_levels=17``, ``t_min=...``), overriding ``options``.
                ``method``: ``"elbo"`` (a bound, stochastic), ``"ode"`` (probability flow) or ``"both"``.
                ``num_levels`` defaults to the loaded folder's record (``likelihood_data.json``), else 256;
                ``None``: continuous data. ``t_min`` defaults to the quantisation rule for n-level data (ELBO).
            generator: a generator (draws the run seed) or one generator per image; CPU or CUDA (noise is drawn
                on the generator's device, so CPU generators give the same numbers on every device).
            seed, indices: run seed and global image indices (``python -m diffusers_ve.evaluate`` uses them).
            prediction_type: optional check against the scheduler config (a mismatch is an error).
            return_dict: return a :class:`VELikelihoodPipelineOutput` (else a tuple of its fields).

        Returns:
            :class:`VELikelihoodPipelineOutput`; ``summary()`` prints the mean, what it bounds and the protocol.
        """
        opts = self.options(options, **fields)
        den = self.denoiser(prediction_type)
        y = self.preprocess(images, opts.num_levels).to(self._execution_device)
        gens = self.generators(y.shape[0], generator, seed, indices)
        if opts.method == "both":
            out = self._run(den, y, gens, opts.replace(method="elbo", dequantization=None))
            out.ode = self._run(den, y, gens, opts.replace(method="ode", dequantization=None))
        else:
            out = self._run(den, y, gens, opts)
        return out if return_dict else tuple(out.values())

    def _run(self, den, y, gens, opts: LikelihoodOptions) -> VELikelihoodPipelineOutput:
        """One method on preprocessed images, with a progress bar (ELBO: groups of images; ODE: % of the range)."""
        lo, hi = opts.t_range(den.family, opts.method)
        deq = opts.dequantization_for(opts.method)
        d = common.dim_of(y)
        with self.progress_bar(total=100) as bar:
            def progress(done, total):
                bar.update(int(100 * done / total) - bar.n)

            fn = elbo_log_likelihood if opts.method == "elbo" else ode.ode_log_likelihood
            est = fn(den, y, gens, opts.replace(t_min=lo, t_max=hi), progress=progress)
        protocol = {"method": opts.method, "t_min": lo, "t_max": hi, "prior": opts.make_prior(hi).describe(),
                    **est.protocol, "dequantization": deq or "none", "num_levels": opts.num_levels, "dim": d,
                    "estimand": estimand(opts.method, opts.num_levels)}
        scale = d * discrete.LN2
        if str(est.protocol.get("trace", "")).startswith("hutchinson") and est.protocol.get("num_dequant", 1) == 1:
            # the noise the probes add to one image's number (its standard error over the probes), on average
            protocol["probe_std_bits_per_dim"] = float(est.stderr.mean() / scale)
        terms = {k: v / scale for k, v in est.extras["terms"].items()} if "terms" in est.extras else None
        return VELikelihoodPipelineOutput(est.log_likelihood, discrete.bits_per_dim(est.log_likelihood, d),
                                          est.stderr, est.stderr / scale, est.nfe, protocol, terms)

    @torch.no_grad()
    def integrand_plot(self, images, num_levels: Union[int, None, str] = "default", num_t: int = 48, num_eps: int = 4,
                       generator: Optional[torch.Generator] = None, labels: Optional[Sequence[str]] = None):
        """Where the bits go: the ELBO integrand per unit ``ln t`` (bits/dim) against ``log10 t``, as a PIL image.

        One curve per image when ``labels`` are given, else the average over the set. The dashed line,
        ``1/(2 ln 2)``, is a denoiser that has learned nothing about that noise level.
        """
        den = self.denoiser()
        num_levels = self.default_num_levels() if num_levels == "default" else num_levels
        y = self.preprocess(images, num_levels).to(self._execution_device)
        t = torch.tensor(process.log_t_grid(den.family.t_min, den.family.t_max, num_t)[::-1], dtype=torch.float64)
        gen = generator or torch.Generator().manual_seed(0)
        groups = {lab: y[i:i + 1] for i, lab in enumerate(labels)} if labels else {f"mean over {len(y)} images": y}
        curves = {lab: elbo_integrand(den, yy, t, gen, num_eps).tolist() for lab, yy in groups.items()}
        return line_plot(torch.log10(t).tolist(), curves, "ELBO integrand: where the bits go", "log10 t",
                         "bits/dim per unit ln t", reference=1 / (2 * math.log(2)))


def _find_data_record(path, kwargs) -> Optional[dict]:
    """The data record of a local folder, or of a Hub repo (None when it has none or cannot be fetched)."""
    import os

    if os.path.isdir(str(path)):
        return load_data_record(path)
    try:
        from huggingface_hub import hf_hub_download

        from ..likelihood.record import DATA_RECORD_NAME

        local = hf_hub_download(str(path), DATA_RECORD_NAME, revision=kwargs.get("revision"),
                                cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token"))
    except Exception:  # noqa: BLE001  (no record in the repo, or offline: the uint8 check still warns)
        return None
    return load_data_record(os.path.dirname(local))
