"""Diffusion-DPO's loss and online DPO's pairing against hand computations."""

import math

import pytest
import torch

from rl.losses import best_worst_pairs, dpo_loss


def test_dpo_loss_by_hand():
    # pair 0: model improves the winner by 0.02 more than the reference; pair 1: it prefers the loser by 0.01.
    model_w, model_l = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.30])
    ref_w, ref_l = torch.tensor([0.12, 0.29]), torch.tensor([0.20, 0.30])
    beta = 100.0
    # diff = (Lw - Lrw) - (Ll - Lrl): pair 0: (-0.02) - 0 = -0.02; pair 1: 0.01 - 0 = 0.01
    inside = [-0.5 * beta * -0.02, -0.5 * beta * 0.01]  # [1.0, -0.5]
    expected = sum(-math.log(1 / (1 + math.exp(-x))) for x in inside) / 2
    loss, stats = dpo_loss(model_w, model_l, ref_w, ref_l, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["implicit_acc"].item() == pytest.approx(0.5)
    assert stats["reward_margin"].item() == pytest.approx((1.0 - 0.5) / 2, rel=1e-5)
    assert stats["model_diff"].item() == pytest.approx((-0.10 + 0.0) / 2, rel=1e-5)
    assert stats["ref_diff"].item() == pytest.approx((-0.08 - 0.01) / 2, rel=1e-5)


def test_preferring_the_winner_more_than_the_reference_lowers_the_loss():
    ref = torch.tensor([0.5]), torch.tensor([0.5])
    at_reference, stats = dpo_loss(torch.tensor([0.5]), torch.tensor([0.5]), *ref, beta=10.0)
    assert at_reference.item() == pytest.approx(math.log(2))
    assert stats["implicit_acc"].item() == 0.5  # a tie counts half
    prefers_winner, stats = dpo_loss(torch.tensor([0.4]), torch.tensor([0.5]), *ref, beta=10.0)
    prefers_loser, _ = dpo_loss(torch.tensor([0.5]), torch.tensor([0.4]), *ref, beta=10.0)
    assert prefers_winner.item() < math.log(2) < prefers_loser.item()
    assert stats["implicit_acc"].item() == 1.0


def test_beta_scales_the_argument_of_the_sigmoid():
    args = torch.tensor([0.4]), torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.5])
    loss_1, stats_1 = dpo_loss(*args, beta=1.0)
    loss_4, stats_4 = dpo_loss(*args, beta=4.0)
    assert stats_4["reward_margin"].item() == pytest.approx(4 * stats_1["reward_margin"].item())
    assert loss_1.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.05))), rel=1e-5)
    assert loss_4.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), rel=1e-5)


def test_dpo_gradient_lowers_the_winner_error_and_raises_the_loser_error():
    model_w = torch.tensor([0.5], requires_grad=True)
    model_l = torch.tensor([0.5], requires_grad=True)
    loss, _ = dpo_loss(model_w, model_l, torch.tensor([0.5]), torch.tensor([0.5]), beta=2.0)
    loss.backward()
    # d/dLw of -logsigmoid(-beta/2 (Lw - Ll)) at 0 = sigmoid(0) * beta/2 = 0.5
    assert model_w.grad.item() == pytest.approx(0.5)
    assert model_l.grad.item() == pytest.approx(-0.5)


def test_best_worst_pairs_per_group():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.7, 0.2, 0.2])
    groups = torch.tensor([4, 4, 4, 1, 1, 1, 2, 2])  # group 2 is a tie: no pair
    winners, losers, valid = best_worst_pairs(rewards, groups)
    assert winners.tolist()[:2] == [1, 5]
    assert losers.tolist()[:2] == [0, 3]
    assert valid.tolist() == [True, True, False]
