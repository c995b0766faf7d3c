"""Rollout correction (verl-omni's `rollout_correction`, ALGORITHMS-2026 section 15) as pure functions: how far the
log-probabilities a PPO update compares with (`logp_old`) are from those the rollout recorded (`logp_rollout`), the
truncated importance weights and the rejection mask that correct for it, and the drift diagnostics.

Every function takes `log_ratio = logp_old - logp_rollout` per sample and stochastic step, shape (B, W) (or (B,)), with
the per-element-mean Gaussian log-density of this codebase's SDE step (`pipelines.sde`). Sequence level means over a
sample's W steps: a sum of log-ratios (one outlier step decides the whole sample). No algorithm uses them yet (issue
33 wires them into the PPO methods as `algo.ppo.old_log_probs=rollout|recompute`).
"""

from __future__ import annotations

import math

import torch

LOG_RATIO_LIMIT = 20.0  # log-ratios are clipped to +-20 before exp (the reference's bound), so no weight overflows


def importance_weights(log_ratio: torch.Tensor, threshold: float = 2.0, level: str = "token") -> torch.Tensor:
    """Truncated importance weights (TIS), detached: `min(exp(clip(log_ratio, +-20)), threshold)` per entry ("token"),
    or of the sum of a sample's log-ratios broadcast to its steps ("sequence")."""
    log_ratio = log_ratio.detach()
    if level == "sequence":
        steps = log_ratio.reshape(log_ratio.shape[0], -1)
        log_ratio = steps.sum(dim=1, keepdim=True).expand_as(steps).reshape(log_ratio.shape)
    elif level != "token":
        raise ValueError(f"level must be token or sequence, got {level!r}")
    return torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)).clamp(max=threshold)


def k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """`-log ratio`, per entry: the k1 estimate of KL(rollout || old) (it can be negative)."""
    return -log_ratio


def k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """`(log ratio)^2 / 2`, per entry."""
    return 0.5 * log_ratio**2


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """`ratio - 1 - log ratio`, per entry: a non-negative estimate of the KL."""
    return torch.expm1(log_ratio) - log_ratio


def rejection_keep(log_ratio: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The k1 rejection band: keep an entry when `log(low) <= k1 <= log(high)` (verl's "low_high", e.g. "0.5_2.0");
    rejected entries leave the loss but stay in its mean's denominator."""
    value = k1(log_ratio)
    return (value >= math.log(low)) & (value <= math.log(high))


def effective_sample_size(weights: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """`1 / mean((w / mean w)^2)` of the weights clamped to [0, threshold]: 1 when every weight is equal, towards
    1/N when one dominates."""
    w = weights.clamp(0, threshold)
    return 1.0 / ((w / w.mean()) ** 2).mean()


def drift_metrics(log_ratio: torch.Tensor, threshold: float = 2.0) -> dict[str, torch.Tensor]:
    """The drift between the rollout's log-probabilities and the old ones, for logging: the KL estimates (`kl`, k1's
    mean of `logp_rollout - logp_old`; `k3_kl`), the chi-squared divergence per entry (`chi2_token`,
    `mean ratio^2 - 1`), the truncated weights' effective sample size and the fractions above `threshold` and below
    its inverse, and the mean and largest `|log ratio|`."""
    log_ratio = log_ratio.detach().float()
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    weights = importance_weights(log_ratio, threshold)
    return {
        "kl": k1(log_ratio).mean(),
        "k3_kl": k3(log_ratio).mean(),
        "chi2_token": (ratio**2).mean() - 1,
        "ess": effective_sample_size(weights, threshold),
        "above_threshold": (ratio > threshold).float().mean(),
        "below_inverse": (ratio < 1 / threshold).float().mean(),
        "log_ratio_abs_mean": log_ratio.abs().mean(),
        "log_ratio_abs_max": log_ratio.abs().max(),
    }
