"""The digits world: a small SD3-architecture text-to-image model trained here, on the CPU, on real handwritten digits.

    python -m experiments.digits_world --out data/digits_world          # build (or reuse) the base model

1. **Data**: the "generator" half of scikit-learn's `load_digits` (`scripts/train_digit_classifier.digits_split`),
   upscaled to 32 px, captioned in several phrasings ("a handwritten digit 7", "the number seven", ...). The digits
   reward's classifier trains on another part, so the reward never scores digits the generator saw.
2. **VAE**: the tiny model's `AutoencoderKL`, trained on those images (reconstruction + a small KL term); its
   `scaling_factor` and `shift_factor` are then set from the latents' statistics, as SD3's are.
3. **Transformer**: the tiny SD3.5-architecture MMDiT, fully fine-tuned from random with this project's supervised
   trainer (`algo=sft algo.lora=null`) on the images and captions, for a fixed, short budget: it learns to draw
   digits, not yet to draw the right one every time, which leaves RL room to improve.

The result is an ordinary diffusers folder (`<out>/base`), loaded by `model=digits` like any checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "data" / "digits_world"
PHRASINGS_TRAIN = ["a handwritten digit {n}", "the number {w}", "a {n}"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def caption(template: str, digit: int) -> str:
    return template.format(n=digit, w=WORDS[digit])


def write_imagefolder(folder: Path, resolution: int = 32) -> Path:
    """The generator split as an imagefolder; each image appears once per training phrasing."""
    from scripts.train_digit_classifier import digits_split

    images, labels = digits_split("generator")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        picture = PIL.Image.fromarray((image * 255).round().astype(np.uint8)).resize((resolution, resolution),
                                                                                      PIL.Image.BICUBIC)
        name = f"{i:04d}.png"
        picture.convert("RGB").save(folder / name)
        lines += [json.dumps({"file_name": name, "text": caption(t, int(label))}) for t in PHRASINGS_TRAIN]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def train_vae(vae, pixels: torch.Tensor, steps: int = 1500, batch_size: int = 64, kl_weight: float = 1e-6,
              seed: int = 0) -> float:
    """Fit the VAE to `pixels` (N x 3 x H x W in [-1, 1]); returns the final reconstruction MSE on all of them.
    Then sets `scaling_factor` / `shift_factor` so that scaled latents have zero mean and unit std."""
    from tqdm.auto import trange

    generator = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for _ in trange(steps, desc="vae"):
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        error = torch.cat([
            (vae.decode(vae.encode(pixels[i : i + 256]).latent_dist.mean).sample - pixels[i : i + 256]) ** 2
            for i in range(0, len(pixels), 256)
        ]).mean().item()
    shift = means.mean().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / (means - shift).std().item())
    return error


def digits_components(seed: int = 0) -> dict:
    """The tiny pipeline's tokenizers, text encoders and scheduler, with a digits-sized VAE (4 latent channels at
    16 x 16) and a wider MMDiT (4 blocks, 4 heads of 32) than the random test model, both from the real classes."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from pipelines.tiny import T5_WIDTH, CLIP_WIDTH, build_tiny_components

    components = build_tiny_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components["vae"] = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
            latent_channels=4, norm_num_groups=16, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        )
        components["transformer"] = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
            num_attention_heads=4, caption_projection_dim=128, joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=16, qk_norm="rms_norm",
        )
    return components


def build_base(out: Path = DEFAULT_DIR, vae_steps: int = 1500, sft_steps: int = 1500, seed: int = 0) -> Path:
    """Build the digits world's base model into `<out>/base` (reused when it exists); returns that folder."""
    base = out / "base"
    if (base / "model_index.json").exists():
        return base
    from pipelines import StableDiffusion3LogProbPipeline

    folder = write_imagefolder(out / "images")
    pipe = StableDiffusion3LogProbPipeline(**digits_components(seed))
    pixels = torch.stack([
        torch.as_tensor(np.asarray(PIL.Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
        for p in sorted(folder.glob("*.png"))
    ])
    error = train_vae(pipe.vae, pixels, vae_steps, seed=seed)
    logger.info("VAE reconstruction MSE %.4f", error)
    untrained = out / "untrained"
    pipe.save_pretrained(untrained)
    command = [
        sys.executable, "-m", "rl.run", "experiment=sft_digits_world_base", f"model.path={untrained}",
        f"data.path={folder}", f"algo.train.max_steps={sft_steps}", f"seed={seed}", f"hydra.run.dir={out / 'sft'}",
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    (out / "sft" / "final").rename(base)
    (out / "build.json").write_text(json.dumps({"vae_mse": error, "vae_steps": vae_steps, "sft_steps": sft_steps,
                                                "seed": seed}) + "\n")
    return base


def load_digits_pipeline(world: str = str(DEFAULT_DIR), device="cpu", **kwargs):
    """`model=digits`: the digits world's base model from `world` (built there first if missing)."""
    from pipelines import load_pipeline

    folder = Path(world)
    folder = folder if folder.is_absolute() else ROOT / folder
    return load_pipeline(str(build_base(folder)), device=device, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="where the world is cached")
    parser.add_argument("--vae-steps", type=int, default=1500, help="VAE training steps")
    parser.add_argument("--sft-steps", type=int, default=1500, help="supervised steps for the transformer")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(build_base(args.out, args.vae_steps, args.sft_steps))


if __name__ == "__main__":
    main()
