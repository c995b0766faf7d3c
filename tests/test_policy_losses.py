"""PPO clip loss, GRPO group advantages, the KL term and DDPO's stat tracker against hand computations."""

import math

import numpy as np
import pytest
import torch

from pipelines.sde import sde_step_with_logprob
from rl.ddpo import PerPromptStatTracker
from rl.losses import group_advantages, kl_to_reference, ppo_clip_loss, ratio_norm_log_ratio


def test_ppo_clip_loss_by_hand():
    # ratio = exp(logp - old): [1, e^0.1, e^-0.1]; eps = 0.05; A = [1, 1, -2]
    log_prob = torch.tensor([0.0, 0.1, -0.1])
    old = torch.zeros(3)
    advantages = torch.tensor([1.0, 1.0, -2.0])
    loss, stats = ppo_clip_loss(log_prob, old, advantages, clip_range=0.05)
    r1 = math.exp(0.1)
    # sample 1: max(-1, -1) = -1; sample 2: max(-e^0.1, -1.05) = -1.05; sample 3: max(2 e^-0.1, 2 * 0.95) = 1.9
    assert -r1 < -1.05 and 2 * math.exp(-0.1) < 1.9
    expected = (-1 - 1.05 + 1.9) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.01) / 3, abs=1e-7)


def test_ppo_gradient_at_ratio_one_is_the_policy_gradient():
    log_prob = torch.zeros(4, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 2.0, 0.5])
    loss, _ = ppo_clip_loss(log_prob, torch.zeros(4), advantages, clip_range=1e-4)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -advantages / 4)


def test_weighted_ppo_clip_loss_by_hand():
    # GRPO-Guard weighs each sample's term by 1/dt: weights [2, 10], ratio 1, A = [1, -3] -> mean(-2, 30) = 14
    loss, _ = ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -3.0]), 0.1,
                            weights=torch.tensor([2.0, 10.0]))
    assert loss.item() == pytest.approx(14.0)


def test_ratio_norm_by_hand():
    """log w = (logp - logp_old + mean_d (mu - mu_old)^2 / (2 s^2)) * s: one sample of two pixels, s = 0.5,
    mu - mu_old = [0.1, -0.3] (mean square 0.05), logp - logp_old = -0.2: (-0.2 + 0.05 / 0.5) * 0.5 = -0.05."""
    old_mean = torch.tensor([[1.0, 2.0]])
    log_ratio = ratio_norm_log_ratio(torch.tensor([-0.7]), torch.tensor([-0.5]), old_mean + torch.tensor([[0.1, -0.3]]),
                                     old_mean, torch.tensor([0.5]))
    assert log_ratio.item() == pytest.approx(-0.05)


def test_ratio_norm_is_the_mean_shift_times_the_rollout_noise():
    """GRPO-Guard's identity: with the Gaussian step's own log-probabilities, log w = mean_d((mu - mu_old) * eps),
    eps the transition's noise; so its mean over the noise is 0 (no negative bias) and its scale does not depend on
    the step's std."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    timestep = scheduler.timesteps[[1, 3, 5, 7]]
    v_old = torch.randn(4, 3, 8, 8, generator=generator)
    v_new = v_old + 0.05 * torch.randn(4, 3, 8, 8, generator=generator)
    x_next, old_log_prob, old_mean, std_dev_t = sde_step_with_logprob(scheduler, v_old, timestep, x, 0.7,
                                                                      generator=generator)
    _, log_prob, mean, _ = sde_step_with_logprob(scheduler, v_new, timestep, x, 0.7, prev_sample=x_next)
    index = [1, 3, 5, 7]
    dt = (scheduler.sigmas[index] - scheduler.sigmas[[i + 1 for i in index]]).float()
    s = std_dev_t.reshape(-1) * dt.sqrt()
    eps = (x_next - old_mean) / s.view(-1, 1, 1, 1)
    expected = ((mean - old_mean) * eps).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ratio_norm_log_ratio(log_prob, old_log_prob, mean, old_mean, s), expected,
                               rtol=1e-4, atol=1e-7)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = torch.tensor([7, 7, 2, 2])
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0])  # group means 2 and 12
    # Flow-GRPO's global std is numpy's (ddof 0): mean 7, squares 36 + 16 + 9 + 49 = 110, std = sqrt(110 / 4)
    torch.testing.assert_close(group_advantages(rewards, groups, "global", eps=0.0), centred / math.sqrt(27.5))
    # the unbiased std (ddof 1): sqrt(110 / 3)
    torch.testing.assert_close(group_advantages(rewards, groups, "global", eps=0.0, ddof=1),
                               centred / math.sqrt(110 / 3))
    # per-group std, ddof 0: sqrt((1 + 1) / 2) = 1 and sqrt((4 + 4) / 2) = 2
    torch.testing.assert_close(group_advantages(rewards, groups, "group", eps=0.0),
                               torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    # per-group, ddof 1: sqrt(2) and sqrt(8)
    expected = torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2), -2 / math.sqrt(8), 2 / math.sqrt(8)])
    torch.testing.assert_close(group_advantages(rewards, groups, "group", eps=0.0, ddof=1), expected)
    assert float(np.std([1, 3, 10, 14])) == pytest.approx(math.sqrt(27.5))  # numpy's default is the ddof-0 std
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), torch.tensor([0, 0, 0, 0]), "group", clip=1.0)
    assert clipped.max().item() == 1.0


def test_identical_rewards_in_a_group_give_zero_advantage():
    adv = group_advantages(torch.tensor([5.0, 5.0, 1.0, 2.0]), torch.tensor([0, 0, 1, 1]), "group")
    assert adv[:2].abs().max() == 0


def test_kl_to_reference_by_hand():
    mean = torch.ones(2, 1, 2, 2)
    reference = torch.zeros(2, 1, 2, 2)
    reference[1] = 0.5
    std = torch.tensor([0.5, 1.0]).view(2, 1, 1, 1)
    # sample 0: mean sq 1 / (2 * 0.25) = 2; sample 1: 0.25 / 2 = 0.125
    torch.testing.assert_close(kl_to_reference(mean, reference, std), torch.tensor([2.0, 0.125]))
    # CPS: the squared mean difference alone, also where the step's std is 0 (a deterministic step gave NaN)
    zero = torch.zeros(2, 1, 1, 1)
    torch.testing.assert_close(kl_to_reference(mean, reference, zero, "cps"), torch.tensor([1.0, 0.25]))


def test_per_prompt_stat_tracker_by_hand():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    # Fewer than min_count for each prompt: the batch's mean (2.5) and population std stand in.
    batch = np.array([1.0, 2.0, 3.0, 4.0])
    first = tracker.update(["a", "a", "b", "b"], batch)
    np.testing.assert_allclose(first, (batch - 2.5) / (np.std(batch) + 1e-6))
    # "a" now has 4 >= 3 rewards [1, 2, 5, 6]: its own buffer's statistics.
    second = tracker.update(["a", "a", "b"], np.array([5.0, 6.0, 7.0]))
    buffer_a = np.array([1.0, 2.0, 5.0, 6.0])
    np.testing.assert_allclose(second[:2], (np.array([5.0, 6.0]) - buffer_a.mean()) / (buffer_a.std() + 1e-6))
    buffer_b = np.array([3.0, 4.0, 7.0])
    np.testing.assert_allclose(second[2], (7.0 - buffer_b.mean()) / (buffer_b.std() + 1e-6))
    # The buffer keeps the last buffer_size rewards, and the state round-trips.
    tracker.update(["a"] * 3, np.array([7.0, 8.0, 9.0]))
    assert list(tracker.buffers["a"]) == [6.0, 7.0, 8.0, 9.0]
    restored = PerPromptStatTracker(buffer_size=4, min_count=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.buffers["a"] == tracker.buffers["a"] and restored.buffers["a"].maxlen == 4


def test_flow_dppo_keeps_corrective_moves_and_drops_only_far_moves_in_the_advantages_direction():
    """ALGORITHMS-2026 section 10's table: s = 0.5 (2 s^2 = 0.5), tau = 1e-5, D = 2 delta^2; delta = 0.01 gives
    D = 2e-4 (past tau), delta = 0.001 gives D = 2e-6 (within it)."""
    from rl.losses import dppo_keep, dppo_loss, gaussian_step_kl

    std = torch.full((5,), 0.5)
    old_mean = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0))
    delta = torch.tensor([0.01, 0.01, 0.01, 0.01, 0.001]).reshape(5, 1, 1)
    divergence = gaussian_step_kl(old_mean + delta, old_mean, std)
    assert divergence.tolist() == pytest.approx([2e-4, 2e-4, 2e-4, 2e-4, 2e-6], rel=1e-4)
    ratio = torch.tensor([1.1, 0.9, 0.9, 1.1, 1.1])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    assert dppo_keep(divergence, ratio, advantages, 1e-5).tolist() == [False, True, False, True, True]
    assert dppo_keep(torch.full((2,), 1.0), torch.ones(2), torch.tensor([1.0, -1.0]), 1e-5).all()  # ratio 1: a tie
    assert dppo_keep(divergence, ratio, advantages, 2e-4 + 1e-9).all()  # below the threshold nothing is dropped
    edge = dppo_keep(torch.tensor([0.5, 0.5]), torch.tensor([1.1, 1.1]), torch.tensor([1.0, 1.0]), 0.5)
    assert not edge.any()  # D at the threshold counts as past it (D >= tau)

    log_prob = torch.log(ratio).requires_grad_(True)
    loss, stats = dppo_loss(log_prob, torch.zeros(5), old_mean + delta, old_mean, std, advantages, 1e-5)
    keep = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    assert loss.item() == pytest.approx((-advantages * ratio * keep).sum().item() / 5, abs=1e-7)  # dropped stay in N
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx((-advantages * ratio * keep / 5).tolist(), abs=1e-7)
    assert stats["masked_fraction"].item() == pytest.approx(0.4)
    assert stats["kl_new_old_mean"].item() == pytest.approx((4 * 2e-4 + 2e-6) / 5, rel=1e-4)


def test_flow_dppo_passes_everything_on_policy_and_stays_finite_where_a_dropped_ratio_overflows():
    from rl.losses import dppo_loss

    mean, std = torch.randn(3, 8), torch.full((3,), 0.3)
    log_prob = torch.tensor([0.2, -0.2, 0.0])
    loss, stats = dppo_loss(log_prob, torch.zeros(3), mean, mean.clone(), std, torch.tensor([1.0, -1.0, 2.0]), 1e-5)
    assert stats["masked_fraction"].item() == 0.0 and stats["kl_new_old_mean"].item() == 0.0
    assert loss.item() == pytest.approx((-math.exp(0.2) + math.exp(-0.2) - 2.0) / 3, abs=1e-6)
    far = mean + 1.0  # D = 1 / (2 * 0.09): dropped where the move goes with the advantage
    loss, stats = dppo_loss(torch.tensor([1000.0, 0.0, 0.0]), torch.zeros(3), far, mean, std,
                            torch.tensor([1.0, 1.0, -1.0]), 1e-5)
    assert math.isfinite(loss.item()) and stats["masked_fraction"].item() == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx((-1.0 + 1.0) / 3, abs=1e-6)  # the ratio-1 entries pass (ties never mask)
