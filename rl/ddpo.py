"""`algo=ddpo`: DDPO (Black et al. 2023, arXiv 2305.13301) for SD3 / SD3.5 (`docs/algorithms.md` section 3).

DDPO's original step is DDIM for epsilon-prediction models; on a flow-matching model it must be the flow SDE step of
section 1, which this uses (the same sampler as GRPO). What is DDPO's own: advantages from a per-prompt stat tracker
(each prompt's recent rewards) instead of groups, and no KL term. Each epoch: sample, score, advantages, PPO-clip
updates, log, and held-out evaluation every few epochs. Like GRPO, it can sample with an SDE window (only those steps
stochastic and trained; `sampling.sde_window`), which DDPO's paper does not have.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.configs import check_values
from rl.batching import image_indices
from rl.context import RunContext
from rl.evaluation import EvalConfig, held_out
from rl.ppo import PPOConfig, ppo_layout, ppo_update
from rl.rollouts import SamplingConfig, epoch_metrics, sample_epoch, sde_window
from rl.session import TrainingConfig, open_session

logger = logging.getLogger(__name__)


class PerPromptStatTracker:
    """DDPO's advantage estimator: `A = (r - mean_prompt) / (std_prompt + 1e-6)` over a buffer of each prompt's last
    `buffer_size` rewards; until a prompt has `min_count` rewards, the batch's mean and std stand in."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        prompts, rewards = np.asarray(prompts), np.asarray(rewards, dtype=np.float64)
        if not np.isfinite(rewards).all():  # the session skips such an epoch (`Session.rewards_usable`)
            raise ValueError("the per-prompt statistics take finite rewards only")
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
        """Restore the buffers; a non-finite reward that a checkpoint written before the session skipped such epochs
        holds is dropped (it would make every later advantage of its prompt NaN)."""
        buffers = {p: [v for v in values if math.isfinite(v)] for p, values in state["buffers"].items()}
        dropped = sum(len(values) for values in state["buffers"].values()) - sum(map(len, buffers.values()))
        if dropped:
            logger.warning("the checkpoint's per-prompt statistics held %d NaN or infinite rewards: dropped", dropped)
        self.buffers = {p: deque(values, maxlen=self.buffer_size) for p, values in buffers.items()}


def prompt_key(prompt) -> str:
    """What the per-prompt statistics are kept by: the text, and an image-to-image prompt's source image (one
    instruction applied to many images is many prompts)."""
    return prompt.text if prompt.image is None else f"{prompt.text}\x00{prompt.image}"


@dataclass(kw_only=True)
class DDPO(TrainingConfig):
    """`algo=ddpo` (conf/algo/ddpo.yaml): DDPO's own options, and the session's (`TrainingConfig`)."""

    epochs: int = 100
    buffer_size: int = 32  # the per-prompt stat tracker: rewards kept per prompt
    min_count: int = 16  # below this many, a prompt uses the batch's mean and std
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_values("algo", self, positive=("epochs", "buffer_size", "min_count"))

    def __call__(self, ctx: RunContext) -> None:
        run(ctx, self)


def run(ctx: RunContext, config: DDPO) -> None:
    """Train with DDPO for `config.epochs` epochs."""
    sampling, ppo, eval = config.sampling, config.ppo, config.eval
    tracker = PerPromptStatTracker(config.buffer_size, config.min_count)
    ctx.require_reward("ddpo")
    layout = ppo_layout(sampling, ppo, config.epochs)
    s = open_session(ctx, config, total_steps=config.epochs, unit="epoch", layout=layout,
                     gradient_checkpointing=ppo.gradient_checkpointing, prompts_only=True,
                     state={"stat_tracker": tracker})
    for epoch in s.steps("ddpo", first=lambda step: held_out(s, eval, step, force=True)):
        # 1. Sample and score.
        samples = sample_epoch(s, sampling, epoch, sde_window(sampling, ctx.seed, epoch),
                               image_indices(sampling, ppo.batch_size, ctx.seed, epoch))
        if not s.rewards_usable(samples.all_rewards):  # NaN or infinite: nothing stores or trains on them
            metrics = epoch_metrics(samples, {}, s, epoch + 1)
            if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
                return
            continue

        # 2. Advantages from each prompt's running statistics (the same tracker state on every process).
        keys = [prompt_key(ctx.train_prompts[i]) for i in samples.all_prompt_ids.tolist()]
        advantages = torch.as_tensor(tracker.update(keys, samples.all_rewards.cpu().numpy()), dtype=torch.float32)
        advantages = advantages.clamp(-ppo.adv_clip, ppo.adv_clip).to(samples.rewards.device)
        advantages = samples.local(advantages)

        # 3. Train: PPO-clip, no KL.
        stats = ppo_update(s, samples.rollouts, advantages, sampling, ppo, epoch, samples.indices)

        # 4. Log; evaluate on held-out prompts every few epochs; checkpoint.
        metrics = epoch_metrics(samples, stats, s, epoch + 1)
        if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
            return

    s.finish()
