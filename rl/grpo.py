"""`algo=grpo`: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) for SD3 / SD3.5 (`docs/algorithms.md` section 2).

Each epoch: (1) sample a group of G images per prompt with the SDE sampler, recording log-probabilities, and score
them; (2) advantages relative to each group, after gathering every process's rewards; (3) PPO-clip updates over the
stored transitions with classifier-free guidance, plus a KL term to the reference policy (the adapter disabled);
(4) log; every few epochs (and before the first), evaluate held-out prompts with ODE sampling at fixed seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipelines.configs import check_values
from pipelines.errors import ConfigError
from rl.batching import image_indices
from rl.context import RunContext
from rl.evaluation import EvalConfig, held_out
from rl.losses import group_advantages, kl_to_reference
from rl.ppo import ExtraLoss, PPOConfig, ppo_layout, ppo_update
from rl.rollouts import SamplingConfig, epoch_metrics, sample_epoch, sde_window
from rl.session import TrainingConfig, open_session


def kl_penalty(beta: float, reference: Callable, sde_type: str) -> ExtraLoss:
    """GRPO's `beta * KL(policy || reference)` on the trained transitions, added to the PPO loss."""

    def term(forward, index, column, mean, std_dev_t):
        with torch.no_grad(), reference():
            _, reference_mean, _ = forward(index, column)
        kl = kl_to_reference(mean, reference_mean, std_dev_t, sde_type).mean()
        return beta * kl, {"kl": kl.detach()}

    return term


@dataclass(kw_only=True)
class GRPO(TrainingConfig):
    """`algo=grpo` (conf/algo/grpo.yaml): GRPO's own options, and the session's (`TrainingConfig`)."""

    epochs: int = 100
    beta: float = 0.04  # the weight of the KL to the reference
    advantage_std: Literal["global", "group"] = "global"  # normalise advantages by the std of all rewards ("global") or
    #                                                       of each group
    advantage_ddof: int = 0  # the std divides by n - ddof: 0 as Flow-GRPO, 1 the unbiased std
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_values("algo", self, positive=("epochs",), at_least_zero=("beta",))
        if self.sampling.images_per_prompt < 2:
            raise ConfigError("GRPO compares the images of a group: algo.sampling.images_per_prompt must be at least 2 "
                              "(with 1 every advantage is 0 and nothing is trained)")

    def __call__(self, ctx: RunContext) -> None:
        run(ctx, self)


def run(ctx: RunContext, config: GRPO) -> None:
    """Train with GRPO for `config.epochs` epochs."""
    sampling, ppo, eval = config.sampling, config.ppo, config.eval
    ctx.require_reward("grpo")
    layout = ppo_layout(sampling, ppo, config.epochs)
    s = open_session(ctx, config, total_steps=config.epochs, unit="epoch", layout=layout,
                     gradient_checkpointing=ppo.gradient_checkpointing, prompts_only=True, reference=config.beta > 0)
    kl = kl_penalty(config.beta, s.reference_policy(), sampling.sde_type) if config.beta > 0 else None
    for epoch in s.steps("grpo", first=lambda step: held_out(s, eval, step, force=True)):
        # 1. Sample this process's share of G images for each of the epoch's prompts, and score them.
        samples = sample_epoch(s, sampling, epoch, sde_window(sampling, ctx.seed, epoch),
                               image_indices(sampling, ppo.batch_size, ctx.seed, epoch))
        if not s.rewards_usable(samples.all_rewards):  # NaN or infinite: nothing stores or trains on them
            metrics = epoch_metrics(samples, {}, s, epoch + 1)
            if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
                return
            continue

        # 2. Advantages within complete groups, over every process's rewards.
        advantages = group_advantages(samples.all_rewards, samples.all_groups, config.advantage_std,
                                      clip=ppo.adv_clip, ddof=config.advantage_ddof)
        advantages = samples.local(advantages)

        # 3. Train: PPO-clip with the KL to the reference policy.
        stats = ppo_update(s, samples.rollouts, advantages, sampling, ppo, epoch, samples.indices, extra_loss=kl)

        # 4. Log; evaluate on held-out prompts every few epochs; checkpoint.
        metrics = epoch_metrics(samples, stats, s, epoch + 1)
        if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
            return

    # The adapter (or weights) in diffusers' format; the EMA weights when kept.
    s.finish()
