"""``VEPipeline``: unconditional image generation with a VE scheduler and a reverse-noise level chosen per call."""

from __future__ import annotations

import inspect
from typing import Callable, List, Optional, Union

import diffusers
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .. import process
from ..schedulers.scheduling_ve import VESchedulerBase

OUTPUT_TYPES = ("pil", "np", "pt")


class VEPipeline(DiffusionPipeline):
    """Unconditional sampling from a VP ``UNet2DModel`` with :class:`~diffusers_ve.VEScheduler` or
    :class:`~diffusers_ve.VEHeunScheduler` (any diffusers scheduler also works; ``reverse_noise`` then does not).

    Save it with ``save_pretrained`` and load it with ``diffusers_ve.VEPipeline.from_pretrained(folder)``
    (``DiffusionPipeline.from_pretrained`` cannot resolve a pipeline class outside diffusers).

    To change lambda for good (it is then saved with the pipeline), on this or any pipeline holding a VE scheduler:
    ``pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, reverse_noise=0.5)``.

    Args:
        unet: the denoising model; it reads the VP sample ``x = z / sqrt(1 + t)`` and a model timestep.
        scheduler: the sampler; its config carries the model's beta table and prediction type.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        reverse_noise: Optional[float] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Union[Callable, PipelineCallback, MultiPipelineCallbacks, None] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate images.

        Args:
            batch_size: number of images.
            num_inference_steps: grid points of the scheduler (``VEHeunScheduler`` makes about twice as many
                model calls); the progress bar counts these steps.
            generator: a ``torch.Generator``, or a list of ``batch_size`` of them (one per image), for the
                starting noise and the reverse noise.
            latents: the starting VP sample ``x_T`` of shape ``(batch_size, C, H, W)``; drawn from ``N(0, I)``
                (times the scheduler's ``init_noise_sigma``) if omitted.
            reverse_noise: lambda for this call only (a finite real >= 0); the pipeline's scheduler and its saved
                config are left unchanged. Needs a VE scheduler.
            output_type: ``"pil"`` (PIL images), ``"np"`` (float32 array NHWC in [0, 1]) or ``"pt"`` (float32
                tensor NCHW in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called after every model call as ``callback(pipe, i, timestep, kwargs)``
                with the tensors named in ``callback_on_step_end_tensor_inputs``; may return replacements.
            callback_on_step_end_tensor_inputs: which tensors the callback receives (``"latents"``: the VP sample).

        Returns:
            ``ImagePipelineOutput(images)`` or ``(images,)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(batch_size, generator, latents, output_type, callback_on_step_end_tensor_inputs)
        scheduler = self.scheduler
        if reverse_noise is not None:
            self.scheduler = _with_reverse_noise(scheduler, reverse_noise)
        try:
            images = self._sample(batch_size, num_inference_steps, generator, latents, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs)
        finally:
            self.scheduler = scheduler
        images = self._postprocess(images, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def check_inputs(self, batch_size, generator, latents, output_type, tensor_inputs):
        """ValueError naming the argument for any input the call cannot use."""
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)} generators but `batch_size` is {batch_size}.")
        if latents is not None and tuple(latents.shape) != self._shape(batch_size):
            raise ValueError(f"`latents` must have shape {self._shape(batch_size)}; got {tuple(latents.shape)}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {output_type!r}.")
        bad = [k for k in tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}; got {bad}."
            )

    def _shape(self, batch_size):
        cfg = self.unet.config
        size = cfg.sample_size
        return (batch_size, cfg.in_channels, *((size, size) if isinstance(size, int) else size))

    def _sample(self, batch_size, num_inference_steps, generator, latents, callback, tensor_inputs):
        """The reverse loop in VP coordinates: model call, scheduler step, callback, progress bar."""
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device)  # first: some set init_noise_sigma here
        if latents is None:
            latents = randn_tensor(self._shape(batch_size), generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents.to(device, self.unet.dtype) * self.scheduler.init_noise_sigma
        timesteps = self.scheduler.timesteps
        order = getattr(self.scheduler, "order", 1)
        num_warmup_steps = len(timesteps) - num_inference_steps * order
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                model_output = self.unet(model_input, t).sample
                latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
                if callback is not None:
                    outputs = callback(self, i, t, {k: latents for k in tensor_inputs}) or {}  # "latents" only
                    latents = outputs.pop("latents", latents)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % order == 0):
                    progress_bar.update()
        return latents

    @staticmethod
    def _postprocess(images, output_type):
        images = (images.float() / 2 + 0.5).clamp(0, 1)  # float first: numpy has no bfloat16
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        return DiffusionPipeline.numpy_to_pil(images) if output_type == "pil" else images


def portable_scheduler(scheduler) -> SchedulerMixin:
    """The family's stock diffusers scheduler (``DDPMScheduler`` for a DDPM table; ``EDMEulerScheduler``,
    ``FlowMatchEulerDiscreteScheduler`` or ``ScoreSdeVeScheduler`` for the others) whose config carries every key of
    a VE scheduler's config: a folder plain diffusers loads.

    Plain diffusers samples it with that scheduler (same time axis, prediction type and clipping; it logs that it
    ignores our keys). With diffusers-ve installed, ``VEScheduler.from_config(pipe.scheduler.config)`` (or
    ``VEHeunScheduler.from_config``) restores the VE sampler with all its settings, family included. Every key is
    written out, not only the ones that differ from a default: diffusers would otherwise fill them with *its*
    defaults (``DDPMScheduler``'s ``clip_sample=True``) when the folder is loaded.

    Args:
        scheduler: a ``VEScheduler`` or ``VEHeunScheduler``.
    """
    if not isinstance(scheduler, VESchedulerBase):
        raise ValueError(f"`scheduler` must be a VEScheduler or VEHeunScheduler; got {type(scheduler).__name__}.")
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    if scheduler.family.name == "edm" and config["sigma_schedule"] == "log_t":
        config["sigma_schedule"] = "exponential"  # the same grid, under the name EDMEulerScheduler accepts
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # diffusers would call our keys "not expected": carrying them is the point
    try:
        return getattr(diffusers, scheduler.family.reference_scheduler).from_config(config)
    finally:
        logging.set_verbosity(level)


def _with_reverse_noise(scheduler, reverse_noise):
    """A copy of a VE scheduler with another lambda (the original and its config are untouched)."""
    if not isinstance(scheduler, VESchedulerBase):
        raise ValueError(
            f"`reverse_noise` needs a VE scheduler (VEScheduler or VEHeunScheduler); this pipeline holds "
            f"{type(scheduler).__name__}. Swap it first: "
            "`pipe.scheduler = VEScheduler.from_config(pipe.scheduler.config)`."
        )
    return type(scheduler).from_config(scheduler.config, reverse_noise=process.check_reverse_noise(reverse_noise))


__all__ = ["VEPipeline", "portable_scheduler"]
