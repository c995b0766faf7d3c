"""`pipelines.solvers.dpm_solver_pp_2m_step` by hand and against diffusers' `DPMSolverMultistepScheduler`."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from pipelines.solvers import dpm_solver_pp_2m_step


def toy_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A linear velocity field with a sigma-dependent offset: enough to tell first- from second-order steps."""
    weight = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    return x @ weight.T + torch.tensor([0.5, -1.0]) * sigma


def test_first_step_is_ddim_and_euler():
    # x = 2, v = 1 at s = 0.6 -> x0_hat = 2 - 0.6 = 1.4; DDIM to s' = 0.4:
    # (1 - 0.4) * 1.4 + (0.4 / 0.6) * (2 - 0.4 * 1.4) = 0.84 + 0.96 = 1.8 = 2 + (0.4 - 0.6) * 1 (Euler)
    x, v = torch.tensor([2.0]), torch.tensor([1.0])
    step = dpm_solver_pp_2m_step(x, x - 0.6 * v, None, None, 0.6, 0.4)
    assert step.item() == pytest.approx(1.8, abs=1e-6)


def test_second_order_step_by_hand():
    # s_prev = 0.8, s = 0.5, s' = 0.2: lambda = log(1/4), log(1), log(4) -> h = log 4, r = log 4 / log 4 = 1;
    # alpha' (e^-h - 1) = 0.8 (1/4 - 1) = -0.6; x = 1, x0 = 0.5, x0_prev = 0.3:
    # x' = 0.4 * 1 + 0.6 * 0.5 + 0.5 * 0.6 * (0.5 - 0.3) / 1 = 0.4 + 0.3 + 0.06 = 0.76
    step = dpm_solver_pp_2m_step(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.3]), 0.8, 0.5, 0.2)
    assert step.item() == pytest.approx(0.76, abs=1e-6)


def test_last_step_returns_the_data_prediction():
    x0 = torch.tensor([0.7, -0.1])
    step = dpm_solver_pp_2m_step(torch.tensor([3.0, 2.0]), x0, torch.tensor([9.0, 9.0]), 0.3, 0.1, 0.0)
    assert torch.allclose(step, x0)


@pytest.mark.parametrize("steps", [4, 10])
def test_matches_diffusers_dpm_solver_pp_2m(steps):
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                            prediction_type="flow_prediction", flow_shift=3.0)
    scheduler.set_timesteps(steps)
    sigmas = [float(s) for s in scheduler.sigmas]
    start = torch.tensor([[1.2, -0.7], [0.3, 0.9]])
    theirs = start.clone()
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(toy_velocity(theirs, sigmas[i]), t, theirs).prev_sample
    ours, previous = start.clone(), None
    for i in range(steps):
        x0 = ours - sigmas[i] * toy_velocity(ours, sigmas[i])
        ours = dpm_solver_pp_2m_step(ours, x0, previous, sigmas[i - 1] if i else None, sigmas[i], sigmas[i + 1])
        previous = x0
    assert torch.allclose(ours, theirs, atol=1e-5)
    euler = start.clone()
    for i in range(steps):
        euler = euler + (sigmas[i + 1] - sigmas[i]) * toy_velocity(euler, sigmas[i])
    assert not torch.allclose(euler, theirs, atol=1e-3)  # the second-order correction matters on this field


def test_pipeline_dpm2_sampling_matches_the_stock_pipeline_with_diffusers_dpm_solver(tiny_pipe, monkeypatch):
    """`solver="dpm2"` on the stock DPM-Solver++ scheduler's sigmas gives the stock pipeline's latents. diffusers'
    DPM scheduler hands the transformer integer timesteps (its `timesteps` are int64) where the log-prob pipeline
    passes `1000 * sigma`; both see the truncated timesteps here, so that only the solvers are compared."""
    from diffusers import StableDiffusion3Pipeline

    shift = tiny_pipe.scheduler.config.shift
    dpm = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                      prediction_type="flow_prediction", flow_shift=shift)
    stock = StableDiffusion3Pipeline(**{**tiny_pipe.components, "scheduler": dpm})
    stock.set_progress_bar_config(disable=True)
    forward = tiny_pipe.transformer.forward
    monkeypatch.setattr(tiny_pipe.transformer, "forward",
                        lambda *args, timestep, **kwargs: forward(*args, timestep=timestep.floor(), **kwargs))
    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=6, guidance_scale=4.5, output_type="latent")
    expected = stock(generator=torch.Generator().manual_seed(3), **kwargs).images
    # diffusers' flow sigmas before the shift (the log-prob pipeline's scheduler shifts what it is given)
    unshifted = (1 - torch.linspace(1, 1 / 1000, 7)).flip(0)[:-1].tolist()
    ours = tiny_pipe(generator=torch.Generator().manual_seed(3), solver="dpm2", sigmas=unshifted, **kwargs)
    torch.testing.assert_close(ours.sigmas, dpm.sigmas.float(), atol=1e-6, rtol=0)
    assert (ours.images - expected).abs().max() < 1e-5
    euler = tiny_pipe(generator=torch.Generator().manual_seed(3), sigmas=unshifted, **kwargs)
    assert (euler.images - expected).abs().max() > 1e-3


def test_flash_schedule_regrids_the_steps_after_the_window():
    """MixGRPO-Flash on 25 steps with the window ending at L = 3: ratio 0.4 leaves int(22 * 0.4) = 8 points, 7 steps
    after the window (11 in all); ratio 0.2, 3 (7 in all); the first post-window sigma is the schedule's
    sigma[L + 1]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines.solvers import flash_sigmas, time_shift

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(25)
    sigmas = scheduler.sigmas.tolist()
    for ratio, total in ((0.4, 11), (0.2, 7)):
        flash = flash_sigmas(sigmas, 3, ratio, 3.0)
        regridded = FlowMatchEulerDiscreteScheduler(shift=3.0)
        regridded.set_timesteps(sigmas=flash)
        assert len(regridded.timesteps) == total
        assert regridded.sigmas[:5].tolist() == pytest.approx(sigmas[:5], abs=1e-6)  # steps 0..3, and sigma[L + 1]
        assert regridded.sigmas[-1] == 0
        gaps = [a - b for a, b in zip(flash[4:], flash[5:] + [0.0], strict=True)]
        assert gaps == pytest.approx([gaps[0]] * len(gaps))  # linear before the shift, down to 0
        assert time_shift(flash[4], 3.0) == pytest.approx(sigmas[4], abs=1e-6)
    unchanged = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unchanged.set_timesteps(sigmas=flash_sigmas(sigmas, 24, 0.4, 3.0))  # the window ends on the last step
    assert unchanged.sigmas.tolist() == pytest.approx(sigmas, abs=1e-6)
