"""The LAION aesthetic predictor: a CLIP ViT-L/14 image embedding, L2-normalised, into a small head.

Heads load in their published formats:

- the improved predictor (christophschuhmann/improved-aesthetic-predictor, e.g. `sac+logos+ava1-l14-linearMSE.pth`):
  `Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16) Linear(16,1)`, no
  activations, keys `layers.{0,2,4,6,7}.{weight,bias}`; a copy ships in `assets/aesthetic/`;
- the v1 linear predictor (LAION-AI/aesthetic-predictor, `sa_0_4_vit_l_14_linear.pth`): one `Linear(768, 1)`, keys
  `weight`, `bias`;
- the Hugging Face format of `shunk031/aesthetics-predictor-*`: a `CLIPVisionModelWithProjection` folder whose weights
  also hold the head (`layers.*` for v2, `predictor.*` for v1); the CLIP tower then comes from the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.hub import ModelLoadError, check_hub_file, looks_like_hub_id
from rewards.base import Reward
from rewards.clip_model import ClipModel

SHIPPED_HEADS = Path(__file__).resolve().parents[1] / "assets" / "aesthetic"
IMPROVED_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
EXPECTED_FORMATS = (
    "an improved-aesthetic-predictor MLP (keys layers.{0,2,4,6,7}.weight/bias) or a v1 linear head (keys weight, bias)"
)


def improved_head(embed_dim: int = 768) -> nn.Sequential:
    """The improved predictor's MLP (the dropouts are inactive in eval mode, so it is a linear map)."""
    return nn.Sequential(
        nn.Linear(embed_dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def head_from_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Build the head whose published format matches the keys of `state_dict`."""
    keys = set(state_dict)
    if keys == IMPROVED_KEYS:
        head = improved_head(state_dict["layers.0.weight"].shape[1])
        head.load_state_dict({k.removeprefix("layers."): v for k, v in state_dict.items()})
    elif keys == {"weight", "bias"} and state_dict["weight"].ndim == 2 and state_dict["weight"].shape[0] == 1:
        head = nn.Linear(state_dict["weight"].shape[1], 1)
        head.load_state_dict(state_dict)
    else:
        shown = ", ".join(sorted(keys)[:6]) + (", ..." if len(keys) > 6 else "")
        raise ModelLoadError(f"{source} is not an aesthetic head: expected {EXPECTED_FORMATS}; found keys {shown}")
    return head


def load_head_file(path: str) -> nn.Module:
    """Load a head from a `.pth` file, as given or by name from `assets/aesthetic/`."""
    file = Path(path).expanduser()
    if not file.is_file() and (SHIPPED_HEADS / path).is_file():
        file = SHIPPED_HEADS / path
    if not file.is_file():
        raise ModelLoadError(f"aesthetic head {path}: no such file "
                             f"(shipped: {sorted(p.name for p in SHIPPED_HEADS.iterdir())})")
    try:
        # The LAION files were saved on a GPU; map_location lets them load anywhere.
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"cannot read aesthetic head {file} ({type(error).__name__}): "
                             f"expected {EXPECTED_FORMATS}") from None
    if not isinstance(state_dict, dict):
        raise ModelLoadError(f"{file} holds a {type(state_dict).__name__}, not a state dict: "
                             f"expected {EXPECTED_FORMATS}")
    return head_from_state_dict(state_dict, str(file))


def load_hf_predictor(name: str) -> tuple[ClipModel, nn.Module]:
    """A `shunk031/aesthetics-predictor-*` folder or hub id: its CLIP vision tower and its head."""
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file

    folder = Path(name).expanduser()
    if not folder.is_dir():
        if not looks_like_hub_id(name):
            raise ModelLoadError(f"aesthetic predictor {name}: no such folder "
                                 f"(and not a hub id of the form 'org/name')")
        check_hub_file(name, "config.json", "set the reward's head=DIR")
        folder = Path(snapshot_download(name))
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    for file in sorted(folder.glob("pytorch_model*.bin")):
        weights.update(torch.load(file, map_location="cpu", weights_only=True))
    head_weights = {k.removeprefix("predictor."): v for k, v in weights.items() if k.startswith("predictor.")}
    head_weights |= {k: v for k, v in weights.items() if k.startswith("layers.")}
    if not head_weights:
        raise ModelLoadError(f"{folder} holds no aesthetic head (no layers.* or predictor.* weights)")
    return ClipModel(backend="hf_vision", model=str(folder)), head_from_state_dict(head_weights, str(folder))


class AestheticReward(Reward):
    """LAION aesthetic score (roughly 1-10) of each image; the prompt is not used. Differentiable.

    Args:
        clip: the CLIP image tower (ViT-L/14 from OpenAI for the published heads). None with an HF predictor `head`.
        head: a head `.pth` file (a path, or a file name in `assets/aesthetic/`), or a `shunk031/aesthetics-predictor-*`
            folder / hub id, which carries its own CLIP tower.
    """

    differentiable = True

    def __init__(self, clip: ClipModel | None = None, head: str = "sac+logos+ava1-l14-linearMSE.pth"):
        super().__init__()
        if str(head).endswith((".pth", ".pt")):
            if clip is None:
                raise ModelLoadError("an aesthetic head file needs a CLIP image tower: set the reward's clip")
            self.clip, self.head = clip, load_head_file(head)
        else:
            self.clip, self.head = load_hf_predictor(head)
        head_width = next(self.head.parameters()).shape[1]
        embed_width = self.clip.embed_dim
        if head_width != embed_width:
            raise ModelLoadError(f"the aesthetic head takes {head_width}-d embeddings but the CLIP tower gives "
                                 f"{embed_width}-d")
        self.freeze()

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        embeds = self.clip.embed_images(images).float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.head(embeds).squeeze(-1), {}
