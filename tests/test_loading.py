"""Model loading: options, and a one-line error before any weights are read for every bad input."""

import json

import huggingface_hub
import pytest
import torch

from pipelines import ModelLoadError, load_pipeline
from pipelines.loading import resolve_source


def test_offline_hub_id_fails_at_once_with_what_to_do(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as error:
        load_pipeline("stabilityai/stable-diffusion-3.5-medium")
    message = str(error.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "model.path=" in message


def test_unreachable_hub_fails_at_once_with_what_to_do(monkeypatch):
    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(ModelLoadError, match=r"cannot reach the Hugging Face hub .* set model.path=DIR"):
        load_pipeline("stabilityai/stable-diffusion-3.5-large")


def test_folder_that_is_not_an_sd3_pipeline_fails(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelLoadError, match="StableDiffusionXLPipeline pipeline, not an SD3"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelLoadError, match="no transformer/config.json"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_pipeline(str(tmp_path))


def test_missing_path_and_files_fail(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_source(str(tmp_path / "missing" / "model"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_source(str(tmp_path / "weights.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on machines without CUDA")
@pytest.mark.parametrize("option", ["t5_8bit", "cpu_offload"])
def test_cuda_only_options_fail_without_cuda(option):
    with pytest.raises(ModelLoadError, match=f"model.{option}=true needs a CUDA GPU"):
        load_pipeline(**{option: True})


def test_bad_dtype_fails():
    with pytest.raises(ModelLoadError, match="model.dtype must be one of"):
        load_pipeline(dtype="float8")


def test_drop_t5_samples_without_the_t5_encoder():
    pipe = load_pipeline(drop_t5=True)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    out = pipe("a cat", num_inference_steps=2, guidance_scale=4.5, noise_level=0.7, output_type="pt")
    assert torch.isfinite(out.images).all() and out.log_probs.shape == (1, 2)


def test_local_folder_with_options(tmp_path):
    from scripts.save_tiny_model import save_tiny_model

    save_tiny_model(tmp_path, seed=3)
    pipe = load_pipeline(str(tmp_path), dtype="bfloat16", drop_t5=True)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder_3 is None
    out = pipe("a cat", num_inference_steps=2, guidance_scale=4.5, noise_level=0.7, output_type="pt")
    assert torch.isfinite(out.images).all()
    assert out.latents.dtype == torch.float32 and out.log_probs.dtype == torch.float32


def test_tiny_seed_selects_the_weights(tmp_path):
    a, b = load_pipeline(tiny_seed=0), load_pipeline(tiny_seed=1)
    assert not torch.equal(a.transformer.pos_embed.proj.weight, b.transformer.pos_embed.proj.weight)


@pytest.mark.slow
def test_compiled_transformer_and_vae_decode_sample_the_same_images():
    kwargs = dict(prompt="a cat", num_inference_steps=2, guidance_scale=4.5, output_type="pt")
    eager = load_pipeline()(generator=torch.Generator().manual_seed(0), **kwargs).images
    compiled_pipe = load_pipeline(compile_transformer=True, compile_vae_decode=True)
    compiled = compiled_pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_a_truncated_weights_file_fails_with_one_line(tmp_path):
    from scripts.save_tiny_model import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    weights = next((folder / "transformer").glob("*.safetensors"))
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size // 2)  # as an interrupted download leaves it
    with pytest.raises(ModelLoadError, match=r"cannot load the weights of .*tiny.*truncated or corrupt") as error:
        load_pipeline(str(folder))
    assert "\n" not in str(error.value)


def test_the_image_sizes_a_model_takes_are_read_from_its_config_files(tmp_path, monkeypatch):
    from pipelines.errors import ConfigError
    from pipelines.geometry import ModelGeometry, pipeline_geometry
    from scripts.save_tiny_model import save_tiny_model

    # SD3.5-Medium's published configs: sample_size 128, patches of 2, pos_embed_max_size 384; a 4-block VAE (x8).
    medium = ModelGeometry.from_configs({"sample_size": 128, "patch_size": 2, "pos_embed_max_size": 384},
                                        {"block_out_channels": [128, 256, 512, 512]})
    assert (medium.vae_factor, medium.patch_size, medium.native, medium.largest) == (8, 2, 1024, 6144)
    medium.check("algo.sampling.resolution", 512)
    with pytest.raises(ConfigError, match=r"algo.sampling.resolution=520 does not fit .* a multiple of 16, e.g. 512"):
        medium.check("algo.sampling.resolution", 520)
    with pytest.raises(ConfigError, match="6160 is larger than this model's positional embedding covers"):
        medium.check("algo.sampling.resolution", 6160)

    save_tiny_model(tmp_path, seed=3)
    tiny = pipeline_geometry(None)
    assert pipeline_geometry(str(tmp_path)) == tiny == ModelGeometry(vae_factor=2, patch_size=2, native=32, largest=64)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert pipeline_geometry("no-such-org/no-such-model") is None  # loading it says why, in one line
    pipe = load_pipeline(None)  # the bounds are diffusers' own: the largest size samples, one patch more does not
    assert pipe.default_sample_size * pipe.vae_scale_factor == tiny.native
    pipe("a cat", num_inference_steps=1, height=tiny.largest, width=tiny.largest, output_type="latent")
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        pipe("a cat", num_inference_steps=1, height=tiny.largest + 4, width=tiny.largest, output_type="latent")
