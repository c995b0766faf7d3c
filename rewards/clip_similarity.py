"""Text-image similarity rewards on one CLIP machinery: CLIP score, PickScore and HPSv2.

All three score `scale * [logit_scale] * cos(image_embedding, text_embedding)`; they differ in the CLIP weights
(`conf/reward/clip_score.yaml`, `pickscore.yaml`, `hpsv2.yaml`):

- CLIP score: any CLIP; CLIPScore (Hessel et al. 2021) reports `2.5 * max(cos, 0)`, others `100 * cos`;
- PickScore: CLIP-H/14 fine-tuned on Pick-a-Pic (`yuvalkirstain/PickScore_v1`), `logit_scale * cos`, which Flow-GRPO
  divides by 26;
- HPSv2: open_clip ViT-H-14 with the HPS v2 / v2.1 checkpoint, `cos` (HPSv2 pads to a square before resizing; for the
  square images diffusion models make, that is the same resize this uses).
"""

from __future__ import annotations

from typing import Any

import torch

from rewards.base import Reward
from rewards.clip_model import ClipModel, cosine_similarity


class ClipSimilarityReward(Reward):
    """`scale * (logit_scale if use_logit_scale) * cos(image, prompt)`, with negative cosines clamped to 0 if asked.

    Differentiable in the images.
    """

    differentiable = True

    def __init__(
        self, clip: ClipModel, scale: float = 1.0, use_logit_scale: bool = False, clamp_negative: bool = False
    ):
        super().__init__()
        self.clip = clip
        self.scale = scale
        self.use_logit_scale = use_logit_scale
        self.clamp_negative = clamp_negative
        self.freeze()

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cosine = cosine_similarity(self.clip.embed_images(images).float(), self.clip.embed_texts(prompts).float())
        similarity = cosine.clamp(min=0) if self.clamp_negative else cosine
        if self.use_logit_scale:
            similarity = similarity * self.clip.logit_scale.float()
        return self.scale * similarity, {"cosine": cosine.detach()}
