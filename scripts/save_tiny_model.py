"""Save the tiny random SD3 model as an ordinary diffusers pipeline folder.

    python -m scripts.save_tiny_model --out tiny-sd3 [--seed 0]
    python -m scripts.save_tiny_model --out tiny-sd3 --single-file tiny-sd3.safetensors [--no-t5]

The folder loads with `StableDiffusion3Pipeline.from_pretrained(out)` and with `python -m rl.run model.path=out`.
With `--single-file`, the model is the tiny model laid out as Stability AI's single files need (two CLIP encoders of
different widths, 24 and 40, as SD3's 768 and 1280, so that diffusers tells them apart; CLIP-L's projection the
identity, as SD3 uses its pooled output unprojected), the folder holds its configs and weights, and the file the same
weights in the single-file layout: `python -m rl.run model.path=FILE model.config=out` loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import StableDiffusion3Pipeline

from pipelines.tiny import build_tiny_components


def save_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write the tiny model with weights from `seed` to `out` (a stock `StableDiffusion3Pipeline` folder)."""
    components = build_tiny_components(seed=seed)
    StableDiffusion3Pipeline(**components).save_pretrained(out)
    return out


def save_tiny_single_file(out: Path, file: Path, seed: int = 0, include_t5: bool = True,
                          transformer_only: bool = False) -> tuple[Path, Path]:
    """Write the single-file variant of the tiny model to the folder `out` and, in the single-file layout, to `file`
    (pipelines/single_file.py); return both."""
    import torch

    from pipelines.single_file import save_single_file

    components = build_tiny_components(seed=seed, clip_widths=(24, 40))
    with torch.no_grad():
        components["text_encoder"].text_projection.weight.copy_(torch.eye(24))
    StableDiffusion3Pipeline(**components).save_pretrained(out)
    save_single_file(components, file, include_t5=include_t5, transformer_only=transformer_only)
    return out, file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--single-file", type=Path, help="also write the weights as one SD3 single-file checkpoint")
    parser.add_argument("--no-t5", action="store_true", help="leave T5 out of the single file")
    args = parser.parse_args()
    if args.single_file:
        print(*save_tiny_single_file(args.out, args.single_file, args.seed, include_t5=not args.no_t5))
    else:
        print(save_tiny_model(args.out, args.seed))


if __name__ == "__main__":
    main()
