"""Preference pairs for offline Diffusion-DPO, in Pick-a-Pic v2's shape: `caption`, `jpg_0`, `jpg_1`, `label_0`.

`label_0` is 1 when `jpg_0` was preferred, 0 when `jpg_1` was, and 0.5 for a tie; ties are dropped and every pair is
stored winner first. The source is a `datasets` dataset name (`yuvalkirstain/pickapic_v2`), or a local folder holding
a `save_to_disk` dataset, parquet files (`<split>-*.parquet`, as Pick-a-Pic's repository has them), or a
`metadata.jsonl` whose image columns are file names in that folder. `scripts/make_preference_pairs.py` writes a small
such folder from real photographs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from rl.data import DataError, is_readable, load_pixels, native_or_set

logger = logging.getLogger(__name__)


@dataclass
class PreferenceData:
    """Where the preference pairs are and how to prepare them (`conf/data/preferences.yaml`, `pickapic.yaml`)."""

    path: str | None = None
    dataset: str | None = None
    split: str = "train"
    eval_split: str | None = None  # a split of held-out pairs; None: the last `eval_pairs` pairs of `split`
    eval_pairs: int = 64
    caption_column: str = "caption"
    image_columns: tuple[str, str] = ("jpg_0", "jpg_1")
    label_column: str = "label_0"
    resolution: int | None = None  # pixels; None: the model's native size (rl/run.py sets it)
    max_pairs: int | None = None  # use only the first N pairs of the training split (after dropping ties)

    def load(self) -> tuple[PreferenceDataset, PreferenceDataset]:
        """The training and held-out pairs, every image checked; raises `DataError` (one line)."""
        if (self.path is None) == (self.dataset is None):
            raise DataError("set exactly one of data.path=<folder of pairs> or data.dataset=<datasets name>")
        pairs = self._pairs(self.split, self.max_pairs)
        if self.eval_split is not None:
            held_out = self._pairs(self.eval_split, self.eval_pairs)
        else:
            if len(pairs) <= self.eval_pairs:
                raise DataError(
                    f"{self.path or self.dataset} has {len(pairs)} usable pairs, not more than data.eval_pairs="
                    f"{self.eval_pairs} held out; lower eval_pairs or add pairs"
                )
            pairs, held_out = pairs[: -self.eval_pairs], pairs[-self.eval_pairs :]
        resolution = native_or_set(self.resolution)
        return PreferenceDataset(pairs, resolution), PreferenceDataset(held_out, resolution)

    def _table(self, split: str):
        from datasets import DatasetDict, load_dataset, load_from_disk

        source = self.path or self.dataset
        try:
            if self.dataset is not None:
                return load_dataset(self.dataset, split=split)
            folder = Path(self.path).expanduser()
            if not folder.is_dir():
                raise DataError(f"data.path={self.path}: no such folder")
            if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
                table = load_from_disk(str(folder))
                return table[split] if isinstance(table, DatasetDict) else table
            parquet = sorted(folder.rglob(f"{split}-*.parquet")) or (
                sorted(folder.rglob("*.parquet")) if split == "train" else []
            )
            if parquet:
                return load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")
            metadata = folder / ("metadata.jsonl" if split == "train" else f"{split}.jsonl")
            if metadata.exists():
                return load_dataset("json", data_files=str(metadata), split="train")
            raise DataError(
                f"{folder} holds no pairs for split {split!r} (a saved dataset, parquet, or metadata.jsonl)"
            )
        except DataError:
            raise
        except Exception as error:  # offline hub, a missing split, unreadable files: datasets raises many kinds
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f"cannot load the pairs of {source!r} (split {split!r}): {reason}") from None

    def _pairs(self, split: str, limit: int | None) -> list[tuple[str, dict, dict, str]]:
        """(key, winner image, loser image, caption) for each non-tied pair with two readable images."""
        table = self._table(split)
        columns = [self.caption_column, *self.image_columns, self.label_column]
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DataError(f"{self.path or self.dataset} has no column(s) {missing}; it has {table.column_names}")
        labels = table[self.label_column]
        pairs, skipped, ties = [], [], 0
        for index, label in enumerate(labels):
            if limit is not None and len(pairs) >= limit:
                break
            if label not in (0, 1):
                ties += 1
                continue
            row = table[index]
            images = [self._image(row[c]) for c in self.image_columns]
            key = f"{split}[{index}]"
            if not all(image is not None and is_readable(image) for image in images):
                skipped.append(key)
                continue
            winner, loser = images if label == 1 else images[::-1]
            pairs.append((key, winner, loser, row[self.caption_column] or ""))
        if skipped:
            logger.warning("skipping %d pair(s) with unreadable images: %s", len(skipped), ", ".join(skipped[:10]))
        if ties:
            logger.info("dropped %d tied pair(s) of split %s", ties, split)
        if not pairs:
            raise DataError(f"{self.path or self.dataset} (split {split!r}) holds no usable pairs")
        return pairs

    def _image(self, value) -> dict | None:
        """A stored image as `{"bytes"}` or `{"path"}`: raw bytes, a `datasets` Image dict, or a file name."""
        if isinstance(value, (bytes, bytearray)):
            return {"bytes": bytes(value)}
        if isinstance(value, dict):
            if value.get("bytes") is None and value.get("path") and self.path is not None:
                return {"path": str(Path(self.path).expanduser() / value["path"])}
            return value
        if isinstance(value, str):
            return {"path": str(Path(self.path).expanduser() / value) if self.path is not None else value}
        if hasattr(value, "save"):  # a decoded PIL image
            import io

            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            return {"bytes": buffer.getvalue()}
        return None


class PreferenceDataset(Dataset):
    """Items are `(index, epoch, seed)` tuples (see `rl.data.EpochBatchSampler`); each yields the winner's and the
    loser's pixels (CHW in [-1, 1], center-cropped), the caption and a key."""

    def __init__(self, pairs: list[tuple[str, dict, dict, str]], resolution: int):
        self.pairs, self.resolution = pairs, resolution

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: tuple[int, int, int]) -> dict:
        index = item[0]
        key, winner, loser, caption = self.pairs[index]
        pixels = [load_pixels(image, self.resolution) * 2 - 1 for image in (winner, loser)]
        return {"winner": pixels[0], "loser": pixels[1], "caption": caption, "key": key}


def collate_pairs(items: list[dict]) -> dict:
    return {
        "winner": torch.stack([item["winner"] for item in items]),
        "loser": torch.stack([item["loser"] for item in items]),
        "captions": [item["caption"] for item in items],
        "keys": [item["key"] for item in items],
    }
