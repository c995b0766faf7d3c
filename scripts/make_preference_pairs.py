"""Write a small preference dataset in Pick-a-Pic v2's shape from real photographs (scikit-image's `skimage.data`).

    python -m scripts.make_preference_pairs --out data/photo_pairs --pairs 256 --resolution 32

Each pair is a random crop of a photograph (preferred) and a degraded copy of the same crop (blurred, noisy, heavily
JPEG-compressed), captioned after the photograph ("a photo of a cat"). Which side is `jpg_0` is random, `label_0`
says which one is preferred, and about one pair in twenty is a tie (`label_0 = 0.5`), which loaders must drop. Writes
`train-00000.parquet` with columns `caption`, `jpg_0`, `jpg_1` (JPEG bytes) and `label_0`.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter

from rl.data import import_data_extra

PHOTOS = {
    "astronaut": "a photo of an astronaut",
    "chelsea": "a photo of a cat",
    "coffee": "a photo of a cup of coffee",
    "rocket": "a photo of a rocket",
    "colorwheel": "a colour wheel",
    "immunohistochemistry": "a microscope image of stained tissue",
    "hubble_deep_field": "a photo of galaxies in deep space",
    "retina": "a photo of a retina",
}


def jpeg_bytes(picture: PIL.Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def random_crop(photo: np.ndarray, resolution: int, rng: np.random.Generator) -> PIL.Image.Image:
    """A random square crop of between half and all of the short side, resized to `resolution`."""
    height, width = photo.shape[:2]
    side = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = PIL.Image.fromarray(photo[top : top + side, left : left + side]).convert("RGB")
    return crop.resize((resolution, resolution), PIL.Image.BICUBIC)


def degrade(picture: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    """Blur, add Gaussian noise, and compress at JPEG quality 10: the dispreferred image."""
    blurred = picture.filter(PIL.ImageFilter.GaussianBlur(radius=picture.width / 32))
    array = np.asarray(blurred, dtype=np.float32) + rng.normal(0, 25, size=(picture.height, picture.width, 3))
    noisy = PIL.Image.fromarray(array.clip(0, 255).astype(np.uint8))
    return PIL.Image.open(io.BytesIO(jpeg_bytes(noisy, quality=10))).convert("RGB")


def make_pairs(out: Path, pairs: int, resolution: int, seed: int = 0) -> Path:
    from datasets import Dataset

    skimage_data = import_data_extra("skimage.data")
    rng = np.random.default_rng(seed)
    photos = {name: getattr(skimage_data, name)() for name in PHOTOS}
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    names = list(PHOTOS)
    for i in range(pairs):
        name = names[i % len(names)]
        good = random_crop(photos[name], resolution, rng)
        bad = degrade(good, rng)
        tie = rng.random() < 0.05
        good_first = bool(rng.random() < 0.5)
        first, second = (good, bad) if good_first else (bad, good)
        rows["caption"].append(PHOTOS[name])
        rows["jpg_0"].append(jpeg_bytes(first))
        rows["jpg_1"].append(jpeg_bytes(second))
        rows["label_0"].append(0.5 if tie else (1.0 if good_first else 0.0))
    out.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows).to_parquet(str(out / "train-00000.parquet"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/photo_pairs"), help="folder to write")
    parser.add_argument("--pairs", type=int, default=256, help="number of pairs (ties included)")
    parser.add_argument("--resolution", type=int, default=32, help="image size (the tiny model's is 32)")
    parser.add_argument("--seed", type=int, default=0, help="crop, noise and order seed")
    args = parser.parse_args()
    folder = make_pairs(args.out, args.pairs, args.resolution, args.seed)
    print(f"wrote {args.pairs} pairs to {folder}")


if __name__ == "__main__":
    main()
