"""Metrics and images: `metrics.jsonl` in the run directory always, plus wandb and/or tensorboard through accelerate.

Every algorithm logs with `accelerator.log(values, step=step)`; accelerate sends it to each tracker on the main process
only. `JsonlTracker` is the accelerate tracker that writes the run directory's `metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration
from torchvision.utils import make_grid

from pipelines.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

BACKENDS = ("wandb", "tensorboard")

# What a per-image value of a reward is called in the docs' tables and on plots, where its key alone does not say
# it: the digits reward's `correct` (1 when the classifier reads the asked digit), whose mean is the model's accuracy.
METRIC_NAMES = {"correct": "accuracy"}


def metric_name(key: str) -> str:
    """The readable name of a reward value's key (`correct` -> `accuracy`; others unchanged)."""
    return METRIC_NAMES.get(key, key)


def step_unit(records: list[dict]) -> str:
    """"epoch" for the epoch-based algorithms (their steps are epochs: they log `train/epoch`), else "step"."""
    return "epoch" if any("train/epoch" in r for r in records) else "step"


@dataclass
class LoggerConfig:
    """Which trackers to use besides `metrics.jsonl` (built from `conf/logger/*.yaml`)."""

    backends: list[str] = field(default_factory=list)
    project: str = "sd3-rl"
    entity: str | None = None
    mode: str = "online"  # wandb: online, offline (no network; `wandb sync` later) or disabled
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        unknown = sorted(set(self.backends) - set(BACKENDS))
        if unknown:
            raise ConfigError(f"unknown logger backends {unknown}; choose from {list(BACKENDS)}")


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per `log` call to a file, with the step under the key `step`."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is saved as config.yaml next to metrics.jsonl

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        """Append the record as one line, flushed: a NaN or infinite value is written as null and its key listed
        under `nonfinite`, so that every line is standard JSON."""
        record = {"step": step, **{key: _to_json(value) for key, value in values.items()}}
        nonfinite = sorted(key for key, value in record.items() if _nonfinite(value))
        record = {key: None if key in nonfinite else value for key, value in record.items()}
        if nonfinite:
            record["nonfinite"] = nonfinite
        with self.path.open("a") as file:
            file.write(json.dumps(record, allow_nan=False) + "\n")
            file.flush()


def _to_json(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _nonfinite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value)


def info_means(info: dict, prefix: str, count: int | None = None, std: bool = False) -> dict[str, float]:
    """`<prefix><name>_mean` (and `_std` if asked) of each per-image value a reward reports in `info` (tensors of
    `count` values when `count` is given). A reward marks an image a value does not apply to with NaN (GenEval's
    per-task `correct_<tag>`): the statistics are over the other images, and a value that applies to none of them
    is left out."""
    metrics = {}
    for name, values in info.items():
        if not isinstance(values, torch.Tensor) or values.ndim != 1 or (count is not None and len(values) != count):
            continue
        values = values.detach().float()
        applicable = values[~values.isnan()]
        if len(applicable) == 0:
            continue
        metrics[f"{prefix}{name}_mean"] = applicable.mean().item()
        if std:
            metrics[f"{prefix}{name}_std"] = applicable.std().item() if len(applicable) > 1 else 0.0
    return metrics


def make_accelerator(
    run_dir: Path,
    logger: LoggerConfig,
    config: dict,
    mixed_precision: str = "no",
    **accelerator_kwargs,
) -> Accelerator:
    """An `Accelerator` that logs to `run_dir/metrics.jsonl` and the configured backends, trackers started."""
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=[JsonlTracker(run_dir / "metrics.jsonl"), *logger.backends],
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        **accelerator_kwargs,
    )
    init_kwargs = {
        "wandb": {
            "dir": str(run_dir),
            "name": run_dir.name,
            "entity": logger.entity,
            "mode": logger.mode,
            "tags": list(logger.tags),
        }
    }
    try:
        accelerator.init_trackers(logger.project, config=flatten_config(config), init_kwargs=init_kwargs)
    except Exception as error:
        if type(error).__module__.startswith("wandb"):  # e.g. no API key configured, and not offline
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"logger=wandb could not start ({reason}); log in with `wandb login`, or log offline "
                              f"with WANDB_MODE=offline (or logger.mode=offline) and `wandb sync` later") from None
        raise
    return accelerator


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run directory's `metrics.jsonl` (none when it has no such file). A torn last line (a kill or
    a full disk in the middle of a write) is left out with a warning; a torn line elsewhere is a corrupt file."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [record for _, record in _metric_lines(path)[0]]


def _metric_lines(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """`(line, record)` of each line of a metrics file (a torn last line left out, with a warning), and the number of
    non-empty lines read."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path} line {number} is not JSON: the file is corrupt (move it away to start "
                                f"the run's metrics afresh)") from None
            logger.warning("%s: its last line is torn (%d characters), left out", path, len(line))
    return parsed, len(lines)


def backup_metrics(run_dir: Path) -> Path | None:
    """Copy `metrics.jsonl` to the first free `metrics.before-resume[.<n>].jsonl` (no resume overwrites the copy an
    earlier one kept); returns the copy."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    backup, n = run_dir / "metrics.before-resume.jsonl", 1
    while backup.exists():
        backup, n = run_dir / f"metrics.before-resume.{n}.jsonl", n + 1
    shutil.copy(path, backup)
    return backup


def trim_metrics(run_dir: Path, step: int | None) -> None:
    """Cut `metrics.jsonl` back to the records of steps up to `step` (a resume from that step's checkpoint logs the
    later ones again; None: no checkpoint, so none is kept and the run starts its metrics afresh). The original is
    kept by `backup_metrics`; the rewrite goes through a temporary file, so a kill never leaves half a file."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines, total = _metric_lines(path)
    kept = [line for line, record in lines if step is not None and (record.get("step") or 0) <= step]
    if len(kept) == total:
        return  # nothing to cut (and no torn line to drop)
    backup_metrics(run_dir)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)


def metric_curve(records: list[dict], key: str = "eval/reward_mean") -> list[tuple[int, float]]:
    """The (step, value) points of one metric in `metrics.jsonl` records, by step (a step logged twice: the last)."""
    points = {record["step"]: record[key] for record in records if key in record}
    return sorted(points.items())


def flatten_config(config: dict, prefix: str = "") -> dict:
    """Nested config to flat `a.b.c` keys with scalar values, as trackers' hyperparameter tables want."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def image_grid(
    images: torch.Tensor, nrow: int | None = None, row_labels: list[str] | None = None, min_cell: int = 64
) -> PIL.Image.Image:
    """A grid of NCHW images in [0, 1] as one PIL image (rows of `nrow`, default about square).

    With `row_labels` (one text per row, e.g. each row's prompt), every row is captioned in a strip on its left, and
    images smaller than `min_cell` pixels are enlarged (nearest neighbour, so pixels stay sharp) to keep the captions
    beside them readable.
    """
    images = images.detach().float().cpu().clamp(0, 1)
    if nrow is None:
        nrow = max(1, math.ceil(math.sqrt(images.shape[0])))
    if row_labels is not None:
        rows = math.ceil(images.shape[0] / nrow)
        if len(row_labels) != rows:
            raise ValueError(f"{len(row_labels)} row labels for {rows} rows of {nrow} images")
        scale = math.ceil(min_cell / max(images.shape[-2:]))
        if scale > 1:
            images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    picture = PIL.Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if row_labels is None:
        return picture
    return caption_rows(picture, row_labels, row_height=images.shape[-2] + 2)


def caption_rows(picture: PIL.Image.Image, labels: list[str], row_height: int, width: int = 220) -> PIL.Image.Image:
    """`picture` with a white strip of `width` pixels on its left holding one wrapped label per row."""
    import textwrap

    from PIL import ImageDraw, ImageFont

    size = 12
    font = ImageFont.load_default(size=size)
    line_height = size + 2
    lines_per_row = max(1, (row_height - 2) // line_height)
    chars_per_line = max(8, (width - 8) * 2 // size)  # the default font averages about half its size per character
    out = PIL.Image.new("RGB", (picture.width + width, picture.height), "white")
    out.paste(picture, (width, 0))
    draw = ImageDraw.Draw(out)
    for row, label in enumerate(labels):
        lines = textwrap.wrap(label, chars_per_line) or [""]
        if len(lines) > lines_per_row:
            lines = lines[:lines_per_row]
            lines[-1] = lines[-1][: chars_per_line - 1] + "\u2026"
        top = 2 + row * row_height + (row_height - 2 - len(lines) * line_height) // 2
        for index, line in enumerate(lines):
            draw.text((4, top + index * line_height), line, fill="black", font=font)
    return out


def log_image(accelerator: Accelerator, name: str, image: PIL.Image.Image, step: int) -> None:
    """Send one image (e.g. a grid) to the image-capable trackers; `metrics.jsonl` keeps numbers only."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), global_step=step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step=step)


def plot_eval_curves(run_dir: Path) -> Path | None:
    """`<run dir>/curves.png`: every held-out mean in `metrics.jsonl` (`eval/<name>_mean`) against the step, one panel
    each. None when nothing was evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(run_dir)
    names = sorted({key[5:-5] for r in records for key in r if key.startswith("eval/") and key.endswith("_mean")})
    if not names:
        return None
    unit = step_unit(records)
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        points = [(step, value) for step, value in metric_curve(records, f"eval/{name}_mean") if value is not None]
        axis.plot(*zip(*points, strict=True), marker="o")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel(unit)
        axis.set_title(f"held-out {metric_name(name)}", fontsize=10)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = run_dir / "curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
