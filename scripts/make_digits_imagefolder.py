"""Write scikit-learn's real handwritten digits as an imagefolder (images + metadata.jsonl with captions).

    python -m scripts.make_digits_imagefolder --out data/digits [--resolution 32] [--limit N]

Captions read "a handwritten digit N". The folder works as `data.path` for `algo=sft`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rl.data import digits_imagefolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (the digits are 8x8)")
    parser.add_argument("--limit", type=int, default=None, help="write only the first N of the 1797 digits")
    args = parser.parse_args()
    print(digits_imagefolder(args.out, args.resolution, args.limit))


if __name__ == "__main__":
    main()
