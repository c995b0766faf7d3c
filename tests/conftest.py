import pytest
import torch

from pipelines import load_pipeline


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny random SD3 pipeline (seed 0) on the CPU; tests must not modify its weights."""
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)
