"""What a run shows on its console besides the progress bar: one line per stop, and no library chatter.

- `stop_on_signal()` (the first thing `python -m rl.run` does, before its heavy imports): from then on SIGINT (Ctrl-C)
  and SIGTERM (a scheduler's stop) end the process with one line on stderr and exit code 130 / 143, whatever it is
  doing: importing, checking the input, loading the model, the step-0 evaluation, writing `final/`. Inside the step
  loop the training session takes the signals over (`rl.session.Session.steps`): the step finishes, a checkpoint is
  written, and the run stops with one line; a second signal there stops at once, through this handler.
- `LibraryChatter` keeps the INFO lines of the libraries the run drives (accelerate's "Model weights saved in ...",
  four per checkpoint) out of the console; `conf/config.yaml` puts it on the console handler, and the run's `run.log`
  keeps every line.
"""

from __future__ import annotations

import logging
import signal
import sys

CHATTY_LIBRARIES = ("accelerate",)  # loggers whose INFO lines go to run.log only


class LibraryChatter(logging.Filter):
    """Drops the records below WARNING of `CHATTY_LIBRARIES` (for a console handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        chatty = any(record.name == name or record.name.startswith(f"{name}.") for name in CHATTY_LIBRARIES)
        return not chatty or record.levelno >= logging.WARNING


def stop_message(signum: int) -> str:
    """The one line a stop by signal outside the step loop prints."""
    return (f"stopped by {signal.Signals(signum).name}: nothing was saved at this point; start the same command again "
            f"to resume from the run's last checkpoint")


def _stop(signum: int, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the stop is under way: a second signal ends the process at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stderr.write(("\n" if sys.stderr.isatty() else "") + f"{stop_message(signum)}\n")
    sys.stderr.flush()
    raise SystemExit(128 + signum)


def stop_on_signal() -> None:
    """SIGINT and SIGTERM stop the process with `stop_message` and exit code 128 + the signal's number."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
