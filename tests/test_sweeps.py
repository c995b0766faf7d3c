"""The wandb sweep files in experiments/sweeps/ start `python -m rl.run` with Hydra overrides, and every job they can
start composes; Hydra's own multirun (`python -m rl.run -m ...`) gives one complete run directory per job."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
COMMAND = ["${env}", "python", "-m", "rl.run", "${args_no_hyphens}"]  # the agent fills in `key=value` overrides
TOP_LEVEL_KEYS = {"program", "method", "metric", "parameters", "command", "name", "description", "run_cap",
                  "early_terminate", "project", "entity"}  # what a wandb sweep file may hold
RANGE_DISTRIBUTIONS = {"uniform", "int_uniform", "log_uniform_values", "q_uniform", "q_log_uniform_values"}  # min/max


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # as `wandb sweep` reads it (OmegaConf would resolve ${env})


def parameter_values(name: str, spec: dict) -> list:
    """The values a job can get: the fixed value, each listed value, or a range's two endpoints."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if spec.get("distribution") in RANGE_DISTRIBUTIONS:
        return [spec["min"], spec["max"]]
    raise AssertionError(f"parameter {name}: use value, values, or one of {sorted(RANGE_DISTRIBUTIONS)} with min/max")


def jobs(sweep: dict) -> list[dict]:
    """Every parameter combination of a sweep (for a range, both ends)."""
    names = list(sweep["parameters"])
    choices = [parameter_values(name, sweep["parameters"][name]) for name in names]
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*choices)]


def args_no_hyphens(job: dict) -> list[str]:
    return [f"{name}={value}" for name, value in job.items()]  # the wandb agent writes f"{param}={value}"


def test_there_are_sweeps():
    assert len(SWEEPS) >= 4


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_file_is_a_wandb_sweep_of_rl_run(path):
    sweep = load(path)
    assert set(sweep) <= TOP_LEVEL_KEYS, set(sweep) - TOP_LEVEL_KEYS
    assert (ROOT / sweep["program"]).is_file()
    assert sweep["command"] == COMMAND
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert (sweep["metric"]["name"] in ("eval/reward_mean", "eval/correct_mean")
            and sweep["metric"]["goal"] == "maximize")
    for name, spec in sweep["parameters"].items():
        assert len({"value", "values", "distribution"} & set(spec)) == 1, name
        if "distribution" in spec:
            assert sweep["method"] != "grid", f"{name}: a grid sweep takes listed values only"
            assert isinstance(spec["min"], (int, float)) and isinstance(spec["max"], (int, float)), name
            assert spec["min"] < spec["max"], name
        for value in parameter_values(name, spec):
            assert value is not None, f"{name}: the agent would write None; use the string 'null'"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_job_of_the_sweep_composes_and_resolves(path):
    sweep = load(path)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in jobs(sweep):
            overrides = args_no_hyphens(job)
            try:
                cfg = compose(config_name="config", overrides=overrides)
                OmegaConf.to_container(cfg, resolve=True)
                assert callable(instantiate(cfg.algo))  # typed configs (sampling, PPO, ReFL, ...) accept the values
            except Exception as error:
                raise AssertionError(f"python -m rl.run {' '.join(overrides)}: {error}") from error
            for name, value in job.items():
                if (CONF / name).is_dir():  # a config group: the option must exist
                    assert (CONF / name / f"{value}.yaml").is_file(), f"{name}={value}"
                else:  # a value: it arrives with its type (the agent writes floats, ints and bools as Python does)
                    got = OmegaConf.select(cfg, name)
                    assert got == value and type(got) is type(value), f"{name}={value} composed to {got!r}"


# One short job per algorithm, its keys set with `++` (add or override): a multirun composes its first config without
# the swept `algo=`, whose keys need not exist in the default algo.
TINY_JOB = {
    "algo.epochs": 1, "algo.sampling.prompts_per_epoch": 1, "algo.sampling.images_per_prompt": 2,
    "algo.sampling.batch_size": 2, "algo.sampling.num_inference_steps": 2, "algo.ppo.batch_size": 2,
    "algo.ppo.optimizer_steps": 1, "algo.eval.every": 0, "algo.eval.max_prompts": 1, "algo.eval.num_inference_steps": 2,
}


@pytest.mark.slow  # four short training jobs: 75-80 s on two shared cores
def test_hydra_multirun_gives_one_run_directory_per_job(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rl.run", "-m", "algo=ddpo,grpo", "seed=0,1", "model=tiny",
         "reward=jpeg_compressibility", *(f"++{key}={value}" for key, value in TINY_JOB.items()),
         f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in run_dirs] == ["0", "1", "2", "3"]  # one folder per job, named by its number
    first_rewards = {}
    for run_dir, (algo, seed) in zip(run_dirs, itertools.product(["ddpo", "grpo"], [0, 1]), strict=True):
        config = OmegaConf.load(run_dir / "config.yaml")
        assert config.algo._target_.startswith(f"rl.{algo}.") and config.seed == seed and config.algo.epochs == 1
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "train/reward_mean" in r]
        assert [r["step"] for r in train] == [1]
        first_rewards[algo, seed] = train[0]["train/reward_mean"]
    # Each job got its own seed: the same algorithm samples different images with seed 0 and seed 1.
    assert first_rewards["ddpo", 0] != first_rewards["ddpo", 1] and first_rewards["grpo", 0] != first_rewards["grpo", 1]
