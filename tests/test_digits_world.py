"""The digits world's pieces: data, the VAE fit and its latent scaling, the shipped base model, the build (slow)."""

import json
from pathlib import Path

import pytest
import torch

from experiments.digits_world import WORDS, build_base, digits_components, train_vae, unpack, write_imagefolder
from pipelines import StableDiffusion3LogProbPipeline, load_pipeline
from rewards.digits import DigitReward

ROOT = Path(__file__).resolve().parents[1]


def test_imagefolder_has_every_training_phrasing(tmp_path):
    folder = write_imagefolder(tmp_path / "images")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images = sorted(folder.glob("*.png"))
    assert len(images) == 898 and len(rows) == 3 * len(images)  # the generator half of load_digits
    texts = {r["text"] for r in rows}
    assert {"a handwritten digit 7", "the number seven", "a 7"} <= texts
    assert not any("picture" in t for t in texts)  # a held-out phrasing


def test_vae_fit_lowers_the_error_and_scales_latents_to_unit_std():
    components = digits_components(seed=0)
    vae = components["vae"]
    pixels = torch.rand(16, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = ((vae.decode(vae.encode(pixels).latent_dist.mean).sample - pixels) ** 2).mean().item()
    after = train_vae(vae, pixels, steps=30, batch_size=16)
    assert after < before
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
    scaled = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    assert scaled.mean().abs().item() < 1e-4 and scaled.std().item() == pytest.approx(1.0, rel=1e-3)
    pipe = StableDiffusion3LogProbPipeline(**components)
    image = pipe("a 3", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)


def test_shipped_base_model_unpacks_loads_and_draws_the_digits_it_was_trained_on(tmp_path):
    base = unpack(tmp_path / "world")
    stamp = (base / "model_index.json").stat().st_mtime_ns
    assert unpack(tmp_path / "world") == base and (base / "model_index.json").stat().st_mtime_ns == stamp  # reused
    (tmp_path / "world" / "build.json").write_text(json.dumps({"sft_steps": 1500}))  # an older build in the folder
    assert unpack(tmp_path / "world") == base and (base / "model_index.json").stat().st_mtime_ns != stamp  # replaced
    assert json.loads((tmp_path / "world" / "build.json").read_text()) == json.loads(
        (ROOT / "assets" / "digits_world" / "build.json").read_text())
    pipe = load_pipeline(str(base), max_sequence_length=16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer_max_length == 16 and pipe.transformer.config.in_channels == 4
    prompts = [f"the number {word}" for word in WORDS]  # a phrasing of its supervised training
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=10, guidance_scale=4.5, generator=generators, output_type="pt").images
    _, info = DigitReward()(images, prompts, [{}] * len(prompts))
    assert info["correct"].mean() >= 0.8  # the classifier, trained on other real digits, reads the asked digit


@pytest.mark.slow
def test_base_model_builds_once_and_loads_as_a_diffusers_folder(tmp_path):
    base = build_base(tmp_path / "world", vae_steps=2, sft_steps=2)
    assert (base / "model_index.json").exists() and json.loads((tmp_path / "world" / "build.json").read_text())
    assert build_base(tmp_path / "world", vae_steps=2, sft_steps=2) == base  # cached: not rebuilt
    pipe = load_pipeline(str(base))
    assert pipe.transformer.config.in_channels == 4 and pipe.vae.config.scaling_factor != 1.0
