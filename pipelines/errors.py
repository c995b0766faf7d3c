"""The one base class of the user's input errors, on the lowest layer so that every package can raise it, and how an
entry point reports them (`exit_on_user_error`). Checking and building configs is `pipelines/configs.py`.

A `UserError` means the input is wrong (a missing file, offline weights, a bad value, two options that contradict each
other), not the code: every entry point (`rl.run`, `rewards.score`, `experiments.evaluate`, `experiments.compare`)
prints its message as one line, `error: <message>`, and exits with code 2 (`exit_on_user_error`). Subclasses only say
which part of the input is at fault, for callers that want to catch one kind.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# An OS error with one of these numbers while writing is the disk's or the folder's fault, not the code's.
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG)


class UserError(ValueError):
    """Bad input from the user; the message (one line) names the option or file and says what to do."""


class ConfigError(UserError):
    """A configuration value is invalid or two values contradict each other; the message names the option."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Around an entry point's work: a `UserError` becomes `error: <message>` on stderr and exit code 2, and so does
    an OS error while writing (a full disk, a folder that takes no file: `WRITE_ERRORS`), naming the path. The line
    goes above any progress bar."""
    try:
        yield
    except UserError as error:
        report(f"error: {error}")
        sys.exit(2)
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        where = f" {error.filename}" if error.filename else ""
        report(f"error: cannot write{where}: {error.strerror or os.strerror(error.errno)}; free space there or make it "
               f"writable, then start the same command again (a training run resumes from its last checkpoint)")
        sys.exit(2)


def report(line: str) -> None:
    """Print a line on stderr, above any progress bar (tqdm's bars are cleared and redrawn around it)."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        print(line, file=sys.stderr)


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Around a write by a library that reports I/O failures in its own exception (safetensors' `SafetensorError`):
    such a failure becomes an `OSError` naming `path`, with the OS error's number when the message gives it."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), str(path)) from None
        raise
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        number = re.search(r"os error (\d+)|code: (\d+)", str(error))
        code = int(next(g for g in number.groups() if g)) if number else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None
