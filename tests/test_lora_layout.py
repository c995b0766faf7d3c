"""The LoRA files of `final/`: diffusers' (loaded by a stock `load_lora_weights` to the trained model's images) and the
original-module layout ComfyUI reads (pipelines/lora_layout.py), checked against each other."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from pipelines.lora_layout import ORIGINAL_FILE, from_original, to_original, write_original
from pipelines.single_file import transformer_to_original
from pipelines.tiny import build_tiny_components
from rl.lora import LoraSpec, add_text_encoder_lora, add_transformer_lora, save_lora

# Every linear kind of an MMDiT block, attn2 (SD3.5's second attention) and the feed-forwards included, and the
# last block's context modulation (whose halves diffusers swaps).
MODULES = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
           "ff.net.0.proj", "ff.net.2", "norm1.linear", "norm1_context.linear"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny pipeline with random (nonzero) adapters of rank 4, alpha 8, on the transformer and both CLIPs,
    saved as a run's final/ is."""
    components = build_tiny_components()
    spec = LoraSpec(rank=4, alpha=8, target_modules=MODULES)
    add_transformer_lora(components["transformer"], spec)
    for name in ("text_encoder", "text_encoder_2"):
        add_text_encoder_lora(components[name], spec)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            for key, p in components[name].named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    final = tmp_path_factory.mktemp("final")
    save_lora(final, components["transformer"], components["text_encoder"], components["text_encoder_2"])
    write_original(final, layers=2)
    return components, final


def sample(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cube", num_inference_steps=3, guidance_scale=4.5, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_a_stock_load_lora_weights_gives_the_trained_models_images(trained):
    """alpha (8) is not the rank (4): the file's adapter metadata must carry it, or diffusers loads at half scale."""
    components, final = trained
    want = sample(StableDiffusion3Pipeline(**components))
    stock = StableDiffusion3Pipeline(**build_tiny_components())
    before = sample(stock)
    stock.load_lora_weights(final)
    got = sample(stock)
    assert (want - before).abs().max() > 1e-2
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_diffusers_loads_no_adapter_from_the_comfyui_file(trained):
    """What docs/evaluation.md and the model card warn of: `load_lora_weights` given the ComfyUI file raises nothing
    but loads no adapter (diffusers only warns that no key has its prefix); the images stay the base model's."""
    stock = StableDiffusion3Pipeline(**build_tiny_components())
    before = sample(stock)
    stock.load_lora_weights(trained[1], weight_name=ORIGINAL_FILE)
    assert stock.get_list_adapters() == {} and not hasattr(stock.transformer, "peft_config")
    assert torch.equal(sample(stock), before)


def test_the_two_layouts_round_trip_to_identical_tensors(trained):
    _, final = trained
    diffusers_state = load_file(str(final / "pytorch_lora_weights.safetensors"))
    original = load_file(str(final / ORIGINAL_FILE))
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in original
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in original
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in original
    back, scales = from_original(original, layers=2)
    assert back.keys() == diffusers_state.keys()
    assert all(torch.equal(back[k], diffusers_state[k]) for k in back)
    assert scales == {"transformer": (8.0, 4), "text_encoder": (8.0, 4), "text_encoder_2": (8.0, 4)}
    qkv = original["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"]
    assert qkv.shape[0] == 12 and float(original["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 24.0
    assert float(original["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"]) == 8.0


def merged(weights: dict, lora: dict, prefix: str, suffix_down: str, suffix_up: str, alpha_of) -> dict:
    """`W + alpha / rank * up @ down` for every adapter in `lora` (names without prefix and `.weight`)."""
    out = dict(weights)
    for key in [k for k in lora if k.endswith(suffix_down)]:
        module = key.removeprefix(prefix).removesuffix(suffix_down)
        down, up = lora[key], lora[key.removesuffix(suffix_down) + suffix_up]
        out[module + ".weight"] = out[module + ".weight"] + alpha_of(key) / down.shape[0] * up @ down
    return out


def test_merging_either_layout_gives_the_same_model(trained):
    """The ComfyUI layout merged into the original-layout weights, read back by diffusers' own converter, equals the
    diffusers LoRA merged into the diffusers weights: the module names, the fusion and the alphas are right."""
    _, final = trained
    base = build_tiny_components()["transformer"].state_dict()
    lora = load_file(str(final / "pytorch_lora_weights.safetensors"))
    ours = merged(base, {k: v for k, v in lora.items() if k.startswith("transformer.")}, "transformer.",
                  ".lora_A.weight", ".lora_B.weight", lambda key: 8.0)
    original = load_file(str(final / ORIGINAL_FILE))
    original_base = transformer_to_original(base)
    # ComfyUI's rule: lora_unet_<module with . as _> patches <module>.weight of the original model
    module_of = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k.removesuffix(".weight")
                 for k in original_base if k.endswith(".weight")}
    adapters = {}
    for key, value in original.items():
        if key.startswith("lora_unet_") and not key.endswith(".alpha"):
            name, _, kind = key.partition(".")
            adapters[f"{module_of[name]}.{kind}"] = value
    alphas = {module_of[k.removesuffix(".alpha")]: float(v) for k, v in original.items()
              if k.startswith("lora_unet_") and k.endswith(".alpha")}
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(merged(
        original_base, adapters, "", ".lora_down.weight", ".lora_up.weight",
        lambda key: alphas[key.removesuffix(".lora_down.weight")]))
    assert theirs.keys() == ours.keys()
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert len(changed) == sum(k.endswith("lora_A.weight") for k in lora if k.startswith("transformer."))  # 16 + 11
    for key in ours:
        assert torch.allclose(theirs[key], ours[key], atol=1e-6, rtol=0), key


def test_a_fused_adapter_that_is_not_block_diagonal_is_refused(trained):
    _, final = trained
    original = load_file(str(final / ORIGINAL_FILE))
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"
    original[key] = original[key] + 1e-3  # as an adapter trained on qkv itself would be
    with pytest.raises(ValueError, match="not block-diagonal"):
        from_original(original, layers=2)


def test_an_adapter_without_its_config_is_refused():
    with pytest.raises(ValueError, match="no adapter config for transformer"):
        to_original({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                     "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, {})


def test_an_adapter_on_some_of_q_k_v_fuses_with_zero_blocks_and_splits_back():
    """A LoRA on to_q and to_v only (not to_k): the fused qkv adapter has a zero block for k; the way back drops it."""
    components = build_tiny_components()
    add_transformer_lora(components["transformer"], LoraSpec(rank=2, alpha=2, target_modules=["attn.to_q",
                                                                                                "attn.to_v"]))
    state = {f"transformer.{k}": torch.randn(v.shape) for k, v in
             get_peft_model_state_dict(components["transformer"]).items()}
    original = to_original(state, {"transformer": {"r": 2, "lora_alpha": 2}}, layers=2)
    up = original["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"]
    assert up.shape == (96, 6) and not torch.count_nonzero(up[32:64])  # k's rows: nothing
    back, scales = from_original(original, layers=2)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert scales["transformer"] == (2.0, 2)


def test_the_context_modulation_needs_the_block_count():
    state = {"transformer.transformer_blocks.0.norm1_context.linear.lora_A.weight": torch.zeros(2, 32),
             "transformer.transformer_blocks.0.norm1_context.linear.lora_B.weight": torch.zeros(192, 2)}
    with pytest.raises(ValueError, match="give the transformer's block count"):
        to_original(state, {"transformer": {"r": 2, "lora_alpha": 2}})
    # block 0 of 2 is not the last: its halves are not swapped
    up = torch.arange(192 * 2, dtype=torch.float32).reshape(192, 2)
    state["transformer.transformer_blocks.0.norm1_context.linear.lora_B.weight"] = up
    original = to_original(state, {"transformer": {"r": 2, "lora_alpha": 2}}, layers=2)
    assert torch.equal(original["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"], up)


def test_a_file_saved_without_metadata_takes_the_adapter_size_from_the_runs_config(trained, tmp_path):
    """final/ of a run from before the metadata was saved: algo.lora in the run's config.yaml gives rank and alpha."""
    from safetensors.torch import save_file

    _, final = trained
    old = tmp_path / "run" / "final"
    old.mkdir(parents=True)
    save_file(load_file(str(final / "pytorch_lora_weights.safetensors")), str(old / "pytorch_lora_weights.safetensors"))
    (tmp_path / "run" / "config.yaml").write_text("algo:\n  lora:\n    rank: 4\n    alpha: 8\n")
    written = load_file(str(write_original(old, layers=2)))
    want = load_file(str(final / ORIGINAL_FILE))
    assert written.keys() == want.keys() and all(torch.equal(written[k], want[k]) for k in want)


def test_the_command_writes_the_comfyui_file_and_refuses_a_folder_without_a_lora(trained, tmp_path, capsys):
    """`python -m scripts.write_comfyui_lora RUN_DIR/final`, for a run from before runs wrote the file themselves."""
    from scripts.write_comfyui_lora import main

    _, final = trained
    old = tmp_path / "final"
    old.mkdir()
    (old / "pytorch_lora_weights.safetensors").write_bytes((final / "pytorch_lora_weights.safetensors").read_bytes())
    main([str(old), "--layers", "2"])
    assert capsys.readouterr().out.strip() == f"wrote {old / ORIGINAL_FILE}"
    written, want = load_file(str(old / ORIGINAL_FILE)), load_file(str(final / ORIGINAL_FILE))
    assert written.keys() == want.keys() and all(torch.equal(written[k], want[k]) for k in want)
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path)])
    assert stopped.value.code == 2 and capsys.readouterr().err.strip() == f"error: {tmp_path} holds no " \
        "pytorch_lora_weights.safetensors"
