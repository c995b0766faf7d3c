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

from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipelines.configs import check_values
from pipelines.errors import ConfigError
from rl import seeds
from rl.batching import UpdateLayout, dealt_chunks, group_images
from rl.checkpoints import CheckpointConfig
from rl.context import RunContext
from rl.data import DataError
from rl.evaluation import EvalConfig, held_out
from rl.losses import best_worst_pairs, dpo_loss, flow_matching_loss, sample_training_timesteps
from rl.preferences import PreferenceData, PreferenceDataset, collate_pairs
from rl.rollouts import SamplingConfig, epoch_metrics, sample_epoch
from rl.session import Session, TrainingConfig, collect, open_session
from rl.supervised import Encoder, LossConfig, batches


@dataclass
class DPOTrainConfig:
    """Steps and batches of offline DPO (`algo.train`)."""

    max_steps: int = 2000  # optimiser steps
    batch_size: int = 1  # pairs per process and micro-batch
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_sequence_length: int = 77  # T5 tokens
    log_every: int = 1
    eval_every: int = 100  # steps between held-out evaluations (pairs, and the reward if one is configured)
    eval_batch_size: int = 8
    eval_repeats: int = 4  # noise draws per held-out pair (the implicit reward is an expectation over them)

    def __post_init__(self):
        check_values("algo.train", self, positive=("max_steps", "batch_size", "gradient_accumulation_steps",
                                                  "max_sequence_length", "log_every", "eval_batch_size",
                                                  "eval_repeats"), at_least_zero=("eval_every",))


@dataclass
class OnlineTrainConfig:
    """The update on each epoch's pairs (`algo.train` of `dpo_online`)."""

    inner_epochs: int = 1  # passes over an epoch's pairs
    batch_size: int = 4  # pairs per training forward, per process
    optimizer_steps: int = 1  # optimiser steps per pass (gradients accumulate in between)
    gradient_checkpointing: bool = False  # recompute each transformer block in backward: less memory, more time

    def __post_init__(self):
        check_values("algo.train", self, positive=("inner_epochs", "batch_size", "optimizer_steps"))


@dataclass(frozen=True)
class NoisedPairs:
    """A batch of pairs' latents stacked `[winners; losers]`, noised with one noise and one sigma per pair."""

    latents: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor


def noised_pair(
    winner: torch.Tensor, loser: torch.Tensor, scheduler, loss: LossConfig, generator: torch.Generator
) -> NoisedPairs:
    """The pairs' latents stacked `[winners; losers]`, noised with one noise and one sigma per pair."""
    noise = torch.randn(winner.shape, generator=generator, device=winner.device, dtype=winner.dtype)
    timesteps, sigmas = sample_training_timesteps(
        scheduler, winner.shape[0], loss.weighting_scheme, loss.logit_mean, loss.logit_std, loss.mode_scale, generator
    )
    latents, noise = torch.cat([winner, loser]), torch.cat([noise, noise])
    timesteps, sigmas = torch.cat([timesteps, timesteps]), torch.cat([sigmas, sigmas])
    s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
    return NoisedPairs(latents, noise, (1 - s) * latents + s * noise, timesteps, sigmas)


def pair_errors(
    transformer: torch.nn.Module, batch: NoisedPairs, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
    loss: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pair flow-matching errors of winners and losers (`L(w)`, `L(l)`), each (B,)."""
    prediction = transformer(
        hidden_states=batch.noisy,
        timestep=batch.timesteps,
        encoder_hidden_states=torch.cat([prompt_embeds, prompt_embeds]),
        pooled_projections=torch.cat([pooled, pooled]),
        return_dict=False,
    )[0]
    errors = flow_matching_loss(
        prediction, batch.latents, batch.noise, batch.noisy, batch.sigmas, loss.weighting_scheme,
        loss.precondition_outputs,
    )
    return errors.chunk(2)


def dpo_step(
    transformer: torch.nn.Module,
    reference,
    batch: NoisedPairs,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    *,
    loss: LossConfig,
    beta: float,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of a batch of noised pairs against the reference (`reference()`: a context in which the
    transformer is the reference policy); `keep` masks pairs out (tied groups carry no preference)."""
    model_w, model_l = pair_errors(transformer, batch, prompt_embeds, pooled, loss)
    with torch.no_grad(), reference():
        reference_w, reference_l = pair_errors(transformer, batch, prompt_embeds, pooled, loss)
    if keep is None:
        return dpo_loss(model_w, model_l, reference_w, reference_l, beta)
    if not keep.any():  # every pair tied: nothing to learn, but every process still takes part in the step (with
        # the same diagnostics, NaN here, so that the processes reduce the same names)
        _, stats = dpo_loss(model_w, model_l, reference_w, reference_l, beta)
        return (model_w + model_l).sum() * 0.0, {name: torch.full_like(v, torch.nan) for name, v in stats.items()}
    return dpo_loss(model_w[keep], model_l[keep], reference_w[keep], reference_l[keep], beta)


# --------------------------------------------------------------------------------------------------------- offline


@dataclass(kw_only=True)
class OfflineDPO(TrainingConfig):
    """`algo=dpo` (conf/algo/dpo.yaml): Diffusion-DPO on a preference dataset, and the session's options."""

    beta: float = 5000.0
    loss: LossConfig = field(default_factory=lambda: LossConfig(weighting_scheme="none"))
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100))

    def __post_init__(self):
        check_values("algo", self, positive=("beta",))
        if self.eval.every_seconds:
            raise ConfigError("algo.eval.every_seconds: offline DPO evaluates every algo.train.eval_every steps (its "
                              "held-out pairs, and held-out prompts when a reward is set), not at seconds marks; set "
                              "it to 0")

    def __call__(self, ctx: RunContext) -> None:
        run_offline(ctx, self)


def run_offline(ctx: RunContext, config: OfflineDPO) -> None:
    """Diffusion-DPO on `ctx.data`, a `PreferenceData` (data=preferences or data=pickapic)."""
    loss, train = config.loss, config.train
    if not isinstance(ctx.data, PreferenceData):
        raise DataError("algo=dpo needs preference pairs: data=preferences data.path=<folder> or data=pickapic")
    pairs, held_out_pairs = ctx.data.load()

    # 1. Load and prepare; the reference policy; resume.
    s = open_session(ctx, config, total_steps=train.max_steps, accumulation=train.gradient_accumulation_steps,
                     gradient_checkpointing=train.gradient_checkpointing, reference=True)
    accelerator, state = s.accelerator, s.state
    reference = s.reference_policy()
    encoder = Encoder(s.pipe, train.max_sequence_length)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(s.pipe.scheduler.config)
    data = batches(pairs, train.batch_size, s, collate_fn=collate_pairs)

    def evaluate(step: int, force: bool = False) -> None:
        if force or (train.eval_every and (step % train.eval_every == 0 or step == train.max_steps)):
            evaluate_offline(s, config, reference, encoder, scheduler, held_out_pairs, step)

    # 2. Train: pairs -> latents -> DPO loss against the reference -> step; log, checkpoint, evaluate (first: the
    # start, or on a resume the step whose evaluation failed).
    samples_per_step = train.batch_size * train.gradient_accumulation_steps * accelerator.num_processes
    for _ in s.steps("dpo", first=lambda step: evaluate(step, force=True)):
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(train.gradient_accumulation_steps):
            batch = next(data)
            generator = seeds.training_step(ctx.seed, seeds.global_micro_batch(
                state.micro_batches, accelerator.num_processes, accelerator.process_index), accelerator.device)
            state.micro_batches += 1
            with accelerator.accumulate(s.transformer):
                winner = encoder.latents(batch["winner"].to(accelerator.device), batch["keys"], generator)
                loser = encoder.latents(batch["loser"].to(accelerator.device), batch["keys"], generator)
                prompt_embeds, pooled = encoder.text(batch["captions"], batch["keys"])
                noised = noised_pair(winner, loser, scheduler, loss, generator)
                total, step_stats = dpo_step(s.transformer, reference, noised, prompt_embeds, pooled, loss=loss,
                                             beta=config.beta)
                s.backward_and_step(total, step_stats)
            collect(stats, {**step_stats, "loss": total})
        if s.end_step(stats, samples_per_step, train.log_every, evaluate):
            return
    s.finish()


@torch.no_grad()
def evaluate_offline(s: Session, config: OfflineDPO, reference, encoder: Encoder, scheduler,
                     held_out_pairs: PreferenceDataset, step: int) -> None:
    """The held-out pairs' implicit accuracy, reward margin and loss at fixed noise and sigmas (the same at every
    evaluation, with EMA weights when kept); then the reward on held-out prompts when a reward is configured."""
    if s.accelerator.is_main_process:
        with s.ema_weights():
            transformer = s.accelerator.unwrap_model(s.transformer)
            metrics = held_out_pair_metrics(transformer, reference, encoder, scheduler, held_out_pairs,
                                            config=config, seed=s.ctx.seed)
        s.accelerator.log(metrics, step=step)
    s.accelerator.wait_for_everyone()
    if s.reward is not None:
        held_out(s, config.eval, step, force=True)


def held_out_pair_metrics(
    transformer, reference, encoder: Encoder, scheduler, held_out_pairs: PreferenceDataset, *, config: OfflineDPO,
    seed: int,
) -> dict[str, float]:
    """DPO diagnostics over all held-out pairs. Each pair's errors are averaged over `train.eval_repeats` fixed draws
    of noise, sigma and VAE sample (a steadier estimate of the expectation the implicit reward is defined by), then
    compared."""
    loss, batch_size, repeats = config.loss, config.train.eval_batch_size, config.train.eval_repeats
    device = next(transformer.parameters()).device
    errors: list[torch.Tensor] = []  # per batch: (4, B) model_w, model_l, reference_w, reference_l
    for start in range(0, len(held_out_pairs), batch_size):
        indices = range(start, min(start + batch_size, len(held_out_pairs)))
        batch = collate_pairs([held_out_pairs[(i, 0, seed)] for i in indices])
        prompt_embeds, pooled = encoder.text(batch["captions"], batch["keys"])
        total = 0
        for repeat in range(repeats):
            generator = seeds.held_out_pairs(seed, start, repeat, device)
            winner = encoder.latents(batch["winner"].to(device), batch["keys"], generator)
            loser = encoder.latents(batch["loser"].to(device), batch["keys"], generator)
            noised = noised_pair(winner, loser, scheduler, loss, generator)
            model = pair_errors(transformer, noised, prompt_embeds, pooled, loss)
            with reference():
                ref = pair_errors(transformer, noised, prompt_embeds, pooled, loss)
            total = total + torch.stack([*model, *ref])
        errors.append(total / repeats)
    model_w, model_l, reference_w, reference_l = torch.cat(errors, dim=1)
    value, stats = dpo_loss(model_w, model_l, reference_w, reference_l, config.beta)
    return {f"eval/{name}": number.item() for name, number in {"loss": value, **stats}.items()}


# ---------------------------------------------------------------------------------------------------------- online


@dataclass(kw_only=True)
class OnlineDPO(TrainingConfig):
    """`algo=dpo_online` (conf/algo/dpo_online.yaml): DPO on each epoch's best and worst images, and the session's
    options."""

    epochs: int = 100
    beta: float = 100.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: OnlineTrainConfig = field(default_factory=OnlineTrainConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig(weighting_scheme="none"))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_values("algo", self, positive=("epochs", "beta"))

    def __call__(self, ctx: RunContext) -> None:
        run_online(ctx, self)


def run_online(ctx: RunContext, config: OnlineDPO) -> None:
    """Online DPO for `epochs` epochs: sample groups, pair each group's best and worst image, train on the pairs."""
    sampling, train, eval = config.sampling, config.train, config.eval
    ctx.require_reward("dpo_online")
    if sampling.sde_window is not None:
        raise ConfigError("online DPO trains on final images and samples every step alike; "
                          "algo.sampling.sde_window must be null")
    layout = online_layout(sampling, train, config.epochs)
    s = open_session(ctx, config, total_steps=config.epochs, unit="epoch", layout=layout, reference=True,
                     gradient_checkpointing=train.gradient_checkpointing)
    reference = s.reference_policy()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(s.pipe.scheduler.config)
    for epoch in s.steps("dpo_online", first=lambda step: held_out(s, eval, step, force=True)):
        # 1. Sample whole groups on each process (ODE with noise_level 0, or the SDE), and score them: the groups of
        # the pair batches this process trains in the first pass (dealt from the global group order).
        chunks = dealt_chunks(ctx.seed, epoch, sampling.prompts_per_epoch, train.batch_size,
                              s.accelerator.num_processes, s.accelerator.process_index)
        samples = sample_epoch(s, sampling, epoch, None, group_images(chunks, sampling.images_per_prompt))
        if not s.rewards_usable(samples.all_rewards):  # NaN or infinite: nothing stores or trains on them
            metrics = epoch_metrics(samples, {}, s, epoch + 1)
            if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
                return
            continue

        # 2. Pairs: the best and the worst image of each group.
        rewards = samples.rewards
        groups = torch.tensor([job.group for job in samples.jobs], device=rewards.device)
        winners, losers, valid = best_worst_pairs(rewards, groups)

        # 3. Train on the pairs' final latents.
        stats = online_update(s, config, reference, scheduler, samples.rollouts, (winners, losers, valid), epoch,
                              chunks)

        # 4. Log; evaluate on held-out prompts every few epochs; checkpoint.
        stats["reward_gap"] = s.accelerator.reduce((rewards[winners] - rewards[losers]).mean(), "mean").item()
        metrics = epoch_metrics(samples, stats, s, epoch + 1)
        if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
            return
    s.finish()


def online_layout(sampling: SamplingConfig, train: OnlineTrainConfig, epochs: int) -> UpdateLayout:
    """Samples per process, micro-batches per optimiser step, optimiser steps in all; each process must hold whole
    groups, so that it can pair them without gathering latents. Checked before anything loads."""
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
    return UpdateLayout(local, forwards // train.optimizer_steps, epochs * train.inner_epochs * train.optimizer_steps)


def online_update(s: Session, config: OnlineDPO, reference, scheduler, rollouts, pairs: tuple, epoch: int,
                  chunks: list[tuple[int, list[int]]]) -> dict[str, float]:
    """DPO over this process's `pairs` (winner and loser indices, and whether the group had a preference; one per
    group, in ascending group order) in micro-batches; tied groups are masked out of the loss. The first pass trains
    `chunks` (the dealt pair batches: global batch number, groups), later passes this process's groups in each pass's
    permutation of all groups; each pair batch draws its noise from its global position in that pass."""
    accelerator, train = s.accelerator, config.train
    winners, losers, valid = pairs
    groups = sorted(group for _, chunk in chunks for group in chunk)
    pair_of = {group: position for position, group in enumerate(groups)}
    final = rollouts.latents[:, -1].to(accelerator.device)  # the final latents (on the CPU with rollouts_on_cpu)
    stats: dict[str, list[torch.Tensor]] = {}
    for inner in range(train.inner_epochs):
        if inner == 0:
            batches = [(number * train.batch_size, chunk) for number, chunk in chunks]
        else:
            order = torch.randperm(config.sampling.prompts_per_epoch,
                                   generator=seeds.update_order(s.ctx.seed, epoch, inner)).tolist()
            mine = [group for group in order if group in pair_of]
            batches = [(start, mine[start : start + train.batch_size])
                       for start in range(0, len(mine), train.batch_size)]
        for start, batch_groups in batches:
            chosen = torch.tensor([pair_of[group] for group in batch_groups], device=winners.device)
            batch_number = seeds.online_pair_batch(epoch, inner, train.inner_epochs, start)
            generator = seeds.training_step(s.ctx.seed, batch_number, accelerator.device)
            w, lose = winners[chosen], losers[chosen]
            with accelerator.accumulate(s.transformer):
                batch = noised_pair(final[w], final[lose], scheduler, config.loss, generator)
                total, step_stats = dpo_step(s.transformer, reference, batch, rollouts.prompt_embeds[w],
                                             rollouts.pooled_prompt_embeds[w], loss=config.loss, beta=config.beta,
                                             keep=valid[chosen])
                s.backward_and_step(total, step_stats)
            collect(stats, {**step_stats, "loss": total})
    # The mean over every process's micro-batches; a batch of tied pairs only (NaN diagnostics) is left out of it.
    return {name: accelerator.gather(torch.stack(values)).nanmean().item() for name, values in stats.items()}
