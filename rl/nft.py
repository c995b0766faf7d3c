"""`algo=nft`: DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117), online RL on the forward process
(`docs/algorithms.md` section 10).

Each epoch: (1) sample a group of images per prompt with the *old* policy, deterministically (DPM-Solver++ 2M or Euler,
without guidance as published), keeping only each final latent; (2) advantages within groups, mapped to an optimality
probability `r`; (3) train on the final latents re-noised at the sampler's timesteps: the implicit positive policy
`v+ = b v + (1 - b) v_old` is pulled towards the data where `r` is high, the negative `v- = (1 + b) v_old - b v` where
it is low (`rl.losses.nft_loss`; `b` is DiffusionNFT's beta, `algo.policy_mix` here, so that `beta` names a KL weight
in every method), plus a small KL to the base model (`kl_beta`); (4) the old policy trails the
trained one (`old <- eta old + (1 - eta) theta`, eta from `capped_linear_decay`); log, evaluate, checkpoint.

No log-probabilities, no SDE and no guidance: a training sample costs one forward of the old policy and one of the
trained one at a random timestep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from pipelines.configs import check_values
from pipelines.errors import ConfigError
from rl.batching import image_indices, update_layout
from rl.context import RunContext
from rl.evaluation import EvalConfig, held_out
from rl.losses import group_advantages, nft_loss, nft_optimality_prob, velocity_kl
from rl.matching import MatchingConfig, NoisedBatch, matching_update
from rl.policy_copy import PolicyCopy, TrailingCopyConfig, capped_linear_decay
from rl.rollouts import SamplingConfig, epoch_metrics, sample_epoch
from rl.session import TrainingConfig, open_session


@dataclass(kw_only=True)
class NFT(TrainingConfig):
    """`algo=nft` (conf/algo/nft.yaml): DiffusionNFT's options, and the session's (`TrainingConfig`)."""

    epochs: int = 100
    policy_mix: float = 1.0  # DiffusionNFT's beta, how far the implicit policies sit from the old one (0.1 for
    #                          OCR): v+ = mix v + (1 - mix) v_old; not a KL weight (that is kl_beta)
    kl_beta: float = 1e-4  # the weight of the KL (mean squared velocity difference) to the base model
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip], then mapped to r in [0, 1]
    advantage_std: Literal["global", "group"] = "global"  # normalise advantages by the std of all rewards ("global") or
    #                                                       of each group
    advantage_ddof: int = 0  # the std divides by n - ddof: 0 as DiffusionNFT (np.std)
    adaptive_loss: bool = True  # the released self-normalised x0-space loss; false: the paper's velocity loss
    old_policy: TrailingCopyConfig = field(default_factory=TrailingCopyConfig)  # how the old policy trails
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(guidance_scale=1.0, noise_level=0.0,
                                                                            solver="dpm2"))
    train: MatchingConfig = field(default_factory=MatchingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_values("algo", self, positive=("epochs", "policy_mix", "adv_clip"), at_least_zero=("kl_beta",))
        self.old_policy.check("algo.old_policy")
        if self.sampling.images_per_prompt < 2:
            raise ConfigError("DiffusionNFT compares the images of a group: algo.sampling.images_per_prompt must be "
                              "at least 2")
        if self.sampling.sde_window is not None:
            raise ConfigError("DiffusionNFT trains on final images: algo.sampling.sde_window must be null")

    def __call__(self, ctx: RunContext) -> None:
        run(ctx, self)


def run(ctx: RunContext, config: NFT) -> None:
    """Train with DiffusionNFT for `config.epochs` epochs."""
    sampling, train, eval = config.sampling, config.train, config.eval
    ctx.require_reward("nft")
    steps_per_sample = train.steps_per_sample(sampling.steps_taken)
    layout = update_layout(sampling, train, config.epochs, steps_per_sample, "train")
    old = PolicyCopy()
    s = open_session(ctx, config, total_steps=config.epochs, unit="epoch", layout=layout,
                     gradient_checkpointing=train.gradient_checkpointing, prompts_only=True,
                     reference=config.kl_beta > 0, state={"old_policy": old})
    old.ensure(s.parameters)  # the trained weights at the start, or the old policy a resume restored
    reference = s.reference_policy() if config.kl_beta > 0 else None
    for epoch in s.steps("nft", first=lambda step: held_out(s, eval, step, force=True)):
        # 1. Sample this process's share of the epoch with the old policy; keep the final latents; score them.
        with old.swapped_in(s.parameters):
            samples = sample_epoch(s, sampling, epoch, None, image_indices(sampling, train.batch_size, ctx.seed, epoch),
                                   final_only=True)
        if not s.rewards_usable(samples.all_rewards):  # NaN or infinite: nothing stores or trains on them
            metrics = epoch_metrics(samples, {}, s, epoch + 1)
            if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
                return
            continue

        # 2. Advantages within complete groups (over every process's rewards), as optimality probabilities.
        advantages = group_advantages(samples.all_rewards, samples.all_groups, config.advantage_std,
                                      clip=config.adv_clip, ddof=config.advantage_ddof)
        optimality = samples.local(nft_optimality_prob(advantages, config.adv_clip))

        # 3. Train: the implicit positive and negative policies against the clean latents, and the KL to the base.
        def loss_fn(batch: NoisedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with torch.no_grad(), old.swapped_in(s.parameters):
                v_old = batch.velocity()
            v = batch.velocity()
            policy_loss = nft_loss(v, v_old, batch.x0, batch.noise, batch.sigmas, optimality[batch.rows],  # noqa: B023
                                   config.policy_mix, config.adaptive_loss, config.adv_clip).mean()
            stats = {"policy_loss": policy_loss.detach(),
                     "velocity_change": ((v.detach() - v_old) ** 2).mean()}  # how far theta has left the old policy
            if reference is None:
                return policy_loss, stats
            with torch.no_grad(), reference():
                v_reference = batch.velocity()
            kl = velocity_kl(v, v_reference).mean()
            return policy_loss + config.kl_beta * kl, {**stats, "kl": kl.detach()}

        stats = matching_update(s, samples.rollouts, train, sampling, epoch, samples.indices, loss_fn)

        # 4. The old policy trails the trained one; log; evaluate on held-out prompts every few epochs; checkpoint.
        decay = capped_linear_decay(s.optimizer_steps_through(epoch), config.old_policy.rate, config.old_policy.cap,
                                    config.old_policy.flat)
        stats["old_deviation"] = old.deviation(s.parameters)
        stats["old_decay"] = decay
        old.update(s.parameters, decay)
        metrics = epoch_metrics(samples, stats, s, epoch + 1)
        if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
            return

    # The adapter (or weights) in diffusers' format; the EMA weights when kept.
    s.finish()
