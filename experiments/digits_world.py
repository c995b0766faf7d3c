"""The digits world: a small SD3-architecture text-to-image model trained here, on the CPU, on real handwritten digits.

    python -m experiments.digits_world                         # unpack the shipped base model into data/digits_world
    python -m experiments.digits_world --build --out DIR       # train it from scratch instead (about 15 minutes)
    python -m experiments.digits_world --build --ship          # ... and replace the shipped weights with the new ones

1. **Data**: the "generator" half of scikit-learn's `load_digits` (`experiments/digits_data.py`),
   upscaled to 32 px, captioned in three phrasings ("a handwritten digit 7", "the number seven", "a 7"). The digits
   reward's classifier trains on another part, so the reward never scores digits the generator saw.
2. **VAE**: an `AutoencoderKL` with 4 latent channels, trained on those images (reconstruction + a small KL term); its
   `scaling_factor` and `shift_factor` are then set from the latents' statistics, as SD3's are.
3. **Transformer**: a 4-block SD3 MMDiT, trained from random with this project's supervised trainer
   (`experiment=sft_digits_world_base`) on the images and captions, for a short fixed budget.
4. **Text encoders**: the tiny model's random CLIP and T5 encoders (`pipelines/tiny.py`, frozen), with prompts cut to
   `pipelines.digits.TEXT_LENGTH` tokens: digit prompts are at most 12 tokens long, and short text makes every step
   about 4x faster.

The transformer and VAE weights this produced ship in `assets/digits_world/` (fp16, about 6 MB); the text encoders are
rebuilt from their seed, and a fingerprint of their weights and vocabularies checks that this machine builds the ones
the base model was trained with. Either way the result is an ordinary diffusers folder (`<out>/base`), loaded by
`model=digits` with `from_pretrained` like any checkpoint. A build here gives an equivalent model, not a bit-identical
one (float sums depend on the machine and its thread count).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from experiments.digits_data import digits_split
from pipelines.digits import DEFAULT_DIR, SHIPPED, digits_components, text_fingerprint, unpack

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PHRASINGS_TRAIN = ["a handwritten digit {n}", "the number {w}", "a {n}"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def caption(template: str, digit: int) -> str:
    return template.format(n=digit, w=WORDS[digit])


def write_imagefolder(folder: Path, resolution: int = 32) -> Path:
    """The generator split as an imagefolder; each image appears once per training phrasing."""
    images, labels = digits_split("generator")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
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


def build_base(out: Path = DEFAULT_DIR, vae_steps: int = 300, sft_steps: int = 1000, seed: int = 0) -> Path:
    """Train the digits world's base model into `<out>/base` (reused when it exists); returns that folder."""
    base = out / "base"
    if (base / "model_index.json").exists():
        return base
    from pipelines import StableDiffusion3LogProbPipeline

    started = time.time()
    folder = write_imagefolder(out / "images")
    components = digits_components(seed)
    pipe = StableDiffusion3LogProbPipeline(**components)
    pixels = torch.stack([
        torch.from_numpy(np.array(PIL.Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
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
    build = {"vae_mse": error, "vae_steps": vae_steps, "sft_steps": sft_steps, "seed": seed,
             "text": text_fingerprint(components), "minutes": (time.time() - started) / 60}
    (out / "build.json").write_text(json.dumps(build) + "\n")
    return base


def ship(base: Path, world: Path, assets: Path = SHIPPED) -> None:
    """Write the base model's trained parts (transformer, VAE) into `assets` in fp16, with the build's record."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    for name, cls in (("transformer", SD3Transformer2DModel), ("vae", AutoencoderKL)):
        model = cls.from_pretrained(base, subfolder=name)
        model.to(torch.float16).save_pretrained(assets / name)
        config = json.loads((assets / name / "config.json").read_text())
        config.pop("_name_or_path", None)  # the build's local folder means nothing elsewhere
        (assets / name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (assets / "build.json").write_text((world / "build.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="the world's folder (the model is <out>/base)")
    parser.add_argument("--build", action="store_true", help="train the base model (not unpack the shipped one)")
    parser.add_argument("--vae-steps", type=int, default=300, help="VAE training steps (with --build)")
    parser.add_argument("--sft-steps", type=int, default=1000, help="supervised transformer steps (with --build)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the build")
    parser.add_argument("--ship", action="store_true", help="write the built transformer and VAE into assets/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.build:
        base = build_base(args.out, args.vae_steps, args.sft_steps, args.seed)
        if args.ship:
            ship(base, args.out)
    else:
        base = unpack(args.out)
    print(base)


if __name__ == "__main__":
    main()
