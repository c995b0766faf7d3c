"""Image-to-image training: prompt sets with a source image per prompt (rl/prompts.py), `algo.sampling.strength` and
`algo.eval.strength`, GRPO end to end on the tiny model with a resume, and the one-line errors."""

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from pipelines import load_pipeline
from pipelines.errors import ConfigError
from rewards.jpeg import JpegSizeReward
from rl import grpo, nft
from rl.checkpoints import CheckpointConfig
from rl.context import RunContext
from rl.evaluation import EvalConfig
from rl.lora import LoraSpec
from rl.matching import MatchingConfig
from rl.optim import OptimConfig
from rl.ppo import PPOConfig
from rl.prompts import PromptSetError, load_prompts
from rl.rollouts import SamplingConfig, steps_taken
from rl.run import check_image_prompts
from rl.tracking import LoggerConfig

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "horse"]


@pytest.fixture(scope="module")
def photo_prompts(tmp_path_factory) -> Path:
    """A jsonl of 6 prompts, each with a real photograph (scikit-image) at 32 px, paths relative to the file."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    (folder / "images").mkdir()
    lines = []
    for name in PHOTOS:
        pixels = getattr(data, name)()
        image = PIL.Image.fromarray(pixels).convert("RGB").resize((32, 32), PIL.Image.BICUBIC)
        image.save(folder / "images" / f"{name}.png")
        lines.append(json.dumps({"prompt": f"a watercolour of the {name}", "image": f"images/{name}.png"}))
    (folder / "edits.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "edits.jsonl"


def test_prompts_carry_their_source_images_and_bad_ones_fail_in_one_line(photo_prompts, tmp_path):
    prompts = load_prompts(str(photo_prompts))
    assert [Path(p.image).name for p in prompts] == [f"{n}.png" for n in PHOTOS]
    assert all(Path(p.image).is_absolute() for p in prompts)
    # the same text with another image is another prompt; the same pair twice is one
    same_text = tmp_path / "same.jsonl"
    image = prompts[0].image
    same_text.write_text("".join(json.dumps({"prompt": "edit it", "image": i}) + "\n"
                                 for i in (image, prompts[1].image, image)))
    assert len(load_prompts(str(same_text))) == 2
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "a", "image": "nowhere.png"}) + "\n")
    with pytest.raises(PromptSetError, match=r"missing.jsonl:1: image nowhere.png not found"):
        load_prompts(str(missing))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(json.dumps({"prompt": "a", "image": "corrupt.png"}) + "\n")
    with pytest.raises(PromptSetError, match=r"corrupt.jsonl:1: image corrupt.png is not a readable image"):
        load_prompts(str(corrupt))


def test_steps_taken_as_the_stock_img2img_pipeline():
    assert [steps_taken(10, s) for s in (None, 1.0, 0.6, 0.35, 0.05)] == [10, 10, 6, 4, 1]  # N - int(N - N s)
    assert SamplingConfig(num_inference_steps=8, strength=0.5).steps_taken == 4
    with pytest.raises(ConfigError, match=r"algo.sampling.strength must be in \(0, 1\]"):
        SamplingConfig(strength=1.5)
    with pytest.raises(ConfigError, match="trains every step it takes"):
        SamplingConfig(strength=0.5, sde_window=2)
    with pytest.raises(ConfigError, match="CPS's last step is deterministic: nothing to train"):
        SamplingConfig(num_inference_steps=10, strength=0.05, sde_type="cps")
    with pytest.raises(ConfigError, match=r"algo.eval.strength must be in \(0, 1\]"):
        EvalConfig(strength=0.0)


def test_image_prompts_and_strength_go_together(photo_prompts):
    images, texts = load_prompts(str(photo_prompts)), load_prompts("simple_animals.txt", stop=4)
    with_strength = grpo.GRPO(sampling=SamplingConfig(strength=0.6), eval=EvalConfig(strength=0.6))
    check_image_prompts(with_strength, images, images)
    with pytest.raises(ConfigError, match="the training prompts carry source images: set algo.sampling.strength"):
        check_image_prompts(grpo.GRPO(), images, texts)
    with pytest.raises(ConfigError, match="the held-out prompts carry source images: set algo.eval.strength"):
        check_image_prompts(grpo.GRPO(sampling=SamplingConfig(strength=0.6)), images, images)
    with pytest.raises(ConfigError, match=r"algo.sampling.strength=0.6 is image-to-image: it needs a prompt set"):
        check_image_prompts(grpo.GRPO(sampling=SamplingConfig(strength=0.6)), texts, texts)
    with pytest.raises(ConfigError, match="3 of the 7 training prompts carry an image"):
        check_image_prompts(with_strength, images[:3] + texts, images)
    from rl.refl import ReFL

    with pytest.raises(ConfigError, match="trains from text prompts only"):
        check_image_prompts(ReFL(), images, texts)


def context(run_dir: Path, prompts: Path) -> RunContext:
    return RunContext(run_dir=run_dir, seed=0, load_pipeline=partial(load_pipeline, None),
                      train_prompts=load_prompts(str(prompts), stop=4),
                      eval_prompts=load_prompts(str(prompts), start=4),
                      logger=LoggerConfig(), config={}, reward=JpegSizeReward())


def small_grpo(checkpoint: CheckpointConfig) -> grpo.GRPO:
    return grpo.GRPO(
        epochs=4, checkpoint=checkpoint,
        sampling=SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=6,
                                strength=0.5),
        ppo=PPOConfig(batch_size=4, clip_range=1e-2), lora=LoraSpec(rank=4), optim=OptimConfig(lr=1e-2),
        eval=EvalConfig(every=2, max_prompts=2, num_inference_steps=6, strength=0.5))


def test_grpo_trains_on_image_prompts_and_resumes_exactly(photo_prompts, tmp_path, monkeypatch):
    """Rollouts start from each prompt's noised photograph and take 6 - int(6 - 6 x 0.5) = 3 steps, all trained; a run
    stopped after 2 epochs and resumed ends where an uninterrupted one does."""
    seen = []
    original = grpo.ppo_update

    def spy(session, rollouts, *args, **kwargs):
        seen.append((rollouts.latents.shape, rollouts.sde_steps, rollouts.timesteps.clone()))
        return original(session, rollouts, *args, **kwargs)

    monkeypatch.setattr(grpo, "ppo_update", spy)
    small_grpo(CheckpointConfig(every=2))(context(tmp_path / "whole", photo_prompts))
    shape, sde_steps, timesteps = seen[0]
    assert shape[1] == 4 and sde_steps == [0, 1, 2] and len(timesteps) == 3
    scheduler = load_pipeline().scheduler
    scheduler.set_timesteps(6)
    assert torch.equal(timesteps, scheduler.timesteps[3:])  # the last three steps of the schedule
    small_grpo(CheckpointConfig(every=2, exit_after=2))(context(tmp_path / "split", photo_prompts))
    small_grpo(CheckpointConfig(every=2))(context(tmp_path / "split", photo_prompts))
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("whole", "split")}
    assert [r["step"] for r in records["whole"]] == [r["step"] for r in records["split"]]
    for a, b in zip(records["whole"], records["split"], strict=True):
        for key in ("train/reward_mean", "train/loss", "eval/reward_mean"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    a, b = (load_file(tmp_path / name / "final" / "pytorch_lora_weights.safetensors") for name in ("whole", "split"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    # the held-out evaluation edits the two held-out photographs at eval.strength, at epochs 0, 2 and 4
    assert [r["step"] for r in records["whole"] if "eval/reward_mean" in r] == [0, 2, 4]


def test_nft_trains_on_image_prompts(photo_prompts, tmp_path):
    """DiffusionNFT's flow-matching update on the final images of image-to-image rollouts: it trains the taken steps
    (the sigmas of the schedule's tail)."""
    config = nft.NFT(
        epochs=2, sampling=SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8,
                                          num_inference_steps=6, strength=0.5, guidance_scale=1.0, noise_level=0.0),
        train=MatchingConfig(batch_size=4), lora=LoraSpec(rank=4), optim=OptimConfig(lr=1e-3),
        eval=EvalConfig(every=1, max_prompts=2, num_inference_steps=6, strength=0.5),
        checkpoint=CheckpointConfig(every=10))
    config(context(tmp_path, photo_prompts))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.slow  # the CLI's exit code and bytes; the check itself runs in the default suite (test_faults too)
def test_rl_run_refuses_image_prompts_without_strength_in_one_line(photo_prompts, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rl.run", "algo=grpo", "reward=jpeg_compressibility", "model=tiny",
         f"prompts.train.file={photo_prompts}", f"prompts.eval.file={photo_prompts}", "prompts.train.stop=4",
         "prompts.eval.start=4", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: the training prompts carry source images: set algo.sampling.strength (image-to-image: the fraction of "
        "the schedule to take, e.g. 0.6)"), result.stderr[-2000:]


def test_held_out_images_are_edits_of_the_source_photographs(photo_prompts, tiny_pipe):
    """sample_images with a strength samples image-to-image from each prompt's photograph, image i with seed + i."""
    from rl import seeds
    from rl.evaluation import sample_images
    from rl.prompts import source_image

    prompts = load_prompts(str(photo_prompts), stop=2)
    edited = sample_images(tiny_pipe, prompts, 11, num_inference_steps=6, guidance_scale=4.5, resolution=None,
                           strength=0.5)
    plain = sample_images(tiny_pipe, prompts, 11, num_inference_steps=6, guidance_scale=4.5, resolution=None)
    direct = tiny_pipe([p.text for p in prompts], image=[source_image(p.image) for p in prompts], strength=0.5,
                       num_inference_steps=6, guidance_scale=4.5, output_type="pt",
                       generator=[seeds.generator(11 + i) for i in range(2)]).images
    torch.testing.assert_close(edited, direct, atol=1e-5, rtol=0)
    assert (edited - plain).abs().max() > 1e-2


def test_ddpo_keeps_statistics_per_source_image(photo_prompts, tmp_path):
    """One instruction over several images is several prompts for DDPO's per-prompt baseline."""
    from rl.ddpo import prompt_key
    from rl.prompts import Prompt

    same = tmp_path / "same.jsonl"
    images = [p.image for p in load_prompts(str(photo_prompts), stop=2)]
    same.write_text("".join(json.dumps({"prompt": "make it bolder", "image": i}) + "\n" for i in images))
    keys = {prompt_key(p) for p in load_prompts(str(same))}
    assert len(keys) == 2 and prompt_key(Prompt("a cat")) == "a cat"


def test_given_noise_is_the_starts_only_randomness(photo_prompts, tiny_pipe):
    """Training passes each sample's noise (image_noise): the source's encoding is then its mean, so two samples with
    the same noise (same_initial_noise) start from the same latents whatever their generators."""
    from rl.prompts import source_image

    image = source_image(load_prompts(str(photo_prompts), stop=1)[0].image)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    starts = [tiny_pipe("a cat", image=image, strength=0.5, num_inference_steps=4, image_noise=noise,
                        generator=torch.Generator().manual_seed(seed), output_type="latent").latents[:, 0]
              for seed in (1, 2)]
    assert torch.equal(starts[0], starts[1])
