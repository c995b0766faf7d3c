"""CLIP image and text towers from open_clip or transformers, behind one small interface, for reward models.

Two tiny open_clip architectures ship in `rewards/clip_configs/` (`tiny-ViT-768`, the embedding width of ViT-L/14, and
`tiny-ViT-1024`, that of ViT-H/14); with `pretrained=None` they give random weights (always the same ones) for tests
and CPU experiments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from pipelines.hub import ModelLoadError, check_hub_file, looks_like_hub_id
from rewards.preprocess import clip_preprocess

TINY_CONFIGS = Path(__file__).resolve().parent / "clip_configs"


class ClipModel(torch.nn.Module):
    """A frozen CLIP model: `embed_images` (differentiable in the images) and `embed_texts`.

    Args:
        backend: "open_clip", "hf" (transformers' `CLIPModel`), or "hf_vision" (an image tower alone,
            `CLIPVisionModelWithProjection`, as aesthetic predictors ship it; it has no `embed_texts`).
        model: open_clip: an architecture name (`ViT-L-14`, `ViT-H-14`, `tiny-ViT-768`, ...); hf: a hub id or a local
            folder saved with `save_pretrained` (with its tokenizer and image processor).
        pretrained: open_clip only: a pretrained tag (`openai`, `laion2b_s32b_b79k`), a local checkpoint file, a file
            on the hub as `org/repo/filename` (HPSv2's `xswu/HPSv2/HPS_v2.1_compressed.pt`), or None for random
            weights.
        processor: hf only: where the tokenizer and image processor live when not beside the model (PickScore uses
            `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s).
        dtype: the weights' dtype, "float32" (the default), "bfloat16" or "float16": half the memory (PickScore's
            CLIP-H is 3.9 GB in float32); the embeddings are returned in float32.
    """

    def __init__(
        self,
        backend: Literal["open_clip", "hf", "hf_vision"] = "open_clip",
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        processor: str | None = None,
        dtype: str = "float32",
    ):
        super().__init__()
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ModelLoadError(f"the reward's clip.dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        self.backend = backend
        if backend == "open_clip":
            self._load_open_clip(model, pretrained)
        elif backend in ("hf", "hf_vision"):
            self._load_hf(model, processor, vision_only=backend == "hf_vision")
        else:
            raise ModelLoadError(f"CLIP backend must be 'open_clip', 'hf' or 'hf_vision', got {backend!r}")
        self.model.to(dtype=dtypes[dtype])
        self.eval()
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _load_open_clip(self, name: str, pretrained: str | None) -> None:
        import open_clip

        open_clip.add_model_config(TINY_CONFIGS)
        if name not in open_clip.list_models():
            raise ModelLoadError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
        if pretrained and not Path(pretrained).expanduser().is_file():
            pretrained = self._fetch_open_clip_weights(name, pretrained)
        try:
            with torch.random.fork_rng():  # random weights (pretrained=None) are the same in every run
                torch.manual_seed(0)
                self.model = open_clip.create_model(name, pretrained=pretrained)
        except Exception as error:  # a download that fails offline surfaces as many exception types
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelLoadError(
                f"cannot load open_clip {name} weights {pretrained!r} ({reason}); download the checkpoint where the "
                f"hub is reachable and set the reward's clip.pretrained=<file>"
            ) from None
        self.tokenizer = open_clip.get_tokenizer(name)
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = preprocess.get("size", 224)
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean, self.std = tuple(preprocess["mean"]), tuple(preprocess["std"])

    @staticmethod
    def _fetch_open_clip_weights(name: str, pretrained: str) -> str:
        """Check that a tag's or a hub file's weights can be had (fast, before open_clip's slow retries); returns what
        to pass to `open_clip.create_model`."""
        import open_clip
        from huggingface_hub import hf_hub_download

        if pretrained.count("/") >= 2:  # org/repo/filename on the hub
            repo, filename = "/".join(pretrained.split("/")[:2]), pretrained.split("/", 2)[2]
            check_hub_file(repo, filename, "set the reward's clip.pretrained=<local file>")
            return hf_hub_download(repo, filename)
        if pretrained not in open_clip.list_pretrained_tags_by_model(name):
            raise ModelLoadError(
                f"open_clip has no pretrained tag {pretrained!r} for {name} and no such file exists; "
                f"tags: {open_clip.list_pretrained_tags_by_model(name)}"
            )
        repo = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub", "").strip("/")
        if repo:
            files = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            check_hub_file(repo, files, f"set the reward's clip.pretrained=DIR/{files[1]}")
        return pretrained

    def _load_hf(self, name: str, processor: str | None, vision_only: bool = False) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

        for source in dict.fromkeys([name, processor or name]):  # the model first, then its processor, once each
            if Path(source).expanduser().is_dir():
                continue
            if not looks_like_hub_id(source):
                raise ModelLoadError(f"CLIP model {source}: no such folder (and not a hub id of the form 'org/name')")
            needed = "config.json" if source == name else "preprocessor_config.json"
            option = "clip.model" if source == name else "clip.processor"
            check_hub_file(source, needed, f"set the reward's {option}=DIR")
        if vision_only:
            self.model, self.tokenizer = CLIPVisionModelWithProjection.from_pretrained(name), None
        else:
            self.model = CLIPModel.from_pretrained(name)
            self.tokenizer = AutoTokenizer.from_pretrained(processor or name)
        image_processor = CLIPImageProcessor.from_pretrained(processor or name)
        crop = image_processor.crop_size
        self.image_size = int(crop) if isinstance(crop, int) else int(crop["height"])
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (not normalised) of NCHW images in [0, 1]; differentiable in `images`."""
        pixels = clip_preprocess(images, self.image_size, self.mean, self.std).to(self.dtype)
        if self.backend == "open_clip":
            return self.model.encode_image(pixels).float()
        vision = self.model.vision_model(pixel_values=pixels)
        return self.model.visual_projection(vision.pooler_output).float()

    @property
    def embed_dim(self) -> int:
        """The width of the image embeddings."""
        if self.backend == "open_clip":
            return self.model.visual.output_dim
        return self.model.visual_projection.out_features

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (not normalised), one per prompt."""
        if self.tokenizer is None:
            raise ModelLoadError("this CLIP model is an image tower only; text rewards need a full CLIP model")
        device = next(self.model.parameters()).device
        if self.backend == "open_clip":
            return self.model.encode_text(self.tokenizer(prompts).to(device)).float()
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        text = self.model.text_model(input_ids=tokens.input_ids.to(device),
                                     attention_mask=tokens.attention_mask.to(device))
        return self.model.text_projection(text.pooler_output).float()

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned temperature, exponentiated (100 for OpenAI CLIP)."""
        return self.model.logit_scale.float().exp()


def cosine_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of matching image and text embeddings, shape [B]."""
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return (image_embeds * text_embeds).sum(dim=-1)
