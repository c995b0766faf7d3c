"""JPEG (in)compressibility, as DDPO defines them: the size of the image encoded as JPEG at quality 95, in kB.

Compressibility is the negative size (smaller files score higher), incompressibility the size. Not differentiable.
Flow-GRPO scales compressibility by 1/500 (`scale: 0.002`).
"""

from __future__ import annotations

import io
from typing import Any

import PIL.Image
import torch

from rewards.base import Reward


def jpeg_size_kb(image: torch.Tensor, quality: int = 95) -> float:
    """The JPEG size in kB (1000 bytes) of one CHW image in [0, 1], rounded to 8 bits first as any saved image is."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JpegSizeReward(Reward):
    """`scale * size_kb` for incompressibility, `-scale * size_kb` for compressibility."""

    differentiable = False

    def __init__(self, compressible: bool = True, quality: int = 95, scale: float = 1.0):
        super().__init__()
        self.sign = -1.0 if compressible else 1.0
        self.quality = quality
        self.scale = scale

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        sizes = torch.tensor([jpeg_size_kb(image, self.quality) for image in images])
        return self.sign * self.scale * sizes, {"jpeg_kb": sizes}
