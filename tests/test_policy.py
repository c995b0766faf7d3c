"""GRPO and DDPO end to end on the tiny model: the run contract, the first PPO ratio, resume, and layout checks."""

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import huggingface_hub
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

import rl.ppo
from pipelines import load_pipeline
from pipelines.errors import ConfigError
from rewards.jpeg import JpegSizeReward
from rl import ddpo, grpo
from rl.checkpoints import CheckpointConfig
from rl.context import RunContext
from rl.evaluation import EvalConfig
from rl.lora import LoraSpec
from rl.optim import OptimConfig
from rl.ppo import PPOConfig
from rl.prompts import load_prompts
from rl.rollouts import SamplingConfig, epoch_jobs
from rl.tracking import LoggerConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "algo.epochs=2", "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=4",
    "algo.sampling.batch_size=8", "algo.sampling.num_inference_steps=4", "algo.ppo.batch_size=4",
    "algo.eval.every=1", "algo.eval.max_prompts=2", "algo.eval.num_inference_steps=4",
]


def context(run_dir, reward=None):
    return RunContext(
        run_dir=run_dir,
        seed=0,
        load_pipeline=partial(load_pipeline, None),
        train_prompts=load_prompts("simple_animals.txt", stop=6),
        eval_prompts=load_prompts("simple_animals.txt", start=36, stop=38),
        logger=LoggerConfig(),
        config={},
        reward=reward or JpegSizeReward(),
    )


def small_configs():
    return dict(
        sampling=SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=4),
        ppo=PPOConfig(batch_size=4, clip_range=1e-2),
        lora=LoraSpec(rank=4),
        optim=OptimConfig(lr=1e-2),
        eval=EvalConfig(every=2, max_prompts=2, num_inference_steps=4),
    )


def config_class(module):
    """The config of the algorithm in `module`, which runs it when called with a context."""
    return {grpo: grpo.GRPO, ddpo: ddpo.DDPO}[module]


def trained_sde_steps(monkeypatch, algo) -> list:
    """A list that collects the stochastic steps of each epoch's rollouts as `algo`'s PPO update receives them."""
    seen = []
    original = rl.ppo.ppo_update

    def spy(session, rollouts, *args, **kwargs):
        seen.append(rollouts.sde_steps)
        return original(session, rollouts, *args, **kwargs)

    monkeypatch.setattr(algo, "ppo_update", spy)
    return seen


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["grpo", pytest.param("ddpo", marks=pytest.mark.slow)])  # DDPO's: the slow suite
def test_cli_runs_end_to_end_with_the_run_directory_contract(tmp_path, algo):
    result = subprocess.run(
        [sys.executable, "-m", "rl.run", f"algo={algo}", "reward=jpeg_compressibility", "model=tiny", *SMALL,
         f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = records(tmp_path)
    keys = set().union(*logged)
    required = {"train/reward_mean", "train/reward_std", "eval/reward_mean", "train/loss", "train/approx_kl",
                "train/clipfrac"} | ({"train/kl"} if algo == "grpo" else set())
    assert required <= keys, required - keys
    assert [r["step"] for r in logged if "eval/reward_mean" in r] == [0, 1, 2]
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "samples" / "step_000002.png").exists()
    assert (tmp_path / "checkpoints" / "step_000002" / "done").exists()
    assert PIL.Image.open(tmp_path / "curves.png").size[0] > 0  # the held-out curves, plotted at the end
    # What final/ publishes: the LoRA in ComfyUI's layout, a hub model card, the last sample grid.
    assert (tmp_path / "final" / "comfyui_lora.safetensors").stat().st_size > 0
    card = huggingface_hub.ModelCard.load(tmp_path / "final" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0" and "lora" in card.data.tags
    assert card.data.algorithm == algo and card.data.reward == "jpeg_compressibility"
    start, end = (logged[0]["eval/reward_mean"], [r for r in logged if "eval/reward_mean" in r][-1]["eval/reward_mean"])
    assert f"| eval/reward_mean | {start:.4f} | {end:.4f} |" in card.text
    assert (tmp_path / "final" / "samples.png").read_bytes() == (tmp_path / "samples" / "step_000002.png").read_bytes()


@pytest.mark.parametrize("recompute", [True, False])
def test_first_inner_step_has_ratio_one(tmp_path, monkeypatch, recompute):
    calls = []
    original = rl.ppo.ppo_clip_loss

    def spy(log_prob, old_log_prob, advantages, clip_range):
        calls.append((log_prob.detach().clone(), old_log_prob.detach().clone()))
        return original(log_prob, old_log_prob, advantages, clip_range)

    monkeypatch.setattr(rl.ppo, "ppo_clip_loss", spy)
    configs = small_configs()
    configs["ppo"] = PPOConfig(batch_size=4, recompute_old_log_probs=recompute)
    grpo.GRPO(epochs=1, **configs)(context(tmp_path))
    log_prob, old = calls[0]
    ratio = torch.exp(log_prob - old)
    if recompute:
        assert torch.equal(ratio, torch.ones_like(ratio))  # the training layout re-scored before any update
    else:
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)  # sampled in other batches


@pytest.mark.parametrize("algo", [grpo, ddpo], ids=["grpo", "ddpo"])
def test_resume_after_a_stop_continues_the_curve(tmp_path, algo):
    extra = {"beta": 0.04} if algo is grpo else {"min_count": 2}
    every_2, stop_after_2 = CheckpointConfig(every=2), CheckpointConfig(every=2, exit_after=2)
    config_class(algo)(epochs=4, checkpoint=every_2, **small_configs(), **extra)(context(tmp_path / "whole"))
    config_class(algo)(epochs=4, checkpoint=stop_after_2, **small_configs(), **extra)(context(tmp_path / "split"))
    assert not (tmp_path / "split" / "final").exists()
    config_class(algo)(epochs=4, checkpoint=every_2, **small_configs(), **extra)(context(tmp_path / "split"))
    whole, split = records(tmp_path / "whole"), records(tmp_path / "split")
    assert [r["step"] for r in whole] == [r["step"] for r in split]
    for a, b in zip(whole, split, strict=True):
        for key in ("train/reward_mean", "train/loss", "eval/reward_mean"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    a = load_file(tmp_path / "whole" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "final" / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_full_fine_tuning_resumes_with_the_initial_weights_as_reference(tmp_path):
    """GRPO's KL compares with the weights the run started from, also after a resume (not the resumed weights)."""
    configs = {**small_configs(), "lora": None, "optim": OptimConfig(lr=1e-3)}
    every_2, stop_after_2 = CheckpointConfig(every=2), CheckpointConfig(every=2, exit_after=2)
    grpo.GRPO(epochs=4, beta=0.5, checkpoint=every_2, **configs)(context(tmp_path / "whole"))
    grpo.GRPO(epochs=4, beta=0.5, checkpoint=stop_after_2, **configs)(context(tmp_path / "split"))
    grpo.GRPO(epochs=4, beta=0.5, checkpoint=every_2, **configs)(context(tmp_path / "split"))
    whole, split = records(tmp_path / "whole"), records(tmp_path / "split")
    kl = [r["train/kl"] for r in whole if "train/kl" in r]
    assert kl[-1] > 0
    assert kl == pytest.approx([r["train/kl"] for r in split if "train/kl" in r], rel=1e-5, abs=1e-12)


def test_layout_and_reward_are_checked_before_loading(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(ConfigError, match="not a multiple of sampling.batch_size"):
        grpo.GRPO(sampling=SamplingConfig(prompts_per_epoch=3, images_per_prompt=3, batch_size=4))(ctx)
    with pytest.raises(ConfigError, match="3 training forwards per epoch do not split into 2 optimiser steps"):
        grpo.GRPO(
            sampling=SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=4),
            ppo=PPOConfig(batch_size=8, optimizer_steps=2),
        )(ctx)
    ctx.reward = None
    with pytest.raises(ConfigError, match="needs a reward"):
        ddpo.DDPO()(ctx)


def test_epoch_jobs_form_complete_groups_across_processes():
    sampling = SamplingConfig(prompts_per_epoch=3, images_per_prompt=4, same_initial_noise=True)
    ppo = PPOConfig(batch_size=2)
    shares = [epoch_jobs(10, 5, 0, sampling, ppo_share(sampling, ppo, 0, 5, 2, rank)) for rank in (0, 1)]
    jobs = shares[0] + shares[1]
    assert sorted(j.index for j in jobs) == list(range(12)) and len(shares[0]) == len(shares[1]) == 6
    assert all([j.index for j in share] == sorted(j.index for j in share) for share in shares)
    groups = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    assert all(len(g) == 4 and len({j.prompt_id for j in g}) == 1 for g in groups.values())
    assert all(len({j.noise_seed for j in g}) == 1 for g in groups.values())  # shared initial noise
    assert len({j.sde_seed for j in jobs}) == 12
    whole = epoch_jobs(10, 5, 0, sampling, list(range(12)))  # one process: the same images, seeds and prompts
    assert sorted(jobs, key=lambda j: j.index) == whole


def ppo_share(sampling, ppo, seed, epoch, num_processes, rank):
    from rl.batching import dealt_chunks

    chunks = dealt_chunks(seed, epoch, sampling.prompts_per_epoch * sampling.images_per_prompt, ppo.batch_size,
                          num_processes, rank)
    return sorted(i for _, chunk in chunks for i in chunk)


@pytest.mark.parametrize("order", ["random", "first"])
@pytest.mark.parametrize("num_processes", [2, 4])
def test_n_processes_train_in_each_optimiser_step_what_one_process_trains(order, num_processes):
    """The PPO layout is drawn from the global sample index: in each optimiser step of the first pass, the union over
    N processes of their (sample, step) micro-batches is one process's step, and every process trains only the samples
    it sampled. (Later passes, with inner_epochs > 1, shuffle each process's own samples.)"""
    from rl.batching import micro_batches

    sampling = SamplingConfig(prompts_per_epoch=4, images_per_prompt=4)  # 16 samples
    ppo = PPOConfig(batch_size=2, timestep_fraction=0.5, timestep_order=order, optimizer_steps=2)
    num_sde = 6  # 3 trained steps per sample; 8 chunks x 3 = 24 micro-batches, 12 per optimiser step on one process

    def steps(n: int, rank: int) -> list[set]:
        mine = ppo_share(sampling, ppo, 0, 3, n, rank)
        batches = micro_batches(mine, 16, num_sde, ppo, 0, 3, 0, n, rank)
        assert {i for chunk, _ in batches for i in chunk} == set(mine)  # it trains what it sampled, all of it
        per_step = len(batches) // ppo.optimizer_steps
        return [{(i, c) for chunk, columns in batches[k * per_step : (k + 1) * per_step]
                 for i, c in zip(chunk, columns, strict=True)} for k in range(ppo.optimizer_steps)]

    one = steps(1, 0)
    many = [steps(num_processes, rank) for rank in range(num_processes)]
    for k in range(ppo.optimizer_steps):
        assert set().union(*(m[k] for m in many)) == one[k] and len(one[k]) == 16 * 3 // 2
    assert one[0] != one[1]


def test_old_log_probs_are_re_scored_only_where_the_weights_changed(tmp_path, monkeypatch):
    """Before an update's first optimiser step the weights are the sampling ones: those micro-batches take the training
    forward's own log-prob as the old one, and only the later ones are re-scored without gradients."""
    import rl.ppo

    calls = {"no_grad": 0, "grad": 0}
    original = rl.ppo.transition_log_probs

    def counted(*args, **kwargs):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(rl.ppo, "transition_log_probs", counted)
    config = grpo.GRPO(epochs=1, beta=0.0, **{**small_configs(), "ppo": PPOConfig(batch_size=4, optimizer_steps=2)})
    config(context(tmp_path))
    # 8 samples in micro-batches of 4, 3 trained steps each (0.99 of 4): 6 training forwards, 3 per optimiser step;
    # before, every one of them was re-scored first (6 forwards without gradients).
    assert calls == {"grad": 6, "no_grad": 3}
    trained = next(r for r in records(tmp_path) if "train/ratio" in r)
    assert trained["train/ratio"] != 1.0  # the second step's ratios moved: its old log-probs are the sampling ones


def test_gradient_checkpointing_trains_the_same(tmp_path):
    """`algo.ppo.gradient_checkpointing` recomputes activations in backward: less memory, the same numbers."""
    runs = {}
    for on in (False, True):
        configs = small_configs()
        configs["ppo"] = PPOConfig(batch_size=4, clip_range=1e-2, gradient_checkpointing=on)
        grpo.GRPO(epochs=2, beta=0.04, **configs)(context(tmp_path / str(on)))
        runs[on] = [r for r in records(tmp_path / str(on)) if "train/loss" in r]
    for plain, checkpointed in zip(runs[False], runs[True], strict=True):
        for key in ("train/loss", "train/grad_norm", "train/kl", "train/reward_mean"):
            assert checkpointed[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-9), key


def test_later_inner_epochs_compare_with_the_sampling_policy(tmp_path, monkeypatch):
    """With two inner epochs, the second epoch's ratios are measured against the weights that sampled, so they move."""
    calls = []
    original = rl.ppo.ppo_clip_loss

    def spy(log_prob, old_log_prob, advantages, clip_range):
        calls.append(torch.exp(log_prob.detach() - old_log_prob.detach()))
        return original(log_prob, old_log_prob, advantages, clip_range)

    monkeypatch.setattr(rl.ppo, "ppo_clip_loss", spy)
    configs = small_configs()
    configs["ppo"] = PPOConfig(batch_size=4, inner_epochs=2, optimizer_steps=1, clip_range=0.2)
    grpo.GRPO(epochs=1, **configs)(context(tmp_path))
    per_epoch = len(calls) // 2
    assert all(torch.equal(r, torch.ones_like(r)) for r in calls[:per_epoch])  # one update per inner epoch
    assert any((r - 1).abs().max() > 0 for r in calls[per_epoch:])


@pytest.mark.parametrize("algo", [grpo, ddpo], ids=["grpo", "ddpo"])
def test_sde_window_samples_and_trains_only_its_steps(tmp_path, monkeypatch, algo):
    """With `sde_window=2`, both methods sample 2 stochastic steps in the trajectory's first half (ODE elsewhere) and
    PPO trains those steps only."""
    seen = []
    original = rl.ppo.ppo_update

    def spy(session, rollouts, *args, **kwargs):
        seen.append(rollouts)
        return original(session, rollouts, *args, **kwargs)

    monkeypatch.setattr(algo, "ppo_update", spy)
    configs = small_configs()
    configs["sampling"] = SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=4,
                                         sde_window=2, sde_window_range=0.5)
    configs["ppo"] = PPOConfig(batch_size=4, clip_range=1e-2, timestep_fraction=1.0)
    config_class(algo)(epochs=2, **configs)(context(tmp_path))
    assert [r.sde_steps for r in seen] == [[0, 1], [0, 1]]  # 0.5 x 4 steps hold exactly one window of 2
    assert all(r.log_probs.shape == (8, 2) for r in seen)
    assert all(r.latents.shape[1] == 5 for r in seen)  # the whole trajectory is kept


def test_cps_with_a_kl_term_trains_with_finite_losses(tmp_path, monkeypatch):
    """CPS's last step is deterministic (its std is 0): it is never scored or trained, and the KL under CPS has no
    division by the std, so GRPO with CPS and beta > 0 keeps finite losses and weights (it used to turn them NaN)."""
    seen = trained_sde_steps(monkeypatch, grpo)
    configs = small_configs()
    configs["sampling"] = SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=4,
                                         sde_type="cps", noise_level=0.8)
    configs["ppo"] = PPOConfig(batch_size=4, clip_range=1e-2, timestep_fraction=1.0, optimizer_steps=3)
    grpo.GRPO(epochs=2, beta=0.04, **configs)(context(tmp_path))
    assert seen == [[0, 1, 2], [0, 1, 2]]  # the last of 4 steps ends at sigma 0
    logged = [r for r in records(tmp_path) if "train/loss" in r]
    assert logged and all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"]) for r in logged)
    weights = load_file(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_timestep_order_first_trains_the_first_steps_in_order(tmp_path, monkeypatch):
    """`timestep_order=first` (Flow-GRPO) trains the first `timestep_fraction` of the steps, in order, never the
    last."""
    trained, schedules = [], []
    original_forward, original_update = rl.ppo.transition_log_probs, rl.ppo.ppo_update

    def forward(transformer, scheduler, latents, next_latents, timesteps, *args, **kwargs):
        trained.append(timesteps.clone())
        return original_forward(transformer, scheduler, latents, next_latents, timesteps, *args, **kwargs)

    def update(session, rollouts, *args, **kwargs):
        schedules.append(rollouts.timesteps)
        return original_update(session, rollouts, *args, **kwargs)

    monkeypatch.setattr(rl.ppo, "transition_log_probs", forward)
    monkeypatch.setattr(grpo, "ppo_update", update)
    configs = small_configs()
    configs["ppo"] = PPOConfig(batch_size=4, timestep_fraction=0.75, timestep_order="first", optimizer_steps=3)
    grpo.GRPO(epochs=1, beta=0.0, **configs)(context(tmp_path))
    # Training: 2 batches of 4 samples, 3 steps each, 2 micro-batches per optimiser step; before it, the re-scoring of
    # the 4 micro-batches after the first optimiser step (the first 2 see unchanged weights).
    assert len(trained) == 4 + 2 * 3
    for k, got in enumerate(trained[4:]):  # steps 0, 1, 2 for each batch; the last step (3) never
        assert torch.all(got == schedules[0][k % 3]), (k, got)
    for k, got in enumerate(trained[:4]):  # micro-batches 2 to 5 of that layout
        assert torch.all(got == schedules[0][(k + 2) % 3]), (k, got)


def test_grpo_guard_trains_with_the_normalised_ratio(tmp_path, monkeypatch):
    """`algo.ppo.ratio_norm=true` (GRPO-Guard): the ratio is 1 where the weights have not moved (the first optimiser
    step's micro-batches), the loss is weighted by 1/dt, and the run trains; CPS and stored old log-probs are
    refused before loading."""
    seen = []
    original = rl.ppo.ratio_norm_log_ratio

    def recorded(*args):
        log_ratio = original(*args)
        seen.append(log_ratio.detach())
        return log_ratio

    monkeypatch.setattr(rl.ppo, "ratio_norm_log_ratio", recorded)
    configs = small_configs()
    configs["ppo"] = PPOConfig(batch_size=4, clip_range=2e-6, optimizer_steps=2, ratio_norm=True)
    grpo.GRPO(epochs=1, beta=0.0, **configs)(context(tmp_path))
    assert len(seen) == 6  # 8 samples in micro-batches of 4, 3 trained steps each
    assert all(torch.equal(s, torch.zeros_like(s)) for s in seen[:3])  # before the first optimiser step
    assert any(s.abs().max() > 0 for s in seen[3:])  # after it the weights moved
    trained = next(r for r in records(tmp_path) if "train/loss" in r)
    assert math.isfinite(trained["train/loss"]) and trained["train/grad_norm"] > 0
    with pytest.raises(ConfigError, match="recompute_old_log_probs=true"):
        PPOConfig(ratio_norm=True, recompute_old_log_probs=False)
    cps = {**small_configs(), "ppo": PPOConfig(batch_size=4, ratio_norm=True)}
    cps["sampling"] = SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=4,
                                     sde_type="cps")
    with pytest.raises(ConfigError, match="sde_type=sde"):
        grpo.GRPO(epochs=1, **cps)(context(tmp_path / "cps"))


def test_sliding_window_start_by_hand():
    """MixGRPO's window: from step 0, one step further every `every` epochs, back to 0 past the last start."""
    from rl.rollouts import sliding_window_start

    starts = [sliding_window_start(epoch, every=2, stride=1, last_start=2) for epoch in range(8)]
    assert starts == [0, 0, 1, 1, 2, 2, 0, 0]
    assert [sliding_window_start(e, every=1, stride=2, last_start=4) for e in range(4)] == [0, 2, 4, 1]
    assert {sliding_window_start(e, every=3, stride=0, last_start=9) for e in range(20)} == {0}  # Flash*: fixed


@pytest.mark.parametrize("algo", [grpo, ddpo], ids=["grpo", "ddpo"])
def test_a_sliding_sde_window_moves_along_the_trajectory_and_only_it_trains(tmp_path, monkeypatch, algo):
    """`sde_window_schedule=sliding` (MixGRPO): with 6 steps and a window of 2 the window starts at 0, 1, 2 (the last
    window, steps 2-3, keeps clear of the last two steps, as MixGRPO's), then 0 again, moving every epoch here; PPO
    trains those steps only."""
    seen = trained_sde_steps(monkeypatch, algo)
    configs = small_configs()
    configs["sampling"] = SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=6,
                                         sde_window=2, sde_window_schedule="sliding", sde_window_every=1)
    configs["ppo"] = PPOConfig(batch_size=4, clip_range=1e-2, timestep_fraction=1.0)
    configs["eval"] = EvalConfig(every=0)
    config_class(algo)(epochs=4, **configs)(context(tmp_path))
    assert seen == [[0, 1], [1, 2], [2, 3], [0, 1]]
    with pytest.raises(ConfigError, match="sde_window_schedule must be random or sliding"):
        SamplingConfig(sde_window=2, sde_window_schedule="forward")


def test_mixgrpo_flash_regrids_after_the_window_and_trains_only_the_window(tmp_path, monkeypatch):
    """MixGRPO-Flash (`sampling.flash_ratio`): with 8 steps and a sliding window of 2, the steps up to the window's
    last (L) keep their sigmas and the rest become int((8 - L) * 0.5) - 1 DPM-Solver++ steps from sigma[L + 1] to 0;
    only the window's steps are stochastic, scored and trained, and their stored transitions re-score to the sampled
    log-probabilities (the first PPO ratio is 1)."""
    import pipelines.pipeline_sd3_logprob as pipeline_module

    seen, ratios, dpm_steps = [], [], []
    original_update, original_loss = rl.ppo.ppo_update, rl.ppo.ppo_clip_loss
    original_dpm = pipeline_module.dpm_solver_pp_2m_step

    def dpm(sample, x0, x0_previous, sigma_previous, sigma, sigma_next):
        dpm_steps.append((sigma, x0_previous is not None))
        return original_dpm(sample, x0, x0_previous, sigma_previous, sigma, sigma_next)

    def update(session, rollouts, *args, **kwargs):
        seen.append(rollouts)
        return original_update(session, rollouts, *args, **kwargs)

    def loss(log_prob, old_log_prob, *args, **kwargs):
        ratios.append(torch.exp(log_prob - old_log_prob).detach())
        return original_loss(log_prob, old_log_prob, *args, **kwargs)

    monkeypatch.setattr(grpo, "ppo_update", update)
    monkeypatch.setattr(rl.ppo, "ppo_clip_loss", loss)
    monkeypatch.setattr(pipeline_module, "dpm_solver_pp_2m_step", dpm)
    configs = small_configs()
    configs["sampling"] = SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8, num_inference_steps=8,
                                         sde_window=2, sde_window_schedule="sliding", sde_window_every=1,
                                         flash_ratio=0.5)
    configs["ppo"] = PPOConfig(batch_size=4, clip_range=1e-2, timestep_fraction=1.0, recompute_old_log_probs=False)
    configs["eval"] = EvalConfig(every=0)
    grpo.GRPO(epochs=2, **configs)(context(tmp_path))
    reference = load_pipeline(None).scheduler
    reference.set_timesteps(8)
    for rollouts, window in zip(seen, [[0, 1], [1, 2]], strict=True):
        last = window[-1]
        assert rollouts.sde_steps == window
        steps = last + 1 + int((8 - last) * 0.5) - 1  # 4 then 5: L = 1 -> 2 + 2; L = 2 -> 3 + 2
        assert len(rollouts.timesteps) == steps and rollouts.latents.shape[1] == steps + 1
        torch.testing.assert_close(rollouts.scheduler.sigmas[: last + 2], reference.sigmas[: last + 2])
        assert rollouts.log_probs.shape == (8, 2)
    # DPM-Solver++ takes exactly the steps after the window (one sampling batch per epoch), the first of them with
    # the window's last data prediction as its history; the evaluation (every=0: none) and the window use no DPM step
    expected = [(float(s), True) for r in seen for s in r.scheduler.sigmas[r.sde_steps[-1] + 1 : -1]]
    assert dpm_steps == expected
    # stored log-probs (recompute_old_log_probs=false) against the first optimiser step's training forward
    first_step = torch.cat(ratios[:2])  # 2 chunks x 2 steps in 2 optimiser steps: 2 micro-batches each
    torch.testing.assert_close(first_step, torch.ones_like(first_step), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="set algo.sampling.sde_window too"):
        SamplingConfig(flash_ratio=0.4)
