"""`python -m rl.run` as a user runs it: the run directory contract, trackers, resume, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["algo.max_prompts=2", "algo.num_inference_steps=2", "algo.num_images_per_prompt=2"]


def run(*args, cwd=ROOT, env=None):
    return subprocess.run(
        [sys.executable, "-m", "rl.run", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_sample_writes_images_grid_config_and_metrics(tmp_path):
    run_dir = tmp_path / "run"
    result = run("algo=sample", "model=tiny", "prompts=simple_animals", *FAST, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    samples = sorted((run_dir / "samples").glob("0*.png"))
    assert [p.name for p in samples] == ["0000_00.png", "0000_01.png", "0001_00.png", "0001_01.png"]
    assert PIL.Image.open(samples[0]).size == (32, 32)
    grid = PIL.Image.open(run_dir / "samples" / "grid.png")
    # A row per prompt (2 images each, 32 px enlarged to 64, 2 px padding), captioned in a 220 px strip on the left
    assert grid.size == (220 + 2 * 66 + 2, 2 * 66 + 2)
    assert PIL.Image.open(samples[0]).convert("RGB").resize((64, 64), PIL.Image.NEAREST) == grid.crop((222, 2, 286, 66))
    config = (run_dir / "config.yaml").read_text()
    assert "_target_: rl.sample.Sample" in config and "${" not in config  # resolved
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all("step" in r for r in records)
    assert records[-1]["sample/num_images"] == 4
    index = [json.loads(line) for line in (run_dir / "samples" / "index.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in index] == [0, 1, 2, 3] and index[0]["prompt"] == "pig"

    # Started again in the same directory, it keeps the images already written and makes none twice.
    mtimes = {p: p.stat().st_mtime_ns for p in samples}
    result = run("algo=sample", "model=tiny", "prompts=simple_animals", *FAST[:2],
                 "algo.num_images_per_prompt=3",
                 f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert len(list((run_dir / "samples").glob("0*.png"))) == 6


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=sd35_medium mixed_precision=bf16", "not in the local Hugging Face cache"),
        ("model=tiny model.path=/no/such/folder", "no such folder"),
        ("prompts.eval.file=/no/such/prompts.txt", "not found"),
        ("reward=digits prompts=simple_animals", "reward=digits needs prompts naming a digit"),
    ],
)
def test_bad_input_fails_in_one_line_before_loading(tmp_path, override, message):
    result = run(*override.split(), f"hydra.run.dir={tmp_path}", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_processes_share_one_run_directory(tmp_path):
    """`accelerate launch` with two CPU processes (gloo ranks): each samples its share into the main process's
    directory (named by the clock, which could differ between the processes)."""
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "scripts" / "accelerate" / "cpu_two_processes.yaml"), "--main_process_port",
         str(29700 + os.getpid() % 1000), "-m", "rl.run", "algo=sample", "model=tiny", "prompts=simple_animals", *FAST,
         "algo.max_prompts=3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2 (MULTI_CPU" in result.stdout and "rank 1 of 2 (MULTI_CPU" in result.stdout
    run_dirs = list((tmp_path / "outputs" / "sample").iterdir())
    assert len(run_dirs) == 1
    assert len(list((run_dirs[0] / "samples").glob("0*.png"))) == 6
    assert (run_dirs[0] / "samples" / "grid.png").exists()


def test_each_rank_says_who_it_is_and_one_process_on_several_gpus_says_how_to_use_them(monkeypatch, caplog):
    import logging

    import torch

    from rl.run import start_processes

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    state = start_processes()
    assert state.num_processes == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("rank 0 of 1 (") for m in messages)
    assert any("has 4 GPUs and this run uses one" in m and "--num_processes 4" in m for m in messages)
