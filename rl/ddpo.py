"""`algo=ddpo`: DDPO (Black et al. 2023, arXiv 2305.13301) for SD3 / SD3.5 (`docs/algorithms.md` section 3).

DDPO's original step is DDIM for epsilon-prediction models; on a flow-matching model it must be the flow SDE step of
section 1, which this uses (the same sampler as GRPO). What is DDPO's own: advantages from a per-prompt stat tracker
(each prompt's recent rewards) instead of groups, and no KL term. Each epoch: sample, score, advantages, PPO-clip
updates, log, and held-out evaluation every few epochs. Like GRPO, it can sample with an SDE window (only those steps
stochastic and trained; `sampling.sde_window`), which DDPO's paper does not have.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from tqdm.auto import trange

from rl.context import RunContext
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
    sample_rollouts,
    require_reward,
    score,
    sde_window,
    setup,
)
from rl.sft import EmaConfig
from rl.trainer import OptimConfig


class PerPromptStatTracker:
    """DDPO's advantage estimator: `A = (r - mean_prompt) / (std_prompt + 1e-6)` over a buffer of each prompt's last
    `buffer_size` rewards; until a prompt has `min_count` rewards, the batch's mean and std stand in."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        prompts, rewards = np.asarray(prompts), np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mask = prompts == prompt
            buffer = self.buffers.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {"buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(values, maxlen=self.buffer_size) for p, values in state["buffers"].items()}


def run(
    ctx: RunContext,
    *,
    epochs: int = 100,
    buffer_size: int = 32,
    min_count: int = 16,
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
    """Train with DDPO for `epochs` epochs; `buffer_size` and `min_count` configure the per-prompt stat tracker."""
    sampling, ppo, optim = sampling or SamplingConfig(), ppo or PPOConfig(), optim or OptimConfig()
    eval, ema = eval or EvalConfig(), ema or EmaConfig()
    tracker = PerPromptStatTracker(buffer_size, min_count)
    require_reward(ctx, "ddpo")
    local, accumulation, updates = ppo_layout(sampling, ppo, epochs)
    s = setup(ctx, lora, optim, local, accumulation, updates, ema.decay if ema.enabled else None, checkpoint_every,
              keep_checkpoints, resume, registered=[tracker])
    start = s.state.step
    if start == 0:
        maybe_evaluate(ctx, s, eval, 0, epochs, force=True)  # the base model's held-out reward: the curve's start
    for epoch in trange(start, epochs, initial=start, total=epochs, desc="ddpo",
                        disable=not s.accelerator.is_local_main_process):
        # 1. Sample.
        jobs = epoch_jobs(len(ctx.train_prompts), epoch, ctx.seed, sampling, s.accelerator.num_processes,
                          s.accelerator.process_index)
        window = sde_window(sampling, ctx.seed, epoch)
        rollouts, images = sample_rollouts(s.pipe, ctx.train_prompts, jobs, sampling, window)

        # 2. Reward.
        metadata = [ctx.train_prompts[job["prompt_id"]].metadata for job in jobs]
        rewards, info = score(s.reward, images, rollouts.prompts, metadata)

        # 3. Advantages from each prompt's running statistics (the same tracker state on every process).
        all_rewards, all_prompt_ids = gather_rewards(s, rewards, rollouts.prompt_ids)
        texts = [ctx.train_prompts[i].text for i in all_prompt_ids.tolist()]
        advantages = torch.as_tensor(tracker.update(texts, all_rewards.cpu().numpy()), dtype=torch.float32)
        advantages = local_slice(s, advantages.clamp(-ppo.adv_clip, ppo.adv_clip).to(rewards.device))

        # 4. Train: PPO-clip, no KL.
        stats = ppo_update(
            s.accelerator, s.transformer, rollouts, advantages, sampling, ppo, s.optimizer,
            s.lr_scheduler, s.parameters, optim.max_grad_norm, ctx.seed, epoch,
        )

        # 5. Log; 6. evaluate on held-out prompts every few epochs; checkpoint.
        metrics = epoch_metrics(all_rewards, info, stats, s, epoch + 1)
        if end_epoch(ctx, s, metrics, eval, epoch, epochs, checkpoint_every, start, exit_after_epochs):
            return

    finish(ctx, s, lora)
