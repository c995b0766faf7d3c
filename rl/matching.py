"""The update of the methods that train on final images with a flow-matching-style loss: DiffusionNFT (`rl/nft.py`)
and AWM (`rl/awm.py`); `docs/algorithms.md` section 10.

Neither needs the trajectory or a log-probability: each rollout keeps its final latent `x0` only. The update re-noises
it, `x_t = (1 - t) x0 + t eps`, with fresh noise at some of the sampler's own timesteps, and the method's loss compares
velocities there. `matching_update` runs an epoch's micro-batches in the online methods' layout
(`rl.batching.micro_batches`: N processes train in each optimiser step what one process trains with the same global
batch) and asks the method for the loss of each micro-batch; the noise of a sample depends only on the run's seed, the
epoch, the pass, the sample and the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipelines import guided_velocity
from pipelines.configs import check_values
from pipelines.errors import ConfigError
from rl import seeds
from rl.batching import micro_batches
from rl.losses import awm_timestep_indices
from rl.rollouts import Rollouts, SamplingConfig
from rl.session import Session, collect


@dataclass
class MatchingConfig:
    """How an epoch's final images are trained (`algo.train` of `algo=nft` and `algo=awm`)."""

    batch_size: int = 8  # samples per training forward, per process
    timestep_order: str = "random"  # random: each sample its own random subset of the sampler's steps, shuffled
    #                                  (DiffusionNFT); first: the first steps in order; stratified: one step per
    #                                  stratum (AWM)
    timestep_fraction: float = 0.99  # random / first: the fraction of the steps trained per sample (9 of 10);
    #                                   stratified: the strata cover this first fraction of the steps
    stratified_steps: int = 6  # stratified: steps (strata) per sample (AWM: 6 of 14)
    skip_first_step: bool = True  # stratified: never train step 0, at sigma 1 (AWM's discrete_wo_init); image-to-
    #                               image's first step is below sigma 1: false trains it too
    inner_epochs: int = 1  # passes over an epoch's samples
    optimizer_steps: int = 1  # optimiser steps per pass (DiffusionNFT: 1, OCR 2; AWM: 1)
    gradient_checkpointing: bool = False  # recompute each transformer block in backward: less memory, more time
    detach_unconditional: bool = False  # with guidance (both references train without it), the gradient reaches
    #                                     only the conditional half of the guided velocity

    def __post_init__(self):
        check_values("algo.train", self, positive=("batch_size", "stratified_steps", "inner_epochs",
                                                  "optimizer_steps"), fraction=("timestep_fraction",))
        if self.timestep_order not in ("random", "first", "stratified"):
            raise ConfigError(f"algo.train.timestep_order must be random, first or stratified, got "
                              f"{self.timestep_order!r}")

    def steps_per_sample(self, num_steps: int) -> int:
        """How many of a sampler's `num_steps` steps each sample trains (checked before anything loads)."""
        if self.timestep_order == "stratified":
            awm_timestep_indices(num_steps, self.stratified_steps, torch.zeros(self.stratified_steps),
                                 self.timestep_fraction, self.skip_first_step)  # raises if the strata do not fit
            return self.stratified_steps
        return max(1, int(num_steps * self.timestep_fraction))

    def draw_columns(self, num_steps: int) -> Callable[[int, torch.Generator], torch.Tensor] | None:
        """For `stratified`: each sample's steps, one per stratum (a draw per sample, where AWM shares one draw across
        a micro-batch); None for the orders `rl.batching.micro_batches` draws itself."""
        if self.timestep_order != "stratified":
            return None

        def draw(total: int, generator: torch.Generator) -> torch.Tensor:
            u = torch.rand(total, self.stratified_steps, generator=generator)
            return torch.stack([awm_timestep_indices(num_steps, self.stratified_steps, row, self.timestep_fraction,
                                                     self.skip_first_step) for row in u])

        return draw


@dataclass
class NoisedBatch:
    """One micro-batch: this process's rows of the rollouts, their final latents re-noised at their steps."""

    rows: torch.Tensor  # rows of the rollouts (B,)
    x0: torch.Tensor  # the final latents, float32
    noise: torch.Tensor
    noisy: torch.Tensor  # x_t = (1 - t) x0 + t eps
    sigmas: torch.Tensor  # t (B,)
    timesteps: torch.Tensor  # the transformer's timesteps, 1000 t (B,)
    velocity: Callable[[], torch.Tensor]  # the transformer's velocity at `noisy` under the weights in place
    old: torch.Tensor | None = None  # `old_fn`'s value before the epoch's update; None where the weights are unchanged


def matching_update(
    session: Session,
    rollouts: Rollouts,
    train: MatchingConfig,
    sampling: SamplingConfig,
    epoch: int,
    indices: list[int],
    loss_fn: Callable[[NoisedBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    old_fn: Callable[[NoisedBatch], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train on this process's final latents (`rollouts.latents[:, -1]`; `indices`: the global indices of the
    rollouts' rows, ascending) with `loss_fn(batch) -> (loss, diagnostics)`; returns the mean diagnostics over all
    processes. The velocity uses the sampling's guidance scale (DiffusionNFT and AWM train without guidance: 1).

    With `old_fn` (AWM's off-policy correction), `old_fn(batch)` is computed without gradients for every micro-batch
    before the epoch's first update, at the same noise and timesteps as its training forward, and handed to `loss_fn`
    as `batch.old`; the micro-batches of the first optimiser step see unchanged weights and get None (their training
    forward's own value, detached, is the old one), as the PPO update's re-scoring (`rl.ppo.old_log_probs`)."""
    accelerator, transformer, seed = session.accelerator, session.transformer, session.ctx.seed
    final = rollouts.latents[:, -1]
    timesteps = rollouts.timesteps
    num_steps = len(timesteps)
    # the steps taken are the schedule's last ones (image-to-image skips the first): step i's sigma is this [i]
    sigmas = rollouts.scheduler.sigmas[-(num_steps + 1):].to(timesteps.device, torch.float32)
    total = sampling.prompts_per_epoch * sampling.images_per_prompt
    row = {index: position for position, index in enumerate(indices)}
    negatives = rollouts.negative_prompt_embeds

    def noised(inner: int, chunk: list[int], column: list[int]) -> NoisedBatch:
        rows = torch.tensor([row[i] for i in chunk], device=final.device)
        steps = torch.tensor(column, device=timesteps.device)
        x0 = final[rows].to(accelerator.device, torch.float32)
        noise = torch.stack([
            torch.randn(x0.shape[1:], generator=seeds.generator(seeds.training_noise(seed, epoch, inner, i, c)))
            for i, c in zip(chunk, column, strict=True)
        ]).to(x0.device)
        t = sigmas[steps].to(x0.device)
        noisy = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise

        def velocity() -> torch.Tensor:
            return guided_velocity(
                transformer, noisy, timesteps[steps].to(noisy.device), rollouts.prompt_embeds[rows],
                rollouts.pooled_prompt_embeds[rows], sampling.guidance_scale,
                negatives[rows] if negatives is not None else None,
                rollouts.negative_pooled_prompt_embeds[rows] if negatives is not None else None,
                detach_unconditional=train.detach_unconditional,
            ).float()

        return NoisedBatch(rows, x0, noise, noisy, t, timesteps[steps], velocity)

    layouts = [micro_batches(indices, total, num_steps, train, seed, epoch, inner, accelerator.num_processes,
                             accelerator.process_index, train.draw_columns(num_steps))
               for inner in range(train.inner_epochs)]
    olds: list[list[torch.Tensor | None]] = [[None] * len(layout) for layout in layouts]
    if old_fn is not None:
        unchanged = accelerator.gradient_accumulation_steps  # the first optimiser step's micro-batches
        with torch.no_grad():
            olds = [[None if inner == 0 and position < unchanged else old_fn(noised(inner, chunk, column))
                     for position, (chunk, column) in enumerate(layout)] for inner, layout in enumerate(layouts)]
    stats: dict[str, list[torch.Tensor]] = {}
    for inner, layout in enumerate(layouts):
        for (chunk, column), old in zip(layout, olds[inner], strict=True):
            batch = noised(inner, chunk, column)
            batch.old = old
            with accelerator.accumulate(transformer):
                loss, step_stats = loss_fn(batch)
                step_stats["loss"] = loss.detach()
                session.backward_and_step(loss, step_stats)
            collect(stats, step_stats)
    return {name: accelerator.reduce(torch.stack(values).mean(), "mean").item() for name, values in stats.items()}
