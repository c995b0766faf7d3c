"""Image-caption data for supervised fine-tuning: a local `datasets` imagefolder or any `datasets` dataset.

Sampling is deterministic in `(seed, epoch, index)`: the order of each epoch and each sample's random crop, flip and
caption dropout depend only on those, never on an RNG's running state. A resumed run therefore sees exactly the
batches the uninterrupted run would have seen, from any step, on any number of processes.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset, Sampler

from pipelines.errors import UserError
from rl import seeds

logger = logging.getLogger(__name__)


class DataError(UserError):
    """The training data cannot be used; the message names the path or file."""


def import_data_extra(module: str):
    """Import a package of the `data` extra (scikit-learn's digits, scikit-image's photographs), or stop with one line
    saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise DataError(f"this needs {module.split('.')[0]} (the real digits and photographs come from it): "
                        "pip install -e '.[data]'") from error


@dataclass
class ImageCaptionData:
    """Where the images and captions are and how to prepare them (`conf/data/*.yaml`).

    `path` is a folder in the `datasets` imagefolder layout: images plus a `metadata.jsonl` with `file_name` and a
    caption column (default `text`). Or `dataset` names any `datasets` dataset with image and caption columns.
    """

    path: str | None = None
    dataset: str | None = None
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int | None = None  # pixels; None: the model's native size (rl/run.py sets it)
    center_crop: bool = True
    random_flip: bool = False
    max_samples: int | None = None

    def load(self, require_captions: bool = True, default_caption: str = "") -> ImageCaptionDataset:
        """Read the index (not the pixels), check every image, and return the dataset; raises `DataError`."""
        from datasets import Image, load_dataset

        if (self.path is None) == (self.dataset is None):
            raise DataError("set exactly one of data.path=<imagefolder> or data.dataset=<datasets name>")
        if self.path is not None:
            folder = Path(self.path).expanduser()
            if not folder.is_dir():
                raise DataError(f"data.path={self.path}: no such folder")
            try:
                table = load_dataset("imagefolder", data_dir=str(folder), split=self.split)
            except Exception as error:  # datasets reports an empty folder and bad metadata in several ways
                raise DataError(f"cannot read the imagefolder {folder}: {str(error).splitlines()[0]}") from None
        else:
            try:
                table = load_dataset(self.dataset, split=self.split)
            except Exception as error:
                raise DataError(f"cannot load dataset {self.dataset!r}: {str(error).splitlines()[0]}") from None
        if self.image_column not in table.column_names:
            raise DataError(f"{self.path or self.dataset} has no image column {self.image_column!r}: "
                            f"{table.column_names}")
        has_captions = self.caption_column in table.column_names
        if require_captions and not has_captions:
            raise DataError(
                f"{self.path or self.dataset} has no caption column {self.caption_column!r} (columns: "
                f"{table.column_names}); add a metadata.jsonl with file_name and {self.caption_column}, or set "
                f"data.caption_column"
            )
        table = table.cast_column(self.image_column, Image(decode=False))
        if self.max_samples is not None:
            table = table.select(range(min(self.max_samples, len(table))))
        records, skipped = [], []
        for index, row in enumerate(table):
            image = row[self.image_column]
            name = image.get("path") or f"{self.dataset}[{index}]"
            if not is_readable(image):
                skipped.append(name)
                continue
            caption = row[self.caption_column] if has_captions else default_caption
            records.append((name, image, caption if caption is not None else ""))
        if skipped:
            logger.warning("skipping %d unreadable image(s): %s", len(skipped), ", ".join(skipped[:10]))
        if not records:
            raise DataError(f"{self.path or self.dataset} holds no readable images")
        return ImageCaptionDataset(records, native_or_set(self.resolution), self.center_crop, self.random_flip,
                                   skipped)


def native_or_set(resolution: int | None) -> int:
    """`data.resolution`, which `rl.run` sets from null to the model's native size when the model's config gives it."""
    if resolution is None:
        raise DataError("data.resolution=null means the model's native size, which this model's config files do not "
                        "give; set data.resolution")
    return resolution


def is_readable(image: dict) -> bool:
    try:
        with open_image(image) as handle:
            handle.verify()
        return True
    except Exception:
        return False


def open_image(image: dict) -> PIL.Image.Image:
    if image.get("bytes") is not None:
        import io

        return PIL.Image.open(io.BytesIO(image["bytes"]))
    return PIL.Image.open(image["path"])


def load_pixels(
    image: dict, resolution: int, center_crop: bool = True, random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An image (`{"bytes"}` or `{"path"}`) as RGB CHW in [0, 1], resized on its short side to `resolution`, then
    center- or randomly cropped to a square and optionally flipped (the randomness from `generator`)."""
    with open_image(image) as handle:
        picture = PIL.ImageOps.exif_transpose(handle).convert("RGB")
    pixels = TF.to_dtype(TF.pil_to_tensor(picture), torch.float32, scale=True)
    pixels = TF.resize(pixels, resolution, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    height, width = pixels.shape[-2:]
    if center_crop:
        pixels = TF.center_crop(pixels, [resolution, resolution])
    else:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
        pixels = pixels[:, top : top + resolution, left : left + resolution]
    if random_flip and torch.rand(1, generator=generator).item() < 0.5:
        pixels = pixels.flip(-1)
    return pixels


class ImageCaptionDataset(Dataset):
    """Items are `(index, epoch, seed)` tuples (see `EpochBatchSampler`); each yields
    `{"pixel_values": CHW in [-1, 1], "caption": str, "key": str}`, the key identifying the sample for caches."""

    def __init__(
        self,
        records: list[tuple[str, dict, str]],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        skipped: list[str] | None = None,
    ):
        self.records = records
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.skipped = skipped or []

    def __len__(self) -> int:
        return len(self.records)

    @property
    def deterministic(self) -> bool:
        """True when a sample's pixels never change between epochs (so its VAE latents can be cached)."""
        return self.center_crop and not self.random_flip

    def __getitem__(self, item: tuple[int, int, int]) -> dict:
        index, epoch, seed = item
        key, image, caption = self.records[index]
        generator = seeds.data_sample(seed, epoch, index)
        pixels = load_pixels(image, self.resolution, self.center_crop, self.random_flip, generator)
        return {"pixel_values": pixels * 2 - 1, "caption": caption, "key": key, "index": index, "epoch": epoch}


def collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
        "keys": [item["key"] for item in items],
        "indices": [item["index"] for item in items],
        "epochs": [item["epoch"] for item in items],
    }


class EpochBatchSampler(Sampler):
    """An endless stream of this process's batches, epoch after epoch, from a given micro-batch position.

    Epoch `e` is a permutation of the dataset drawn from `seed + e`; each global batch of `batch_size * num_replicas`
    samples is split into consecutive per-process slices. Incomplete global batches at an epoch's end are dropped.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0, start: int = 0
    ):
        global_batch = batch_size * num_replicas
        if num_samples < global_batch:
            raise DataError(
                f"the dataset has {num_samples} samples, fewer than one global batch ({batch_size} x {num_replicas} "
                f"processes); lower the batch size"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_replicas, self.rank, self.start = num_replicas, rank, start
        self.batches_per_epoch = num_samples // global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        position = self.start
        while True:
            epoch, batch = divmod(position, self.batches_per_epoch)
            order = torch.randperm(self.num_samples, generator=seeds.data_order(self.seed, epoch))
            first = batch * self.batch_size * self.num_replicas + self.rank * self.batch_size
            yield [(int(i), epoch, self.seed) for i in order[first : first + self.batch_size]]
            position += 1


def digits_imagefolder(folder: Path, resolution: int = 32, limit: int | None = None) -> Path:
    """Write scikit-learn's real handwritten digits (8x8, 1797 images) as an imagefolder with captions
    "a handwritten digit N"; used by tests and CPU examples."""
    digits = import_data_extra("sklearn.datasets").load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    import json

    with (folder / "metadata.jsonl").open("w") as metadata:
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            if limit is not None and i >= limit:
                break
            array = (image / 16.0 * 255).round().astype(np.uint8)
            picture = PIL.Image.fromarray(array).resize((resolution, resolution), PIL.Image.BICUBIC).convert("RGB")
            picture.save(folder / f"{i:04d}.png")
            metadata.write(json.dumps({"file_name": f"{i:04d}.png", "text": f"a handwritten digit {label}"}) + "\n")
    return folder
