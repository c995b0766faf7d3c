"""The digits world's base model (`model=digits`): a small SD3-architecture model whose VAE and transformer were
trained on real handwritten digits by `experiments/digits_world.py`, shipped in `assets/digits_world/` (fp16, about
6 MB) and unpacked on first use into an ordinary diffusers folder, loaded with `from_pretrained` like any checkpoint.

The text encoders and tokenizers are the tiny model's (`pipelines/tiny.py`), rebuilt from their seed; a fingerprint of
their weights and vocabularies checks that this machine builds the ones the base model was trained with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from pipelines.hub import ModelLoadError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "data" / "digits_world"
SHIPPED = ROOT / "assets" / "digits_world"
TEXT_LENGTH = 16  # CLIP and T5 tokens per prompt


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
    unpacked there (with `build`, the base model that `python -m experiments.digits_world --build --out <world>`
    trained there is loaded instead). Under `accelerate launch` the main
    process prepares the folder while the others wait, then every process loads it."""
    from accelerate import PartialState

    from pipelines import load_pipeline

    folder = Path(world).expanduser()
    folder = folder if folder.is_absolute() else ROOT / folder
    with PartialState().main_process_first():
        base = folder / "base" if build else unpack(folder)
    if not (base / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} holds no base model built here; train one with "
                             f"`python -m experiments.digits_world --build --out {folder}` (about 15 minutes)")
    return load_pipeline(str(base), device=device, **kwargs)
