"""DiffusionNFT (`algo=nft`) and AWM (`algo=awm`) end to end on the tiny model: the run contract, exact resume (the
old policy and the KL-EMA copy are restored), sampling with the old policy, and layout checks before loading."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_policy import context, records

from pipelines.errors import ConfigError
from rl import awm, nft
from rl.checkpoints import CheckpointConfig
from rl.evaluation import EvalConfig
from rl.lora import LoraSpec
from rl.matching import MatchingConfig
from rl.optim import OptimConfig
from rl.policy_copy import TrailingCopyConfig
from rl.rollouts import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "algo.epochs=2", "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=4",
    "algo.sampling.batch_size=8", "algo.sampling.num_inference_steps=4", "algo.train.batch_size=4",
    "algo.eval.every=1", "algo.eval.max_prompts=2", "algo.eval.num_inference_steps=4",
]


def small_configs(algo, **train):
    stratified = dict(timestep_order="stratified", stratified_steps=2, timestep_fraction=1.0) if algo is awm else {}
    return dict(
        sampling=SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=4,
                                guidance_scale=1.0, noise_level=0.0, solver="dpm2" if algo is nft else "euler"),
        train=MatchingConfig(batch_size=4, optimizer_steps=2, **{**stratified, **train}),
        lora=LoraSpec(rank=4),
        optim=OptimConfig(lr=1e-2),
        eval=EvalConfig(every=2, max_prompts=2, num_inference_steps=4),
    )


def config_class(algo):
    return {nft: nft.NFT, awm: awm.AWM}[algo]


@pytest.mark.slow  # the default suite runs both end to end in process (the resume tests below)
@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_cli_runs_end_to_end_with_the_run_directory_contract(tmp_path, algo):
    result = subprocess.run(
        [sys.executable, "-m", "rl.run", f"algo={algo}", "reward=jpeg_compressibility", "model=tiny", *SMALL,
         *(["algo.train.stratified_steps=2"] if algo == "awm" else []), f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = records(tmp_path)
    keys = set().union(*logged)
    required = {"train/reward_mean", "eval/reward_mean", "train/loss", "train/policy_loss", "train/kl",
                "train/grad_norm"}
    required |= {"train/old_deviation", "train/old_decay"} if algo == "nft" else {"train/kl_ema",
                                                                                   "train/ema_policy_decay"}
    assert required <= keys, required - keys
    assert [r["step"] for r in logged if "eval/reward_mean" in r] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in logged if "train/loss" in r)
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()
    piece = "old_policy.pt" if algo == "nft" else "ema_policy.pt"
    assert (tmp_path / "checkpoints" / "step_000002" / piece).exists()


@pytest.mark.parametrize("algo", [nft, awm], ids=["nft", "awm"])
def test_resume_after_a_stop_continues_the_curve(tmp_path, algo):
    """A run stopped after 2 of 4 epochs and resumed logs what the uninterrupted run logs: the old policy (NFT) and
    the trailing copy (AWM) come back from the checkpoint (a fresh copy of the resumed weights would change
    `old_deviation` / `ema_policy_deviation`, the samples and the losses)."""
    every_2, stop_after_2 = CheckpointConfig(every=2), CheckpointConfig(every=2, exit_after=2)
    extra = {"old_policy": TrailingCopyConfig(rate=0.3, cap=0.6)} if algo is nft else {
        "ema_policy": TrailingCopyConfig(rate=0.3, cap=0.6)}
    run = config_class(algo)
    run(epochs=4, checkpoint=every_2, **small_configs(algo), **extra)(context(tmp_path / "whole"))
    run(epochs=4, checkpoint=stop_after_2, **small_configs(algo), **extra)(context(tmp_path / "split"))
    assert not (tmp_path / "split" / "final").exists()
    run(epochs=4, checkpoint=every_2, **small_configs(algo), **extra)(context(tmp_path / "split"))
    whole, split = records(tmp_path / "whole"), records(tmp_path / "split")
    assert [r["step"] for r in whole] == [r["step"] for r in split]
    deviation = "train/old_deviation" if algo is nft else "train/ema_policy_deviation"
    assert [r[deviation] for r in whole if deviation in r][-1] > 0
    for a, b in zip(whole, split, strict=True):
        for key in ("train/reward_mean", "train/loss", "eval/reward_mean", deviation):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    seconds = [r["train/seconds"] for r in split if "train/seconds" in r]  # the training time goes on counting
    assert len(seconds) == 4 and seconds == sorted(seconds) and seconds[0] > 0
    a = load_file(tmp_path / "whole" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "final" / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_nft_samples_with_the_old_policy(tmp_path):
    """With a decay of 1 the old policy never leaves the initial weights: every epoch's rollouts are the base model's
    (the same rewards as a run whose weights barely move), while the trained weights, evaluated on held-out prompts,
    have moved. With a decay of 0 the old policy is the latest weights, and the rollouts change."""
    frozen_old = TrailingCopyConfig(rate=1.0, cap=1.0)  # eta = min(n, 1) = 1 from the first epoch on
    latest = TrailingCopyConfig(rate=0.0, cap=0.0)
    still = {**small_configs(nft), "optim": OptimConfig(lr=1e-12)}
    nft.NFT(epochs=2, old_policy=frozen_old, **small_configs(nft))(context(tmp_path / "frozen"))
    nft.NFT(epochs=2, old_policy=latest, **small_configs(nft))(context(tmp_path / "latest"))
    nft.NFT(epochs=2, old_policy=latest, **still)(context(tmp_path / "still"))

    def rewards(name, key="train/reward_mean"):
        return [r[key] for r in records(tmp_path / name) if key in r]

    assert rewards("frozen") == pytest.approx(rewards("still"), rel=1e-6)
    assert rewards("latest")[1:] != pytest.approx(rewards("still")[1:], rel=1e-4)
    assert rewards("frozen", "eval/reward_mean")[-1] != pytest.approx(rewards("still", "eval/reward_mean")[-1],
                                                                      rel=1e-4)


@pytest.mark.parametrize("lr", [1e-2, 1e-12])
def test_awm_later_optimiser_steps_compare_with_the_weights_before_the_update(tmp_path, monkeypatch, lr):
    """AWM's off-policy correction: 4 training forwards per epoch in 2 optimiser steps. The first step's micro-batches
    have l_old = sg(l) (ratio exactly 1); the second's l_old was computed before the epoch's update at the same noise
    and timestep, so their ratio moves off 1 once the weights move (lr 1e-2) and stays 1 when they do not (lr 1e-12)."""
    calls = []

    def recording(log_prob, old_log_prob, advantages, clip_range):
        calls.append(torch.exp(log_prob.detach() - old_log_prob))
        return real(log_prob, old_log_prob, advantages, clip_range)

    real = awm.awm_policy_loss
    monkeypatch.setattr(awm, "awm_policy_loss", recording)
    configs = {**small_configs(awm), "optim": OptimConfig(lr=lr)}
    awm.AWM(epochs=1, **configs)(context(tmp_path))
    assert len(calls) == 4
    assert all(torch.equal(ratio, torch.ones_like(ratio)) for ratio in calls[:2])
    later = torch.cat(calls[2:])
    if lr > 1e-6:
        assert (later - 1).abs().max() > 1e-4
    else:
        torch.testing.assert_close(later, torch.ones_like(later), rtol=0, atol=1e-5)


def test_layouts_are_checked_before_loading(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(ConfigError, match="stratified timesteps do not fit"):
        awm.AWM(**{**small_configs(awm), "train": MatchingConfig(timestep_order="stratified", stratified_steps=6)})(ctx)
    with pytest.raises(ConfigError, match="not a multiple of train.batch_size"):
        nft.NFT(**{**small_configs(nft), "train": MatchingConfig(batch_size=3)})(ctx)
    with pytest.raises(ConfigError, match="sde_window must be null"):
        nft.NFT(sampling=SamplingConfig(sde_window=2))
    with pytest.raises(ConfigError, match="solver must be one of"):
        SamplingConfig(solver="heun")
    assert not (tmp_path / "checkpoints").exists()


def test_training_seconds_leave_out_held_out_evaluations(tmp_path, monkeypatch):
    """`train/seconds` counts the training loop's wall time without the held-out evaluations: the evaluation after
    epoch 1, which takes over 3 s (a sleep), is not in epoch 2's count (a tiny epoch trains in well under a second)."""
    original = nft.held_out

    def slow(*args, **kwargs):
        time.sleep(3.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(nft, "held_out", slow)
    configs = {**small_configs(nft), "eval": EvalConfig(every=1, max_prompts=1, num_inference_steps=2)}
    nft.NFT(epochs=2, **configs)(context(tmp_path))
    seconds = [r["train/seconds"] for r in records(tmp_path) if "train/seconds" in r]
    assert len(seconds) == 2 and 0 < seconds[0] < seconds[1]
    assert seconds[1] - seconds[0] < 3.0  # epoch 2's training only, not the evaluation between the two epochs
