"""The PPO-clip update over stored transitions (GRPO, DDPO; `docs/algorithms.md` sections 2-3).

The update re-scores each stored transition under the current policy, compares it with the sampling policy's
log-probability (`rl.losses.ppo_clip_loss`) and adds whatever the algorithm passes as `extra_loss` (GRPO's KL to the
reference lives in `rl/grpo.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipelines import transition_log_probs
from pipelines.configs import check_values
from pipelines.errors import ConfigError
from pipelines.sde import sigmas_for_timesteps
from rl.batching import UpdateLayout, micro_batches, update_layout
from rl.losses import ppo_clip_loss, ratio_norm_log_ratio
from rl.rollouts import Rollouts, SamplingConfig, stochastic_step_count
from rl.session import Session, collect

# forward(index, column) -> (log_prob, mean, std_dev_t) of the chosen samples' chosen stochastic steps
Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# extra_loss(forward, index, column, mean, std_dev_t) -> (a term added to the loss, its diagnostics)
ExtraLoss = Callable[[Forward, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class PPOConfig:
    """The PPO-clip update over stored transitions (`algo.ppo`)."""

    clip_range: float = 1e-4  # tiny because log-probs are per-pixel means (Flow-GRPO, DDPO)
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip]
    timestep_fraction: float = 0.99  # fraction of the (stochastic) steps trained per sample
    timestep_order: str = "random"  # random: a random subset per sample, in random order (DDPO); first: the first
    #                                  steps of the trajectory, in order, never the last ones (Flow-GRPO)
    inner_epochs: int = 1  # passes over an epoch's samples
    batch_size: int = 8  # samples per training forward, per process
    optimizer_steps: int = 2  # optimiser steps per inner epoch (gradients accumulate in between)
    recompute_old_log_probs: bool = True  # old log-probs in the training layout: the first ratio is exactly 1
    gradient_checkpointing: bool = False  # recompute each transformer block in backward: less memory, more time
    ratio_norm: bool = False  # GRPO-Guard: the normalised ratio (RatioNorm) and each step's loss over its dt
    detach_unconditional: bool = False  # with guidance, the gradient reaches only the conditional half of the guided
    #                                     velocity (Flow-GRPO before 2025-08-19); false: both halves (Flow-GRPO, DDPO)

    def __post_init__(self):
        check_values("algo.ppo", self, positive=("clip_range", "adv_clip", "inner_epochs", "batch_size",
                                                "optimizer_steps"), fraction=("timestep_fraction",))
        if self.timestep_order not in ("random", "first"):
            raise ConfigError(f"algo.ppo.timestep_order must be random or first, got {self.timestep_order!r}")
        if self.ratio_norm and not self.recompute_old_log_probs:
            raise ConfigError("algo.ppo.ratio_norm=true compares with the behaviour policy's transition means, which "
                              "the re-scoring gives: set algo.ppo.recompute_old_log_probs=true")


def ppo_layout(sampling: SamplingConfig, ppo: PPOConfig, epochs: int) -> UpdateLayout:
    """The layout of a PPO method, with the batch sizes checked against each other before anything loads."""
    if ppo.ratio_norm and sampling.sde_type != "sde":
        raise ConfigError("algo.ppo.ratio_norm=true (GRPO-Guard) normalises the Gaussian SDE step's ratio: set "
                          "algo.sampling.sde_type=sde")
    num_sde = stochastic_step_count(sampling)
    return update_layout(sampling, ppo, epochs, max(1, int(num_sde * ppo.timestep_fraction)), "ppo")


@torch.no_grad()
def old_log_probs(forward, layouts: list[list[tuple[torch.Tensor, torch.Tensor]]], unchanged: int
                  ) -> list[list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """The behaviour policy's `(log-probs, transition means)` of each micro-batch of each inner epoch's layout,
    re-scored before any update; None where the training forward gives them: the first `unchanged` micro-batches (the
    first optimiser step's), which see the weights before they change."""
    return [[None if inner == 0 and position < unchanged else forward(index, column)[:2]
             for position, (index, column) in enumerate(layout)]
            for inner, layout in enumerate(layouts)]


def ppo_update(
    session: Session,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    sampling: SamplingConfig,
    ppo: PPOConfig,
    epoch: int,
    indices: list[int],
    extra_loss: ExtraLoss | None = None,
) -> dict[str, float]:
    """PPO-clip over this process's stored transitions (`session`: a `rl.session.Session`; `indices`: the global
    indices of the rollouts' rows, ascending); returns the mean diagnostics over all processes.

    Samples are shuffled, and each sample trains on `timestep_fraction` of its stochastic steps: its own random subset
    in random order (`timestep_order=random`), or the first ones in order (`first`), with a new layout for each inner
    epoch (`rl.batching.micro_batches`: drawn from the global sample index, so that N processes train what one
    does). The old log-probabilities are the sampling policy's in every inner epoch (re-scored in each layout before
    the first update, or the stored ones). Re-scoring runs only where it is needed: the micro-batches of the first
    optimiser step see unchanged weights, so their training forward's own (detached) log-probability is the old one.
    """
    accelerator, transformer = session.accelerator, session.transformer
    num_sde = len(rollouts.sde_steps)
    total = sampling.prompts_per_epoch * sampling.images_per_prompt
    row = {index: position for position, index in enumerate(indices)}
    stats: dict[str, list[torch.Tensor]] = {}

    def forward(index: torch.Tensor, column: torch.Tensor):
        steps = torch.tensor(rollouts.sde_steps, device=column.device)[column]
        negatives = rollouts.negative_prompt_embeds
        return transition_log_probs(
            transformer,
            rollouts.scheduler,
            rollouts.latents[index, steps].to(accelerator.device, non_blocking=True),  # a copy when kept on the CPU
            rollouts.latents[index, steps + 1].to(accelerator.device, non_blocking=True),
            rollouts.timesteps[steps],
            rollouts.prompt_embeds[index],
            rollouts.pooled_prompt_embeds[index],
            sampling.guidance_scale,
            sampling.noise_level,
            negatives[index] if negatives is not None else None,
            rollouts.negative_pooled_prompt_embeds[index] if negatives is not None else None,
            sde_type=sampling.sde_type,
            detach_unconditional=ppo.detach_unconditional,
        )

    device = rollouts.latents.device
    layouts = []  # per inner epoch: a list of (rows, per-sample step columns)
    for inner in range(ppo.inner_epochs):
        passes = micro_batches(indices, total, num_sde, ppo, session.ctx.seed, epoch, inner,
                               accelerator.num_processes, accelerator.process_index)
        layouts.append([(torch.tensor([row[i] for i in chunk], device=device), torch.tensor(column, device=device))
                        for chunk, column in passes])
    if ppo.recompute_old_log_probs:
        olds = old_log_probs(forward, layouts, unchanged=accelerator.gradient_accumulation_steps)
    else:
        olds = [[(rollouts.log_probs[index, column], None) for index, column in layout] for layout in layouts]

    for layout, layout_olds in zip(layouts, olds, strict=True):
        for (index, column), old in zip(layout, layout_olds, strict=True):
            with accelerator.accumulate(transformer):
                log_prob, mean, std_dev_t = forward(index, column)
                old_log_prob, old_mean = (log_prob.detach(), mean.detach()) if old is None else old
                if ppo.ratio_norm:  # GRPO-Guard (docs/algorithms.md section 8)
                    steps = torch.tensor(rollouts.sde_steps, device=column.device)[column]
                    sigma, sigma_next = sigmas_for_timesteps(rollouts.scheduler, rollouts.timesteps[steps])
                    dt = sigma - sigma_next
                    log_ratio = ratio_norm_log_ratio(log_prob, old_log_prob, mean, old_mean,
                                                     std_dev_t.reshape(-1) * dt.sqrt())
                    loss, step_stats = ppo_clip_loss(log_ratio, torch.zeros_like(log_ratio), advantages[index],
                                                     ppo.clip_range, weights=1 / dt)
                else:
                    loss, step_stats = ppo_clip_loss(log_prob, old_log_prob, advantages[index], ppo.clip_range)
                if extra_loss is not None:
                    extra, extra_stats = extra_loss(forward, index, column, mean, std_dev_t)
                    loss = loss + extra
                    step_stats.update(extra_stats)
                step_stats["loss"] = loss.detach()
                session.backward_and_step(loss, step_stats)
            collect(stats, step_stats)
    return {name: accelerator.reduce(torch.stack(values).mean(), "mean").item() for name, values in stats.items()}
