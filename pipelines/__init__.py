"""SD3 / SD3.5 sampling with trajectories and log-probabilities, model loading, and the tiny offline model."""

from pipelines.hub import ModelLoadError
from pipelines.loading import load_pipeline
from pipelines.pipeline_sd3_logprob import (
    StableDiffusion3LogProbPipeline,
    StableDiffusion3LogProbPipelineOutput,
    guided_velocity,
    transition_log_probs,
)
from pipelines.sde import sde_step_with_logprob

__all__ = [
    "ModelLoadError",
    "StableDiffusion3LogProbPipeline",
    "StableDiffusion3LogProbPipelineOutput",
    "guided_velocity",
    "load_pipeline",
    "sde_step_with_logprob",
    "transition_log_probs",
]
