"""One writer per run directory: `<run dir>/.lock`, held by the run's main process for as long as it lives.

Two runs writing into one directory (launched together, or a resume started while the first still runs) would
interleave their `metrics.jsonl` records and checkpoints. `hold_run_dir` takes an exclusive `flock` on the lock file
and writes the holder into it (`pid`, `host`, `started`); a second run finds the lock taken and stops with one line
naming the holder. The kernel releases a `flock` when its process ends, however it ends, so a run killed with
`kill -9` never leaves the directory locked: the next run takes the lock over, with a warning when the file still
names the killed run (a run that ends normally empties it). The file itself is never deleted (deleting a locked
file would let a third run lock a new file of the same name).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from pipelines.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run directory -> the open lock file's descriptor, in this process
_untold: dict[Path, str] = {}  # run directory -> the takeover warning not yet logged (`announce=False`)


class RunDirectoryBusy(UserError):
    """Another run holds the run directory."""


def holder() -> dict:
    """This process as a lock holder."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(record: dict) -> str:
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}, since {record.get('started', '?')}"


def read_holder(descriptor: int) -> dict | None:
    os.lseek(descriptor, 0, os.SEEK_SET)
    text = os.read(descriptor, 4096).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?"}


def hold_run_dir(run_dir: Path, announce: bool = True) -> None:
    """Lock `run_dir` (created if needed) for this process, or raise `RunDirectoryBusy` naming the run that holds it.
    Holding it already is fine. Taking over the lock of a run that did not end normally logs a warning, or (not
    `announce`: before logging is configured) at the next call."""
    run_dir = Path(run_dir).absolute()
    if run_dir in _held:
        if announce and run_dir in _untold:
            logger.warning(_untold.pop(run_dir))
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = read_holder(descriptor) or {}
        os.close(descriptor)
        raise RunDirectoryBusy(f"another run is writing into {run_dir} ({describe(other)}); wait for it to end or stop "
                               f"it, or start this one in another run directory (hydra.run.dir=...)") from None
    previous = read_holder(descriptor)
    if previous is not None:
        message = (f"{run_dir} was last held by a run that did not end normally ({describe(previous)}; killed?): "
                   f"taken over")
        if announce:
            logger.warning(message)
        else:
            _untold[run_dir] = message
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.write(descriptor, (json.dumps(holder()) + "\n").encode())
    if not _held:
        atexit.register(release_all)  # however the process exits, short of a kill
    _held[run_dir] = descriptor


def release_run_dir(run_dir: Path) -> None:
    """Empty the lock file (a normal end) and release it; nothing when this process does not hold it."""
    descriptor = _held.pop(Path(run_dir).absolute(), None)
    if descriptor is None:
        return
    try:
        os.ftruncate(descriptor, 0)
    finally:
        os.close(descriptor)  # releases the flock


def release_all() -> None:
    for run_dir in list(_held):
        release_run_dir(run_dir)
