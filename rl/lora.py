"""LoRA on the SD3 transformer (and optionally the two CLIP text encoders), through peft and diffusers' integration.

Adapters are added with `model.add_adapter(LoraConfig(...))`, saved with `StableDiffusion3Pipeline.save_lora_weights`
(so a stock `pipe.load_lora_weights(dir)` loads them), and read back for resuming with peft's
`set_peft_model_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import _set_state_dict_into_text_encoder
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

# The attention projections of each MMDiT block: image stream (to_*) and text stream (add_*), as Flow-GRPO and the
from pipelines.configs import check_values
from pipelines.errors import ConfigError, writing

# The attention projections of each MMDiT block: image stream (to_*) and text stream (add_*), as Flow-GRPO and the
# diffusers SD3 LoRA recipe target them.
TRANSFORMER_LORA_MODULES = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
TEXT_ENCODER_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LoraSpec:
    """Where and how big the adapters are (built from `algo.lora` in the config)."""

    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    init: bool | str = "gaussian"  # peft's init_lora_weights: gaussian (SD3 recipes), true (Kaiming / zeros),
    #                                pissa, ...
    target_modules: list[str] = field(default_factory=lambda: list(TRANSFORMER_LORA_MODULES))
    blocks: list[int] | None = None  # transformer block indices to adapt; None: all
    text_encoders: bool = False  # also adapt both CLIP text encoders (DreamBooth)
    text_encoder_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_LORA_MODULES))

    def __post_init__(self):
        check_values("algo.lora", self, positive=("rank", "alpha"))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"algo.lora.dropout must be in [0, 1), got {self.dropout!r}")

    def config(self, target_modules: list[str]) -> LoraConfig:
        init = True if self.init in (True, "true", "True") else self.init
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            init_lora_weights=init,
            target_modules=target_modules,
        )


def transformer_lora_targets(transformer: SD3Transformer2DModel, spec: LoraSpec) -> list[str]:
    """The full module names LoRA will wrap; raises ValueError if a block or a module does not exist."""
    num_blocks = len(transformer.transformer_blocks)
    blocks = list(range(num_blocks)) if spec.blocks is None else list(spec.blocks)
    bad_blocks = [b for b in blocks if not 0 <= b < num_blocks]
    if bad_blocks:
        raise ConfigError(f"LoRA blocks {bad_blocks} do not exist: the transformer has blocks 0..{num_blocks - 1}")
    names = {name for name, _ in transformer.named_modules()}
    targets = [f"transformer_blocks.{b}.{m}" for b in blocks for m in spec.target_modules]
    missing = [m for m in spec.target_modules if not any(f"transformer_blocks.{b}.{m}" in names for b in blocks)]
    if missing:
        raise ConfigError(f"LoRA target modules {missing} are not in the transformer's blocks")
    # Modules that exist only in some blocks (e.g. SD3.5's attn2 in the first blocks) are kept where they exist.
    return [t for t in targets if t in names]


def add_transformer_lora(transformer: SD3Transformer2DModel, spec: LoraSpec) -> list[str]:
    """Add a LoRA adapter to the transformer; only the adapter's weights are trainable afterwards."""
    targets = transformer_lora_targets(transformer, spec)
    transformer.requires_grad_(False)
    transformer.add_adapter(spec.config(targets))
    return targets


def add_text_encoder_lora(text_encoder: torch.nn.Module, spec: LoraSpec) -> None:
    text_encoder.requires_grad_(False)
    text_encoder.add_adapter(spec.config(list(spec.text_encoder_modules)))


def save_lora(
    directory: Path,
    transformer: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> None:
    """Write the adapters in diffusers' format (`pytorch_lora_weights.safetensors`), each with its peft config in the
    file's metadata: without it a stock `load_lora_weights` takes alpha = rank, and any other alpha (Flow-GRPO's 64 for
    rank 32) would load at the wrong scale."""
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    with writing(Path(directory) / "pytorch_lora_weights.safetensors"):  # a full disk: an OSError naming the file
        StableDiffusion3Pipeline.save_lora_weights(
            directory,
            transformer_lora_layers=get_peft_model_state_dict(transformer),
            transformer_lora_adapter_metadata=adapter_metadata(transformer),
            **{f"{name}_lora_layers": get_peft_model_state_dict(m) for name, m in encoders.items() if m is not None},
            **{f"{name}_lora_adapter_metadata": adapter_metadata(m) for name, m in encoders.items() if m is not None},
        )


def adapter_metadata(module: torch.nn.Module) -> dict:
    """The adapter's peft config as diffusers stores it in a LoRA file (rank, alpha, targets)."""
    config = module.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def load_lora(
    directory: Path,
    transformer: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> None:
    """Set the weights of already-added adapters from a directory written by `save_lora` (used when resuming)."""
    state_dict = StableDiffusion3Pipeline.lora_state_dict(directory)
    transformer_state = {k.removeprefix("transformer."): v for k, v in state_dict.items()
                         if k.startswith("transformer.")}
    incompatible = set_peft_model_state_dict(transformer, convert_unet_state_dict_to_peft(transformer_state), "default")
    if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
        raise ConfigError(f"LoRA checkpoint {directory} does not match the adapter (another algo.lora?): "
                          f"{incompatible.unexpected_keys[:3]}")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(state_dict, prefix="text_encoder.", text_encoder=text_encoder)
    if text_encoder_2 is not None:
        _set_state_dict_into_text_encoder(state_dict, prefix="text_encoder_2.", text_encoder=text_encoder_2)
