"""A LoRA in the layout ComfyUI reads for SD3 (kohya-style names): the original
checkpoint's module names (`lora_unet_joint_blocks_0_x_block_attn_qkv`), `lora_down` / `lora_up` / `alpha`.

Diffusers trains LoRA on separate q, k and v projections; the original model fuses them into one `qkv` linear. The
three adapters become one exactly: `down = [A_q; A_k; A_v]` (rank 3r) and `up = diag(B_q, B_k, B_v)`, so that
`up @ down = [B_q A_q; B_k A_k; B_v A_v]`, each block the adapter's own update; `alpha` is scaled with the rank
(these tools apply `alpha / rank`) so that every block keeps its scale `alpha / r`. The way back splits the blocks and
refuses a fused adapter that is not block-diagonal (one trained on `qkv` itself has no exact split). Module names come
from the same table as the single-file checkpoint (pipelines/single_file.py), whose weights diffusers' own converter
reads back; a test merges both layouts into their models and compares the weights.

    python -m scripts.write_comfyui_lora RUN_DIR/final       # writes final/comfyui_lora.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipelines.errors import writing
from pipelines.single_file import _swap_halves, transformer_modules

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
ORIGINAL_FILE = "comfyui_lora.safetensors"
TEXT_ENCODERS = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}  # CLIP-L, CLIP-G (kohya's names)


def _scales(metadata: dict, component: str) -> tuple[float, int]:
    """`(alpha, rank)` of one component's adapter, from the peft config diffusers keeps in the file's metadata."""
    config = metadata.get(component)
    if config is None:
        raise ValueError(f"the LoRA file has no adapter config for {component}: save it with rl.lora.save_lora "
                         f"(or diffusers' save_lora_weights with *_lora_adapter_metadata)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{component}'s adapter has per-module ranks or alphas; only uniform adapters are converted")
    if config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"{component}'s adapter is rsLoRA or DoRA, whose scale or form these tools do not apply")
    return float(config["lora_alpha"]), int(config["r"])


def to_original(state: dict[str, torch.Tensor], metadata: dict, layers: int | None = None) -> dict[str, torch.Tensor]:
    """A diffusers SD3 LoRA state dict (`transformer.<module>.lora_A.weight`, ...) in the original layout, for a
    transformer of `layers` blocks (needed when the last block's context modulation is adapted: its halves are
    swapped; None: the last adapted block is taken for the last). Of q, k and v, a projection without an adapter
    takes a zero block: the fused adapter is still exactly the others'."""
    out: dict[str, torch.Tensor] = {}
    transformer = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    if transformer:
        alpha, rank = _scales(metadata, "transformer")
        adapted = 1 + max(int(k.split(".")[1]) for k in transformer if k.startswith("transformer_blocks."))
        if layers is None and any("norm1_context" in k for k in transformer):
            raise ValueError("the context modulation is adapted: give the transformer's block count (--layers)")
        for original, modules, swap in transformer_modules(layers or adapted):
            downs = [transformer.pop(f"{m}.lora_A.weight", None) for m in modules]
            ups = [transformer.pop(f"{m}.lora_B.weight", None) for m in modules]
            present = [i for i, d in enumerate(downs) if d is not None]
            if not present:
                continue
            down_shape, up_shape = downs[present[0]].shape, ups[present[0]].shape
            downs = [d if d is not None else downs[present[0]].new_zeros(down_shape) for d in downs]
            ups = [u if u is not None else ups[present[0]].new_zeros(up_shape) for u in ups]
            up = torch.block_diag(*ups)
            name = "lora_unet_" + original.replace(".", "_")
            out[f"{name}.lora_down.weight"] = torch.cat(downs, dim=0)
            out[f"{name}.lora_up.weight"] = _swap_halves(up) if swap else up
            out[f"{name}.alpha"] = torch.tensor(alpha * len(modules))  # alpha / (k r) = the adapters' alpha / r
        if transformer:
            raise ValueError(f"LoRA weights on modules without an original name: {sorted(transformer)[:3]}")
    for component, prefix in TEXT_ENCODERS.items():
        weights = {k.removeprefix(component + "."): v for k, v in state.items() if k.startswith(component + ".")}
        if not weights:
            continue
        alpha, _ = _scales(metadata, component)
        for key, tensor in weights.items():
            module, kind = key.rsplit(".lora_", 1)  # text_model.encoder.layers.0.self_attn.q_proj, A.weight
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def from_original(state: dict[str, torch.Tensor], layers: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The inverse of `to_original`: a diffusers LoRA state dict and its adapters' `(alpha, rank)` per component."""
    out: dict[str, torch.Tensor] = {}
    scales: dict[str, tuple[float, int]] = {}
    table = {"lora_unet_" + original.replace(".", "_"): (modules, swap)
             for original, modules, swap in transformer_modules(layers)}
    names = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state})
    for name in names:
        if f"{name}.lora_down.weight" not in state or f"{name}.lora_up.weight" not in state:
            raise ValueError(f"{name} has no lora_down / lora_up pair (a LoCon, LoHa or other network?)")
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        alpha = state.get(f"{name}.alpha", torch.tensor(float(down.shape[0])))  # kohya: no alpha means alpha = rank
        if not name.startswith(("lora_unet_", *TEXT_ENCODERS.values())):
            raise ValueError(f"{name}: not an SD3 transformer (lora_unet_) or CLIP-L / CLIP-G (lora_te1_ / lora_te2_) "
                             f"module")
        if name.startswith("lora_unet_"):
            if name not in table:
                raise ValueError(f"{name} is not a module of an SD3 transformer with {layers} blocks")
            modules, swap = table[name]
            up = _swap_halves(up) if swap else up
            k, rank = len(modules), down.shape[0] // len(modules)
            rows = up.shape[0] // k
            for i, module in enumerate(modules):
                block = up[i * rows:(i + 1) * rows]
                if torch.count_nonzero(block[:, :i * rank]) or torch.count_nonzero(block[:, (i + 1) * rank:]):
                    raise ValueError(f"{name} is not block-diagonal: it cannot be split into {modules} exactly")
                a, b = down[i * rank:(i + 1) * rank], block[:, i * rank:(i + 1) * rank]
                if k > 1 and not torch.count_nonzero(a) and not torch.count_nonzero(b):
                    continue  # a projection without an adapter (a zero block)
                out[f"transformer.{module}.lora_A.weight"] = a
                out[f"transformer.{module}.lora_B.weight"] = b
            scales["transformer"] = (float(alpha) / k, rank)
        else:
            component = next(c for c, p in TEXT_ENCODERS.items() if name.startswith(p))
            module = _text_module(name.removeprefix(TEXT_ENCODERS[component]))
            out[f"{component}.{module}.lora_A.weight"] = down
            out[f"{component}.{module}.lora_B.weight"] = up
            scales[component] = (float(alpha), down.shape[0])
    return out, scales


CLIP_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                      "mlp.fc2")


def _text_module(flat: str) -> str:
    """`text_model_encoder_layers_0_self_attn_q_proj` -> `text_model.encoder.layers.0.self_attn.q_proj`."""
    layer, _, module = flat.removeprefix("text_model_encoder_layers_").partition("_")
    names = {m.replace(".", "_"): m for m in CLIP_LAYER_MODULES}
    if not layer.isdigit() or module not in names:
        raise ValueError(f"text_model_{flat} is not a CLIP encoder layer's linear")
    return f"text_model.encoder.layers.{layer}.{names[module]}"


def write_original(final: Path, layers: int | None = None) -> Path:
    """Write `final/comfyui_lora.safetensors` beside diffusers' `pytorch_lora_weights.safetensors` (`layers`: the
    transformer's block count, see `to_original`)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = Path(final) / DIFFUSERS_FILE
    with safe_open(str(source), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    metadata = {}
    if raw:  # diffusers stores {"transformer.r": 4, "transformer.lora_alpha": 8, ...} flattened with prefixes
        for key, value in json.loads(raw).items():
            component, _, option = key.partition(".")
            metadata.setdefault(component, {})[option] = value
    if not metadata:  # a file saved before the metadata was written: the run's config.yaml has the adapter's size
        metadata = _metadata_from_run(Path(final).parent / "config.yaml", state)
    target = Path(final) / ORIGINAL_FILE
    with writing(target):
        save_file({k: v.contiguous() for k, v in to_original(state, metadata, layers).items()}, str(target),
                  metadata={"format": "pt", "ss_network_module": "networks.lora", "modelspec.architecture":
                            "stable-diffusion-v3/lora"})
    return target


def _metadata_from_run(config_file: Path, state: dict) -> dict:
    """`{component: {"r": rank, "lora_alpha": alpha}}` from a run's `algo.lora` (alpha null means alpha = rank)."""
    if not config_file.exists():
        return {}
    from omegaconf import OmegaConf

    lora = OmegaConf.select(OmegaConf.load(config_file), "algo.lora", default=None)
    if lora is None:
        return {}
    size = {"r": int(lora.rank), "lora_alpha": float(lora.alpha if lora.get("alpha") is not None else lora.rank)}
    return {component: size for component in ("transformer", *TEXT_ENCODERS)
            if any(k.startswith(component + ".") for k in state)}


if __name__ == "__main__":  # the command moved out of this library module
    print("error: this command moved: python -m scripts.write_comfyui_lora RUN_DIR/final [--layers N]", file=sys.stderr)
    sys.exit(2)
