"""`sde_step_with_logprob` against hand computations, re-scoring, and the statistics of the noise it draws."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipelines import sde_step_with_logprob


def scheduler_with_sigmas(sigmas, shift=1.0):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=sigmas)
    return scheduler


def scalar(value):
    return torch.full((1, 1, 1, 1), value)


def test_hand_computed_sde_step():
    # s = 0.6, s' = 0.4, a = 0.7, x = 1, v = -0.5, x' = 0.9. By hand:
    # std = 0.7 sqrt(0.6 / 0.4); std^2 = 0.735; dt = -0.2
    # mean = 1 * (1 + 0.735 / 1.2 * -0.2) + -0.5 * (1 + 0.735 * 0.4 / 1.2) * -0.2 = 0.8775 + 0.1245 = 1.002
    # variance = 0.735 * 0.2 = 0.147; logp = -(0.102^2) / 0.294 - ln(sqrt(0.147)) - ln(sqrt(2 pi)) = 0.0043354
    scheduler = scheduler_with_sigmas([0.6, 0.4])
    prev, log_prob, mean, std = sde_step_with_logprob(
        scheduler, scalar(-0.5), torch.tensor([600.0]), scalar(1.0), noise_level=0.7, prev_sample=scalar(0.9)
    )
    assert mean.item() == pytest.approx(1.002, abs=1e-6)
    assert std.item() == pytest.approx(0.7 * math.sqrt(1.5), abs=1e-6)
    assert log_prob.item() == pytest.approx(0.0043354, abs=1e-6)
    assert prev.item() == pytest.approx(0.9)


def test_first_step_uses_second_sigma_in_the_std():
    # s = 1 would divide by zero: std = a sqrt(s / (1 - sigmas[1])) = 0.5 sqrt(1 / 0.5).
    # mean = 2 * (1 + 0.5 / 2 * -0.5) + 1 * (1 + 0) * -0.5 = 1.75 - 0.5 = 1.25
    scheduler = scheduler_with_sigmas([1.0, 0.5])
    _, log_prob, mean, std = sde_step_with_logprob(
        scheduler, scalar(1.0), torch.tensor([1000.0]), scalar(2.0), noise_level=0.5, prev_sample=scalar(1.25)
    )
    assert std.item() == pytest.approx(0.5 * math.sqrt(2), abs=1e-6)
    assert mean.item() == pytest.approx(1.25, abs=1e-6)
    # x' at the mean: logp = -ln(std * sqrt(0.5)) - ln(sqrt(2 pi)) = -ln(0.5) - 0.9189385
    assert log_prob.item() == pytest.approx(math.log(2) - 0.9189385, abs=1e-6)


def test_hand_computed_cps_step():
    # CPS: std = s' sin(a pi / 2) = 0.4 sin(pi / 4); x0 = 1 - 0.6 * -0.5 = 1.3; x1 = 1 + 0.4 * -0.5 = 0.8
    # mean = 1.3 * 0.6 + 0.8 * sqrt(0.16 - 0.08) = 1.00627417; logp = -(0.9 - mean)^2 = -0.01129420
    scheduler = scheduler_with_sigmas([0.6, 0.4])
    _, log_prob, mean, std = sde_step_with_logprob(
        scheduler, scalar(-0.5), torch.tensor([600.0]), scalar(1.0), 0.5, prev_sample=scalar(0.9), sde_type="cps"
    )
    assert std.item() == pytest.approx(0.4 * math.sin(math.pi / 4), abs=1e-6)
    assert mean.item() == pytest.approx(1.00627417, abs=1e-6)
    assert log_prob.item() == pytest.approx(-0.01129420, abs=1e-6)


def test_cps_final_step_is_deterministic():
    scheduler = scheduler_with_sigmas([0.6, 0.4])
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    prev, log_prob, mean, _ = sde_step_with_logprob(scheduler, v, torch.tensor([400.0, 400.0]), x, 0.8, sde_type="cps")
    torch.testing.assert_close(prev, x - 0.4 * v)  # s' = 0: the x0 prediction
    assert torch.all(log_prob == 0)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_zero_noise_is_the_scheduler_euler_step(sde_type):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for t in scheduler.timesteps:
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        prev, log_prob, _, _ = sde_step_with_logprob(scheduler, v, t.expand(3), x, 0.0, sde_type=sde_type)
        assert log_prob is None
        if sde_type == "sde":
            assert torch.equal(prev, expected)  # bit-identical to diffusers' Euler step
        else:
            torch.testing.assert_close(prev, expected, atol=1e-5, rtol=1e-5)


def test_rescoring_a_sampled_transition_returns_its_log_prob(generator):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x, v = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    t = scheduler.timesteps[[0, 3, 5, 9]]  # a different timestep for each sample
    prev, log_prob, _, _ = sde_step_with_logprob(scheduler, v, t, x, 0.7, generator=generator)
    _, rescored, _, _ = sde_step_with_logprob(scheduler, v, t, x, 0.7, prev_sample=prev)
    torch.testing.assert_close(rescored, log_prob, rtol=0, atol=0)
    # A different velocity explains the same transition worse.
    _, other, _, _ = sde_step_with_logprob(scheduler, v + 5.0, t, x, 0.7, prev_sample=prev)
    assert torch.all(other < log_prob)


def test_per_sample_timesteps_match_one_at_a_time():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x, v, prev = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = scheduler.timesteps[[1, 7, 4]]
    _, batch_lp, batch_mean, _ = sde_step_with_logprob(scheduler, v, t, x, 0.7, prev_sample=prev)
    for i in range(3):
        _, lp, mean, _ = sde_step_with_logprob(scheduler, v[i : i + 1], t[i : i + 1], x[i : i + 1], 0.7,
                                               prev[i : i + 1])
        torch.testing.assert_close(batch_lp[i : i + 1], lp)
        torch.testing.assert_close(batch_mean[i : i + 1], mean)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("step", [0, 4, 8])
def test_sampled_noise_has_the_claimed_gaussian_statistics(sde_type, step, generator):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x, v = torch.randn(2, 16, 64, 64), torch.randn(2, 16, 64, 64)
    t = scheduler.timesteps[step].expand(2)
    prev, _, mean, std = sde_step_with_logprob(scheduler, v, t, x, 0.7, generator=generator, sde_type=sde_type)
    sigma, sigma_next = scheduler.sigmas[step], scheduler.sigmas[step + 1]
    transition_std = std * torch.sqrt(sigma - sigma_next) if sde_type == "sde" else std
    standardised = (prev - mean) / transition_std
    assert abs(standardised.mean().item()) < 0.01  # 131072 draws: the mean's standard error is 0.003
    assert standardised.std().item() == pytest.approx(1.0, abs=0.01)


def test_gradients_flow_through_the_mean_only():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8)
    v = torch.randn(2, 4, 8, 8, requires_grad=True)
    prev = torch.randn(2, 4, 8, 8, requires_grad=True)
    _, log_prob, _, _ = sde_step_with_logprob(scheduler, v, scheduler.timesteps[2].expand(2), x, 0.7, prev)
    log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert prev.grad is None


def test_bad_arguments_fail_clearly():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[2].expand(2)
    with pytest.raises(ValueError, match="noise_level=0"):
        sde_step_with_logprob(scheduler, x, t, x, 0.0, prev_sample=x)
    with pytest.raises(ValueError, match="not in the scheduler's current schedule"):
        sde_step_with_logprob(scheduler, x, torch.tensor([123.0, 456.0]), x, 0.7)
    with pytest.raises(ValueError, match="sde_type"):
        sde_step_with_logprob(scheduler, x, t, x, 0.7, sde_type="ddim")
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        sde_step_with_logprob(scheduler, x, t, x, -0.1)
