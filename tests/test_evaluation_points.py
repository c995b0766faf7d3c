"""Held-out evaluations at fixed points that do not depend on a method's step length (rl/evaluation.py): at marks of
training seconds (`algo.eval.every_seconds`: the weights of the last step that ended at or before each mark, also
after a resume), at extra guidance scales, and the CPU-time clock (`train/cpu_seconds`)."""

from dataclasses import replace

import pytest
from test_policy import context, records, small_configs

from pipelines.errors import ConfigError
from rl import grpo
from rl.checkpoints import CheckpointConfig
from rl.dpo import OfflineDPO
from rl.evaluation import EvalConfig
from rl.session import EmaConfig, Session

STEP_SECONDS = 25.0  # a made-up, exact clock: every step "takes" 25 s


@pytest.fixture
def clock(monkeypatch):
    """`training_seconds` reads 25 s per step done, on either clock, so that which weights meet which mark is exact."""
    monkeypatch.setattr(Session, "training_seconds", lambda self, clock="wall": self.state.step * STEP_SECONDS)


def run(run_dir, epochs=5, exit_after=None, **eval_options):
    configs = small_configs()
    configs["eval"] = EvalConfig(every=1, max_prompts=2, num_inference_steps=4, **eval_options)
    configs["checkpoint"] = CheckpointConfig(every=1, exit_after=exit_after)
    grpo.GRPO(epochs=epochs, beta=0.0, **configs)(context(run_dir))


def by_key(logged, key, step="step"):
    return {r[step]: r for r in logged if key in r}


def marks_of(logged):
    """The seconds marks' records by the step whose weights they evaluated."""
    return by_key(logged, "eval_seconds/reward_mean", step="eval_seconds/step")


def test_each_mark_evaluates_the_weights_of_the_last_step_before_it(tmp_path, clock):
    # Steps end at 25, 50, 75, 100, 125 s. Mark 60 is passed by step 3 (75 s): step 2's weights (50 s) are the last
    # at or before it; mark 120 is passed by step 5: step 4's (100 s). Every step is also evaluated as usual, so the
    # mark's numbers must be exactly those of step 2 and step 4.
    run(tmp_path / "run", every_seconds=60, seconds_clock="cpu")
    logged = records(tmp_path / "run")
    marks = marks_of(logged)
    assert sorted(marks) == [2, 4]
    assert [marks[s]["step"] for s in (2, 4)] == [3, 5]  # logged at the step that passed the mark
    assert [marks[s]["eval_seconds/mark"] for s in (2, 4)] == [60, 120]
    assert [marks[s]["eval_seconds/seconds"] for s in (2, 4)] == [50.0, 100.0]
    regular = by_key(logged, "eval/reward_mean")
    for step in (2, 4):
        assert marks[step]["eval_seconds/reward_mean"] == regular[step]["eval/reward_mean"]
    assert marks[2]["eval_seconds/reward_mean"] != marks[4]["eval_seconds/reward_mean"]


def test_a_resumed_run_evaluates_the_same_weights_at_the_same_marks(tmp_path, clock):
    run(tmp_path / "whole", every_seconds=60)
    run(tmp_path / "split", exit_after=3, every_seconds=60)  # stops after step 3, having evaluated mark 60 ...
    run(tmp_path / "split", every_seconds=60)  # ... and the resumed run starts its copy from step 3's checkpoint
    whole = marks_of(records(tmp_path / "whole"))
    split = marks_of(records(tmp_path / "split"))
    assert sorted(split) == sorted(whole) == [2, 4]
    for step in (2, 4):
        assert split[step]["eval_seconds/reward_mean"] == whole[step]["eval_seconds/reward_mean"]


def test_extra_guidance_scales_and_the_cpu_clock_are_logged(tmp_path):
    run(tmp_path / "run", epochs=1, extra_guidance_scales=[1.0])
    logged = records(tmp_path / "run")
    evaluations = by_key(logged, "eval/reward_mean")
    assert sorted(evaluations) == [0, 1]
    for record in evaluations.values():  # a second evaluation of the same prompts and seeds without guidance
        assert record["eval_guidance_1/reward_mean"] != record["eval/reward_mean"]
    train = [r for r in logged if "train/seconds" in r]
    assert train and all(r["train/cpu_seconds"] > 0 for r in train)


def test_marks_need_the_trained_weights_themselves(tmp_path):
    configs = small_configs()
    configs["eval"] = replace(configs["eval"], every_seconds=60)
    with pytest.raises(ConfigError, match="every_seconds"):
        grpo.GRPO(epochs=1, ema=EmaConfig(enabled=True), **configs)(context(tmp_path))
    with pytest.raises(ConfigError, match="seconds_clock"):
        EvalConfig(seconds_clock="gpu")
    with pytest.raises(ConfigError, match="offline DPO"):  # it evaluates every algo.train.eval_every steps
        OfflineDPO(eval=EvalConfig(every_seconds=60))
