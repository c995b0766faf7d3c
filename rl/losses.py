"""The training objectives, as small pure functions with unit tests (`tests/test_losses.py`).

Notation as in `docs/algorithms.md`: `x_s = (1 - s) x0 + s eps`, the transformer predicts the velocity `v = eps - x0`.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from pipelines.errors import ConfigError

# diffusers.training_utils' timestep densities / loss weightings for SD3 ("none": uniform timesteps, weight 1).
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


def check_weighting_scheme(weighting_scheme: str) -> None:
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ConfigError(f"unknown weighting_scheme {weighting_scheme!r}; choose one of {list(WEIGHTING_SCHEMES)}")


def sample_training_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler,
    batch_size: int,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw training timesteps and their sigmas from the SD3 timestep density (`docs/algorithms.md` section 6).

    `scheduler` is a training scheduler with its full `num_train_timesteps` schedule (not `set_timesteps`). Returns
    `(timesteps, sigmas)`, each of shape (B,), on the generator's device.
    """
    check_weighting_scheme(weighting_scheme)
    device = generator.device if generator is not None else torch.device("cpu")
    u = compute_density_for_timestep_sampling(
        weighting_scheme, batch_size, logit_mean, logit_std, mode_scale, device=device, generator=generator
    )
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
    timesteps = scheduler.timesteps.to(device)[indices]
    sigmas = scheduler.sigmas.to(device)[indices]
    return timesteps, sigmas


def flow_matching_loss(
    model_pred: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    noisy_latents: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "logit_normal",
    precondition_outputs: bool = False,
) -> torch.Tensor:
    """The SD3 rectified-flow loss per sample, shape (B,).

    Without preconditioning the target is the velocity `eps - x0`; with it, the prediction is turned into an `x0`
    estimate (`x_s - s v`) and compared with `x0`. The per-timestep weight is diffusers'
    `compute_loss_weighting_for_sd3` (`sigma_sqrt`: `s^-2`; `cosmap`: `2 / (pi (1 - 2s + 2s^2))`; otherwise 1).
    """
    check_weighting_scheme(weighting_scheme)
    sigmas = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).float()
    model_pred = model_pred.float()
    if precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_latents.float()
        target = latents.float()
    else:
        target = noise.float() - latents.float()
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    return (weighting * (model_pred - target) ** 2).reshape(latents.shape[0], -1).mean(dim=1)


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, as DDPO and Flow-GRPO use it (`docs/algorithms.md` sections 2-3).

    `loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps)))` with `ratio = exp(logp - logp_old)`, each
    sample's term times its weight when `weights` are given (GRPO-Guard's 1/dt). Also returns the diagnostics
    `approx_kl = mean((logp - logp_old)^2) / 2` and `clipfrac = mean(|ratio - 1| > eps)`.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    loss = (per_sample if weights is None else weights * per_sample).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio": ratio.mean(),
        }
    return loss, stats


def ratio_norm_log_ratio(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
    transition_std: torch.Tensor,
) -> torch.Tensor:
    """GRPO-Guard's RatioNorm (arXiv 2510.22319, `docs/algorithms.md` section 8): the normalised log-ratio
    `log w = (logp - logp_old + mean_d (mu - mu_old)^2 / (2 s^2)) * s` per sample, with `s` the transition's standard
    deviation (B,) and `mu_old` the behaviour policy's mean. Adding the bias removes `E[log ratio] < 0`, multiplying
    by `s` the variance that depends on the step; it equals `mean_d((mu - mu_old) * eps)` with `eps` the transition's
    noise `(x' - mu_old) / s`. For the Gaussian "sde" step only (its log-probability is a per-pixel mean)."""
    s = transition_std.reshape(-1)
    squared = ((mean - old_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return (log_prob - old_log_prob + squared / (2 * s**2)) * s


def gaussian_step_kl(mean: torch.Tensor, old_mean: torch.Tensor, transition_std: torch.Tensor) -> torch.Tensor:
    """Per sample, the exact KL between the old and the current Gaussian transition of an SDE step, which share their
    per-element std `s` (B,): `mean_d (mu - mu_old)^2 / (2 s^2)`, a mean over latent elements as Flow-DPPO's code has
    it (the paper's Eq. 14 sums them, larger by the latent size). In float32: Flow-DPPO's threshold (1e-5) is below
    bf16's resolution of the means (ALGORITHMS-2026 section 10, pitfalls)."""
    s = transition_std.float().reshape(-1)
    return _per_sample_mean((mean.float() - old_mean.float()) ** 2) / (2 * s**2)


def dppo_keep(divergence: torch.Tensor, ratio: torch.Tensor, advantages: torch.Tensor, threshold: float
              ) -> torch.Tensor:
    """Flow-DPPO's trust region (arXiv 2606.11025): which sample-steps keep their gradient. One is dropped only when
    its KL from the old policy reached `threshold` *and* the update moves further in its advantage's direction (ratio
    above 1 with a positive advantage, below 1 with a negative one); corrective moves and ratio exactly 1 always
    pass."""
    further = ((ratio > 1) & (advantages > 0)) | ((ratio < 1) & (advantages < 0))
    return ~((divergence >= threshold) & further)


def dppo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
    transition_std: torch.Tensor, advantages: torch.Tensor, threshold: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPPO's loss: `mean(-A * ratio * keep)` with `ratio = exp(logp - logp_old)` and no ratio clip, `keep` from
    `dppo_keep` on the detached KL (`gaussian_step_kl`) and ratio. Dropped entries stay in the mean's denominator (the
    gradient shrinks with the dropped fraction, as in the reference) and are selected out with `where`, so that an
    overflowing ratio there leaves the loss finite. A kept entry's gradient is `-A * ratio * grad logp / N`: the
    importance-weighted policy gradient. Diagnostics: `kl_new_old_mean`, `masked_fraction`, `ratio`, `approx_kl`."""
    ratio = torch.exp(log_prob - old_log_prob)
    with torch.no_grad():
        divergence = gaussian_step_kl(mean, old_mean, transition_std)
        keep = dppo_keep(divergence, ratio, advantages, threshold)
    per_sample = torch.where(keep, -advantages * ratio, torch.zeros_like(ratio))
    with torch.no_grad():
        stats = {"kl_new_old_mean": divergence.mean(), "masked_fraction": (~keep).float().mean(),
                 "ratio": ratio.mean(), "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean()}
    return per_sample.mean(), stats


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, std: str = "global", eps: float = 1e-4, clip: float = 5.0,
    ddof: int = 0,
) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the std of the group ("group") or of all rewards
    ("global", the SD3 presets of Flow-GRPO), clipped to [-clip, clip]. The std divides by `n - ddof`: 0 is
    Flow-GRPO's (numpy's `np.std`); 1, the unbiased std, shrinks advantages by `sqrt((n - 1) / n)`."""
    if std not in ("global", "group"):
        raise ConfigError(f"advantage std must be 'global' or 'group', got {std!r}")
    rewards = rewards.float()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1, device=rewards.device).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    if ddof not in (0, 1):
        raise ConfigError(f"advantage ddof must be 0 (Flow-GRPO) or 1 (the unbiased std), got {ddof!r}")
    if std == "global":
        scale = rewards.std(correction=ddof) if rewards.numel() > 1 else torch.zeros((), device=rewards.device)
    else:
        variance = torch.zeros_like(count).index_add_(0, inverse, centred**2) / (count - ddof).clamp(min=1)
        scale = variance.sqrt()[inverse]
    return (centred / (scale + eps)).clamp(-clip, clip)


def kl_to_reference(
    mean: torch.Tensor, reference_mean: torch.Tensor, std_dev_t: torch.Tensor, sde_type: str = "sde"
) -> torch.Tensor:
    """The KL term per sample between the policy's and the reference's transition means, over all non-batch dims.

    "sde": Flow-GRPO's `mean((mean_theta - mean_ref)^2) / (2 std^2)`, with `std` the step's `std_dev_t` (as
    `sde_step_with_logprob` returns it). "cps": `mean((mean_theta - mean_ref)^2)` without the division, as the CPS
    authors' code has it (CPS's log-probability drops the same `1 / (2 std^2)`; and its std is 0 on a step ending at
    sigma 0, where the division gave NaN)."""
    squared = ((mean - reference_mean) ** 2).reshape(mean.shape[0], -1).mean(dim=1)
    if sde_type == "cps":
        return squared
    return squared / (2 * std_dev_t.reshape(-1) ** 2)


def dpo_loss(
    model_winner: torch.Tensor,
    model_loser: torch.Tensor,
    reference_winner: torch.Tensor,
    reference_loser: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO for flow matching (`docs/algorithms.md` section 4), from per-pair flow-matching errors (B,).

    `diff = (L(w) - L_ref(w)) - (L(l) - L_ref(l))`; `loss = mean(-logsigmoid(-beta / 2 * diff))`. A model whose error
    drops more on the winner than the reference's does has `diff < 0` and a loss below log 2. Diagnostics:
    `implicit_acc` (the fraction of pairs with `-beta / 2 * diff > 0`, ties counted half), `reward_margin` (the mean
    of `-beta / 2 * diff`, the implicit reward of the winner minus the loser's), and the model's and the reference's
    mean error differences `model_diff = L(w) - L(l)` and `ref_diff`.
    """
    model_diff = model_winner - model_loser
    reference_diff = reference_winner - reference_loser
    inside = -0.5 * beta * (model_diff - reference_diff)
    loss = -torch.nn.functional.logsigmoid(inside).mean()
    with torch.no_grad():
        stats = {
            "implicit_acc": (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean(),
            "reward_margin": inside.mean(),
            "model_diff": model_diff.mean(),
            "ref_diff": reference_diff.mean(),
        }
    return loss, stats


def best_worst_pairs(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online DPO's pairs: for each group (in order of first appearance), the indices of its highest- and lowest-reward
    samples, and whether the pair is valid (False when all the group's rewards are equal: nothing to prefer)."""
    winners, losers, valid = [], [], []
    for group in dict.fromkeys(group_ids.tolist()):
        members = (group_ids == group).nonzero().flatten()
        values = rewards[members]
        winners.append(members[values.argmax()])
        losers.append(members[values.argmin()])
        valid.append(bool(values.max() > values.min()))
    return torch.stack(winners), torch.stack(losers), torch.tensor(valid, device=rewards.device)


# ------------------------------------------------------------------------------------ DiffusionNFT and AWM (section 10)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def nft_optimality_prob(advantages: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's optimality probability `r = clip(clip(A, -c, c) / c / 2 + 1/2, 0, 1)`: 1/2 for an average
    sample, 1 for one `c` standard deviations above its group's mean, 0 below."""
    return (advantages.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


def nft_implicit_velocities(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffusionNFT's implicit positive and negative policies: `v+ = beta v_theta + (1 - beta) v_old` and
    `v- = (1 + beta) v_old - beta v_theta` (their mean is `v_old`)."""
    return beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta


def nft_loss(
    v_theta: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
    optimality: torch.Tensor, beta: float, adaptive: bool = True, adv_clip: float = 5.0,
) -> torch.Tensor:
    """DiffusionNFT's loss per sample (B,): `adv_clip * (r L+ + (1 - r) L-) / beta` at `x_t = (1 - t) x0 + t eps`.

    The factor is the advantage clip that maps advantages to `r` (`nft_optimality_prob`), as the reference multiplies
    its loss by `adv_clip_max`: with it, the on-policy gradient is that of `adv_clip * (2r - 1) ...`, i.e. of the
    clipped advantage itself (`A` within the clip), whatever the clip.

    `adaptive` (the released code): `L± = mean_d (x0± - x0)^2 / sg(max(mean_d |x0± - x0|, 1e-5))` with
    `x0± = x_t - t v±`, a self-normalised x0-space error; otherwise the paper's `L± = mean_d (v± - (eps - x0))^2`.
    `optimality` is `r` (`nft_optimality_prob`), `v_old` the old policy's velocity (no gradient)."""
    t = sigmas.reshape(-1, *([1] * (x0.ndim - 1))).float()
    x0, noise, v_old = x0.float(), noise.float(), v_old.float().detach()
    v_positive, v_negative = nft_implicit_velocities(v_theta.float(), v_old, beta)
    if adaptive:
        x_t = (1 - t) * x0 + t * noise

        def error(v: torch.Tensor) -> torch.Tensor:
            residual = x_t - t * v - x0
            weight = _per_sample_mean(residual.detach().double().abs()).clamp(min=1e-5).float()
            return _per_sample_mean(residual**2) / weight
    else:
        target = noise - x0

        def error(v: torch.Tensor) -> torch.Tensor:
            return _per_sample_mean((v - target) ** 2)

    r = optimality.float()
    return adv_clip * (r * error(v_positive) + (1 - r) * error(v_negative)) / beta


def velocity_kl(v: torch.Tensor, v_reference: torch.Tensor) -> torch.Tensor:
    """`mean_d (v - v_ref)^2` per sample (B,): the KL between two flow policies' Gaussian steps up to a factor
    (DiffusionNFT's and AWM's KL term to the base model, AWM's to its EMA)."""
    return _per_sample_mean((v.float() - v_reference.float().detach()) ** 2)


def awm_log_prob(squared_error: torch.Tensor, sigmas: torch.Tensor, weighting: str = "ghuber",
                 power: float = 0.25) -> torch.Tensor:
    """AWM's log-likelihood surrogate from the flow-matching error `m = mean_d (v - (eps - x0))^2` (B,):
    `ghuber`: `-((m + 1e-10)^p - 1e-10^p) t / p` (a generalised Huber loss, flatter for large errors); `uniform`:
    `-m`."""
    if weighting == "uniform":
        return -squared_error
    if weighting != "ghuber":
        raise ConfigError(f"AWM's weighting must be ghuber or uniform, got {weighting!r}")
    return -((squared_error + 1e-10) ** power - 1e-10**power) * sigmas.reshape(-1).float() / power


def awm_advantages(advantages: torch.Tensor, clip: float = 5.0, maximum: float = 1.0) -> torch.Tensor:
    """AWM's advantages: clipped to `[-clip, clip]` and scaled to `[-maximum, maximum]`."""
    return advantages.clamp(-clip, clip) / clip * maximum


def awm_timestep_indices(num_steps: int, count: int, u: torch.Tensor, fraction: float = 0.9,
                         skip_first: bool = True) -> torch.Tensor:
    """AWM's stratified training steps: `count` indices of the sampler's `num_steps`, one per stratum of
    `linspace(1 or 0, int(num_steps * fraction), count + 1)` (integer boundaries), the j-th at `u[j]` in [0, 1) of
    its stratum. `skip_first` never trains step 0 (AWM's 'discrete_wo_init'). Each stratum holds at least one step."""
    low = 1 if skip_first else 0
    high = int(num_steps * fraction)
    if high - low < count:
        raise ConfigError(f"{count} stratified timesteps do not fit in steps {low}..{high - 1} of {num_steps}")
    bounds = torch.linspace(low, high, count + 1).long()
    start, width = bounds[:-1], (bounds[1:] - bounds[:-1]).clamp(min=1)
    return start + (u.reshape(-1) * width).long().clamp(max=width - 1)


def awm_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AWM's policy loss (its `loss_type="exp_first"`): PPO's clipped surrogate on the log-likelihood surrogate `l`,
    `mean(max(-A_hat r, -A_hat clamp(r, 1 - c, 1 + c)))` with `r = exp(l - l_old)`, per sample and timestep; AWM's
    `c = 1` clamps the ratio to [0, 2]. `l_old` is `l` under the weights before the epoch's update, at the same noise
    and timestep: `sg(l)` while the weights are unchanged (the first optimiser step; then `r = 1` and the gradient is
    `-A_hat / N` on each `l`, an advantage-weighted flow-matching loss), the re-scored value after (the off-policy
    correction of later optimiser steps). Returns the loss and `ppo_clip_loss`'s diagnostics."""
    return ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range)
