"""Rewards for image-to-image edits, which compare each image with its prompt's source image (`metadata["image"]`).

`BolderDigit` (`reward=digits_bolder`): the digits world's "make the digit bolder". The edit must keep the digit the
prompt asks for, `p(asked digit | image)` under the world's classifier (rewards/digits.py), and add ink: the mean
brightness of the image (the world draws light strokes on black) above the source's. The score is
`p + weight * (ink(image) - ink(source))`; `info` carries `correct` (the classifier's top class is the asked digit) and
`ink_gain`, whose held-out means say whether the model learned the edit without losing the digit.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from rewards.base import Reward, RewardInputError
from rewards.digits import DigitReward


@lru_cache(maxsize=4096)
def _source_pixels(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A source image as CHW float in [0, 1] at `size` (height, width)."""
    import PIL.Image

    with PIL.Image.open(path) as opened:
        image = opened.convert("RGB").resize((size[1], size[0]), PIL.Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def source_images(metadata: list[dict], size: tuple[int, int], reward: str) -> torch.Tensor:
    """The prompts' source images (NCHW in [0, 1], at the images' size); `RewardInputError` for a prompt without."""
    missing = [i for i, m in enumerate(metadata) if not m.get("image")]
    if missing:
        raise RewardInputError(f"reward={reward} compares each image with its prompt's source image: use a prompt set "
                               f"with an 'image' per prompt (image-to-image), e.g. prompts=digits_edit")
    return torch.stack([_source_pixels(str(m["image"]), size) for m in metadata])


def ink(images: torch.Tensor) -> torch.Tensor:
    """The mean brightness of each image (N,), in [0, 1]."""
    return images.float().mean(dim=(1, 2, 3))


class BolderDigit(Reward):
    """`p(asked digit | image) + weight * (ink(image) - ink(source))` (see the module's docstring)."""

    differentiable = True

    def __init__(self, weight: float = 2.0, weights: str | None = None):
        super().__init__()
        if weight <= 0:
            raise RewardInputError(f"reward.weight must be positive, got {weight}")
        self.weight = weight
        self.digits = DigitReward(weights)

    def check_prompts(self, prompts) -> None:
        self.digits.check_prompts(prompts)

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        keep, info = self.digits.score(images, prompts, metadata)
        sources = source_images(metadata, tuple(images.shape[-2:]), "digits_bolder").to(images.device)
        gain = ink(images) - ink(sources)
        return keep + self.weight * gain, {"correct": info["correct"], "ink_gain": gain.detach(),
                                           "keep": keep.detach()}
