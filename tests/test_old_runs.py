"""Run directories written by an earlier version of this code still resume and still evaluate.

`tests/fixtures/old_runs/<case>/run` was written before the redesign of the shared training session (issue 13) by a
run stopped after its first checkpoint, as a killed run would be; `expected.json` holds the metrics of the same run
left uninterrupted, and the overrides that start it. A later version must evaluate the old directory and continue it
to the uninterrupted run's curve (or the README must say how to convert it).

Re-record (only with the code that wrote the fixtures, never to make a later version pass):
`GOLDEN_RECORD=1 pytest tests/test_old_runs.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import evaluate
from rl.config import build
from rl.run import build_context

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "old_runs"
TINY_EVAL = ["algo.eval.every=1", "algo.eval.max_prompts=2", "algo.eval.num_inference_steps=2"]
CASES = {
    "grpo_tiny": {  # an epoch-based algorithm with LoRA and EMA
        "run": ["algo=grpo", "reward=jpeg_compressibility", "algo.epochs=2", "algo.checkpoint_every=1",
                "algo.optim.lr=5e-2", "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=4",
                "algo.sampling.batch_size=8", "algo.sampling.num_inference_steps=2", "algo.ppo.batch_size=8",
                "algo.ppo.optimizer_steps=1", *TINY_EVAL],
        "stop": ["algo.exit_after_epochs=1"],
    },
    "refl_tiny": {  # a step-based algorithm with LoRA
        "run": ["algo=refl", "reward=digits", "prompts=digits", "algo.optim.lr=1e-3", "algo.train.max_steps=2",
                "algo.train.checkpoint_every=1", "algo.refl.num_inference_steps=2", "algo.refl.stop_range=[0,1]",
                "algo.refl.loss=negative", "algo.train.batch_size=1", *TINY_EVAL],
        "stop": ["algo.train.exit_after_steps=1"],
    },
}
COMPARED = ("train/reward_mean", "train/loss", "eval/reward_mean")


def train(run_dir: Path, overrides: list[str]) -> None:
    """What `python -m rl.run <overrides> hydra.run.dir=<run_dir>` does, in this process."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    build(cfg.algo)(build_context(cfg, run_dir))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def record_fixture(case: str, tmp_path: Path) -> None:
    spec = CASES[case]
    train(tmp_path / "whole", spec["run"])
    train(tmp_path / "stopped", spec["run"] + spec["stop"])
    shutil.rmtree(FIXTURES / case, ignore_errors=True)
    shutil.copytree(tmp_path / "stopped", FIXTURES / case / "run", ignore=shutil.ignore_patterns("*.png"))
    expected = {"run": spec["run"], "records": records(tmp_path / "whole")}
    (FIXTURES / case / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to share (as tests/test_experiments.py)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_old_run_directory_evaluates_and_resumes(tmp_path, case):
    if os.environ.get("GOLDEN_RECORD") == "1":
        record_fixture(case, tmp_path)
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURES / case / "run", run_dir)
    expected = json.loads((FIXTURES / case / "expected.json").read_text())

    # It evaluates: the base model and the checkpoint it left give the held-out numbers the run logged.
    logged = {r["step"]: r["eval/reward_mean"] for r in records(run_dir) if "eval/reward_mean" in r}
    rows = evaluate.main([str(run_dir)])
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("base", 0), ("step_000001", 1)]
    assert {r["step"]: r["eval/reward_mean"] for r in rows} == logged

    # It resumes: started again with the same options, it continues to the uninterrupted run's curve.
    train(run_dir, expected["run"])
    resumed, whole = records(run_dir), expected["records"]
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    for a, b in zip(resumed, whole):
        for key in COMPARED:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
