"""Single-file SD3 / SD3.5 checkpoints: the layout Stability AI publishes (`sd3_medium_incl_clips_t5xxlfp8.safetensors`,
`sd3.5_medium.safetensors`) and ComfyUI / A1111-style tools read.

Loading goes through diffusers' own `from_single_file` (pipelines/loading.py); this file only

- looks at a file's header (tensor names and shapes, no weights) to refuse what is not an SD3 checkpoint in one line,
  to tell which parts it holds (transformer, VAE, CLIP-L, CLIP-G, T5) and which hub config fits it, and to refuse a
  whole-pipeline load whose two CLIP encoders diffusers cannot tell apart (the same width);
- resolves where a file is: a local path, a hub file URL (`https://huggingface.co/ORG/REPO/blob/REV/FILE`) or
  `ORG/REPO/FILE` (downloaded into the Hugging Face cache, or refused in one line when offline);
- writes the layout from diffusers weights (`original_state_dict`, `save_single_file`): the inverse of diffusers'
  `convert_sd3_transformer_checkpoint_to_diffusers` and `convert_ldm_vae_checkpoint`, with the text encoders under
  `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` as in Stability AI's files. Tests load what it writes back through
  diffusers and compare images, so the two directions are checked against each other.

    python -m scripts.export_single_file MODEL_DIR OUT.safetensors [--no-t5] [--transformer-only]   # the command
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.hub import ModelLoadError, check_hub_file

SUFFIXES = (".safetensors", ".sft")
TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.",
                 "text_encoder_2": "text_encoders.clip_g.transformer.",
                 "text_encoder_3": "text_encoders.t5xxl.transformer."}
CLIP_POSITIONS = "text_model.embeddings.position_embedding.weight"  # [positions, width], the key diffusers reads
HUB_URL = re.compile(r"^https://huggingface\.co/([^/]+/[^/]+)/(?:blob|resolve)/([^/]+)/(.+)$")
# The hub config of each SD3 family, told apart as diffusers' infer_diffusers_model_type does (by shapes).
DEFAULT_CONFIGS = {"sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
                   "sd35_medium": "stabilityai/stable-diffusion-3.5-medium",
                   "sd35_large": "stabilityai/stable-diffusion-3.5-large"}


def is_single_file(path: str) -> bool:
    """A path or hub reference to one weights file (rather than a diffusers folder or a hub repository id)."""
    return str(path).endswith(SUFFIXES) or HUB_URL.match(str(path)) is not None


def locate(path: str, download: bool = True) -> Path | None:
    """The local path of a single-file checkpoint: the file itself, or a hub file found in the Hugging Face cache or
    (with `download`) fetched into it; without `download`, None for a hub file that is not cached yet but can be had.
    Raises `ModelLoadError` (one line) when it is missing or cannot be had."""
    local = Path(path).expanduser()
    if local.is_file():
        return local
    match = HUB_URL.match(path)
    parts = path.split("/")
    if match:
        repo_id, revision, filename = match.groups()
    elif len(parts) < 3 or path.startswith((".", "/", "~")) or Path(parts[0]).is_dir():
        raise ModelLoadError(f"model.path={path}: no such file (a single-file checkpoint is a local .safetensors "
                             f"file, ORG/REPO/FILE on the hub, or a hub file URL)")
    else:
        repo_id, revision, filename = "/".join(parts[:2]), None, "/".join(parts[2:])
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    check_hub_file(repo_id, filename, "set model.path=<the local file>", revision=revision)
    try:
        if not huggingface_hub.file_exists(repo_id, filename, revision=revision):
            raise ModelLoadError(f"{repo_id} has no file {filename} (model.path={path})")
        if not download:
            return None
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision))
    except ModelLoadError:
        raise
    except Exception as error:  # network failures come as many types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(f"cannot fetch {filename} from {repo_id} ({reason})") from None


@dataclass(frozen=True)
class SingleFileContents:
    """What a single-file checkpoint holds, read from its header."""

    transformer: bool
    vae: bool
    clip_l: bool
    clip_g: bool
    t5: bool
    family: str | None  # sd3, sd35_medium or sd35_large (None: an SD3-layout model of another size, e.g. a tiny one)
    clip_widths: tuple[int | None, int | None] = (None, None)  # CLIP-L's and CLIP-G's widths (None: not in the file)

    @property
    def default_config(self) -> str | None:
        return DEFAULT_CONFIGS.get(self.family) if self.family else None


def header_shapes(file: Path) -> dict[str, list[int]]:
    """Every tensor's name and shape, from the safetensors header (no weights read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:  # safetensors raises its own error types for a truncated or foreign file
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ModelLoadError(f"{file} is not a readable safetensors file ({reason})") from None


def inspect_file(file: Path) -> SingleFileContents:
    """Read what `file` holds; raise `ModelLoadError` if it holds no SD3 transformer (an SD1.5 / SDXL / Flux file, a
    LoRA, a VAE alone)."""
    shapes = header_shapes(file)
    prefix = TRANSFORMER_PREFIX if any(k.startswith(TRANSFORMER_PREFIX) for k in shapes) else ""
    if f"{prefix}joint_blocks.0.context_block.adaLN_modulation.1.bias" not in shapes:
        kind = ("a LoRA" if any("lora" in k for k in shapes) else
                "an SD1.x / SDXL checkpoint" if any(k.startswith(TRANSFORMER_PREFIX + "input_blocks") for k in shapes)
                else "not an SD3 / SD3.5 checkpoint")
        raise ModelLoadError(f"{file} holds no SD3 transformer (no joint_blocks.*; it looks like {kind}); "
                             f"model.path takes an SD3 / SD3.5 single-file checkpoint")
    family = None
    modulation = shapes[f"{prefix}joint_blocks.0.context_block.adaLN_modulation.1.bias"]
    if f"{prefix}joint_blocks.37.x_block.mlp.fc1.weight" in shapes:
        family = "sd35_large"
    elif modulation[-1] == 9216 and f"{prefix}pos_embed" in shapes:
        family = {36864: "sd3", 147456: "sd35_medium"}.get(shapes[f"{prefix}pos_embed"][1])
    return SingleFileContents(
        transformer=True,
        vae=any(k.startswith(VAE_PREFIX) for k in shapes),
        clip_l=any(k.startswith(TEXT_PREFIXES["text_encoder"]) for k in shapes),
        clip_g=any(k.startswith(TEXT_PREFIXES["text_encoder_2"]) for k in shapes),
        t5=any(k.startswith(TEXT_PREFIXES["text_encoder_3"]) for k in shapes),
        family=family,
        clip_widths=tuple(shapes.get(TEXT_PREFIXES[name] + CLIP_POSITIONS, [None])[-1]
                          for name in ("text_encoder", "text_encoder_2")),
    )


def check_text_encoders(path: str, contents: SingleFileContents) -> None:
    """Refuse, in one line, a whole-pipeline file whose CLIP-L and CLIP-G have the same width: diffusers'
    `from_single_file` tells the two apart by width alone (`create_diffusers_clip_model_from_ldm`; SD3's are 768 and
    1280): with a config of the same widths it loads CLIP-L's weights into both encoders, with another it fails with a
    bare `ValueError` (diffusers 0.42). `model.transformer_file` reads only the transformer, so any such file serves
    there."""
    clip_l, clip_g = contents.clip_widths
    if clip_l is not None and clip_l == clip_g:
        raise ModelLoadError(f"model.path={path}: its CLIP-L and CLIP-G text encoders are both {clip_l} wide, and "
                             f"diffusers tells the two apart by width (it would load CLIP-L into both); set model.path "
                             f"to a diffusers folder of the model, and model.transformer_file={path} to take only this "
                             f"file's transformer")


# ------------------------------------------------------------------------------- diffusers -> the original layout


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """Diffusers' `swap_scale_shift` (its own inverse): the two halves of a modulation's output exchanged."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_modules(layers: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """Every linear (or parameter group) of an SD3 transformer with `layers` blocks, as `(original module name,
    diffusers module names (several when the original fuses them: q, k and v into qkv), whether the two halves of its
    output are swapped (the modulations diffusers reorders))`. Modules a model lacks (SD3.5's attn2 in later blocks,
    the last block's context stream) are in the table; users skip what is absent."""
    table = [("x_embedder.proj", ("pos_embed.proj",), False),
             ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), False),
             ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), False),
             ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), False),
             ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), False),
             ("context_embedder", ("context_embedder",), False)]
    for i in range(layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        table += [(o + "x_block.attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), False),
                  (o + "context_block.attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"),
                   False),
                  (o + "x_block.attn2.qkv", (d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"), False)]
        table += [(o + original, (d + name,), False) for original, name in (
            ("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
            ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
            ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k"),
            ("x_block.attn.proj", "attn.to_out.0"), ("context_block.attn.proj", "attn.to_add_out"),
            ("x_block.attn2.proj", "attn2.to_out.0"), ("x_block.adaLN_modulation.1", "norm1.linear"),
            ("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2"),
            ("context_block.mlp.fc1", "ff_context.net.0.proj"), ("context_block.mlp.fc2", "ff_context.net.2"))]
        # the last block's context stream only feeds the joint attention: its modulation is diffusers'
        # AdaLayerNormContinuous, whose (shift, scale) halves are in the other order
        table.append((o + "context_block.adaLN_modulation.1", (d + "norm1_context.linear",), i == layers - 1))
    table += [("final_layer.linear", ("proj_out",), False),
              ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True)]
    return table


def block_count(names) -> int:
    return 1 + max(int(k.split(".")[1]) for k in names if k.startswith("transformer_blocks."))


def transformer_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An `SD3Transformer2DModel` state dict in the original MMDiT names (no prefix): q, k and v fused into `qkv`,
    the context-only last block and the final layer's modulation halves swapped back."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {"pos_embed": state.pop("pos_embed.pos_embed")}
    for original, diffusers, swap in transformer_modules(block_count(state)):
        for suffix in (".weight", ".bias"):
            names = [d + suffix for d in diffusers]
            if not all(n in state for n in names):
                continue
            tensor = torch.cat([state.pop(n) for n in names], dim=0)
            out[original + suffix] = _swap_halves(tensor) if swap else tensor
    if state:
        raise ValueError(f"transformer weights without an original name: {sorted(state)[:5]}")
    return out


def vae_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An `AutoencoderKL` state dict in the LDM names (no prefix): the inverse of diffusers'
    `convert_ldm_vae_checkpoint` (decoder up blocks in reverse order, the mid-block attention as 1x1 convolutions)."""
    ups = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, tensor in state.items():
        name = key
        for side in ("encoder", "decoder"):
            name = name.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{ups - 1 - int(m[1])}.block.",
                      name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                      lambda m: f"decoder.up.{ups - 1 - int(m[1])}.upsample.", name)
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        name = name.replace("conv_shortcut.", "nin_shortcut.")
        match = re.match(r"(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", name)
        if match:
            name = f"{match[1]}mid.attn_1.{attention[match[2]]}.{match[3]}"
            if match[2] != "group_norm" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # linear -> 1x1 convolution
        out[name] = tensor
    return out


def original_state_dict(components: dict, include_t5: bool = True, transformer_only: bool = False
                        ) -> dict[str, torch.Tensor]:
    """A pipeline's weights in the single-file layout: `model.diffusion_model.*`, `first_stage_model.*` and
    `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*` (T5 left out with `include_t5=False`, as in
    `sd3_medium_incl_clips.safetensors`; only the transformer with `transformer_only`)."""
    out = {TRANSFORMER_PREFIX + k: v
           for k, v in transformer_to_original(components["transformer"].state_dict()).items()}
    if transformer_only:
        return out
    out.update({VAE_PREFIX + k: v for k, v in vae_to_original(components["vae"].state_dict()).items()})
    for name, prefix in TEXT_PREFIXES.items():
        encoder = components.get(name)
        if encoder is not None and (include_t5 or name != "text_encoder_3"):
            out.update({prefix + k: v for k, v in encoder.state_dict().items()})
    return out


def save_single_file(components: dict, file: str | Path, include_t5: bool = True,
                     transformer_only: bool = False) -> Path:
    """Write `original_state_dict(...)` as one safetensors file (tied weights, such as T5's shared embedding, are
    stored once per name, as in Stability AI's files)."""
    from safetensors.torch import save_file

    state = original_state_dict(components, include_t5=include_t5, transformer_only=transformer_only)
    seen: set[int] = set()
    tensors = {}
    for key, tensor in state.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if pointer in seen else tensor  # safetensors refuses shared storage
        seen.add(pointer)
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


if __name__ == "__main__":  # the command moved out of this library module
    print("error: this command moved: python -m scripts.export_single_file MODEL_DIR OUT.safetensors [--no-t5] "
          "[--transformer-only]", file=sys.stderr)
    sys.exit(2)
