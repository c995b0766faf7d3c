"""What the entry point hands to every algorithm: typed objects built from the config, never the config itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from pipelines import StableDiffusion3LogProbPipeline
from pipelines.errors import ConfigError
from rewards import Reward
from rl.data import ImageCaptionData
from rl.prompts import Prompt
from rl.tracking import LoggerConfig, make_accelerator


@dataclass
class RunContext:
    """The run's directory, seed, model loader, prompt sets, reward, training data and logging choices.

    `load_pipeline(device=...)` loads the configured model (see `pipelines.load_pipeline`); the algorithm calls it once
    it knows its device. `config` is the resolved configuration as a plain dict, for trackers' hyperparameter tables.
    """

    run_dir: Path
    seed: int
    load_pipeline: Callable[..., StableDiffusion3LogProbPipeline]
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    logger: LoggerConfig
    config: dict[str, Any]
    mixed_precision: str = "no"
    reward: Reward | None = None
    data: ImageCaptionData | None = None

    def require_reward(self, algo: str) -> Reward:
        """The reward, which `algo` cannot run without."""
        if self.reward is None:
            raise ConfigError(f"algo={algo} needs a reward: reward=<name> (e.g. reward=jpeg_compressibility)")
        return self.reward

    def accelerator(self, **kwargs) -> Accelerator:
        """An `Accelerator` for this run, logging to `metrics.jsonl` and the configured trackers."""
        return make_accelerator(self.run_dir, self.logger, self.config, self.mixed_precision, **kwargs)
