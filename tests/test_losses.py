"""The training objectives against hand computations."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rl.losses import flow_matching_loss, sample_training_timesteps


def test_flow_matching_loss_by_hand():
    # One sample, two "pixels": x0 = [1, 2], eps = [0, 1], s = 0.5 -> x_s = [0.5, 1.5]; target v = eps - x0 = [-1, -1].
    x0, eps = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])
    s = torch.tensor([0.5])
    noisy = (1 - s[:, None]) * x0 + s[:, None] * eps
    pred = torch.tensor([[-1.0, 0.0]])  # errors: 0 and 1 -> mean square 0.5
    assert flow_matching_loss(pred, x0, eps, noisy, s, "none").item() == pytest.approx(0.5)
    # sigma_sqrt weights by s^-2 = 4.
    assert flow_matching_loss(pred, x0, eps, noisy, s, "sigma_sqrt").item() == pytest.approx(2.0)
    # cosmap weights by 2 / (pi (1 - 2s + 2s^2)) = 2 / (pi * 0.5).
    assert flow_matching_loss(pred, x0, eps, noisy, s, "cosmap").item() == pytest.approx(0.5 * 4 / math.pi)
    # logit_normal and mode weight 1 (their effect is in the timestep density).
    assert flow_matching_loss(pred, x0, eps, noisy, s, "logit_normal").item() == pytest.approx(0.5)
    # Preconditioned: x0_hat = x_s - s * pred = [1, 1.5] vs x0 = [1, 2] -> mean square 0.125.
    assert flow_matching_loss(pred, x0, eps, noisy, s, "none", precondition_outputs=True).item() == pytest.approx(0.125)


def test_perfect_velocity_has_zero_loss_per_sample():
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    s = torch.tensor([0.2, 0.5, 0.9])
    noisy = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    loss = flow_matching_loss(eps - x0, x0, eps, noisy, s, "logit_normal")
    assert loss.shape == (3,) and torch.allclose(loss, torch.zeros(3), atol=1e-10)
    precond = flow_matching_loss(eps - x0, x0, eps, noisy, s, "none", precondition_outputs=True)
    assert torch.allclose(precond, torch.zeros(3), atol=1e-10)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"])
def test_training_timesteps_come_from_the_schedule(scheme):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    timesteps, sigmas = sample_training_timesteps(scheduler, 512, scheme, generator=torch.Generator().manual_seed(0))
    assert timesteps.shape == sigmas.shape == (512,)
    index = (scheduler.timesteps[None] == timesteps[:, None]).float().argmax(1)
    torch.testing.assert_close(scheduler.sigmas[index], sigmas)
    again, _ = sample_training_timesteps(scheduler, 512, scheme, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, timesteps)


def test_logit_normal_concentrates_on_middle_sigmas_before_the_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # no shift: sigma = u
    _, sigmas = sample_training_timesteps(scheduler, 20000, "logit_normal", generator=torch.Generator().manual_seed(0))
    _, uniform = sample_training_timesteps(scheduler, 20000, "none", generator=torch.Generator().manual_seed(0))
    middle = lambda x: ((x > 0.3) & (x < 0.7)).float().mean().item()  # noqa: E731
    assert middle(sigmas) == pytest.approx(0.603, abs=0.015)  # P(|N(0, 1)| < ln(0.7 / 0.3)) = 0.603
    assert middle(uniform) == pytest.approx(0.40, abs=0.02)


def test_unknown_weighting_scheme_fails():
    with pytest.raises(ValueError, match="unknown weighting_scheme 'karras'"):
        flow_matching_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1),
                           "karras")
