"""ImageReward (Xu et al. 2023): a BLIP-based human-preference reward, from the optional `image-reward` package.

Install it with `pip install image-reward` (it pins `timm==0.6.13`, which older open_clip releases accept; use a
separate environment if that conflicts). Its weights (`THUDM/ImageReward`) and BLIP's `bert-base-uncased` tokenizer
come from the Hugging Face hub, or from a local checkpoint file and `med_config.json`. Scored through the package's own
differentiable path (`score_gard`) on images preprocessed in torch, so ReFL can use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipelines.hub import ModelLoadError, check_hub_file
from rewards.base import Reward
from rewards.preprocess import clip_preprocess


class ImageRewardReward(Reward):
    """ImageReward score (standardised; about 0 on average, higher is better). Differentiable.

    Args:
        checkpoint: "ImageReward-v1.0" (downloaded from the hub) or a local `ImageReward.pt`.
        med_config: the BLIP text-encoder config `med_config.json`; None downloads it beside the checkpoint.
        download_root: where the package caches downloads (default `~/.cache/ImageReward`).
    """

    differentiable = True

    def __init__(
        self, checkpoint: str = "ImageReward-v1.0", med_config: str | None = None, download_root: str | None = None
    ):
        super().__init__()
        try:
            import ImageReward as image_reward
        except ImportError:
            raise ModelLoadError("reward=imagereward needs the optional package: `pip install image-reward`") from None
        local = Path(checkpoint).expanduser().is_file()
        if not local:
            check_hub_file("THUDM/ImageReward", "ImageReward.pt", "set reward.checkpoint=DIR/ImageReward.pt")
        if med_config is None:
            check_hub_file("THUDM/ImageReward", "med_config.json", "set reward.med_config=DIR/med_config.json")
        check_hub_file("google-bert/bert-base-uncased", "vocab.txt", "put it in the Hugging Face cache")
        self.model = image_reward.load(checkpoint, device="cpu", download_root=download_root, med_config=med_config)
        self.freeze()

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        self.model.device = images.device  # the package builds attention masks on `model.device`
        tokens = self.model.blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        ).to(images.device)
        pixels = clip_preprocess(images, 224)  # ImageReward's own transform: resize 224 bicubic, crop, CLIP stats
        scores = self.model.score_gard(tokens.input_ids, tokens.attention_mask, pixels)
        return scores.squeeze(-1), {}
