from .pipeline_ve import VEPipeline  # noqa: F401
from .pipeline_ve_likelihood import VELikelihoodPipeline, VELikelihoodPipelineOutput  # noqa: F401
