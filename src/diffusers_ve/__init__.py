"""diffusers-ve: McAllester's variance-exploding diffusion z(t) = y + sqrt(t) eps for Hugging Face diffusers.

Every module that defines a saveable class is imported here eagerly: diffusers resolves foreign classes by
their full module path in ``sys.modules`` when it loads a saved pipeline.
"""

from . import process
from .schedulers.scheduling_ve import VEScheduler
from .schedulers.scheduling_ve_heun import VEHeunScheduler
from .pipelines.pipeline_ve import VEPipeline
from .pipelines.pipeline_ve_likelihood import VELikelihoodPipeline
from . import checkpointing, data, training

__version__ = "0.1.0"

__all__ = ["VEScheduler", "VEHeunScheduler", "VEPipeline", "VELikelihoodPipeline", "process", "training", "data", "checkpointing"]
