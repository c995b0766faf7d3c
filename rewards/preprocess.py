"""Differentiable image preprocessing for CLIP-style reward models (`docs/algorithms.md` section 7).

The reference pipelines (open_clip's and transformers' processors) go through PIL, which cuts the gradient. This does
the same resize / center crop / normalise in torch, so that ReFL and DRaFT can back-propagate a reward into images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic, antialiased), center-crop `size` x `size`, and normalise.

    `images` are NCHW in [0, 1]. Bicubic overshoot is clamped back to [0, 1], as the 8-bit PIL pipeline does.
    """
    height, width = images.shape[-2:]
    # The shorter side becomes `size`; the longer is truncated as torchvision's Resize(size) does.
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    if (new_height, new_width) != (height, width):
        images = F.interpolate(
            images.float(), size=(new_height, new_width), mode="bicubic", antialias=True, align_corners=False
        ).clamp(0, 1)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    images = images[..., top : top + size, left : left + size]
    mean_tensor = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_tensor) / std_tensor
