"""CPU threads (rl/threads.py): the `auto` count, what the environment overrides, and that the entry points limit
OpenMP's spinning before torch loads OpenMP."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.errors import ConfigError
from rl.threads import SPIN_COUNT, auto_threads, limit_openmp_spinning, set_cpu_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("cores", "processes", "expected"), [(2, 1, 2), (2, 2, 1), (16, 8, 2), (16, 3, 5), (1, 4, 1)])
def test_auto_threads_share_the_cores_among_the_processes(cores, processes, expected):
    assert auto_threads(cores, processes) == expected


def test_short_spinning_is_the_default_and_the_environment_wins(monkeypatch):
    import os

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    limit_openmp_spinning()
    assert os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT == "1000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "50")
    limit_openmp_spinning()
    assert os.environ["GOMP_SPINCOUNT"] == "50"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    limit_openmp_spinning()
    assert "GOMP_SPINCOUNT" not in os.environ


def test_set_cpu_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert set_cpu_threads("auto") == 1  # the environment's count is left in force
        for bad in (0, -2, "many"):
            with pytest.raises(ConfigError, match="cpu_threads must be auto or a positive whole number"):
                set_cpu_threads(bad)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("module", ["rl.run", "experiments.evaluate"])
def test_entry_points_limit_spinning_before_torch_loads(module):
    """Record GOMP_SPINCOUNT at the moment `torch` is first imported, while importing the entry point."""
    spy = f"""
import os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("at torch import:", os.environ.get("GOMP_SPINCOUNT"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Spy())
import {module}
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", spy], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert "at torch import: 1000" in out, out


def test_a_run_reports_bad_cpu_threads_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rl.run", "algo=sample", "cpu_threads=none",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("error: cpu_threads must be auto or a positive whole number, "
                                                   "got 'none'")
