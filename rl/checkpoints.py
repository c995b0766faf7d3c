"""Checkpoints of a run: `checkpoints/step_<N>/` folders in the run directory, written and read back by name.

A checkpoint is accelerate's `save_state` folder (the trained model or only its LoRA adapters in diffusers' format,
the optimiser, the LR scheduler, every process's RNG states) plus one file per named piece of the session's state:
`train_state.pt` (the counters), `ema.pt` (EMA weights, when kept), `stat_tracker.pt` (DDPO), ... A `done` marker is
written last: a checkpoint cut off by a kill has none and is never read. Before it, `manifest.json` records every
file's size and SHA-256; a resume verifies them (`verify_checkpoint`) and falls back, with one line, from a damaged
checkpoint (a flipped bit, a truncated or missing file) to the newest intact one, keeping the damaged folder as
`step_<N>.damaged`. Tools find a piece by its name (`read_state(checkpoint, "ema")`), whatever else the run kept.

Runs written before the pieces were named (accelerate's numbered `custom_checkpoint_<i>.pkl`, in registration order)
are read too: `read_state` and `Checkpointer.restore` map the numbers to names in that order.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from pipelines.configs import check_values
from pipelines.errors import ConfigError, UserError
from rl.legacy import upgrade_config
from rl.lora import load_lora, save_lora
from rl.tracking import flatten_config, trim_metrics

logger = logging.getLogger(__name__)

STEP_FOLDER = re.compile(r"step_(\d+)")
MANIFEST = "manifest.json"  # every other file of a checkpoint: its size and SHA-256, written before `done`


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and whether a run resumes (`algo.checkpoint`), the same for every algorithm.

    `every` counts the algorithm's steps: epochs for GRPO, DDPO and online DPO, optimiser steps for the others."""

    every: int = 10  # steps between checkpoints (the last step is always saved)
    keep: int | None = 3  # newest complete checkpoints kept; None keeps all (a full curve for experiments.evaluate)
    resume: bool | str = True  # continue from the latest complete checkpoint; "force": also with changed options
    exit_after: int | None = None  # stop this invocation after N steps, as a kill would (start again to resume)

    def __post_init__(self):
        check_values("algo.checkpoint", self, positive=("every", "keep", "exit_after"))
        if self.resume not in (True, False, "force"):
            raise ConfigError(f"algo.checkpoint.resume must be true, false or force, got {self.resume!r}")


@dataclass
class TrainState:
    """The counters a resume needs; saved in every checkpoint as `train_state`."""

    step: int = 0  # epochs or optimiser steps done
    micro_batches: int = 0  # data batches consumed by this process (the data position)
    seconds: float = 0.0  # wall time spent training so far, held-out evaluations and checkpoints left out
    cpu_seconds: float = 0.0  # the process's CPU time (all its threads) over the same spans
    extra: dict = field(default_factory=dict)
    threads: int | None = None  # torch's CPU threads when the checkpoint was written (None: not recorded)

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_batches": self.micro_batches, "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds, "extra": self.extra, "threads": torch.get_num_threads()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_batches, self.extra = state["step"], state["micro_batches"], state.get("extra", {})
        self.seconds = state.get("seconds", 0.0)  # checkpoints written before it was kept start the count at 0
        self.cpu_seconds = state.get("cpu_seconds", 0.0)
        self.threads = state.get("threads")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# Options a resumed run may change: how long it runs, how it is evaluated, checkpointed and logged, and the CPU threads.
RESUMABLE_CHANGES = (
    "algo.epochs", "algo.train.max_steps", "algo.train.log_every", "algo.train.eval_every",
    "algo.train.eval_batch_size", "algo.train.eval_repeats", "algo.eval.", "algo.validation.", "algo.checkpoint.",
    "logger.", "cpu_threads", "prompts.eval.",
)


def changed_options(saved: dict, new: dict) -> list[str]:
    """`key: old -> new` for each option of the run's saved config (`config.yaml`, flattened) that `new` changes,
    except `RESUMABLE_CHANGES`; options the saved config lacks (added by a later version) are not changes, nor are
    the `data.*` options of a run that read no data (neither `data.path` nor `data.dataset` set)."""
    unused = () if saved.get("data.path") is not None or saved.get("data.dataset") is not None else ("data.",)
    return [f"{key}: {saved[key]!r} -> {new.get(key, '(removed)')!r}" for key in sorted(saved)
            if not key.startswith(RESUMABLE_CHANGES + unused) and not same_value(new.get(key, "(removed)"), saved[key])]


def same_value(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (an option set to nan is not changed by the same nan)."""
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nan or a == b


def check_resume(run_dir: Path, new: dict) -> None:
    """Before a run resumes from a checkpoint in `run_dir`, stop (one line) if its options differ from those it was
    started with in anything but `RESUMABLE_CHANGES`, unless `algo.checkpoint.resume=force`. `new` is the resolved
    config as a plain dict."""
    resume = new.get("algo", {}).get("checkpoint", {}).get("resume", False)
    saved_path = run_dir / "config.yaml"
    if resume in (False, "force") or latest_checkpoint(run_dir) is None or not saved_path.is_file():
        return
    saved, _ = upgrade_config(OmegaConf.load(saved_path))
    changes = changed_options(flatten_config(OmegaConf.to_container(saved, resolve=True)), flatten_config(new))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ConfigError(f"{run_dir} holds a run started with other options ({shown}); resume it with the same "
                          f"options, start a new run directory, or set algo.checkpoint.resume=force")


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of every checkpoint with its `done` marker, by step."""
    found = []
    for path in (run_dir / "checkpoints").glob("step_*"):
        match = STEP_FOLDER.fullmatch(path.name)
        if match and (path / "done").exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Record the size and SHA-256 of every file in `checkpoint` (before its `done` marker) in `manifest.json`."""
    files = {str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name not in (MANIFEST, "done")}
    (checkpoint / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def verify_checkpoint(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against its manifest (the first fault found, in a few words
    naming the file), or None when every file is as written. A checkpoint written before manifests were kept is
    taken as it is."""
    manifest = checkpoint / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({error.__class__.__name__})"
    for name, expected in files.items():
        path = checkpoint / name
        try:
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, not the {expected['bytes']} written"
            if file_digest(path) != expected["sha256"]:
                return f"{name} differs from what was written (its SHA-256 changed)"
        except OSError as error:
            return f"{name} is unreadable ({error.strerror or error})"
    return None


def state_file(checkpoint: Path, name: str, legacy_order: list[str] | None = None) -> Path | None:
    """The file holding the piece `name` of a checkpoint, or None. `legacy_order` is the order in which a run written
    before the pieces were named registered them (its `custom_checkpoint_<i>.pkl` files)."""
    named = checkpoint / f"{name}.pt"
    if named.is_file():
        return named
    if legacy_order and name in legacy_order:
        numbered = checkpoint / f"custom_checkpoint_{legacy_order.index(name)}.pkl"
        if numbered.is_file():
            return numbered
    return None


def read_state(checkpoint: Path, name: str, legacy_order: list[str] | None = None) -> dict[str, Any] | None:
    """The state dict of the piece `name` of a checkpoint (`train_state`, `ema`, `stat_tracker`, ...), or None."""
    path = state_file(checkpoint, name, legacy_order)
    return torch.load(path, map_location="cpu", weights_only=True) if path is not None else None


class CheckpointError(UserError):
    """Every checkpoint of a run is damaged: it cannot resume, and will not silently start again."""


class DiskFullError(UserError):
    """The run's disk is full; nothing written so far is lost, and the run resumes from its last complete checkpoint."""


def disk_full(error: BaseException, directory: Path, margin: int = 64 * 2**20) -> bool:
    """Whether `error` came from a full disk: `ENOSPC`, or a failed write (torch's serializer reports it as
    "unexpected pos" or "file write failed") on a disk with less than `margin` bytes free."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    written = isinstance(error, OSError) or any(text in str(error) for text in ("unexpected pos", "write failed"))
    try:
        return written and shutil.disk_usage(directory if directory.exists() else directory.parent).free < margin
    except OSError:
        return False


# A run written before the pieces were named registered the counters first and the EMA (when kept) second.
_LEGACY_EMA_ORDER = ["train_state", "ema"]


def has_ema(checkpoint: Path) -> bool:
    """Whether a checkpoint holds EMA weights (`read_ema`)."""
    return state_file(checkpoint, "ema", _LEGACY_EMA_ORDER) is not None


def read_ema(checkpoint: Path) -> dict[str, Any] | None:
    """The EMA of a checkpoint (diffusers' `EMAModel` state: `shadow_params` in the order of the trained parameters),
    or None."""
    return read_state(checkpoint, "ema", _LEGACY_EMA_ORDER)


def describe_pieces(pieces: set[str] | int) -> str:
    """`{"ema", "train_state"}` -> "ema, train_state"; a count of numbered pieces -> "3 numbered pieces"."""
    return f"{pieces} numbered pieces" if isinstance(pieces, int) else ", ".join(sorted(pieces))


class Checkpointer:
    """Saves and restores `checkpoints/step_<N>/` in the run directory for one session.

    `state` names the objects (with `state_dict` / `load_state_dict`) saved beside accelerate's state, in the order
    that runs written before the pieces were named registered them. With LoRA only the adapters are written (in
    diffusers' LoRA format), not the frozen base weights.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        config: CheckpointConfig,
        state: dict[str, Stateful],
        lora_modules: dict[str, torch.nn.Module] | None = None,
    ):
        self.accelerator, self.run_dir, self.config, self.state = accelerator, run_dir, config, state
        self.directory = run_dir / "checkpoints"
        self.lora_modules = lora_modules
        if lora_modules is not None:
            accelerator.register_save_state_pre_hook(self._save_adapters)
            accelerator.register_load_state_pre_hook(self._load_adapters)

    def _save_adapters(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            modules = {name: self.accelerator.unwrap_model(m) for name, m in self.lora_modules.items()}
            save_lora(Path(output_dir), **modules)
        weights.clear()  # the frozen base weights are not checkpointed
        models.clear()

    def _load_adapters(self, models, input_dir):
        modules = {name: self.accelerator.unwrap_model(m) for name, m in self.lora_modules.items()}
        load_lora(Path(input_dir), **modules)
        models.clear()

    def latest(self) -> Path | None:
        """The newest complete checkpoint of the run, if any."""
        return latest_checkpoint(self.run_dir)

    def due(self, step: int, last: int) -> bool:
        return step % self.config.every == 0 or step == last

    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` (see `_save`); a full disk stops the run with one line naming the folder,
        and the partial checkpoint is never read."""
        try:
            return self._save(step)
        except (OSError, RuntimeError) as error:
            if not disk_full(error, self.directory):
                raise
            raise DiskFullError(f"no space left on {self.directory} while writing the checkpoint of step {step}; "
                                f"free space there and start the run again: it resumes from its last complete "
                                f"checkpoint") from None

    def _save(self, step: int) -> Path:
        """Write the checkpoint of `step` into a hidden partial folder and rename it to `step_<N>` when complete (with
        its `done` marker), so that a kill or a full disk mid-save leaves no `step_<N>` folder, only a partial one
        that the next save removes; then drop all but the newest `keep` checkpoints."""
        path = self.directory / f"step_{step:06d}"
        partial = self.directory / f".step_{step:06d}.partial"
        if self.accelerator.is_main_process:
            for stale in self.directory.glob(".step_*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        if self.accelerator.is_main_process:
            for name, item in self.state.items():
                torch.save(item.state_dict(), partial / f"{name}.pt")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write_manifest(partial)
            (partial / "done").touch()  # older readers take a folder with this marker as complete
            if path.exists():
                shutil.rmtree(path)  # the same step saved again (a resumed run stopping where it started)
            os.replace(partial, path)
            if self.config.keep is not None:
                finished = [p for _, p in complete_checkpoints(self.run_dir)]
                for old in finished[: -self.config.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def restore(self) -> int | None:
        """Load the newest complete checkpoint that is intact (`verify_checkpoint`, and it loads); returns its step.
        Damaged newer ones are set aside as `step_<N>.damaged`, with one line each; when every checkpoint is damaged
        the run stops (`CheckpointError`) rather than start again from step 0 by itself. The metric records are cut
        back to the step resumed from (to none without a checkpoint), keeping the original file as
        `metrics.before-resume.jsonl`."""
        found = [path for _, path in complete_checkpoints(self.run_dir)]
        if not found:
            if self.accelerator.is_main_process:
                trim_metrics(self.run_dir, None)  # killed before its first checkpoint: its metrics start afresh
            return None
        damaged: list[tuple[Path, str]] = []
        for path in reversed(found):
            fault = self._shared(verify_checkpoint(path) if self.accelerator.is_main_process else None)
            if fault is None:
                try:
                    self._load(path)
                    break
                except UserError:
                    raise
                except Exception as error:  # noqa: BLE001 - whatever the loaders raise, in one line
                    if (path / MANIFEST).exists():  # intact files that do not fit: the run's options differ
                        raise ConfigError(f"{path} does not fit this run ({type(error).__name__}: "
                                          f"{first_line(error)}): it was written with other options (algo.lora, the "
                                          f"model, ...); resume with the run's own options or start a new run "
                                          f"directory") from None
                    # written before manifests
                    fault = f"it does not load ({type(error).__name__}: {first_line(error)})"
            damaged.append((path, fault))
        else:
            listed = "; ".join(f"{path.name}: {fault}" for path, fault in damaged)
            raise CheckpointError(f"every checkpoint in {self.directory} is damaged or was written with other options "
                                  f"({listed}); move them away (or delete {self.directory}) to start the run again "
                                  f"from step 0, which also restarts its metrics, or start a new run directory")
        step = int(path.name.removeprefix("step_"))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for bad, fault in damaged:
                kept = set_aside(bad)
                logger.warning("checkpoint %s is damaged (%s): resuming from %s instead; the damaged folder is kept "
                               "as %s", bad.name, fault, path.name, kept.name)
            if not (self.run_dir / "metrics.jsonl").is_file():
                logger.warning("%s has no metrics.jsonl: the records of steps up to %d are lost (an earlier copy may "
                               "be in metrics.before-resume*.jsonl); the run resumes from %s and logs the steps after",
                               self.run_dir, step, path.name)
            trim_metrics(self.run_dir, step)
        self._compare_threads(path)
        self.accelerator.wait_for_everyone()
        logger.info("resumed from %s", path)
        return step

    def _compare_threads(self, path: Path) -> None:
        """On the CPU, torch's kernels add in an order that depends on the thread count, so a run resumed with
        another count than its checkpoint's may differ from an uninterrupted run in the last bits (SFT: about 1e-7):
        say so (the run goes on)."""
        counters = self.state.get("train_state")
        saved = getattr(counters, "threads", None)
        if self.accelerator.device.type == "cpu" and saved is not None and saved != torch.get_num_threads():
            logger.warning("%s was written with %d CPU threads and the run resumes with %d: on the CPU its numbers "
                           "may then differ from an uninterrupted run's in the last bits (cpu_threads=%d resumes "
                           "exactly)", path.name, saved, torch.get_num_threads(), saved)

    def _shared(self, value):
        """The main process's `value` on every process."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        shared = [value]
        broadcast_object_list(shared, from_process=0)
        return shared[0]

    def _load(self, path: Path) -> None:
        """Load one checkpoint into the accelerator's objects and the named pieces."""
        numbered = sorted(path.glob("custom_checkpoint_*.pkl"))
        if numbered:  # written before the pieces were named: they are told apart by their count and order only
            saved, kept = len(numbered), len(self.state)
        else:
            saved, kept = {p.stem for p in path.glob("*.pt")}, set(self.state)
        if saved != kept:  # e.g. a run with EMA resumed without it: its pieces would be dropped or misread
            raise ConfigError(f"{path} holds {describe_pieces(saved)} and this run keeps {describe_pieces(kept)}: "
                              f"it was written with other options (e.g. algo.ema.enabled); resume with its own options "
                              f"or start a new run directory")
        if numbered:  # written before the pieces were named: accelerate would count them against no registered object
            with tempfile.TemporaryDirectory() as view:
                for file in path.iterdir():
                    if file not in numbered:
                        (Path(view) / file.name).symlink_to(file.resolve())
                self.accelerator.load_state(view)
        else:
            self.accelerator.load_state(str(path))
        for name, item in self.state.items():
            item.load_state_dict(read_state(path, name, legacy_order=list(self.state)))


def first_line(error: BaseException) -> str:
    """An exception's message, first line only, shortened."""
    text = str(error).strip().splitlines()
    return text[0][:160] if text else "no message"


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint to `step_<N>.damaged` (`.damaged.2`, ... when taken), out of every reader's way."""
    target, count = checkpoint.with_name(f"{checkpoint.name}.damaged"), 1
    while target.exists():
        count += 1
        target = checkpoint.with_name(f"{checkpoint.name}.damaged.{count}")
    os.replace(checkpoint, target)
    return target
