"""The digits world: a small SD3-architecture text-to-image model trained here, on the CPU, on real handwritten digits.

    python -m experiments.digits_world                         # unpack the shipped base model into data/digits_world
    python -m experiments.digits_world --build --out DIR       # train it from scratch instead (about 15 minutes)
    python -m experiments.digits_world --build --ship          # ... and replace the shipped weights with the new ones

1. **Data**: the "generator" half of scikit-learn's `load_digits` (`scripts/train_digit_classifier.digits_split`),
   upscaled to 32 px, captioned in three phrasings ("a handwritten digit 7", "the number seven", "a 7"). The digits
   reward's classifier trains on another part, so the reward never scores digits the generator saw.
2. **VAE**: an `AutoencoderKL` with 4 latent channels, trained on those images (reconstruction + a small KL term); its
   `scaling_factor` and `shift_factor` are then set from the latents' statistics, as SD3's are.
3. **Transformer**: a 4-block SD3 MMDiT, trained from random with this project's supervised trainer
   (`experiment=sft_digits_world_base`) on the images and captions, for a short fixed budget.
4. **Text encoders**: the tiny model's random CLIP and T5 encoders (`pipelines/tiny.py`, frozen), with prompts cut to
   `TEXT_LENGTH` tokens: digit prompts are at most 12 tokens long, and short text makes every step about 4x faster.

The transformer and VAE weights this produced ship in `assets/digits_world/` (fp16, about 6 MB); the text encoders are
rebuilt from their seed, and a fingerprint of their weights and vocabularies checks that this machine builds the ones
the base model was trained with. Either way the result is an ordinary diffusers folder (`<out>/base`), loaded by
`model=digits` with `from_pretrained` like any checkpoint. A build here gives an equivalent model, not a bit-identical
one (float sums depend on the machine and its thread count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from pipelines.hub import ModelLoadError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "data" / "digits_world"
SHIPPED = ROOT / "assets" / "digits_world"
PHRASINGS_TRAIN = ["a handwritten digit {n}", "the number {w}", "a {n}"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEXT_LENGTH = 16  # CLIP and T5 tokens per prompt


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
    """The tiny pipeline's tokenizers (cut to `TEXT_LENGTH`), text encoders and scheduler, with a digits-sized VAE
    (4 latent channels at 16 x 16) and a wider MMDiT (4 blocks, 4 heads of 32) than the random test model, both from
    the real classes and random."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from pipelines.tiny import CLIP_WIDTH, T5_WIDTH, build_tiny_components

    components = build_tiny_components(seed)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        components[name].model_max_length = TEXT_LENGTH  # SD3 pads CLIP prompts to the tokenizer's length
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


def text_fingerprint(components: dict) -> str:
    """A hash of the tokenizers' vocabularies and the text encoders' weights: the shipped base model only works with
    the token ids and encoders it was trained with."""
    digest = hashlib.sha256()
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        digest.update(json.dumps(sorted(components[name].get_vocab().items())).encode())
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        for key, value in sorted(components[name].state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().float().cpu().numpy().round(6).tobytes())
    return digest.hexdigest()[:16]


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


def unpack(out: Path = DEFAULT_DIR, assets: Path = SHIPPED) -> Path:
    """The shipped base model as a diffusers folder `<out>/base`, reused when it holds the shipped build (another
    build there, e.g. from an older version of the shipped weights, is replaced); returns that folder."""
    base, shipped = out / "base", json.loads((assets / "build.json").read_text())
    record = out / "build.json"
    if (base / "model_index.json").exists():
        if record.exists() and json.loads(record.read_text()) == shipped:
            return base
        logger.warning("%s holds another base model than the shipped one; unpacking the shipped one", base)
        shutil.rmtree(base)
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from pipelines import StableDiffusion3LogProbPipeline

    components = digits_components(shipped["seed"])
    if text_fingerprint(components) != shipped["text"]:
        raise ModelLoadError(
            f"this machine (torch {torch.__version__}, transformers, tokenizers) builds other random text encoders or "
            f"tokenizers than the shipped digits model was trained with; train one here with "
            f"`python -m experiments.digits_world --build --out {out}`"
        )
    components["transformer"] = SD3Transformer2DModel.from_pretrained(assets, subfolder="transformer",
                                                                      dtype=torch.float32)
    components["vae"] = AutoencoderKL.from_pretrained(assets, subfolder="vae", dtype=torch.float32)
    partial = out / f"base.partial-{os.getpid()}"
    StableDiffusion3LogProbPipeline(**components).save_pretrained(partial)
    try:
        partial.rename(base)  # a complete folder or none: an interrupted unpack is redone
    except OSError:  # another process (a second run started at once) unpacked it first
        shutil.rmtree(partial)
    record.write_text(json.dumps(shipped) + "\n")
    return base


def load_digits_pipeline(world: str = str(DEFAULT_DIR), build: bool = False, device="cpu", **kwargs):
    """`model=digits`: the digits world's base model from `<world>/base`; when missing, the shipped weights are
    unpacked there (or, with `build`, a base model is trained there from scratch). Under `accelerate launch` the main
    process prepares the folder while the others wait, then every process loads it."""
    from accelerate import PartialState

    from pipelines import load_pipeline

    folder = Path(world).expanduser()
    folder = folder if folder.is_absolute() else ROOT / folder
    with PartialState().main_process_first():
        base = build_base(folder) if build else unpack(folder)
    return load_pipeline(str(base), device=device, **kwargs)


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
