"""A weighted sum of rewards, logging each component."""

from __future__ import annotations

from typing import Any

import torch

from pipelines.errors import ConfigError
from rewards.base import Reward


class MultiReward(Reward):
    """`sum_i weights[i] * components[i](images)`; `info` holds each component's raw scores under its name.

    Differentiable when every component with a non-zero weight is.
    """

    differentiable: bool | None = None  # decided by the components when built (`rl.run` cannot tell before)

    def __init__(self, components: dict[str, Reward], weights: dict[str, float]):
        super().__init__()
        if set(components) != set(weights):
            raise ConfigError(f"reward weights {sorted(weights)} must name exactly the components {sorted(components)}")
        if not components:
            raise ConfigError("a multi-reward needs at least one component")
        self.components = torch.nn.ModuleDict(components)
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.differentiable = all(c.differentiable for n, c in components.items() if self.weights[n] != 0)

    def check_prompts(self, prompts) -> None:
        for component in self.components.values():
            component.check_prompts(prompts)

    def check_metadata(self, prompts, metadata) -> None:
        for component in self.components.values():
            component.check_metadata(prompts, metadata)

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        total = torch.zeros(images.shape[0], device=images.device)
        info: dict[str, Any] = {}
        for name, component in self.components.items():
            scores, component_info = component(images, prompts, metadata)
            total = total + self.weights[name] * scores
            info[name] = scores.detach()
            info.update({f"{name}/{key}": value for key, value in component_info.items()})
        return total, info
