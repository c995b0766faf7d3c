"""Write a diffusers SD3 / SD3.5 folder as one single-file checkpoint in Stability AI's layout (the layout ComfyUI and
A1111-style tools read; pipelines/single_file.py holds the conversion).

    python -m scripts.export_single_file MODEL_DIR OUT.safetensors [--no-t5] [--transformer-only]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import exit_on_user_error
from pipelines.loading import load_pipeline
from pipelines.single_file import save_single_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.export_single_file", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a diffusers SD3 pipeline folder (or a hub id, when reachable)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-t5", action="store_true", help="leave T5 out (as sd3_medium_incl_clips.safetensors)")
    parser.add_argument("--transformer-only", action="store_true", help="only model.diffusion_model.*")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        pipe = load_pipeline(args.model, dtype="float32")
        file = save_single_file(pipe.components, args.out, include_t5=not args.no_t5,
                                transformer_only=args.transformer_only)
    print(f"wrote {file} ({file.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
