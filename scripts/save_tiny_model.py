"""Save the tiny random SD3 model as an ordinary diffusers pipeline folder.

    python -m scripts.save_tiny_model --out tiny-sd3 [--seed 0]

The folder loads with `StableDiffusion3Pipeline.from_pretrained(out)` and with `python -m rl.run model.path=out`.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    print(save_tiny_model(args.out, args.seed))


if __name__ == "__main__":
    main()
