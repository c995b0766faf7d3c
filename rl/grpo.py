"""`algo=grpo`: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) for SD3 / SD3.5 (`docs/algorithms.md` section 2).

Each epoch: (1) sample a group of G images per prompt with the SDE sampler, recording log-probabilities; (2) score
them; (3) advantages relative to each group, after gathering every process's rewards; (4) PPO-clip updates over the
stored transitions with classifier-free guidance, plus a KL term to the reference policy (the adapter disabled);
(5) log; (6) every few epochs (and before the first), evaluate held-out prompts with ODE sampling at fixed seeds.
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from rl.context import RunContext
from rl.losses import group_advantages
from rl.lora import LoraSpec
from rl.policy import (
    EvalConfig,
    PPOConfig,
    SamplingConfig,
    epoch_jobs,
    end_epoch,
    epoch_metrics,
    finish,
    gather_rewards,
    local_slice,
    ppo_layout,
    maybe_evaluate,
    ppo_update,
    reference_policy,
    sample_rollouts,
    require_reward,
    score,
    sde_window,
    setup,
)
from rl.sft import EmaConfig
from rl.trainer import OptimConfig


def run(
    ctx: RunContext,
    *,
    epochs: int = 100,
    beta: float = 0.04,
    advantage_std: str = "global",
    sampling: SamplingConfig | None = None,
    ppo: PPOConfig | None = None,
    lora: LoraSpec | None = None,
    optim: OptimConfig | None = None,
    eval: EvalConfig | None = None,
    ema: EmaConfig | None = None,
    checkpoint_every: int = 10,
    keep_checkpoints: int | None = 3,
    resume: bool = True,
    exit_after_epochs: int | None = None,
) -> None:
    """Train with GRPO for `epochs` epochs; `beta` weighs the KL to the reference, `advantage_std` is "global" or
    "group"."""
    sampling, ppo, optim = sampling or SamplingConfig(), ppo or PPOConfig(), optim or OptimConfig()
    eval, ema = eval or EvalConfig(), ema or EmaConfig()
    require_reward(ctx, "grpo")
    local, accumulation, updates = ppo_layout(sampling, ppo, epochs)
    s = setup(ctx, lora, optim, local, accumulation, updates, ema.decay if ema.enabled else None, checkpoint_every,
              keep_checkpoints, resume)
    reference = reference_policy(s, lora) if beta > 0 else None
    start = s.state.step
    if start == 0:
        maybe_evaluate(ctx, s, eval, 0, epochs, force=True)  # the base model's held-out reward: the curve's start
    for epoch in trange(start, epochs, initial=start, total=epochs, desc="grpo",
                        disable=not s.accelerator.is_local_main_process):
        # 1. Sample: this process's share of G images for each of the epoch's prompts.
        jobs = epoch_jobs(len(ctx.train_prompts), epoch, ctx.seed, sampling, s.accelerator.num_processes,
                          s.accelerator.process_index)
        rollouts, images = sample_rollouts(s.pipe, ctx.train_prompts, jobs, sampling, sde_window(sampling, ctx.seed, epoch))

        # 2. Reward.
        metadata = [ctx.train_prompts[job["prompt_id"]].metadata for job in jobs]
        rewards, info = score(s.reward, images, rollouts.prompts, metadata)

        # 3. Advantages within complete groups, after gathering every process's rewards.
        groups = torch.tensor([job["group"] for job in jobs], device=rewards.device)
        all_rewards, all_groups = gather_rewards(s, rewards, groups)
        advantages = local_slice(s, group_advantages(all_rewards, all_groups, advantage_std, clip=ppo.adv_clip))

        # 4. Train: PPO-clip with the KL to the reference policy.
        stats = ppo_update(
            s.accelerator, s.transformer, rollouts, advantages, sampling, ppo, s.optimizer,
            s.lr_scheduler, s.parameters, optim.max_grad_norm, ctx.seed, epoch, kl_beta=beta, reference=reference,
        )

        # 5. Log; 6. evaluate on held-out prompts every few epochs; checkpoint.
        metrics = epoch_metrics(all_rewards, info, stats, s, epoch + 1)
        if end_epoch(ctx, s, metrics, eval, epoch, epochs, checkpoint_every, start, exit_after_epochs):
            return

    # The adapter (or weights) in diffusers' format; the EMA weights when kept.
    finish(ctx, s, lora)
