"""Write the text-rendering training prompts (rl/ocr_prompts.py), disjoint from Flow-GRPO's OCR test prompts.

    python -m scripts.make_ocr_train_prompts [--size 5000] [--seed 2026]

Without options it re-makes the shipped `assets/prompts/ocr_train.txt` byte for byte.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rl.ocr_prompts import DEFAULT_SEED, DEFAULT_SIZE, lines_text, read_lines, training_prompts
from rl.prompts import SHIPPED_PROMPTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, default=SHIPPED_PROMPTS / "ocr_test.txt",
                        help="the OCR test prompts, whose prompts and quoted targets are left out")
    parser.add_argument("--out", type=Path, default=SHIPPED_PROMPTS / "ocr_train.txt", help="file to write")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="prompts to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the draws")
    args = parser.parse_args(argv)
    prompts = training_prompts(read_lines(args.test.read_text(encoding="utf-8")), args.size, args.seed)
    args.out.write_text(lines_text(prompts), encoding="utf-8")
    print(f"{args.out}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
