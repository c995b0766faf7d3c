"""`algo=dpo` (offline) and `algo=dpo_online`: Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908) for flow
matching (`docs/algorithms.md` section 4).

Both train on pairs (winner, loser) of one prompt: the two latents are noised with the same noise at the same sigma,
the trained model's and the reference's flow-matching errors are compared, and `rl.losses.dpo_loss` rewards the model
for lowering its error on the winner more than the reference does. The reference is the base model, the LoRA adapter
disabled (a frozen copy for full fine-tuning), without gradients.

- **Offline** (`run_offline`): pairs from a preference dataset (`rl.preferences.PreferenceData`, Pick-a-Pic's
  columns); a step loop like `algo=sft`; held-out pairs give the implicit accuracy curve.
- **Online** (`run_online`): each epoch samples a group of images per prompt, scores them with the reward, and pairs
  the best with the worst of each group (Flow-GRPO's online DPO); held-out prompts give the reward curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm, trange

from rl.config import ConfigError
from rl.context import RunContext
from rl.data import DataError, EpochBatchSampler
from rl.losses import best_worst_pairs, dpo_loss, flow_matching_loss, sample_training_timesteps
from rl.lora import LoraSpec
from rl.policy import (
    EvalConfig,
    SamplingConfig,
    backward_and_step,
    collect,
    end_epoch,
    end_step,
    epoch_jobs,
    epoch_metrics,
    finish,
    gather_rewards,
    maybe_evaluate,
    reference_policy,
    require_reward,
    sample_rollouts,
    score,
    setup,
)
from rl.preferences import PreferenceData, PreferenceDataset, collate_pairs
from rl.sft import EmaConfig, Encoder, LossConfig
from rl.trainer import OptimConfig, step_generator


@dataclass
class DPOTrainConfig:
    """Steps and batches of offline DPO (`algo.train`)."""

    max_steps: int = 2000  # optimiser steps
    batch_size: int = 1  # pairs per process and micro-batch
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_sequence_length: int = 77  # T5 tokens
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int | None = 3
    resume: bool = True
    exit_after_steps: int | None = None  # stop this invocation after N steps, as a kill would (resume later)
    eval_every: int = 100  # steps between held-out evaluations (pairs, and the reward if one is configured)
    eval_batch_size: int = 8
    eval_repeats: int = 4  # noise draws per held-out pair (the implicit reward is an expectation over them)


@dataclass
class OnlineTrainConfig:
    """The update on each epoch's pairs (`algo.train` of `dpo_online`)."""

    inner_epochs: int = 1  # passes over an epoch's pairs
    batch_size: int = 4  # pairs per training forward, per process
    optimizer_steps: int = 1  # optimiser steps per pass (gradients accumulate in between)


def noised_pair(
    winner: torch.Tensor, loser: torch.Tensor, scheduler, loss: LossConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The pair's latents stacked `[winners; losers]`, noised with one noise and one sigma per pair."""
    noise = torch.randn(winner.shape, generator=generator, device=winner.device, dtype=winner.dtype)
    timesteps, sigmas = sample_training_timesteps(
        scheduler, winner.shape[0], loss.weighting_scheme, loss.logit_mean, loss.logit_std, loss.mode_scale, generator
    )
    latents, noise = torch.cat([winner, loser]), torch.cat([noise, noise])
    timesteps, sigmas = torch.cat([timesteps, timesteps]), torch.cat([sigmas, sigmas])
    s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
    return {"latents": latents, "noise": noise, "noisy": (1 - s) * latents + s * noise, "timesteps": timesteps,
            "sigmas": sigmas}


def pair_errors(
    transformer: torch.nn.Module, batch: dict, prompt_embeds: torch.Tensor, pooled: torch.Tensor, loss: LossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pair flow-matching errors of winners and losers (`L(w)`, `L(l)`), each (B,)."""
    prediction = transformer(
        hidden_states=batch["noisy"],
        timestep=batch["timesteps"],
        encoder_hidden_states=torch.cat([prompt_embeds, prompt_embeds]),
        pooled_projections=torch.cat([pooled, pooled]),
        return_dict=False,
    )[0]
    errors = flow_matching_loss(
        prediction, batch["latents"], batch["noise"], batch["noisy"], batch["sigmas"], loss.weighting_scheme,
        loss.precondition_outputs,
    )
    return errors.chunk(2)


def dpo_step(
    transformer: torch.nn.Module,
    reference,
    winner: torch.Tensor,
    loser: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    scheduler,
    loss: LossConfig,
    beta: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of a batch of pairs (latents of winners and losers, the shared prompt embeddings)."""
    batch = noised_pair(winner, loser, scheduler, loss, generator)
    model_w, model_l = pair_errors(transformer, batch, prompt_embeds, pooled, loss)
    with torch.no_grad(), reference():
        reference_w, reference_l = pair_errors(transformer, batch, prompt_embeds, pooled, loss)
    return dpo_loss(model_w, model_l, reference_w, reference_l, beta)


# --------------------------------------------------------------------------------------------------------- offline


def run_offline(
    ctx: RunContext,
    *,
    beta: float = 5000.0,
    lora: LoraSpec | None = None,
    optim: OptimConfig | None = None,
    loss: LossConfig | None = None,
    train: DPOTrainConfig | None = None,
    eval: EvalConfig | None = None,
    ema: EmaConfig | None = None,
) -> None:
    """Diffusion-DPO on `ctx.data`, a `PreferenceData` (data=preferences or data=pickapic)."""
    optim, loss, train = optim or OptimConfig(), loss or LossConfig(weighting_scheme="none"), train or DPOTrainConfig()
    eval, ema = eval or EvalConfig(), ema or EmaConfig()
    if not isinstance(ctx.data, PreferenceData):
        raise DataError("algo=dpo needs preference pairs: data=preferences data.path=<folder> or data=pickapic")
    pairs, held_out = ctx.data.load()

    # 1. Load and prepare; the reference policy; resume.
    s = setup(ctx, lora, optim, train.batch_size, train.gradient_accumulation_steps, train.max_steps,
              ema.decay if ema.enabled else None, train.checkpoint_every, train.keep_checkpoints, train.resume,
              gradient_checkpointing=train.gradient_checkpointing)
    accelerator, state = s.accelerator, s.state
    reference = reference_policy(s, lora)
    encoder = Encoder(s.pipe, False, False, train.max_sequence_length, False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(s.pipe.scheduler.config)
    sampler = EpochBatchSampler(len(pairs), train.batch_size, ctx.seed, accelerator.num_processes,
                                accelerator.process_index, start=state.micro_batches)
    batches = iter(DataLoader(pairs, batch_sampler=sampler, collate_fn=collate_pairs))
    if state.step == 0:
        evaluate_offline(ctx, s, reference, encoder, scheduler, held_out, loss, beta, eval, train, 0)

    # 2. Train: pairs -> latents -> DPO loss against the reference -> step; log, checkpoint, evaluate.
    progress = tqdm(total=train.max_steps, initial=state.step, desc="dpo",
                    disable=not accelerator.is_local_main_process)
    samples_per_step = train.batch_size * train.gradient_accumulation_steps * accelerator.num_processes
    started, steps_this_run = time.time(), 0

    def evaluate(step: int) -> None:
        if train.eval_every and (step % train.eval_every == 0 or step == train.max_steps):
            evaluate_offline(ctx, s, reference, encoder, scheduler, held_out, loss, beta, eval, train, step)

    while state.step < train.max_steps:
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(train.gradient_accumulation_steps):
            batch = next(batches)
            generator = step_generator(ctx.seed, state.micro_batches, accelerator.process_index, accelerator.device)
            state.micro_batches += 1
            with accelerator.accumulate(s.transformer):
                winner = encoder.latents(batch["winner"].to(accelerator.device), batch["keys"], generator)
                loser = encoder.latents(batch["loser"].to(accelerator.device), batch["keys"], generator)
                prompt_embeds, pooled = encoder.text(batch["captions"], batch["keys"])
                total, step_stats = dpo_step(s.transformer, reference, winner, loser, prompt_embeds, pooled,
                                             scheduler, loss, beta, generator)
                backward_and_step(s, total, optim.max_grad_norm, step_stats)
            collect(stats, {**step_stats, "loss": total})
        steps_this_run += 1
        if end_step(s, stats, train, samples_per_step, started, steps_this_run, evaluate, progress):
            return
    progress.close()
    finish(ctx, s, lora)


@torch.no_grad()
def evaluate_offline(ctx, s, reference, encoder, scheduler, held_out: PreferenceDataset, loss: LossConfig, beta: float,
                     eval: EvalConfig, train: DPOTrainConfig, step: int) -> None:
    """The held-out pairs' implicit accuracy, reward margin and loss at fixed noise and sigmas (the same at every
    evaluation, with EMA weights when kept); then the reward on held-out prompts when a reward is configured."""
    if s.accelerator.is_main_process:
        if s.ema is not None:
            s.ema.store(s.parameters)
            s.ema.copy_to(s.parameters)
        transformer = s.accelerator.unwrap_model(s.transformer)
        metrics = held_out_pair_metrics(transformer, reference, encoder, scheduler, held_out, loss, beta, ctx.seed,
                                        train.eval_batch_size, train.eval_repeats)
        if s.ema is not None:
            s.ema.restore(s.parameters)
        s.accelerator.log(metrics, step=step)
    s.accelerator.wait_for_everyone()
    if s.reward is not None:
        maybe_evaluate(ctx, s, eval, step, train.max_steps, force=True, unit="step")


def held_out_pair_metrics(
    transformer, reference, encoder: Encoder, scheduler, held_out: PreferenceDataset, loss: LossConfig, beta: float,
    seed: int, batch_size: int, repeats: int,
) -> dict[str, float]:
    """DPO diagnostics over all held-out pairs. Each pair's errors are averaged over `repeats` fixed draws of noise,
    sigma and VAE sample (a steadier estimate of the expectation the implicit reward is defined by), then compared."""
    device = next(transformer.parameters()).device
    errors: list[torch.Tensor] = []  # per batch: (4, B) model_w, model_l, reference_w, reference_l
    for start in range(0, len(held_out), batch_size):
        batch = collate_pairs([held_out[(i, 0, seed)] for i in range(start, min(start + batch_size, len(held_out)))])
        prompt_embeds, pooled = encoder.text(batch["captions"], batch["keys"])
        total = 0
        for repeat in range(repeats):
            generator = torch.Generator(device).manual_seed(seed + 20_000_003 + start * 1_009 + repeat)
            winner = encoder.latents(batch["winner"].to(device), batch["keys"], generator)
            loser = encoder.latents(batch["loser"].to(device), batch["keys"], generator)
            noised = noised_pair(winner, loser, scheduler, loss, generator)
            model = pair_errors(transformer, noised, prompt_embeds, pooled, loss)
            with reference():
                ref = pair_errors(transformer, noised, prompt_embeds, pooled, loss)
            total = total + torch.stack([*model, *ref])
        errors.append(total / repeats)
    model_w, model_l, reference_w, reference_l = torch.cat(errors, dim=1)
    value, stats = dpo_loss(model_w, model_l, reference_w, reference_l, beta)
    return {f"eval/{name}": number.item() for name, number in {"loss": value, **stats}.items()}


# ---------------------------------------------------------------------------------------------------------- online


def run_online(
    ctx: RunContext,
    *,
    epochs: int = 100,
    beta: float = 100.0,
    sampling: SamplingConfig | None = None,
    train: OnlineTrainConfig | None = None,
    loss: LossConfig | None = None,
    lora: LoraSpec | None = None,
    optim: OptimConfig | None = None,
    eval: EvalConfig | None = None,
    ema: EmaConfig | None = None,
    checkpoint_every: int = 10,
    keep_checkpoints: int | None = 3,
    resume: bool = True,
    exit_after_epochs: int | None = None,
) -> None:
    """Online DPO for `epochs` epochs: sample groups, pair each group's best and worst image, train on the pairs."""
    sampling, train, optim = sampling or SamplingConfig(), train or OnlineTrainConfig(), optim or OptimConfig()
    loss, eval, ema = loss or LossConfig(weighting_scheme="none"), eval or EvalConfig(), ema or EmaConfig()
    require_reward(ctx, "dpo_online")
    local, accumulation = online_layout(sampling, train)
    s = setup(ctx, lora, optim, local, accumulation, epochs * train.inner_epochs * train.optimizer_steps,
              ema.decay if ema.enabled else None, checkpoint_every, keep_checkpoints, resume)
    reference = reference_policy(s, lora)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(s.pipe.scheduler.config)
    start = s.state.step
    if start == 0:
        maybe_evaluate(ctx, s, eval, 0, epochs, force=True)  # the base model's held-out reward: the curve's start
    for epoch in trange(start, epochs, initial=start, total=epochs, desc="dpo_online",
                        disable=not s.accelerator.is_local_main_process):
        # 1. Sample whole groups on each process (ODE with noise_level 0, or the SDE).
        jobs = epoch_jobs(len(ctx.train_prompts), epoch, ctx.seed, sampling, s.accelerator.num_processes,
                          s.accelerator.process_index)
        rollouts, images = sample_rollouts(s.pipe, ctx.train_prompts, jobs, sampling, None)

        # 2. Reward; 3. pairs: the best and the worst image of each group.
        metadata = [ctx.train_prompts[job["prompt_id"]].metadata for job in jobs]
        rewards, info = score(s.reward, images, rollouts.prompts, metadata)
        groups = torch.tensor([job["group"] for job in jobs], device=rewards.device)
        winners, losers, valid = best_worst_pairs(rewards, groups)
        all_rewards, _ = gather_rewards(s, rewards, groups)

        # 4. Train on the pairs' final latents.
        stats = online_update(ctx, s, reference, rollouts, winners, losers, valid, scheduler, loss, train, beta,
                              optim.max_grad_norm, epoch)

        # 5. Log; 6. evaluate on held-out prompts every few epochs; checkpoint.
        stats["reward_gap"] = s.accelerator.reduce((rewards[winners] - rewards[losers]).mean(), "mean").item()
        metrics = epoch_metrics(all_rewards, info, stats, s, epoch + 1)
        if end_epoch(ctx, s, metrics, eval, epoch, epochs, checkpoint_every, start, exit_after_epochs):
            return
    finish(ctx, s, lora)


def online_layout(sampling: SamplingConfig, train: OnlineTrainConfig) -> tuple[int, int]:
    """Samples per process and micro-batches per optimiser step; each process must hold whole groups, so that it can
    pair them without gathering latents. Checked before anything loads."""
    from accelerate import PartialState

    num_processes = PartialState().num_processes
    groups = sampling.prompts_per_epoch
    if groups % num_processes:
        raise ConfigError(f"sampling.prompts_per_epoch={groups} groups do not split over {num_processes} processes")
    local = groups // num_processes * sampling.images_per_prompt
    if local % sampling.batch_size:
        raise ConfigError(f"{local} images per process are not a multiple of sampling.batch_size={sampling.batch_size}")
    if sampling.images_per_prompt < 2:
        raise ConfigError("online DPO pairs images of one prompt: sampling.images_per_prompt must be at least 2")
    pairs = groups // num_processes
    if pairs % train.batch_size:
        raise ConfigError(f"{pairs} pairs per process are not a multiple of train.batch_size={train.batch_size}")
    forwards = pairs // train.batch_size
    if forwards % train.optimizer_steps:
        raise ConfigError(
            f"{forwards} training forwards per epoch do not split into {train.optimizer_steps} optimiser steps"
        )
    return local, forwards // train.optimizer_steps


def online_update(ctx, s, reference, rollouts, winners, losers, valid, scheduler, loss: LossConfig,
                  train: OnlineTrainConfig, beta: float, max_grad_norm: float, epoch: int) -> dict[str, float]:
    """DPO over this process's pairs in micro-batches; tied groups (no preference) are masked out of the loss."""
    accelerator = s.accelerator
    final = rollouts.latents[:, -1]
    stats: dict[str, list[torch.Tensor]] = {}
    for inner in range(train.inner_epochs):
        order = torch.randperm(len(winners), generator=torch.Generator().manual_seed(
            (ctx.seed * 1_000_003 + epoch) * 101 + inner * 7 + accelerator.process_index)).to(winners.device)
        for start in range(0, len(order), train.batch_size):
            chosen = order[start : start + train.batch_size]
            generator = step_generator(ctx.seed, (epoch * train.inner_epochs + inner) * 1_000 + start,
                                       accelerator.process_index, accelerator.device)
            w, l = winners[chosen], losers[chosen]
            keep = valid[chosen]
            with accelerator.accumulate(s.transformer):
                batch = noised_pair(final[w], final[l], scheduler, loss, generator)
                model_w, model_l = pair_errors(s.transformer, batch, rollouts.prompt_embeds[w],
                                               rollouts.pooled_prompt_embeds[w], loss)
                with torch.no_grad(), reference():
                    reference_w, reference_l = pair_errors(s.transformer, batch, rollouts.prompt_embeds[w],
                                                           rollouts.pooled_prompt_embeds[w], loss)
                if keep.any():
                    total, step_stats = dpo_loss(model_w[keep], model_l[keep], reference_w[keep], reference_l[keep],
                                                 beta)
                else:  # every group tied: nothing to learn, but every process still takes part in the step
                    total, step_stats = (model_w + model_l).sum() * 0.0, {}
                backward_and_step(s, total, max_grad_norm, step_stats)
            collect(stats, {**step_stats, "loss": total})
    return {name: accelerator.reduce(torch.stack(values).mean(), "mean").item() for name, values in stats.items()}
