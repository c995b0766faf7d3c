"""Rollout correction's weights, rejection band and drift metrics (rl/rollout_correction.py) against the hand-computed
values of ALGORITHMS-2026 section 15: log ratio = (0, 0.8, -0.8, 0.1)."""

import math

import pytest
import torch

from rl.rollout_correction import (
    drift_metrics,
    effective_sample_size,
    importance_weights,
    k1,
    k2,
    k3,
    rejection_keep,
)

LOG_RATIO = torch.tensor([0.0, 0.8, -0.8, 0.1])


def test_truncated_weights_and_the_estimates_by_hand():
    assert importance_weights(LOG_RATIO, threshold=2.0).tolist() == pytest.approx([1.0, 2.0, 0.4493, 1.1052],
                                                                                  abs=1e-4)
    assert k1(LOG_RATIO).tolist() == pytest.approx([0.0, -0.8, 0.8, -0.1])
    assert k2(LOG_RATIO).tolist() == pytest.approx([0.0, 0.32, 0.32, 0.005])
    assert k3(LOG_RATIO).tolist() == pytest.approx([0.0, 0.4255, 0.2493, 0.0052], abs=1e-4)
    assert (k3(torch.linspace(-3, 3, 13)) >= 0).all()


def test_the_k1_band_rejects_both_far_sides_and_keeps_the_rest():
    # log 0.5 = -0.693 <= k1 <= log 2 = 0.693: k1 = (0, -0.8, 0.8, -0.1) keeps rows 1 and 4
    assert rejection_keep(LOG_RATIO, 0.5, 2.0).tolist() == [True, False, False, True]
    assert rejection_keep(LOG_RATIO, 0.2, 5.0).all()


def test_sequence_weights_sum_a_samples_steps_and_broadcast():
    log_ratio = torch.tensor([[0.3, 0.5], [-0.1, 0.1]])  # sums 0.8 and 0
    weights = importance_weights(log_ratio, threshold=10.0, level="sequence")
    assert weights.flatten().tolist() == pytest.approx([math.exp(0.8)] * 2 + [1.0, 1.0], abs=1e-6)
    assert importance_weights(torch.tensor([1000.0]), threshold=1e9).item() == pytest.approx(math.exp(20), rel=1e-5)
    with pytest.raises(ValueError, match="token or sequence"):
        importance_weights(log_ratio, level="step")


def test_drift_metrics_by_hand():
    metrics = drift_metrics(LOG_RATIO, threshold=2.0)
    # chi2 = mean(1, 4.953, 0.2019, 1.2214) - 1; ESS of w = (1, 2, 0.4493, 1.1052) = 1 / mean((w / 1.1386)^2)
    assert metrics["chi2_token"].item() == pytest.approx(0.844, abs=1e-3)
    assert metrics["ess"].item() == pytest.approx(0.807, abs=1e-3)
    assert metrics["kl"].item() == pytest.approx(-0.1 / 4, abs=1e-6)  # mean of k1 = (0 - 0.8 + 0.8 - 0.1) / 4
    assert metrics["k3_kl"].item() == pytest.approx((0.4255 + 0.2493 + 0.0052) / 4, abs=1e-4)
    assert metrics["above_threshold"].item() == 0.25 and metrics["below_inverse"].item() == 0.25
    assert metrics["log_ratio_abs_max"].item() == pytest.approx(0.8)
    assert effective_sample_size(torch.ones(5)).item() == pytest.approx(1.0)
