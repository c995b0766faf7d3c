"""Write a run's diffusers LoRA (`final/pytorch_lora_weights.safetensors`) in the layout ComfyUI reads, beside it as
`final/comfyui_lora.safetensors` (runs write it themselves; this is for a run from before they did). The conversion is
pipelines/lora_layout.py.

    python -m scripts.write_comfyui_lora RUN_DIR/final [--layers N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.lora_layout import DIFFUSERS_FILE, write_original


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.write_comfyui_lora", description=__doc__.splitlines()[0])
    parser.add_argument("final", type=Path, help="a folder holding pytorch_lora_weights.safetensors (a run's final/)")
    parser.add_argument("--layers", type=int,
                        help="the transformer's block count (SD3 Medium 24, SD3.5 Medium 24, SD3.5 Large 38); needed "
                             "only when the context modulation is adapted")
    args = parser.parse_args(argv)
    try:
        if not (args.final / DIFFUSERS_FILE).is_file():
            raise ValueError(f"{args.final} holds no {DIFFUSERS_FILE}")
        print(f"wrote {write_original(args.final, args.layers)}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
