"""Runs that survive faults: a signal stops a run with a checkpoint and it resumes exactly; a kill before the first
checkpoint, a torn metrics line and a checkpoint cut off mid-save all resume to the uninterrupted run's records;
metrics.jsonl stays standard JSON with non-finite values."""

import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines import load_pipeline
from pipelines.errors import ConfigError, UserError
from pipelines.text import encode_one, precompute
from rewards import Reward
from rewards.jpeg import JpegSizeReward
from rl import grpo
from rl.checkpoints import CheckpointConfig, CheckpointError, changed_options, latest_checkpoint, verify_checkpoint
from rl.context import RunContext
from rl.evaluation import EvalConfig
from rl.lora import LoraSpec
from rl.optim import DivergenceError, NonFiniteError, OptimConfig
from rl.ppo import PPOConfig
from rl.prompts import load_prompts
from rl.rollouts import SamplingConfig
from rl.tracking import JsonlTracker, LoggerConfig, read_metrics

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("train/reward_mean", "train/loss", "eval/reward_mean")
# A GRPO run of a few seconds an epoch: 2 prompts x 4 images, 2 steps, a held-out evaluation of 2 prompts every epoch.
RUN = ["algo=grpo", "reward=jpeg_compressibility", "model=tiny", "algo.epochs=4", "algo.checkpoint.every=100",
       "algo.optim.lr=5e-2", "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=4",
       "algo.sampling.batch_size=8", "algo.sampling.num_inference_steps=2", "algo.ppo.batch_size=8",
       "algo.ppo.optimizer_steps=1", "algo.eval.every=1", "algo.eval.max_prompts=2",
       "algo.eval.num_inference_steps=2", "cpu_threads=1"]


def context(run_dir: Path) -> RunContext:
    return RunContext(run_dir=run_dir, seed=0, load_pipeline=partial(load_pipeline, None),
                      train_prompts=load_prompts("simple_animals.txt", stop=6),
                      eval_prompts=load_prompts("simple_animals.txt", start=36, stop=38),
                      logger=LoggerConfig(), config={}, reward=JpegSizeReward())


def small(epochs: int = 3, **checkpoint) -> grpo.GRPO:
    return grpo.GRPO(
        epochs=epochs, beta=0.0,
        sampling=SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=2),
        ppo=PPOConfig(batch_size=8, optimizer_steps=1, clip_range=1e-2), lora=LoraSpec(rank=4),
        optim=OptimConfig(lr=5e-2), eval=EvalConfig(every=1, max_prompts=2, num_inference_steps=2),
        checkpoint=CheckpointConfig(**{"every": 1, **checkpoint}),
    )


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in COMPARED:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> list[dict]:
    """The records of the uninterrupted 3-epoch run the interrupted ones must reproduce."""
    run_dir = tmp_path_factory.mktemp("whole")
    small()(context(run_dir))
    return read_metrics(run_dir)


def test_metrics_lines_stay_standard_json_with_non_finite_values(tmp_path):
    tracker = JsonlTracker(tmp_path / "metrics.jsonl")
    tracker.log({"train/reward_mean": float("nan"), "train/loss": float("inf"), "train/lr": 0.1}, step=3)
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not standard JSON"))
    assert record == {"step": 3, "train/reward_mean": None, "train/loss": None, "train/lr": 0.1,
                      "nonfinite": ["train/loss", "train/reward_mean"]}
    assert math.isfinite(record["train/lr"])


def test_a_run_killed_before_its_first_checkpoint_starts_its_metrics_afresh(tmp_path, whole):
    """Records logged before a kill that left no checkpoint are not repeated: the restart starts from step 0 and keeps
    the earlier records in metrics.before-resume.jsonl."""
    run_dir = tmp_path / "run"
    small(exit_after=2)(context(run_dir))  # two epochs, then ...
    for path in (run_dir / "checkpoints").iterdir():  # ... as if killed before any checkpoint was written
        path.rename(run_dir / f"lost-{path.name}")
    small()(context(run_dir))
    assert_same_records(read_metrics(run_dir), whole)
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3]  # each epoch once
    assert (run_dir / "metrics.before-resume.jsonl").is_file()


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes(tmp_path, whole, caplog):
    run_dir = tmp_path / "run"
    small(exit_after=2)(context(run_dir))
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write('{"step": 3, "train/rew')  # a kill in the middle of a write
    small()(context(run_dir))
    assert "torn" in caplog.text
    assert_same_records(read_metrics(run_dir), whole)
    first, second = (run_dir / "metrics.before-resume.jsonl"), (run_dir / "metrics.before-resume.1.jsonl")
    assert first.is_file() and not second.exists()  # each resume keeps its own copy; this one resumed once


def test_a_checkpoint_cut_off_mid_save_is_never_resumed_from(tmp_path, whole):
    """A save writes into a hidden partial folder and renames it when complete: a kill mid-save leaves no step_<N>
    folder, and the run resumes from the checkpoint before; the next save removes the partial folder."""
    run_dir = tmp_path / "run"
    small(exit_after=2)(context(run_dir))
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step_000002").rename(checkpoints / ".step_000002.partial")
    (checkpoints / ".step_000002.partial" / "done").unlink()  # as a kill during the save leaves it
    assert latest_checkpoint(run_dir).name == "step_000001"
    small()(context(run_dir))
    assert_same_records(read_metrics(run_dir), whole)
    assert not list(checkpoints.glob(".step_*.partial"))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("piece, damage", [
    ("pytorch_lora_weights.safetensors", flip_byte), ("optimizer.bin", flip_byte), ("train_state.pt", flip_byte),
    ("pytorch_lora_weights.safetensors", truncate), ("optimizer.bin", truncate), ("scheduler.bin", None),
], ids=["flipped LoRA", "flipped optimizer", "flipped counters", "truncated LoRA", "truncated optimizer",
        "missing scheduler"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, whole, piece, damage,
                                                                                   caplog):
    """A flipped bit loads silently and a truncated or missing piece fails to load: the manifest finds each, the
    resume falls back to the previous intact checkpoint with one line naming the file and the step, and the run
    then gives the uninterrupted run's records."""
    run_dir = tmp_path / "run"
    small(exit_after=2)(context(run_dir))
    checkpoint = run_dir / "checkpoints" / "step_000002"
    if damage is None:
        (checkpoint / piece).unlink()
    else:
        damage(checkpoint / piece)
    assert verify_checkpoint(checkpoint) is not None and verify_checkpoint(checkpoint.parent / "step_000001") is None
    small()(context(run_dir))
    said = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith(f"checkpoint step_000002 is damaged ({piece} ") and "resuming from step_000001" in said[0]
    assert_same_records(read_metrics(run_dir), whole)
    assert (run_dir / "checkpoints" / "step_000002.damaged" / piece).exists() or damage is None
    assert latest_checkpoint(run_dir).name == "step_000003"


def test_a_run_whose_every_checkpoint_is_damaged_stops_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    small(exit_after=1)(context(run_dir))
    flip_byte(run_dir / "checkpoints" / "step_000001" / "optimizer.bin")
    before = files(run_dir)
    with pytest.raises(CheckpointError, match=r"every checkpoint in \S+ is damaged or was written with other options "
                                              r"\(step_000001: optimizer.bin differs from what was written.*\); move "
                                              r"them away"):
        small()(context(run_dir))
    assert files(run_dir) == before  # nothing set aside, nothing trimmed


@pytest.mark.parametrize("lora", [LoraSpec(rank=8), None], ids=["another rank", "no LoRA"])
def test_a_forced_resume_with_an_adapter_that_does_not_fit_stops_with_one_line(tmp_path, lora):
    run_dir = tmp_path / "run"
    small(exit_after=1)(context(run_dir))
    before = files(run_dir)
    config = small(resume="force")
    config.lora = lora
    with pytest.raises(ConfigError, match=r"step_000001 does not fit this run \(\w+: .*\): it was written with other "
                                          r"options \(algo.lora, the model, ...\); resume with the run's own options"):
        config(context(run_dir))
    assert {k: v for k, v in files(run_dir).items() if k.name != "metrics.jsonl"} == {
        k: v for k, v in before.items() if k.name != "metrics.jsonl"}  # the checkpoint is where it was


def test_a_resume_without_its_metrics_or_with_another_thread_count_says_so(tmp_path, caplog):
    run_dir = tmp_path / "run"
    small(exit_after=1)(context(run_dir))
    (run_dir / "metrics.jsonl").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        small(epochs=2)(context(run_dir))
    finally:
        torch.set_num_threads(threads)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{run_dir} has no metrics.jsonl: the records of steps up to 1 are lost" in m for m in said), said
    assert any(f"step_000001 was written with {threads} CPU threads and the run resumes with {threads + 1}" in m
               for m in said), said
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [2]


def test_a_checkpoint_written_before_manifests_still_resumes(tmp_path, whole):
    run_dir = tmp_path / "run"
    small(exit_after=2)(context(run_dir))
    for manifest in (run_dir / "checkpoints").glob("step_*/manifest.json"):
        manifest.unlink()
    small()(context(run_dir))
    assert_same_records(read_metrics(run_dir), whole)


def tensor_bytes(path: Path, name: str) -> tuple[int, int]:
    """Where a tensor's data lies in a safetensors file: (first byte, end)."""
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    begin, end = json.loads(path.read_bytes()[8: 8 + header_size])[name]["data_offsets"]
    return 8 + header_size + begin, 8 + header_size + end


def test_a_damaged_row_of_the_prompt_embedding_cache_is_encoded_again(tmp_path, tiny_pipe, caplog):
    """One changed value in the negative prompt's row (the first: texts are sorted) is found by the row's hash and
    the row is encoded again, with one warning naming the file; the other rows are read as written."""
    store = precompute(tiny_pipe, ["a cat", "a dog"], tmp_path, 16)
    begin, _ = tensor_bytes(store.path, "prompt_embeds")
    data = bytearray(store.path.read_bytes())
    data[begin + 1] ^= 0x01
    store.path.write_bytes(bytes(data))
    again = precompute(tiny_pipe, ["a cat", "a dog"], tmp_path, 16)
    for text in ("", "a cat"):
        embeds, pooled = again[text]
        want, want_pooled = encode_one(tiny_pipe, text, 16, "cpu")
        assert torch.equal(embeds, want) and torch.equal(pooled, want_pooled)
    said = [r.getMessage() for r in caplog.records if "damaged row" in r.getMessage()]
    assert len(said) == 1 and str(store.path) in said[0] and "(the prompt '')" in said[0], said


@pytest.mark.parametrize("damage", ["truncated", "empty", "hashless"])
def test_an_unreadable_prompt_embedding_cache_is_rebuilt(tmp_path, tiny_pipe, caplog, damage):
    store = precompute(tiny_pipe, ["a cat"], tmp_path, 16)
    if damage == "hashless":  # written before the rows' hashes were kept
        tensors = load_file(store.path)
        save_file(tensors, str(store.path), metadata={"texts": json.dumps(["", "a cat"])})
    else:
        store.path.write_bytes(
            store.path.read_bytes()[: store.path.stat().st_size // 2 if damage == "truncated" else 0])
    again = precompute(tiny_pipe, ["a cat"], tmp_path, 16)
    assert again.path == store.path and torch.equal(again["a cat"][0], encode_one(tiny_pipe, "a cat", 16, "cpu")[0])
    said = [r.getMessage() for r in caplog.records if "cannot be read as written" in r.getMessage()]
    assert len(said) == 1 and "rebuilding it" in said[0], said
    assert store.path.with_name(store.path.name + ".damaged").is_file()


def test_an_unwritable_prompt_embedding_cache_folder_stops_with_one_line(tiny_pipe):
    with pytest.raises(UserError, match=r"cannot write the prompt-embedding cache /sys/rl-cache/\w+.safetensors: .*; "
                                        r"free space there or set model.prompt_embeds_cache"):
        precompute(tiny_pipe, ["a cat"], Path("/sys/rl-cache"), 16)


def wait_for_record(path: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and any(r.get("step") == step and "train/loss" in r for r in read_metrics(path.parent)):
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before epoch {step}: {process.stdout.read()[-2000:]}")
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"no record of epoch {step} within {timeout} s")


@pytest.mark.parametrize("signum, code", [  # SIGINT in the slow suite: the same path as SIGTERM, 50 s
    pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
    pytest.param(signal.SIGINT, 130, id="SIGINT", marks=pytest.mark.slow)])
def test_a_signal_stops_the_run_with_a_checkpoint_and_it_resumes_exactly(tmp_path, signum, code):
    run = [sys.executable, "-m", "rl.run", *RUN]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole_dir, run_dir = tmp_path / "whole", tmp_path / "run"
    subprocess.run([*run, f"hydra.run.dir={whole_dir}"], cwd=ROOT, check=True, capture_output=True, env=env,
                   timeout=600)
    process = subprocess.Popen([*run, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # the log goes to stdout
    wait_for_record(run_dir / "metrics.jsonl", 1, process)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == code, output[-2000:]
    assert "Traceback" not in output
    stopped = [line for line in output.splitlines() if "stopped by " + signal.Signals(signum).name in line]
    assert len(stopped) == 1 and "start the same command again to resume" in stopped[0], output[-2000:]
    assert [line for line in output.splitlines() if "[WARNING]" in line] == stopped  # the stop's one line
    assert "[accelerate" not in output and "[accelerate" in (run_dir / "run.log").read_text()  # run.log only
    step = int(stopped[0].split(" after epoch ")[1].split(";")[0])
    assert 1 <= step < 4 and latest_checkpoint(run_dir).name == f"step_{step:06d}"
    assert not (run_dir / "final").exists()
    subprocess.run([*run, f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True, capture_output=True, env=env,
                   timeout=600)
    assert_same_records(read_metrics(run_dir), read_metrics(whole_dir))


# `python -m rl.run` with one phase paused (a print, then a long sleep), for a signal to arrive there.
PAUSED_RUN = """
import runpy, sys, time
phase = sys.argv.pop(1)
import pipelines, rl.export, rl.grpo
def paused(original):
    def pause(*args, **kwargs):
        print("PAUSED", flush=True)
        time.sleep(300)
        return original(*args, **kwargs)
    return pause
if phase == "loading":
    pipelines.load_pipeline = paused(pipelines.load_pipeline)
elif phase == "evaluation":
    rl.grpo.held_out = paused(rl.grpo.held_out)
else:
    rl.export.save_final = paused(rl.export.save_final)
sys.argv[0] = "rl.run"
runpy.run_module("rl.run", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("phase, signum", [  # the other three in the slow suite: the same handler, 20 s each
    ("loading", signal.SIGINT), ("evaluation", signal.SIGTERM), ("final", signal.SIGINT),
    *(pytest.param(phase, signum, marks=pytest.mark.slow)
      for phase, signum in (("loading", signal.SIGTERM), ("evaluation", signal.SIGINT), ("final", signal.SIGTERM)))],
    ids=["loading SIGINT", "evaluation SIGTERM", "final SIGINT", "loading SIGTERM", "evaluation SIGINT",
         "final SIGTERM"])
def test_a_signal_outside_the_steps_stops_with_one_line(tmp_path, phase, signum):
    """While the model loads, during the step-0 evaluation and while final/ is written: one line, exit 130 / 143,
    no traceback; the run then resumes (from its last checkpoint, or from the start)."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, phase, *RUN, "algo.epochs=2",
                                "algo.checkpoint.every=1", f"hydra.run.dir={run_dir}"], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in process.stdout:
        if line.strip() == "PAUSED":
            break
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
             and "s/it]" not in line and not line.startswith("grpo:")]
    assert lines == [f"stopped by {signal.Signals(signum).name}: nothing was saved at this point; start the same "
                     f"command again to resume from the run's last checkpoint"], stderr[-2000:]
    if phase == "final":
        assert latest_checkpoint(run_dir).name == "step_000002"
    subprocess.run([sys.executable, "-m", "rl.run", *RUN, "algo.epochs=2", "algo.checkpoint.every=1",
                    f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert (run_dir / "final" / "README.md").is_file()


def test_a_second_run_in_a_run_directory_is_refused_with_one_line(tmp_path):
    """While a run writes into a directory, the same command (a resume) stops with exit 2 and one line naming the
    first, changing nothing there; a run killed with kill -9 leaves no lock behind: the next one takes over with a
    warning and resumes."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rl.run", *RUN, "algo.epochs=30", "algo.checkpoint.every=1",
               f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_record(run_dir / "metrics.jsonl", 1, first)
        first.send_signal(signal.SIGSTOP)  # holds still while the second tries (and its lock stays held)
        before = files(run_dir)
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip() == (f"error: another run is writing into {run_dir} (pid {first.pid} on "
                                         f"{socket.gethostname()}, since "
                                         f"{json.loads((run_dir / '.lock').read_text())['started']}); wait for it to "
                                         f"end or stop it, or start this one in another run directory "
                                         f"(hydra.run.dir=...)")
        assert files(run_dir) == before
    finally:
        first.kill()  # SIGKILL: no chance to release the lock
        first.communicate()
    resumed = subprocess.run([*command[:-2], "algo.epochs=2", command[-1]], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"[WARNING] - {run_dir} was last held by a run that did not end normally (pid {first.pid} on" in (
        resumed.stdout)
    assert "did not end normally" in (run_dir / "run.log").read_text()
    assert (run_dir / ".lock").read_text() == ""  # released at a normal end


def test_the_run_lock_is_exclusive_across_processes_and_released_at_exit(tmp_path, caplog):
    from rl.run_lock import hold_run_dir, release_run_dir

    hold_run_dir(tmp_path / "run")
    hold_run_dir(tmp_path / "run")  # held already: fine
    other = subprocess.run([sys.executable, "-c", "import sys; from rl.run_lock import hold_run_dir; "
                            "hold_run_dir(sys.argv[1])", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert other.returncode == 1 and "RunDirectoryBusy: another run is writing into" in other.stderr
    release_run_dir(tmp_path / "run")
    assert (tmp_path / "run" / ".lock").read_text() == ""  # a normal release empties it
    hold_run_dir(tmp_path / "run")  # free again, and nothing to warn about
    release_run_dir(tmp_path / "run")
    assert "did not end normally" not in caplog.text


class Faulty(Reward):
    """JPEG compressibility with NaN or inf in place of some scores, from a given call on."""

    def __init__(self, value: float, which: str, from_call: int = 0, only_calls: set[int] | None = None):
        super().__init__()
        self.jpeg, self.value, self.which, self.from_call, self.calls = JpegSizeReward(), value, which, from_call, 0
        self.only_calls = only_calls  # instead of every call after `from_call`: these calls (counted from 1)

    def score(self, images, prompts, metadata):
        scores, info = self.jpeg.score(images, prompts, metadata)
        self.calls += 1
        if self.calls in self.only_calls if self.only_calls is not None else self.calls > self.from_call:
            scores = scores.clone()
            scores[: 1 if self.which == "one" else len(scores)] = self.value
        return scores, info


@pytest.mark.parametrize("value, which", [(math.nan, "one"), (math.nan, "all"), (math.inf, "one")],
                         ids=["one NaN", "all NaN", "one inf"])
def test_non_finite_rewards_are_skipped_and_stop_the_run_after_three_in_a_row(tmp_path, value, which):
    """From the third training epoch on (the held-out evaluation before training is call 1), the reward returns a
    non-finite score: those epochs' updates are skipped and logged, the third in a row stops the run with one line,
    and no checkpoint holds a non-finite tensor."""
    ctx = context(tmp_path)
    # epochs 1 and 2 are healthy: a sampling and an eval call each
    ctx.reward = Faulty(value, which, from_call=1 + 2 * 2)
    with pytest.raises(NonFiniteError, match=r"epoch 5: 3 updates in a row were skipped for NaN or infinite rewards, "
                                             r".* the latest checkpoint \(step_000004\) holds finite weights"):
        small(epochs=8)(ctx)
    records = read_metrics(tmp_path)  # every line parses as standard JSON
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1], parse_constant=pytest.fail)
    skipped = [r for r in records if r.get("train/skipped_nonfinite")]
    assert [r["step"] for r in skipped] == [3, 4] and all(r["train/skipped_nonfinite"] == 1 for r in skipped)
    assert all(r["train/nonfinite_rewards"] == (1 if which == "one" else 8) for r in skipped)
    assert all("train/grad_norm" not in r and "train/loss" not in r for r in skipped)  # no update was made
    for checkpoint in (tmp_path / "checkpoints").glob("step_*"):
        for name, tensor in load_file(checkpoint / "pytorch_lora_weights.safetensors").items():
            assert torch.isfinite(tensor).all(), (checkpoint.name, name)
    assert latest_checkpoint(tmp_path).name == "step_000004"  # written after the skipped (finite-weight) epochs


def test_a_non_finite_reward_never_reaches_ddpos_statistics_or_online_dpos_pairs(tmp_path):
    """DDPO: an epoch with a NaN reward stores nothing in the per-prompt buffers (so a later healthy epoch trains);
    online DPO: no pair is chosen among NaN rewards. Both skip that epoch's update only."""
    from rl import ddpo, dpo

    sampling = SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=2)
    common = dict(epochs=4, lora=LoraSpec(rank=4), optim=OptimConfig(lr=5e-2),
                  eval=EvalConfig(every=10, max_prompts=2, num_inference_steps=2),
                  checkpoint=CheckpointConfig(every=1))
    runs = {"ddpo": ddpo.DDPO(sampling=sampling, ppo=PPOConfig(batch_size=8, optimizer_steps=1), min_count=2,
                              **common),
            "dpo_online": dpo.OnlineDPO(sampling=sampling, train=dpo.OnlineTrainConfig(batch_size=1), **common)}
    for name, config in runs.items():
        ctx = context(tmp_path / name)
        ctx.reward = Faulty(math.nan, "one", only_calls={3})  # the second training epoch (call 1: evaluation)
        config(ctx)
        records = {r["step"]: r for r in read_metrics(tmp_path / name) if "train/reward_mean" in r}
        assert records[2]["train/skipped_nonfinite"] == 1 and records[2]["train/nonfinite_rewards"] == 1, name
        assert all(math.isfinite(records[step]["train/loss"]) for step in (1, 3, 4)), name  # healthy epochs train
        if name == "ddpo":
            for checkpoint in (tmp_path / name / "checkpoints").glob("step_*"):
                buffers = torch.load(checkpoint / "stat_tracker.pt", weights_only=True)["buffers"]
                assert all(math.isfinite(v) for values in buffers.values() for v in values), checkpoint.name


def test_an_overflowing_learning_rate_stops_before_anything_evaluates_or_saves_the_weights(tmp_path):
    """lr 3e37: one AdamW step takes every weight near float32's largest value; their norm overflows. The run stops
    with one line before the held-out evaluation (which would only see NaN images) and before any checkpoint."""
    config = small(epochs=3)
    config.optim = OptimConfig(lr=3e37)
    with pytest.raises(NonFiniteError, match=r"epoch 1: the trained weights became NaN, infinite or overflowing .* "
                                             r"stopped before evaluating or saving them; no checkpoint was written"):
        config(context(tmp_path))
    assert latest_checkpoint(tmp_path) is None and not list((tmp_path / "checkpoints").glob("*"))


def test_a_non_finite_held_out_value_never_stops_the_runs_end_or_its_readers(tmp_path):
    """The held-out evaluation of step 0 scores one image NaN: its mean is logged as null, and the run still ends
    with final/README.md (the model card's table says "non-finite"), curves.png, and a comparison of it."""
    from experiments import compare

    ctx = context(tmp_path / "run")
    ctx.reward = Faulty(math.nan, "one", only_calls={1})
    small(epochs=2)(ctx)
    assert read_metrics(tmp_path / "run")[0]["eval/reward_mean"] is None
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "| eval/reward_mean | non-finite | " in card
    assert (tmp_path / "run" / "curves.png").is_file()
    summary = compare.main([str(tmp_path / "run"), "--out", str(tmp_path / "compared.png")])[0]
    assert math.isfinite(summary["start"]["mean"]) and summary["curve"]["x"] == [1, 2]  # the null point left out


class Constant(Reward):
    """Every image scores the same: every advantage is 0, so the policy gradient is exactly 0 (a dead run)."""

    def score(self, images, prompts, metadata):
        return torch.ones(len(prompts)), {}


@pytest.mark.parametrize("stop", [False, True], ids=["warns", "stops"])
def test_a_dead_run_is_reported(tmp_path, stop, caplog):
    ctx = context(tmp_path)
    ctx.reward = Constant()
    config = small(epochs=3)
    config.optim = OptimConfig(lr=5e-2, dead_after=2, stop_on_divergence=stop)
    says = "epoch 2: the gradient norm has been exactly 0 for 2 optimiser steps in a row (optim.dead_after): "
    if stop:
        with pytest.raises(DivergenceError, match=re.escape(says)):
            config(ctx)
        assert latest_checkpoint(tmp_path).name == "step_000001"  # the step that found it wrote none
    else:
        config(ctx)
        assert [r.getMessage() for r in caplog.records if "exactly 0" in r.getMessage()] == [
            says + "nothing is learned; a dead run? check the learning rate and the reward (set "
                   "algo.optim.stop_on_divergence=true to stop such a run)"]  # once
    logged = [r["train/grad_norm"] for r in read_metrics(tmp_path) if "train/grad_norm" in r]
    assert logged == ([0.0] if stop else [0.0, 0.0, 0.0])  # a stop comes within epoch 2's update, before its record


@pytest.mark.parametrize("stop", [False, True], ids=["warns", "stops"])
def test_an_exploding_run_is_reported(tmp_path, stop, caplog):
    config = small(epochs=2)
    config.optim = OptimConfig(lr=1e3, stop_on_divergence=stop)  # AdamW moves every weight by ~1e3 a step
    says = r"epoch 1: the trained weights' norm grew from \S+ to \S+, past optim.max_weight_growth=10 times"
    if stop:
        with pytest.raises(DivergenceError, match=says):
            config(context(tmp_path))
        assert latest_checkpoint(tmp_path) is None
    else:
        config(context(tmp_path))
        assert len([r for r in caplog.records if re.match(says, r.getMessage())]) == 1
    caplog.clear()
    small(epochs=2)(context(tmp_path / "healthy"))  # lr 5e-2 (these tests' usual run): no warning
    assert not [r for r in caplog.records if "optim.max_weight_growth" in r.getMessage()]


def test_changed_options_are_those_a_resume_must_not_change():
    saved = {"algo.optim.lr": 3e-4, "algo.epochs": 10, "algo.eval.every": 5, "algo.checkpoint.every": 2, "seed": 0,
             "algo.lora.rank": 8}
    new = {"algo.optim.lr": 1e-3, "algo.epochs": 20, "algo.eval.every": 1, "algo.checkpoint.every": 1, "seed": 0,
           "algo.ppo.timestep_order": "first"}  # an option the saved config lacks: added by a later version
    assert changed_options(saved, new) == ["algo.lora.rank: 8 -> '(removed)'", "algo.optim.lr: 0.0003 -> 0.001"]
    assert changed_options(saved, {**saved, "algo.epochs": 40}) == []
    no_data = {"data.path": None, "data.dataset": None, "data.resolution": 512}  # a run that read no data
    assert changed_options({**saved, **no_data}, {**saved, **no_data, "data.resolution": 32}) == []
    with_data = {**no_data, "data.path": "/data/digits"}
    assert changed_options({**saved, **with_data}, {**saved, **with_data, "data.resolution": 32}) == [
        "data.resolution: 512 -> 32"]
    nan = {**saved, "algo.optim.max_grad_norm": math.nan}
    assert changed_options(nan, {**nan, "algo.optim.max_grad_norm": float("nan")}) == []  # nan is nan here
    assert changed_options(nan, {**nan, "algo.optim.max_grad_norm": 1.0}) == ["algo.optim.max_grad_norm: nan -> 1.0"]


@pytest.mark.slow  # three short runs in subprocesses (about 45 s)
def test_a_resume_with_changed_options_stops_with_one_line_unless_forced(tmp_path):
    run = [sys.executable, "-m", "rl.run", *RUN, f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([*run, "algo.checkpoint.exit_after=1", "algo.checkpoint.every=1"], cwd=ROOT, check=True,
                   capture_output=True, env=env, timeout=600)
    files = {name: (tmp_path / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    changed = subprocess.run([*run, "algo.optim.lr=0.1", "algo.epochs=6"], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=600)
    assert changed.returncode == 2, changed.stderr[-2000:]
    message = changed.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert "algo.optim.lr: 0.05 -> 0.1" in message and "algo.epochs" not in message  # more epochs may resume
    assert {name: (tmp_path / name).read_bytes() for name in files} == files  # nothing written was lost
    forced = subprocess.run([*run, "algo.optim.lr=0.1", "algo.checkpoint.resume=force"], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=600)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("override, says", [
    ("algo=nope", "Could not find 'algo/nope' Available options in 'algo': awm ddpo"),
    pytest.param("reward=nope", "Could not find 'reward/nope'", marks=pytest.mark.slow),  # the same Hydra error
    ("algo.nonexistent=1", "Could not override 'algo.nonexistent'"),
    pytest.param("lora@algo.lora=nope", "Could not find 'lora/nope'", marks=pytest.mark.slow),  # as algo=nope
])
def test_a_config_that_does_not_compose_stops_with_one_line(tmp_path, override, says):
    result = subprocess.run([sys.executable, "-m", "rl.run", override, f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and says in message, message
    assert "search path" not in message and not (tmp_path / "run").exists()  # nothing was started


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run directory as a stopped run leaves it (`RUN` after one epoch, with a checkpoint): every bad input below
    points at it and must leave its files as they are."""
    run_dir = tmp_path_factory.mktemp("stopped")
    subprocess.run([sys.executable, "-m", "rl.run", *RUN, "algo.checkpoint.exit_after=1", "algo.checkpoint.every=1",
                    f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True, capture_output=True, timeout=600,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return run_dir


def files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


BAD_INPUTS = [  # (command line, what its one line says): each stops before Hydra starts and before any weights load
    # counts, fractions, choices (each config class checks its own when it builds)
    ([*RUN, "algo.sampling.batch_size=0"], "algo.sampling.batch_size must be a positive number, got 0"),
    ([*RUN, "algo.sampling.prompts_per_epoch=-2"], "algo.sampling.prompts_per_epoch must be a positive number"),
    ([*RUN, "algo.sampling.images_per_prompt=1"], "images_per_prompt must be at least 2"),
    ([*RUN, "algo.sampling.noise_level=-0.1"], "algo.sampling.noise_level must be 0 or more"),
    ([*RUN, "algo.sampling.sde_type=ddim"], "algo.sampling.sde_type"),
    ([*RUN, "algo.ppo.batch_size=0"], "algo.ppo.batch_size must be a positive number"),
    ([*RUN, "algo.ppo.optimizer_steps=0"], "algo.ppo.optimizer_steps must be a positive number"),
    ([*RUN, "algo.ppo.timestep_fraction=1.5"], "algo.ppo.timestep_fraction must be in (0, 1]"),
    ([*RUN, "algo.ppo.timestep_order=last"], "algo.ppo.timestep_order"),
    ([*RUN, "algo.epochs=-1"], "algo.epochs must be a positive number"),
    ([*RUN, "algo.beta=-0.1"], "algo.beta must be 0 or more"),
    ([*RUN, "algo.optim.lr=-1"], "algo.optim.lr must be a positive number, got -1"),
    ([*RUN, "algo.optim.dead_after=0"], "algo.optim.dead_after must be a positive number"),
    ([*RUN, "algo.checkpoint.every=0"], "algo.checkpoint.every must be a positive number"),
    ([*RUN, "algo.checkpoint.resume=maybe"], "algo.checkpoint.resume must be true, false or force"),
    ([*RUN, "algo.eval.max_prompts=0"], "algo.eval.max_prompts must be a positive number"),
    (["algo=ddpo", "algo.sampling.images_per_prompt=0"], "algo.sampling.images_per_prompt must be a positive"),
    (["algo=ddpo", "algo.min_count=0"], "algo.min_count"),
    (["algo=refl", "algo.train.batch_size=0"], "algo.train.batch_size must be a positive number, got 0"),
    (["algo=refl", "algo.train.batch_size=-1"], "algo.train.batch_size must be a positive number, got -1"),
    (["algo=refl", "algo.refl.stop_range=[30,50]"], "refl.stop_range"),
    (["algo=sft", "algo.train.batch_size=0"], "algo.train.batch_size must be a positive number"),
    (["algo=sft", "algo.train.caption_dropout=2"], "caption_dropout"),
    (["algo=dpo", "algo.train.max_steps=0"], "algo.train.max_steps must be a positive number"),
    (["algo=dpo_online", "algo.train.batch_size=0"], "algo.train.batch_size must be a positive number"),
    (["algo=dpo_online", "algo.epochs=0"], "algo.epochs must be a positive number"),
    # image sizes against the model's own (the tiny model: 4 x 4 pixel patches, at most 64 px, native 32 px)
    ([*RUN, "algo.sampling.resolution=30"], "algo.sampling.resolution=30 does not fit this model: its images are "
                                             "made of 4 x 4 pixel patches"),
    ([*RUN, "algo.sampling.resolution=128"], "algo.sampling.resolution=128 is larger than this model's positional "
                                              "embedding covers (64 px)"),
    ([*RUN, "algo.eval.resolution=30"], "algo.eval.resolution=30 does not fit this model"),
    (["algo=refl", "algo.refl.resolution=96"], "algo.refl.resolution=96 is larger than"),
    (["algo=sft", "algo.validation.resolution=30"], "algo.validation.resolution=30 does not fit"),
    (["algo=sft", "data.resolution=30"], "data.resolution=30 does not fit this model"),
    (["algo=sft", "data.resolution=512"], "data.resolution=512 is larger than this model's positional embedding "
                                          "covers (64 px); use at most 64 (its native size is 32)"),
    (["algo=sft", "data.resolution=-32"], "data.resolution must be a positive whole number of pixels, got -32"),
    # a real checkpoint that would train in float32 without saying so
    (["algo=dpo_online", "model=sd35_medium"], "model.path=stabilityai/stable-diffusion-3.5-medium in "
                                               "model.dtype=bfloat16 would train in float32 (mixed_precision=no casts "
                                               "it up): add mixed_precision=bf16, or model.dtype=float32"),
    # where the model and the prompts are
    ([*RUN, "model.path=/nonexistent/sd35"], "model.path=/nonexistent/sd35: no such folder"),
    (["algo=sample", "model=checkpoint", "model.path=no-such-org/no-such-model"], "no-such-org/no-such-model is not "
                                                                                  "in the local Hugging Face cache"),
    ([*RUN, "model.path=/nonexistent/sd3.5_medium.safetensors"], "sd3.5_medium.safetensors: no such file"),
    (["algo=sample", "model=checkpoint", "model.path=no-org/no-repo/sd3.5_medium.safetensors"],
     "no-org/no-repo is not in the local Hugging Face cache"),
    ([*RUN, "model.transformer_file=/data/sd3.5_medium.safetensors"], "model.transformer_file replaces the "
                                                                      "transformer of model.path"),
    ([*RUN, "algo.sampling.strength=1.5"], "algo.sampling.strength must be in (0, 1]"),
    ([*RUN, "algo.sampling.strength=0.6"], "algo.sampling.strength=0.6 is image-to-image: it needs a prompt set"),
    ([*RUN, "prompts.train.file=/nonexistent.txt"], "/nonexistent.txt"),
    # a resume whose options differ from the run directory's
    ([*RUN, "algo.lora.rank=8"], "algo.lora.rank: 32 -> 8"),
    ([*RUN, "algo.lora=null"], "algo.lora.rank: 32 -> '(removed)'"),
    ([*RUN, "algo.sampling.images_per_prompt=8", "algo.sampling.batch_size=16"], "images_per_prompt: 4 -> 8"),
    # values of the wrong type (pipelines/option_types.py) and the top-level options
    ([*RUN, "algo.sampling.strength=half"], "algo.sampling.strength must be a number or null, got 'half'"),
    ([*RUN, "algo.optim.betas=[0.9]"], "algo.optim.betas must be a list of 2 numbers, got [0.9]"),
    ([*RUN, "algo.epochs=1.5"], "algo.epochs must be a whole number, got 1.5"),
    ([*RUN, "model.tiny_seed=abc"], "model.tiny_seed must be a whole number, got 'abc'"),
    ([*RUN, "algo.advantage_std=foo"], "algo.advantage_std must be one of global, group, got 'foo'"),
    ([*RUN, "+reward.clip=3"], "reward.clip is not an option of rewards.jpeg.JpegSizeReward"),
    ([*RUN, "seed=abc"], "seed must be a whole number, got 'abc'"),
    ([*RUN, "mixed_precision=fp8"], "mixed_precision must be no, fp16 or bf16, got 'fp8'"),
    ([*RUN, "cpu_threads=0"], "cpu_threads must be auto or a positive whole number, got 0"),
    # values out of range, and contradictions
    ([*RUN, "algo.lora.rank=0"], "algo.lora.rank must be a positive number, got 0"),
    ([*RUN, "algo.lora.alpha=-4"], "algo.lora.alpha must be a positive number, got -4"),
    ([*RUN, "algo.optim.lr_scheduler=bogus"], "algo.optim.lr_scheduler must be one of linear, cosine"),
    ([*RUN, "algo.optim.lr=1e38"], "algo.optim.lr=1e+38 overflows float32 in AdamW's first step"),
    ([*RUN, "algo.sampling.guidance_scale=-1"], "algo.sampling.guidance_scale must be 0 or more, got -1"),
    ([*RUN, "algo.sampling.sde_window=10"], "algo.sampling.sde_window=10 is longer than the 2 steps sampled"),
    ([*RUN, 'prompts.train.template="{} {}"'], "prompts template '{} {}' must hold exactly one {}"),
    ([*RUN, 'prompts.train.template="{"'], "prompts template '{' is not a format string"),
    (["experiment=refl_digits", "reward=jpeg_compressibility"], "JpegSizeReward is not differentiable"),
    # configs that do not compose (Hydra alone would print several lines and exit 1)
    (["algo=nope"], "Could not find 'algo/nope'"),
    ([*RUN, "reward=nope"], "Could not find 'reward/nope'"),
    ([*RUN, "algo.sampling.batchsize=4"], "Could not override 'algo.sampling.batchsize'"),
]


@pytest.mark.parametrize("argv, says", BAD_INPUTS, ids=[" ".join(a[-1:]) + f" ({a[0]})" for a, _ in BAD_INPUTS])
def test_bad_input_stops_with_one_line_before_hydra_or_any_weights_load(stopped_run, argv, says, capsys,
                                                                       monkeypatch):
    """`rl.run`'s first step, in process: exit code 2, one line, no weights loaded, the run directory unchanged."""
    import diffusers
    import huggingface_hub

    import pipelines.tiny
    from rl.run import check_before_start

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(pipelines.tiny, "build_tiny_components", no_weights)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", no_weights)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read when huggingface_hub loads
    before = files(stopped_run)
    with pytest.raises(SystemExit) as stop:
        check_before_start([*argv, f"hydra.run.dir={stopped_run}"])
    message = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and message.startswith("error: ") and "\n" not in message, message
    assert says in message, message
    assert files(stopped_run) == before


def test_a_binary_prompt_file_stops_with_one_line(tmp_path, capsys):
    from rl.run import check_before_start

    (tmp_path / "prompts.txt").write_bytes(b"a cat\n\xff\xfe\x00\x01")
    with pytest.raises(SystemExit) as stop:
        check_before_start([*RUN, f"prompts.train.file={tmp_path / 'prompts.txt'}", f"hydra.run.dir={tmp_path / 'r'}"])
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: prompt file {tmp_path / 'prompts.txt'} is not UTF-8 text (byte 6: invalid start byte); a prompt set "
        f"is a text file with one prompt per line, or JSONL")


def test_the_stopped_run_itself_passes_the_checks(stopped_run, capsys):
    from rl.run import check_before_start

    check_before_start([*RUN, "algo.epochs=6", f"hydra.run.dir={stopped_run}"])  # more epochs may resume
    assert capsys.readouterr().err == ""


def test_a_bad_value_on_the_command_line_exits_2_and_leaves_the_run_directory_byte_for_byte(stopped_run):
    before = files(stopped_run)
    result = subprocess.run([sys.executable, "-m", "rl.run", *RUN, "algo.sampling.batch_size=0",
                             f"hydra.run.dir={stopped_run}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: algo.sampling.batch_size must be a positive number, got 0"), result.stderr[-2000:]
    assert files(stopped_run) == before  # Hydra's .hydra/ and run.log included: it never started


def test_a_read_only_output_folder_stops_with_one_line(tmp_path):
    """/sys takes no new files, even for root (chmod does not stop root)."""
    result = subprocess.run([sys.executable, "-m", "rl.run", "algo=sample", "hydra.run.dir=/sys/rl-run-test/run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().startswith("error: cannot write the run directory /sys/rl-run-test/run: /sys: "), (
        result.stderr)


def test_bad_input_found_after_hydra_started_leaves_no_new_run_directory(tmp_path):
    """Input that only the run itself can find (here: an imagefolder with no images) stops with one line, and the run
    directory Hydra had created for it is removed (it held only Hydra's files and the config)."""
    (tmp_path / "empty").mkdir()
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "rl.run", "algo=sft", f"data.path={tmp_path / 'empty'}",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: "), result.stderr[-2000:]
    assert not run_dir.exists()


def test_data_resolution_defaults_to_the_models_native_size(tmp_path):
    from hydra import compose, initialize_config_dir

    from pipelines.geometry import model_geometry
    from rl.run import build_context, check_config

    for model, native in (("tiny", 32), ("digits", 32)):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["algo=sft", f"model={model}"])
        assert cfg.data.resolution is None and model_geometry(cfg.model).native == native
        check_config(cfg, tmp_path / model)
        assert cfg.data.resolution == native  # and so in the run's config.yaml
        assert build_context(cfg, tmp_path / model).data.resolution == native


def test_a_full_disk_during_a_checkpoint_stops_with_one_line_and_resumes(tmp_path, whole, monkeypatch):
    """A save that fails for lack of space names the folder; the run then resumes from its last complete checkpoint."""
    import errno

    import rl.checkpoints
    from rl.checkpoints import DiskFullError

    run_dir, saves = tmp_path / "run", []
    original = rl.checkpoints.torch.save

    def save(obj, path, *args, **kwargs):
        saves.append(path)
        if "step_000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(rl.checkpoints.torch, "save", save)
    with pytest.raises(DiskFullError, match=f"no space left on {run_dir / 'checkpoints'} while writing .* step 2"):
        small()(context(run_dir))
    monkeypatch.undo()
    assert latest_checkpoint(run_dir).name == "step_000001"
    small()(context(run_dir))
    assert_same_records(read_metrics(run_dir), whole)


def stops_in_one_line(run, capsys) -> str:
    """Run `run()` as an entry point does (`exit_on_user_error`): its one line on stderr, after exit code 2."""
    from pipelines.errors import exit_on_user_error

    with pytest.raises(SystemExit) as stop, exit_on_user_error():
        run()
    captured = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capsys.readouterr().err)  # the bars' cursor moves
    lines = [line.strip() for line in captured.replace("\r", "\n").splitlines()
             if line.strip().startswith("error: ")]  # a progress bar is cleared around the line (`\r`)
    assert stop.value.code == 2 and len(lines) == 1, (lines, captured[-3000:])
    return lines[0]


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["checkpoint LoRA file", "sample grid", "curves.png", "checkpoints folder"])
def test_a_full_disk_or_unwritable_folder_anywhere_stops_with_one_line_naming_the_path(tmp_path, whole, monkeypatch,
                                                                                         capsys, where):
    """Writes outside accelerate's own files fail with the disk's error: safetensors' own exception (the checkpoint's
    LoRA file), PIL's (the held-out grid), matplotlib's (curves.png), a folder that takes no rename. Each stops the
    run with one line naming the path; the run then resumes as if nothing had happened."""
    import matplotlib.figure
    import PIL.Image
    import safetensors.torch
    from safetensors import SafetensorError

    run_dir = tmp_path / "run"
    if where == "checkpoint LoRA file":
        def fail(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(safetensors.torch, "save_file", fail)
        says = None  # a full disk while a checkpoint is written: the folder and the step (DiskFullError)
    elif where == "sample grid":
        original = PIL.Image.Image.save

        def fail(self, path, *args, **kwargs):
            if isinstance(path, (str, Path)) and "samples" in str(path):  # not the JPEG reward's in-memory files
                raise no_space(path)
            return original(self, path, *args, **kwargs)
        monkeypatch.setattr(PIL.Image.Image, "save", fail)
        says = f"{run_dir}/samples/step_000000.png: No space left on device"
    elif where == "curves.png":
        def fail(self, path, *args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
        says = f"{run_dir}/curves.png: Permission denied"
    else:
        original = os.replace

        def fail(source, target, *args, **kwargs):
            if "checkpoints" in str(target):
                raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(source), str(target))
            return original(source, target, *args, **kwargs)
        monkeypatch.setattr(os, "replace", fail)
        says = f"{run_dir}/checkpoints/.step_000001.partial: Operation not permitted"
    line = stops_in_one_line(lambda: small()(context(run_dir)), capsys)
    assert line.startswith(f"error: cannot write {says}; free space there or make it writable" if says else
                           f"error: no space left on {run_dir}/checkpoints while writing "
                           f"the checkpoint of step 1"), line
    monkeypatch.undo()
    small()(context(run_dir))
    assert_same_records(read_metrics(run_dir), whole)


def test_wandb_without_a_login_stops_with_one_line(tmp_path, monkeypatch):
    from pipelines.errors import ConfigError
    from rl.tracking import make_accelerator

    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    with pytest.raises(ConfigError, match="logger=wandb could not start .*WANDB_MODE=offline"):
        make_accelerator(tmp_path / "run", LoggerConfig(backends=["wandb"]), {})


def short_run(preset: str, data: Path) -> list[str]:
    """A CPU preset cut to 4 steps with a checkpoint after each (tests/test_presets.py's cut, made longer)."""
    from test_presets import CONFIGS, SHORT, data_kind

    cfg = CONFIGS[preset]
    steps = "algo.epochs=4" if "epochs" in cfg.algo else "algo.train.max_steps=4"
    replaced = ("algo.epochs", "algo.train.max_steps", "algo.checkpoint.every")
    keep = [o for o in SHORT[cfg.algo._target_] if o.split("=")[0] not in replaced]
    return [f"experiment={preset}", "cpu_threads=1", steps, "algo.checkpoint.every=1", *keep,
            *([f"data.path={data}"] if data_kind(cfg) else [])]


KILLED = ["grpo_jpeg_tiny", "ddpo_jpeg_tiny", "dpo_online_jpeg_tiny", "dpo_photo_pairs_tiny", "refl_aesthetic_tiny",
          "sft_digits_tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", KILLED)
def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_run(tmp_path, preset):
    """SIGKILL (no handler runs) at a seeded random moment, twice: early (maybe before the first checkpoint, maybe
    while loading) and later (maybe during a checkpoint write); each restart resumes, and the records and the final
    weights equal those of an uninterrupted run."""
    import random

    from safetensors.torch import load_file as read
    from test_presets import CONFIGS, data_kind, write_data

    kind = data_kind(CONFIGS[preset])
    if kind:
        write_data(kind, tmp_path / "data")
    command = [sys.executable, "-m", "rl.run", *short_run(preset, tmp_path / "data")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    subprocess.run([*command, f"hydra.run.dir={whole}"], cwd=ROOT, check=True, capture_output=True, env=env,
                   timeout=900)
    chance = random.Random(preset)
    for delay in (chance.uniform(3, 8), chance.uniform(8, 16)):
        process = subprocess.Popen([*command, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait(timeout=60)
    subprocess.run([*command, f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True, capture_output=True, env=env,
                   timeout=900)
    got, want = read_metrics(run_dir), read_metrics(whole)
    keys = (*COMPARED, "eval/implicit_acc", "eval/loss")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in keys:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    for final in sorted((whole / "final").rglob("*.safetensors")):  # the adapter, or a full pipeline's weights
        a, b = read(run_dir / final.relative_to(whole)), read(final)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a), final
