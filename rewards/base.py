"""The reward contract shared by every reward model.

A reward is called as `reward(images, prompts, metadata) -> (scores, info)`:

- `images`: a float tensor in [0, 1], NCHW with 3 channels, on any device;
- `prompts`: one string per image; `metadata`: one dict per image (e.g. GenEval's objects), or None;
- `scores`: a float32 tensor of shape [B] on the images' device;
- `info`: extra values to log, each a tensor [B] or a number.

`differentiable` says whether gradients flow from the scores back to the images (ReFL and DRaFT need that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipelines.errors import UserError


class RewardUnavailableError(UserError):
    """A reward computed by another process or machine (a served reward, a VLM judge's API) failed for good. The
    reward contract's one failure that a training run survives: it checkpoints the step it reached, then stops, and
    the same command resumes there (`rl.session.Session.saving_on_failure`)."""


class RewardInputError(UserError):
    """The images or prompts passed to a reward are not what the contract asks for."""


def check_reward_inputs(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
) -> None:
    """Raise `RewardInputError` (one line) for empty batches, wrong shapes or dtypes, NaNs, or values outside [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardInputError(f"images must be NCHW with 3 channels, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise RewardInputError("the batch of images is empty")
    if not images.is_floating_point():
        raise RewardInputError(f"images must be a float tensor in [0, 1], got {images.dtype}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        count = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise RewardInputError(f"got {count} for {images.shape[0]} images; pass one prompt per image")
    if metadata is not None and len(metadata) != images.shape[0]:
        raise RewardInputError(f"got {len(metadata)} metadata entries for {images.shape[0]} images")
    with torch.no_grad():
        if torch.isnan(images).any():
            raise RewardInputError("images contain NaN values")
        low, high = images.min().item(), images.max().item()
    if low < -1e-3 or high > 1 + 1e-3:
        raise RewardInputError(f"images must be in [0, 1], got values in [{low:.3f}, {high:.3f}] "
                               f"(were they in [-1, 1]?)")


class Reward(torch.nn.Module):
    """Base class: validates the inputs, then calls `score`. Subclasses set `differentiable` and implement `score`.

    Rewards are `nn.Module`s so that their networks move with `.to(device)`; their weights are frozen (`eval()`,
    `requires_grad_(False)`), and gradients, when `differentiable`, flow only to the images.
    """

    differentiable: bool = False

    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        check_reward_inputs(images, prompts, metadata)
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        scores, info = self.score(images.to(self.device), list(prompts), metadata)
        return scores.float().to(images.device), info

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise `RewardInputError` (one line) if the reward cannot score images of these prompts; the entry point
        calls it on the prompt sets before any model loads. Most rewards take any prompt."""

    def check_metadata(self, prompts: Sequence[str], metadata: Sequence[dict]) -> None:
        """Raise `RewardInputError` (one line) if the prompts' metadata is not what the reward reads (GenEval's
        objects); called with `check_prompts`, before any model loads. Most rewards read none."""

    def freeze(self) -> Reward:
        """Put every sub-network in eval mode with no trainable parameters; returns self."""
        self.eval()
        self.requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        """Where the reward's networks are (the CPU for rewards without any)."""
        parameter = next(self.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")
