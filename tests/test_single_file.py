"""Single-file checkpoints (pipelines/single_file.py): written from the tiny model in Stability AI's layout, loaded back
through diffusers' own `from_single_file`, compared with the folder they came from."""

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from pipelines import ModelLoadError, load_pipeline
from pipelines.loading import check_model_source
from pipelines.single_file import (
    DEFAULT_CONFIGS,
    inspect_file,
    is_single_file,
    save_single_file,
    transformer_to_original,
    vae_to_original,
)
from scripts.save_tiny_model import save_tiny_single_file


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> Path:
    """folder/ (diffusers), full.safetensors, no_t5.safetensors, transformer.safetensors (of seed 1's transformer)."""
    root = tmp_path_factory.mktemp("single_file")
    save_tiny_single_file(root / "folder", root / "full.safetensors")
    save_tiny_single_file(root / "folder", root / "no_t5.safetensors", include_t5=False)
    save_tiny_single_file(root / "other", root / "transformer.safetensors", seed=1, transformer_only=True)
    return root


def images(pipe, noise_level: float = 0.7) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red cube", "a cat"], num_inference_steps=3, guidance_scale=4.5, noise_level=noise_level,
               output_type="pt", generator=torch.Generator().manual_seed(0), max_sequence_length=16)
    return out.images


def test_the_whole_pipeline_from_a_single_file_gives_the_folders_images(tiny_files):
    folder = load_pipeline(str(tiny_files / "folder"))
    single = load_pipeline(str(tiny_files / "full.safetensors"), config=str(tiny_files / "folder"))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        want, got = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert torch.equal(images(single), images(folder))


def test_a_single_file_without_t5_runs_without_it_or_takes_t5_from_the_config(tiny_files, tmp_path):
    dropped = load_pipeline(str(tiny_files / "no_t5.safetensors"), config=str(tiny_files / "folder"), drop_t5=True)
    assert dropped.text_encoder_3 is None
    assert torch.equal(images(dropped), images(load_pipeline(str(tiny_files / "folder"), drop_t5=True)))
    # Not dropped: T5 comes from the config folder's weights (diffusers' rule for parts a file lacks) ...
    completed = load_pipeline(str(tiny_files / "no_t5.safetensors"), config=str(tiny_files / "folder"))
    assert torch.equal(images(completed), images(load_pipeline(str(tiny_files / "folder"))))
    # ... and a config folder without them is refused before any weights are read.
    bare = tmp_path / "configs"
    shutil.copytree(tiny_files / "folder", bare)
    for weights in bare.glob("text_encoder_3/*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match=r"holds no text_encoder_3 and model.config=.* has no weights for it.*"
                                             r"model.drop_t5=true"):
        load_pipeline(str(tiny_files / "no_t5.safetensors"), config=str(bare))


def test_a_transformer_file_replaces_the_folders_transformer(tiny_files):
    base = load_pipeline(str(tiny_files / "folder"))
    swapped = load_pipeline(str(tiny_files / "folder"), transformer_file=str(tiny_files / "transformer.safetensors"))
    other = load_pipeline(str(tiny_files / "other"))
    want, got = other.transformer.state_dict(), swapped.transformer.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(swapped.vae.state_dict()["decoder.conv_out.weight"],
                       base.vae.state_dict()["decoder.conv_out.weight"])
    assert not torch.equal(images(swapped), images(base))  # the transformer of seed 1 draws other images ...
    base.transformer = other.transformer  # ... exactly those of the folder's pipeline with that transformer
    assert torch.equal(images(swapped), images(base))


def test_the_written_layout_has_stability_ais_names(tiny_files):
    contents = inspect_file(tiny_files / "full.safetensors")
    assert (contents.transformer, contents.vae, contents.clip_l, contents.clip_g, contents.t5) == (True,) * 5
    assert contents.family is None  # a tiny model: no published config fits it
    assert not inspect_file(tiny_files / "no_t5.safetensors").t5
    only = inspect_file(tiny_files / "transformer.safetensors")
    assert (only.vae, only.clip_l, only.t5) == (False, False, False)
    pipe = load_pipeline(str(tiny_files / "folder"))
    names = transformer_to_original(pipe.transformer.state_dict())
    q, k, v = (pipe.transformer.state_dict()[f"transformer_blocks.0.attn.to_{x}.weight"] for x in "qkv")
    assert torch.equal(names["joint_blocks.0.x_block.attn.qkv.weight"], torch.cat([q, k, v]))
    assert "joint_blocks.1.context_block.attn.proj.weight" not in names  # the last block's context is pre-only
    shift_scale = pipe.transformer.state_dict()["norm_out.linear.bias"]
    half = shift_scale.shape[0] // 2
    assert torch.equal(names["final_layer.adaLN_modulation.1.bias"][:half], shift_scale[half:])
    vae = vae_to_original(pipe.vae.state_dict())
    assert vae["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.up.0.block.0.conv1.weight" in vae
    assert "encoder.norm_out.weight" in vae and "encoder.down.0.block.0.norm1.weight" in vae


@pytest.mark.parametrize("modulation, pos_embed, large, family", [
    (9216, 36864, False, "sd3"), (9216, 147456, False, "sd35_medium"), (9216, 147456, True, "sd35_large")])
def test_the_family_and_its_hub_config_are_read_from_the_header(monkeypatch, modulation, pos_embed, large, family):
    """The shapes of the published files (SD3 Medium: 1536 wide, 36864 positions; SD3.5 Medium: 147456 positions;
    SD3.5 Large: 38 blocks), as diffusers tells them apart; only the header is read."""
    import pipelines.single_file as single_file

    shapes = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": [modulation],
              "model.diffusion_model.pos_embed": [1, pos_embed, 1536]}
    if large:
        shapes["model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight"] = [9728, 2432]
    monkeypatch.setattr(single_file, "header_shapes", lambda file: shapes)
    contents = inspect_file(Path("x.safetensors"))
    assert contents.family == family and contents.default_config == DEFAULT_CONFIGS[family]
    assert not contents.t5 and not contents.vae


def test_bad_single_files_fail_in_one_line(tmp_path, tiny_files, monkeypatch):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sdxl))
    lora = tmp_path / "lora.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1)}, str(lora))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases = [
        ({"path": str(sdxl)}, "holds no SD3 transformer (no joint_blocks.*; it looks like an SD1.x / SDXL"),
        ({"path": str(lora)}, "it looks like a LoRA"),
        ({"path": str(corrupt)}, "is not a readable safetensors file"),
        ({"path": str(tmp_path / "missing.safetensors")}, "no such file"),
        ({"path": "no-org/no-repo/model.safetensors"}, "no-org/no-repo is not in the local Hugging Face cache"),
        ({"path": str(tiny_files / "full.safetensors")}, "of no published size: set model.config"),
        ({"path": str(tiny_files / "full.safetensors"), "config": str(tmp_path / "nowhere")},
         "model.config=" + str(tmp_path / "nowhere") + ": no such folder"),
        ({"path": str(tiny_files / "full.safetensors"), "config": "no-org/no-configs"},
         "not in the local Hugging Face"),
        ({"config": str(tiny_files / "folder")}, "model.config completes a single-file checkpoint"),
        ({"transformer_file": str(tiny_files / "transformer.safetensors")}, "replaces the transformer of model.path"),
        ({"path": str(tiny_files / "folder"), "transformer_file": str(sdxl)}, "holds no SD3 transformer"),
    ]
    for model, says in cases:
        with pytest.raises(ModelLoadError) as error:
            check_model_source(model)
        assert says in str(error.value) and "\n" not in str(error.value), (model, str(error.value))


def test_a_file_whose_two_clips_have_one_width_is_refused_in_one_line(tiny_files, tmp_path):
    """diffusers tells CLIP-L from CLIP-G by width: with equal widths (the tiny model's default, 32 and 32) it would
    load CLIP-L into both; the whole-pipeline load is refused before any weights are read, naming the file, and the
    way out it names (the folder, with the file's transformer alone) passes the same checks."""
    from pipelines.tiny import build_tiny_components

    file = save_single_file(build_tiny_components(), tmp_path / "same_widths.safetensors", include_t5=False)
    assert inspect_file(file).clip_widths == (32, 32)
    assert inspect_file(tiny_files / "full.safetensors").clip_widths == (24, 40)
    says = (f"model.path={file}: its CLIP-L and CLIP-G text encoders are both 32 wide, and diffusers tells the two "
            f"apart by width")
    with pytest.raises(ModelLoadError) as error:
        check_model_source({"path": str(file), "config": str(tiny_files / "folder")})
    assert str(error.value).startswith(says) and "\n" not in str(error.value)
    assert f"model.transformer_file={file}" in str(error.value)
    with pytest.raises(ModelLoadError, match="both 32 wide"):
        load_pipeline(str(file), config=str(tiny_files / "folder"), drop_t5=True)
    check_model_source({"path": str(tiny_files / "folder"), "transformer_file": str(file)})


def test_what_counts_as_a_single_file():
    assert is_single_file("/data/sd3.5_medium.safetensors") and is_single_file("org/repo/sd3_medium.safetensors")
    assert is_single_file("https://huggingface.co/org/repo/blob/main/sd3.5_large.safetensors")
    assert not is_single_file("stabilityai/stable-diffusion-3.5-medium") and not is_single_file("/data/folder")


def test_save_single_file_stores_tied_weights_once_per_name(tmp_path):
    from pipelines.tiny import build_tiny_components

    components = build_tiny_components()
    file = save_single_file(components, tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    loaded = load_file(str(file))
    assert torch.equal(loaded["text_encoders.t5xxl.transformer.shared.weight"],
                       loaded["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"])


@pytest.mark.slow  # two runs through the CLI; the loads themselves are compared in the default suite above
def test_rl_run_samples_from_a_single_file_as_from_its_folder(tiny_files, tmp_path):
    """As a user runs it: `python -m rl.run algo=sample model.path=FILE model.config=FOLDER` writes the images the
    folder gives (the same pixels)."""
    import subprocess
    import sys

    import numpy as np
    import PIL.Image

    root = Path(__file__).resolve().parents[1]
    fast = ["algo=sample", "model=tiny", "prompts=simple_animals", "algo.max_prompts=2", "algo.num_inference_steps=2",
            "algo.num_images_per_prompt=1", "model.max_sequence_length=16"]
    outputs = {}
    for name, model in (("file", [f"model.path={tiny_files / 'full.safetensors'}",
                                  f"model.config={tiny_files / 'folder'}"]),
                        ("folder", [f"model.path={tiny_files / 'folder'}"])):
        result = subprocess.run([sys.executable, "-m", "rl.run", *fast, *model, f"hydra.run.dir={tmp_path / name}"],
                                cwd=root, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[name] = [np.asarray(PIL.Image.open(p)) for p in sorted((tmp_path / name / "samples").glob("0*.png"))]
    assert len(outputs["file"]) == 2 and all(np.array_equal(a, b)
                                             for a, b in zip(outputs["file"], outputs["folder"], strict=True))


def test_checks_before_a_run_do_not_download_a_hub_file(monkeypatch):
    """ORG/REPO/FILE not cached yet: the checks ask the hub whether the file exists and leave the download (gigabytes)
    to the load; a file the repository lacks is one line."""
    import pipelines.single_file as single_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "file_exists",
                        lambda repo, name, revision=None: name == "sd3.5_medium.safetensors")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("downloaded at check time"))
    assert single_file.locate("org/repo/sd3.5_medium.safetensors", download=False) is None
    check_model_source({"path": "org/repo/sd3.5_medium.safetensors"})
    with pytest.raises(ModelLoadError, match="org/repo has no file sd3_5_typo.safetensors"):
        check_model_source({"path": "org/repo/sd3_5_typo.safetensors"})


def test_the_export_command_writes_the_folder_as_the_single_file_and_the_old_command_names_it(tiny_files, tmp_path,
                                                                                               capsys):
    """`python -m scripts.export_single_file` (the command moved out of the library module, which now only names it)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from scripts.export_single_file import main

    main([str(tiny_files / "folder"), str(tmp_path / "out.safetensors"), "--no-t5"])
    assert "wrote" in capsys.readouterr().out
    written, want = load_file(str(tmp_path / "out.safetensors")), load_file(str(tiny_files / "no_t5.safetensors"))
    assert written.keys() == want.keys() and all(torch.equal(written[k], want[k]) for k in want)
    old = subprocess.run([sys.executable, "-m", "pipelines.single_file", "export", "x", "y"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert old.returncode == 2 and old.stderr.strip().splitlines()[-1] == (  # after runpy's warning about the package
        "error: this command moved: python -m scripts.export_single_file MODEL_DIR OUT.safetensors [--no-t5] "
        "[--transformer-only]")
