"""Write the GenEval-style training prompts (rl/geneval_prompts.py), disjoint from GenEval's test prompts.

    python -m scripts.make_geneval_train_prompts [--size 8500] [--seed 2026]

Without options it re-makes the shipped `assets/prompts/geneval_train_metadata.jsonl` byte for byte.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from rl.geneval_prompts import DEFAULT_SEED, DEFAULT_SIZE, jsonl_text, read_jsonl, training_rows
from rl.prompts import SHIPPED_PROMPTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, default=SHIPPED_PROMPTS / "geneval_test_metadata.jsonl",
                        help="GenEval's test metadata, whose prompts (and their swapped twins) are left out")
    parser.add_argument("--out", type=Path, default=SHIPPED_PROMPTS / "geneval_train_metadata.jsonl",
                        help="file to write")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="rows to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the draws and the shuffle")
    args = parser.parse_args(argv)
    rows = training_rows(read_jsonl(args.test.read_text(encoding="utf-8")), args.size, args.seed)
    args.out.write_text(jsonl_text(rows), encoding="utf-8")
    print(f"{args.out}: {len(rows)} rows, {dict(Counter(row['tag'] for row in rows))}")


if __name__ == "__main__":
    main()
