"""The digits world's image-to-image task, "make the digit bolder": source images and their prompt sets.

    python -m experiments.digits_edit                  # writes assets/prompts/digits_edit/ (shipped; ~1 minute)
    python -m rl.run experiment=grpo_bolder_digits     # GRPO learns the edit (reward=digits_bolder, rewards/edit.py)

The sources are the world's base model's own drawings of "a handwritten digit N" (the phrasing it was trained on and
draws correctly), 10 ODE steps at guidance 4.5: seeds 0-3 of each digit for training, seeds 100-101 for the held-out
evaluation (other drawings of the same digits). Each line of `train.jsonl` / `eval.jsonl` is
`{"prompt": "a handwritten digit N", "image": "images/<split>_<N>_<seed>.png", "digit": N}`; the reward keeps the
digit and rewards the ink added to the source.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rl.prompts import SHIPPED_PROMPTS

SPLITS = {"train": range(4), "eval": range(100, 102)}


def write_edit_prompts(out: Path, steps: int = 10, guidance_scale: float = 4.5) -> dict[str, int]:
    from pipelines.digits import load_digits_pipeline

    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, seeds in SPLITS.items():
        lines = []
        for digit in range(10):
            prompt = f"a handwritten digit {digit}"
            images = pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pil").images
            for seed, image in zip(seeds, images, strict=True):
                name = f"images/{split}_{digit}_{seed}.png"
                image.save(out / name)
                lines.append(json.dumps({"prompt": prompt, "image": name, "digit": digit}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        counts[split] = len(lines)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_PROMPTS / "digits_edit")
    args = parser.parse_args(argv)
    counts = write_edit_prompts(args.out)
    print(f"wrote {counts['train']} training and {counts['eval']} held-out sources to {args.out}")


if __name__ == "__main__":
    main()
