"""Distributed runs: `torchrun` and `accelerate launch` give real ranks on a CPU (gloo), N processes train what one
process trains with the same global batch, a killed multi-process run resumes exactly, and the accelerate config
files in scripts/accelerate/ are accepted by accelerate itself."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "scripts" / "accelerate").glob("*.yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch_args(config: Path):
    """What `accelerate launch --config_file <config> -m rl.run` makes of the file: its checked arguments and the
    environment it gives each process (accelerate's own functions)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config), "-m", "rl.run"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_each_accelerate_config_is_accepted_by_accelerate_launch(config):
    args, env = launch_args(config)
    expected = {"single_gpu": 1, "multi_gpu": 8, "multi_node": 32, "deepspeed_zero2": 8, "deepspeed_zero3": 8,
                "fsdp": 8, "cpu_two_processes": 2}[config.stem]
    assert args.num_processes == expected
    assert f"--config_file scripts/accelerate/{config.name}" in config.read_text()  # its launch line is in the file
    if config.stem.startswith("deepspeed"):
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == config.stem[-1]
    if config.stem == "multi_node":
        assert args.num_machines == 4 and args.main_process_port == 29500


def test_fsdp_config_wraps_each_mmdit_block_of_sd35_medium(monkeypatch):
    """FULL_SHARD, one FSDP unit per JointTransformerBlock of the real SD3.5-Medium architecture (built on the meta
    device): the policy accelerate builds from scripts/accelerate/fsdp.yaml resolves and picks the 24 blocks."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from test_sft import sd35_medium_on_meta

    _, env = launch_args(ROOT / "scripts" / "accelerate" / "fsdp.yaml")
    for name, value in env.items():
        if name.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(name, value)
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # true asks for the GPU it broadcasts from; none here
    plugin = FullyShardedDataParallelPlugin()
    transformer = sd35_medium_on_meta()
    plugin.set_auto_wrap_policy(transformer)
    units = [name for name, module in transformer.named_modules()
             if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0)]
    assert len(units) == 24 and all(re.fullmatch(r"transformer_blocks\.\d+", name) for name in units)
    assert str(plugin.sharding_strategy).endswith("FULL_SHARD") and plugin.use_orig_params


# --------------------------------------------------------------------------------------- runs on two processes

# A smooth reward (the real LAION aesthetic head on a tiny random CLIP tower): JPEG sizes jump with the last bit of a
# pixel, so they would turn the floating-point order of a sum into different rewards.
REWARD = ["reward=aesthetic", "reward.clip.model=tiny-ViT-768", "reward.clip.pretrained=null"]
# AdamW's eps at 1e-6: with 1e-8, a weight whose gradient is near 1e-8 moves by lr x g / (|g| + eps), where the order of
# a sum decides much of g; 1e-6 keeps such weights from amplifying that order into lr-sized differences.
TINY_EVAL = ["algo.eval.every=1", "algo.eval.max_prompts=2", "algo.eval.num_inference_steps=2", "model=tiny",
             "cpu_threads=1", "algo.optim.eps=1e-6", *REWARD]
# Each algorithm's short run with the same global batch on one process (`one`) and on two (`two`).
PPO_RUN = ["algo.epochs=3", "algo.optim.lr=1e-3", "algo.sampling.prompts_per_epoch=2",
           "algo.sampling.images_per_prompt=4", "algo.sampling.batch_size=4", "algo.sampling.num_inference_steps=3",
           "algo.ppo.batch_size=2", "algo.ppo.optimizer_steps=2", *TINY_EVAL]
RUNS = {
    "grpo": {"run": ["algo=grpo", "algo.beta=0.04", "algo.ppo.clip_range=1e-2", *PPO_RUN], "one": [], "two": []},
    "ddpo": {"run": ["algo=ddpo", "algo.min_count=2", *PPO_RUN], "one": [], "two": []},
    "dpo_online": {
        "run": ["algo=dpo_online", "algo.epochs=3", "algo.optim.lr=1e-3", "algo.sampling.prompts_per_epoch=4",
                "algo.sampling.images_per_prompt=2", "algo.sampling.batch_size=2",
                "algo.sampling.num_inference_steps=2", "algo.train.batch_size=1", "algo.train.optimizer_steps=1",
                *TINY_EVAL],
        "one": [], "two": [],
    },
    "refl": {
        "run": ["algo=refl", "algo.train.max_steps=3", "algo.optim.lr=1e-3", "algo.train.batch_size=1",
                "algo.refl.num_inference_steps=4", "algo.refl.stop_range=[1,3]", *TINY_EVAL],
        "one": ["algo.train.gradient_accumulation_steps=2"], "two": ["algo.train.gradient_accumulation_steps=1"],
    },
}
NOT_COMPARED = ("time", "train/steps_per_second", "train/seconds", "train/cpu_seconds", "nonfinite")


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 1000), "-m", "rl.run"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got: Path, want: Path, absolute: float = 1e-5) -> None:
    """The final LoRA weights within 1e-5, and every logged number within 1e-4 relative or 1e-5 absolute: two processes
    sum gradients and diagnostics in another order (differences of about 1e-7 relative), and some numbers amplify
    that: advantages divide by the std of nearly equal rewards, DPO margins multiply differences of nearly equal
    errors by beta, losses and KLs are near-zero means of terms that cancel. (Online DPO's margins are beta = 100 times
    differences of float32 errors near 1, so they move in steps of about 1e-5: `absolute` is 1e-4 there.)"""
    a, b = records(got), records(want)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 4
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y), x["step"]
        for key, value in x.items():
            if key not in NOT_COMPARED and isinstance(value, (int, float)):
                assert value == pytest.approx(y[key], rel=1e-4, abs=absolute), (x["step"], key)
    weights = [load_file(d / "final" / "pytorch_lora_weights.safetensors") for d in (got, want)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=1e-5, atol=1e-5, msg=name)


def ranks(stderr: str) -> list[str]:
    return sorted(set(re.findall(r"rank (\d of \d) \(MULTI_CPU, gloo", stderr)))


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(RUNS))
def test_two_processes_train_what_one_process_trains(tmp_path, algo):
    """The same global batch on one process and on two (torchrun, gloo): the same metrics at every step and the same
    final weights, up to the order of floating-point sums."""
    case = RUNS[algo]
    one = subprocess.run([sys.executable, "-m", "rl.run", *case["run"], *case["one"],
                          f"hydra.run.dir={tmp_path / 'one'}"], cwd=ROOT, capture_output=True, text=True, env=ENV,
                         timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*torchrun(2), *case["run"], *case["two"], f"hydra.run.dir={tmp_path / 'two'}"],
                         cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    assert ranks(two.stdout + two.stderr) == ["0 of 2", "1 of 2"]  # two real ranks, not two single-process runs
    assert_same_run(tmp_path / "two", tmp_path / "one", absolute=1e-4 if algo == "dpo_online" else 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_both_launchers_start_two_ranks_that_write_one_run_directory(tmp_path, launcher):
    command = torchrun(2) if launcher == "torchrun" else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "scripts" / "accelerate" / "cpu_two_processes.yaml"), "--main_process_port",
        str(29600 + os.getpid() % 1000), "-m", "rl.run"]
    result = subprocess.run([*command, *RUNS["grpo"]["run"], "algo.epochs=2"], cwd=tmp_path, capture_output=True,
                            text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ranks(result.stdout + result.stderr) == ["0 of 2", "1 of 2"]
    run_dirs = list((tmp_path / "outputs" / "grpo").iterdir())  # named by the clock: one directory for both
    assert len(run_dirs) == 1
    logged = [(r["step"], tuple(sorted(k for k in r if k.startswith(("train/", "eval/")))))
              for r in records(run_dirs[0])]
    assert len(logged) == len(set(logged)) == 5  # the base evaluation, then a train and an eval record per epoch
    assert [r["train/samples"] for r in records(run_dirs[0]) if "train/samples" in r] == [8, 16]  # both ranks' images


@pytest.mark.slow
def test_a_two_process_run_killed_with_sigkill_resumes_to_the_uninterrupted_run(tmp_path):
    run = [*RUNS["grpo"]["run"], "algo.epochs=4", "algo.checkpoint.every=1"]
    whole = subprocess.run([*torchrun(2), *run, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=ROOT,
                           capture_output=True, text=True, env=ENV, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([*torchrun(2), *run, f"hydra.run.dir={killed_dir}"], cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (killed_dir / "checkpoints" / "step_000002").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, mid-epoch 3
    process.wait()
    assert not (killed_dir / "final").exists()
    resumed = subprocess.run([*torchrun(2), *run, f"hydra.run.dir={killed_dir}"], cwd=ROOT, capture_output=True,
                             text=True, env=ENV, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_run(killed_dir, tmp_path / "whole")
