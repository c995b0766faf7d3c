from rl.threads import limit_openmp_spinning, set_cpu_threads

limit_openmp_spinning()  # the suite runs as `python -m rl.run` does (rl/threads.py); before torch loads OpenMP

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines import load_pipeline  # noqa: E402

set_cpu_threads("auto")


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny random SD3 pipeline (seed 0) on the CPU; tests must not modify its weights."""
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)
