"""CPU threads: how many torch uses (`cpu_threads`, default `auto`), and how long its OpenMP threads spin while they
wait between parallel regions.

On a shared CPU machine torch's defaults oversubscribe: one thread per core, each spinning for a long while when it
waits, so a run beside another busy process loses scheduler slices at every barrier. `python -m scripts.bench_threads`
measures this; on two cores (docs/performance.md) two threads with OpenMP's default waiting were 1.9x faster than one
thread on an idle machine but 1.7x slower than one beside a competing job, while spinning at most 1000 times before
sleeping (GNU OpenMP's `GOMP_SPINCOUNT=1000`, the OpenMP that torch's Linux wheels use) kept 90% of the idle speed
and made the busy case 2.1x faster than the default. So:

- OpenMP threads spin briefly, then sleep (`GOMP_SPINCOUNT=1000`). OpenMP reads it once, when torch loads it, so the
  entry points call `limit_openmp_spinning()` before they import torch.
- `auto` threads: the cores this process may use (torch's default: the physical cores, within the CPU affinity),
  shared among the processes of this machine (under `accelerate launch` / `torchrun`), at least one.

Anything the user set wins: `OMP_NUM_THREADS` (also set by torchrun and accelerate for several processes),
`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` in the environment, or `cpu_threads=N` on the command line. Thread counts do not
change results here (the default job's metrics are identical with 1 and 2 threads); they change only the speed.
"""

from __future__ import annotations

import os

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


SPIN_COUNT = "1000"  # spins before a waiting thread sleeps (GNU OpenMP's default is 300000 when threads <= cores)


def limit_openmp_spinning() -> None:
    """Let waiting OpenMP threads spin `SPIN_COUNT` times, then sleep, unless the environment already says how they
    wait. Call it before torch is imported: OpenMP reads its settings once, when it loads."""
    if not any(name in os.environ for name in WAIT_VARIABLES):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def local_processes() -> int:
    """The processes of this run on this machine (`LOCAL_WORLD_SIZE`, set by torchrun and accelerate), else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_threads(cores: int, processes: int) -> int:
    """`cpu_threads=auto`: the usable cores shared among this machine's processes, at least one each."""
    return max(1, cores // max(1, processes))


def set_cpu_threads(setting: int | str = "auto") -> int:
    """Set torch's intra-op threads from `cpu_threads` (`auto` or a number) and return the count in force.

    `auto` leaves an `OMP_NUM_THREADS` from the environment alone (torch already follows it)."""
    import torch

    if setting == "auto":
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        # torch's own default is the physical cores; the affinity may allow fewer
        threads = auto_threads(min(usable_cores(), torch.get_num_threads()), local_processes())
    else:
        try:
            threads = int(setting)
        except (TypeError, ValueError):
            threads = 0
        if threads < 1:
            from pipelines.errors import ConfigError

            raise ConfigError(f"cpu_threads must be auto or a positive whole number, got {setting!r}")
    torch.set_num_threads(threads)
    return threads
