"""`algo=awm`: Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050), policy gradient with the pretraining
loss (`docs/algorithms.md` section 10).

Each epoch: (1) sample a group of images per prompt with the current policy (the ODE, DPM-Solver++ 2M, or the SDE:
only the final latents are kept); (2) advantages within groups, clipped and scaled to [-1, 1]; (3) train on the final
latents re-noised at one stratified timestep per stratum of the trajectory: the log-likelihood surrogate
`l = -rho(mean_d (v - (eps - x0))^2)` (a generalised Huber of the flow-matching error, `rl.losses.awm_log_prob`) in
PPO's clipped form with `ratio = exp(l - l_old)` clamped to [0, 2] (`rl.losses.awm_policy_loss`): at the first
optimiser step of an epoch the ratio is 1 and the gradient is each sample's flow-matching loss weighted by its
advantage; later optimiser steps of the epoch compare with `l_old`, the surrogate under the weights before the
epoch's update at the same noise and timestep (AWM's off-policy correction); plus the KL to the base model and to a
slowly trailing copy of the policy (the "KL-EMA", `rl.policy_copy`); (4) that copy trails the trained weights; log,
evaluate, checkpoint.

AWM samples with SA-Solver (a stochastic Adams solver, noise 0.4 between t = 0.3 and 0.9 for GenEval / OCR, 0 for
PickScore); diffusers has no SA-Solver for flow models, so this module samples with the log-prob pipeline's solvers:
the ODE (noise_level 0, PickScore's setting) or Flow-GRPO's SDE (`algo.sampling.noise_level`). Only the final images
are used, so any sampler is valid; they differ in how diverse a group is.
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
from rl.losses import awm_advantages, awm_log_prob, awm_policy_loss, group_advantages, velocity_kl
from rl.matching import MatchingConfig, NoisedBatch, matching_update
from rl.policy_copy import PolicyCopy, TrailingCopyConfig, capped_linear_decay
from rl.rollouts import SamplingConfig, epoch_metrics, sample_epoch
from rl.session import TrainingConfig, open_session


@dataclass(kw_only=True)
class AWM(TrainingConfig):
    """`algo=awm` (conf/algo/awm.yaml): AWM's options, and the session's (`TrainingConfig`)."""

    epochs: int = 100
    beta: float = 1e-3  # the weight of the KL (mean squared velocity difference) to the base model
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip] ...
    advantage_max: float = 1.0  # ... and scaled to [-advantage_max, advantage_max]
    clip_range: float = 1.0  # the ratio exp(l - l_old) is clipped to [1 - clip_range, 1 + clip_range] (AWM: 1)
    advantage_std: Literal["global", "group"] = "global"  # normalise advantages by the std of all rewards ("global") or
    #                                                       of each group
    advantage_ddof: int = 0  # the std divides by n - ddof: 0 as AWM (np.std)
    weighting: str = "ghuber"  # the log-likelihood surrogate: ghuber (AWM's generalised Huber) or uniform (-m)
    power: float = 0.25  # ghuber's power p
    ema_kl_beta: float = 1.0  # the weight of mean_d (v - v_ema)^2, the KL to the trailing copy (AWM: 1); 0: no copy
    ema_policy: TrailingCopyConfig = field(default_factory=lambda: TrailingCopyConfig(cap=0.3))  # how it trails
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(guidance_scale=1.0, noise_level=0.0,
                                                                            num_inference_steps=14))
    train: MatchingConfig = field(default_factory=lambda: MatchingConfig(timestep_order="stratified",
                                                                         timestep_fraction=0.9))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_values("algo", self, positive=("epochs", "adv_clip", "advantage_max", "power", "clip_range"),
                     at_least_zero=("beta", "ema_kl_beta"))
        self.ema_policy.check("algo.ema_policy")
        if self.weighting not in ("ghuber", "uniform"):
            raise ConfigError(f"algo.weighting must be ghuber or uniform, got {self.weighting!r}")
        if self.sampling.images_per_prompt < 2:
            raise ConfigError("AWM compares the images of a group: algo.sampling.images_per_prompt must be at least 2")
        if self.sampling.sde_window is not None:
            raise ConfigError("AWM trains on final images: algo.sampling.sde_window must be null")

    def __call__(self, ctx: RunContext) -> None:
        run(ctx, self)


def run(ctx: RunContext, config: AWM) -> None:
    """Train with AWM for `config.epochs` epochs."""
    sampling, train, eval, ema_policy = config.sampling, config.train, config.eval, config.ema_policy
    ctx.require_reward("awm")
    steps_per_sample = train.steps_per_sample(sampling.steps_taken)
    layout = update_layout(sampling, train, config.epochs, steps_per_sample, "train")
    trailing = PolicyCopy() if config.ema_kl_beta > 0 else None
    s = open_session(ctx, config, total_steps=config.epochs, unit="epoch", layout=layout,
                     gradient_checkpointing=train.gradient_checkpointing, prompts_only=True,
                     reference=config.beta > 0, state={"ema_policy": trailing} if trailing is not None else None)
    if trailing is not None:
        trailing.ensure(s.parameters)  # the trained weights at the start, or the copy a resume restored
    reference = s.reference_policy() if config.beta > 0 else None
    for epoch in s.steps("awm", first=lambda step: held_out(s, eval, step, force=True)):
        # 1. Sample this process's share of the epoch with the current policy; keep the final latents; score them.
        samples = sample_epoch(s, sampling, epoch, None, image_indices(sampling, train.batch_size, ctx.seed, epoch),
                               final_only=True)
        if not s.rewards_usable(samples.all_rewards):  # NaN or infinite: nothing stores or trains on them
            metrics = epoch_metrics(samples, {}, s, epoch + 1)
            if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
                return
            continue

        # 2. Advantages within complete groups (over every process's rewards), clipped and scaled.
        advantages = group_advantages(samples.all_rewards, samples.all_groups, config.advantage_std,
                                      clip=config.adv_clip, ddof=config.advantage_ddof)
        advantages = samples.local(awm_advantages(advantages, config.adv_clip, config.advantage_max))

        # 3. Train: the advantage-weighted surrogate (clipped ratio to the weights before the update), the KL to the
        #    base and to the trailing copy.
        def log_likelihood(batch: NoisedBatch, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            squared_error = ((v - (batch.noise - batch.x0)) ** 2).reshape(v.shape[0], -1).mean(dim=1)
            return awm_log_prob(squared_error, batch.sigmas, config.weighting, config.power), squared_error

        def old_log_likelihood(batch: NoisedBatch) -> torch.Tensor:  # before the update, at the same noise
            return log_likelihood(batch, batch.velocity())[0]

        def loss_fn(batch: NoisedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            v = batch.velocity()
            log_prob, squared_error = log_likelihood(batch, v)
            old = log_prob.detach() if batch.old is None else batch.old
            loss, stats = awm_policy_loss(log_prob, old, advantages[batch.rows], config.clip_range)  # noqa: B023
            stats.update(policy_loss=loss.detach(), flow_matching_error=squared_error.detach().mean())
            if reference is not None:
                with torch.no_grad(), reference():
                    v_reference = batch.velocity()
                kl = velocity_kl(v, v_reference).mean()
                loss = loss + config.beta * kl
                stats["kl"] = kl.detach()
            if trailing is not None:
                with torch.no_grad(), trailing.swapped_in(s.parameters):
                    v_trailing = batch.velocity()
                kl_ema = velocity_kl(v, v_trailing).mean()
                loss = loss + config.ema_kl_beta * kl_ema
                stats["kl_ema"] = kl_ema.detach()
            return loss, stats

        stats = matching_update(s, samples.rollouts, train, sampling, epoch, samples.indices, loss_fn,
                                old_log_likelihood)

        # 4. The trailing copy follows the trained weights; log; evaluate every few epochs; checkpoint.
        if trailing is not None:
            decay = capped_linear_decay(s.optimizer_steps_through(epoch), ema_policy.rate, ema_policy.cap,
                                        ema_policy.flat)
            stats["ema_policy_deviation"] = trailing.deviation(s.parameters)
            stats["ema_policy_decay"] = decay
            trailing.update(s.parameters, decay)
        metrics = epoch_metrics(samples, stats, s, epoch + 1)
        if s.end_epoch(metrics, lambda step: held_out(s, eval, step)):
            return

    # The adapter (or weights) in diffusers' format; the EMA weights when kept.
    s.finish()
