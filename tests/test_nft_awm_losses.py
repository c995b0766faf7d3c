"""DiffusionNFT's and AWM's math (rl/losses.py) and the trailing policy copy (rl/policy_copy.py) against hand
computations (`docs/algorithms.md` section 10)."""

import pytest
import torch

from rl.losses import (
    awm_advantages,
    awm_log_prob,
    awm_policy_loss,
    awm_timestep_indices,
    nft_implicit_velocities,
    nft_loss,
    nft_optimality_prob,
    velocity_kl,
)
from rl.policy_copy import PolicyCopy, capped_linear_decay, lerp_params_


def column(*values):
    return torch.tensor(values).reshape(-1, 1)


def test_optimality_probability():
    r = nft_optimality_prob(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0]))
    assert r.tolist() == pytest.approx([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


def test_implicit_velocities():
    positive, negative = nft_implicit_velocities(torch.tensor(1.0), torch.tensor(0.0), 0.1)
    assert (positive.item(), negative.item()) == pytest.approx((0.1, -0.1))
    positive, negative = nft_implicit_velocities(torch.tensor(3.0), torch.tensor(1.0), 1.0)
    assert (positive.item(), negative.item()) == (3.0, -1.0)  # v+ = v_theta and v- = 2 v_old - v_theta at beta 1


@pytest.mark.parametrize("beta, value", [(1.0, 0.5), (0.1, 5.0)])
def test_nft_loss_and_gradient_by_hand(beta, value):
    # x0 = 0, eps = 1, t = 0.5 -> x_t = 0.5; v_theta = v_old = 0.8 -> v+ = v- = 0.8, x0± = 0.5 - 0.4 = 0.1;
    # w = 0.1, L± = 0.01 / 0.1 = 0.1; loss = 5 (0.75 * 0.1 + 0.25 * 0.1) / beta.
    # dL±/dv± = 2 (x0± - x0)(-t) / w = -1; dv+/dv_theta = beta, dv-/dv_theta = -beta:
    # dL/dv_theta = 5 / beta (0.75 * -1 * beta + 0.25 * -1 * -beta) = -2.5 at every beta.
    v_theta = column(0.8).requires_grad_()
    loss = nft_loss(v_theta, column(0.8), column(0.0), column(1.0), torch.tensor([0.5]), torch.tensor([0.75]), beta)
    assert loss.item() == pytest.approx(value)
    loss.sum().backward()
    assert v_theta.grad.item() == pytest.approx(-2.5)
    v_theta.grad = None
    nft_loss(v_theta, column(0.8), column(0.0), column(1.0), torch.tensor([0.5]), torch.tensor([0.5]), beta).backward()
    assert v_theta.grad.item() == pytest.approx(0.0)  # an average sample (r = 1/2) pulls neither way


def test_nft_loss_scale_follows_the_advantage_clip():
    # The reference multiplies by adv_clip_max: at clip 3 the loss of the case above (beta 1) is 3 (0.75 * 0.1 +
    # 0.25 * 0.1) = 0.3, and an advantage of 1.5 (r = 0.75 at clip 3) pulls as hard per unit of advantage as 2.5 at 5.
    args = (column(0.8), column(0.8), column(0.0), column(1.0), torch.tensor([0.5]), torch.tensor([0.75]), 1.0)
    assert nft_loss(*args, adv_clip=3.0).item() == pytest.approx(0.3)
    assert nft_loss(*args).item() == pytest.approx(0.5)
    for clip, advantage in ((3.0, 1.5), (5.0, 1.5)):
        v_theta = column(0.8).requires_grad_()
        r = nft_optimality_prob(torch.tensor([advantage]), clip)
        nft_loss(v_theta, column(0.8), column(0.0), column(1.0), torch.tensor([0.5]), r, 1.0, adv_clip=clip).backward()
        # dL/dv = adv_clip (r (-1) + (1 - r)(+1)) = -adv_clip (2r - 1) = -A: the same for both clips
        assert v_theta.grad.item() == pytest.approx(-advantage)


def test_nft_plain_velocity_loss_by_hand():
    # u = eps - x0 = 1; v+ = v- = 0.8 -> L± = 0.04; loss = 5 * 0.04 / 1 = 0.2
    loss = nft_loss(column(0.8), column(0.8), column(0.0), column(1.0), torch.tensor([0.5]), torch.tensor([0.75]), 1.0,
                    adaptive=False)
    assert loss.item() == pytest.approx(0.2)


def test_on_policy_nft_gradient_is_the_advantage_weighted_flow_matching_gradient():
    """At v_theta = v_old the gradient is `10 t^2 A_hat (v_old - u) / (w D)` per element (A_hat = 2r - 1), for every
    beta: the gradient of `5 A_hat t^2 mean_d (v - u)^2 / w`, an advantage-weighted flow-matching loss."""
    torch.manual_seed(0)
    x0, noise, v_old = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    t = torch.tensor([0.2, 0.5, 0.7, 0.9])
    r = torch.tensor([0.1, 0.5, 0.8, 1.0])
    u = noise - x0
    w = (t.view(-1, 1, 1) * (v_old - u)).abs().mean(dim=(1, 2))
    expected = 10 * (t**2 * (2 * r - 1) / w).view(-1, 1, 1) * (v_old - u) / 15
    for beta in (1.0, 0.1):
        v_theta = v_old.clone().requires_grad_()
        nft_loss(v_theta, v_old, x0, noise, t, r, beta).sum().backward()
        torch.testing.assert_close(v_theta.grad, expected, rtol=1e-5, atol=1e-6)
    a_hat = (2 * r - 1).view(-1, 1, 1)
    v = v_old.clone().requires_grad_()
    (5 * a_hat * t.view(-1, 1, 1) ** 2 * (v - u) ** 2 / w.view(-1, 1, 1)).mean(dim=(1, 2)).sum().backward()
    torch.testing.assert_close(v.grad, expected, rtol=1e-5, atol=1e-6)


def test_awm_off_policy_ratio_and_clip_by_hand():
    """After an epoch's first optimiser step, AWM compares with l_old (the weights before the update): m = (0.0625,
    0.0081), t = 0.5, p = 0.25 give l = -2 (m^0.25 - 1e-10^0.25) = (-0.993675, -0.593675); A = (2.5, -2.5) clipped to
    5 and scaled give A_hat = (0.5, -0.5)."""
    m = torch.tensor([0.0625, 0.0081], requires_grad=True)
    log_prob = awm_log_prob(m, torch.tensor([0.5, 0.5]))
    assert log_prob.tolist() == pytest.approx([-0.993675, -0.593675], abs=1e-6)
    a_hat = awm_advantages(torch.tensor([2.5, -2.5]))
    assert a_hat.tolist() == pytest.approx([0.5, -0.5])
    # l - l_old = (0.1, -0.2): ratio = (e^0.1, e^-0.2) = (1.105171, 0.818731), inside [0, 2]:
    # loss = (-0.5 * 1.105171 + 0.5 * 0.818731) / 2 = -0.071610; d loss / d l = -A_hat r / 2 = (-0.276293, 0.204683)
    old = log_prob.detach() - torch.tensor([0.1, -0.2])
    leaf = log_prob.detach().clone().requires_grad_()
    loss, stats = awm_policy_loss(leaf, old, a_hat)
    assert loss.item() == pytest.approx(-0.071610, abs=1e-6)
    loss.backward()
    assert leaf.grad.tolist() == pytest.approx([-0.276293, 0.204683], abs=1e-6)
    assert stats["clipfrac"].item() == 0.0
    # through l to the flow-matching error: d l / d m = -t m^(p-1) = (-4, -18.518519)
    awm_policy_loss(log_prob, old, a_hat)[0].backward()
    assert m.grad.tolist() == pytest.approx([-0.276293 * -4, 0.204683 * -18.518519], rel=1e-5)
    # l - l_old = (0.8, -0.8): ratio (2.225541, 0.449329); the good sample's ratio is past 1 + 1 = 2, so its term is
    # the clipped -0.5 * 2 = -1 and carries no gradient; the bad one's max(0.5 * 0.449329, 0.5 * 0.449329) does.
    leaf = log_prob.detach().clone().requires_grad_()
    loss, stats = awm_policy_loss(leaf, log_prob.detach() - torch.tensor([0.8, -0.8]), a_hat)
    assert loss.item() == pytest.approx((-1.0 + 0.5 * 0.449329) / 2, abs=1e-6)
    loss.backward()
    assert leaf.grad.tolist() == pytest.approx([0.0, 0.5 * 0.449329 / 2], abs=1e-6)
    assert stats["clipfrac"].item() == 0.5


def test_velocity_kl():
    assert velocity_kl(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])).tolist() == [2.5]


def test_awm_log_prob_by_hand():
    # m = 0.0625, t = 0.5, p = 0.25: m^p = 0.5; 1e-10^0.25 = 0.0031623; -(0.5 - 0.0031623) * 0.5 / 0.25 = -0.993675
    m = torch.tensor([0.0625])
    assert awm_log_prob(m, torch.tensor([0.5])).item() == pytest.approx(-0.993675, abs=1e-6)
    assert awm_log_prob(m, torch.tensor([0.5]), "uniform").item() == pytest.approx(-0.0625)


def test_awm_surrogate_gradient():
    """AWM's policy loss at ratio 1 (`l_old = sg(l)`, the first optimiser step of an epoch): the value `-mean(A_hat)`
    and the gradient `-A_hat / N` on each `l`: an advantage-weighted flow-matching loss through `l = -rho(m)`; by hand,
    d l / d m = -t m^(p-1) = -0.5 * 8 = -4 at m = 0.0625 (m^(-0.75) = 8), t = 0.5."""
    a_hat = awm_advantages(torch.tensor([10.0, -2.5]))
    assert a_hat.tolist() == pytest.approx([1.0, -0.5])
    log_prob = torch.tensor([-0.3, -0.7], requires_grad=True)
    loss, stats = awm_policy_loss(log_prob, log_prob.detach(), a_hat)
    assert loss.item() == pytest.approx(-0.25)
    assert stats["ratio"].item() == 1.0 and stats["clipfrac"].item() == 0.0
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([-0.5, 0.25])
    m = torch.tensor([0.0625], requires_grad=True)
    awm_log_prob(m, torch.tensor([0.5])).backward()
    assert m.grad.item() == pytest.approx(-4.0, rel=1e-6)


def test_awm_stratified_timesteps():
    # 14 steps, 6 strata of linspace(1, 12, 7).long() = [1, 2, 4, 6, 8, 10, 12]
    assert awm_timestep_indices(14, 6, torch.zeros(6)).tolist() == [1, 2, 4, 6, 8, 10]
    assert awm_timestep_indices(14, 6, torch.full((6,), 0.9999)).tolist() == [1, 3, 5, 7, 9, 11]
    assert awm_timestep_indices(14, 6, torch.zeros(6), skip_first=False).tolist() == [0, 2, 4, 6, 8, 10]
    drawn = awm_timestep_indices(10, 4, torch.rand(4))
    assert drawn.unique().numel() == 4 and drawn.min() >= 1 and drawn.max() <= 8


def test_capped_linear_decay():
    assert capped_linear_decay(100, 0.001, 0.5) == pytest.approx(0.1)
    assert capped_linear_decay(1000, 0.001, 0.5) == 0.5
    assert capped_linear_decay(175, 0.0075, 0.999, flat=75) == pytest.approx(0.75)
    assert capped_linear_decay(74, 0.0075, 0.999, flat=75) == 0.0


def test_lerp_params_and_the_policy_copy():
    target, source = [torch.tensor([0.0])], [torch.tensor([1.0])]
    lerp_params_(target, source, 0.25)
    assert target[0].item() == pytest.approx(0.75)
    weights = [torch.nn.Parameter(torch.tensor([2.0, 4.0]))]
    copy = PolicyCopy()
    copy.ensure(weights)
    with torch.no_grad():
        weights[0].add_(2.0)  # trained: [4, 6]
    with copy.swapped_in(weights):
        assert weights[0].tolist() == [2.0, 4.0]
    assert weights[0].tolist() == [4.0, 6.0]
    assert copy.deviation(weights) == pytest.approx((8**0.5) / (20**0.5))
    copy.update(weights, decay=0.5)  # [3, 5]
    restored = PolicyCopy()
    restored.load_state_dict(copy.state_dict())
    restored.ensure(weights)
    assert restored.tensors[0].tolist() == [3.0, 5.0]
