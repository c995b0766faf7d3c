"""One stochastic sampling step of a flow-matching model, with the log-density of the transition.

Implements `docs/algorithms.md` section 1 (Flow-GRPO, arXiv 2505.05470): the Euler ODE step `x' = x + (s' - s) v` is
turned into an SDE with the same marginals, whose one-step transition is Gaussian, so that policy-gradient methods can
compute `log p(x' | x)` and re-score stored transitions under new weights.

Conventions follow diffusers' SD3 scheduler: `x_s = (1 - s) x0 + s eps`, the model predicts `v = eps - x0`, sampling
walks `scheduler.sigmas` from 1 down to 0, and `scheduler.timesteps = sigmas[:-1] * num_train_timesteps`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

SdeType = Literal["sde", "cps"]


def sigmas_for_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler, timestep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Current and next sigma for each timestep of a batch, looked up in the scheduler's current schedule.

    `timestep` holds one entry of `scheduler.timesteps` per sample (they may differ within the batch). Returns two
    float32 tensors of shape (B,). The scheduler must have been `set_timesteps(...)` for the same schedule that
    produced the timesteps.
    """
    timestep = torch.as_tensor(timestep).reshape(-1)
    schedule = scheduler.timesteps.to(device=timestep.device, dtype=torch.float32)
    if schedule.numel() == 0:
        raise ValueError("the scheduler has no timesteps: call scheduler.set_timesteps(...) first")
    distance = (schedule[None, :] - timestep.float()[:, None]).abs()
    nearest, index = distance.min(dim=1)
    # Timesteps are ~1000-scaled floats; anything further than a rounding error is not from this schedule.
    off_schedule = nearest > 1e-3
    if bool(off_schedule.any()):
        bad = timestep[off_schedule].tolist()
        raise ValueError(f"timesteps {bad} are not in the scheduler's current schedule {schedule.tolist()}")
    sigmas = scheduler.sigmas.to(device=timestep.device, dtype=torch.float32)
    return sigmas[index], sigmas[index + 1]


def sde_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sde_type: SdeType = "sde",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Take (or re-score) one sampling step from `sample` at `timestep` towards the next, smaller sigma.

    Args:
        scheduler: a `FlowMatchEulerDiscreteScheduler` whose timesteps are set; only its `sigmas`/`timesteps` are read,
            so its internal step counter is left alone.
        model_output: the predicted velocity `v` (after classifier-free guidance), shape (B, C, H, W).
        timestep: one scheduler timestep per sample, shape (B,); they may differ within a batch.
        sample: the current latents `x` at sigma `s`.
        noise_level: `a` in the formulas; 0 gives the plain Euler (ODE) step and no log-probability.
        prev_sample: if given, the stored next latents `x'` of a transition to re-score instead of drawing new ones.
        generator: random generator(s) for the step's noise.
        sde_type: "sde" is Flow-GRPO's SDE; "cps" is coefficients-preserving sampling (arXiv 2509.05952), whose
            log-probability follows the published implementation and drops every term that does not depend on the
            model (it is `-mean((x' - mean)^2)`, an unnormalised surrogate, and identically 0 on the final step where
            `s' = 0` makes the transition deterministic).

    Returns:
        `(prev_sample, log_prob, prev_sample_mean, std_dev_t)`, all float32: the next latents (B, C, H, W); the
        per-pixel *mean* log-density (B,), or None when `noise_level == 0`; the transition mean; and the noise scale
        `std_dev_t` with shape (B, 1, 1, 1). For "sde" the transition's standard deviation is `std_dev_t * sqrt(s - s')`
        (Flow-GRPO returns and uses `std_dev_t` alone, e.g. in its KL term); for "cps" it is `std_dev_t` itself.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if sde_type not in ("sde", "cps"):
        raise ValueError(f"sde_type must be 'sde' or 'cps', got {sde_type!r}")
    if prev_sample is not None and noise_level == 0:
        raise ValueError("cannot re-score a transition with noise_level=0: the ODE step has no density")

    # bf16 overflows in the mean below (Flow-GRPO), so the whole step runs in float32.
    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()

    sigma, sigma_next = sigmas_for_timesteps(scheduler, timestep.to(sample.device))
    if sigma.shape[0] != sample.shape[0]:
        raise ValueError(f"got {sigma.shape[0]} timesteps for a batch of {sample.shape[0]} samples")
    broadcast = (-1,) + (1,) * (sample.ndim - 1)
    sigma = sigma.view(broadcast)
    sigma_next = sigma_next.view(broadcast)
    dt = sigma_next - sigma  # negative: sampling goes from noise (s = 1) to data (s = 0)

    if sde_type == "sde":
        # s = 1 would divide by zero; Flow-GRPO uses the second sigma of the schedule there.
        sigma_safe = torch.where(sigma == 1, scheduler.sigmas[1].to(sigma), sigma)
        std_dev_t = noise_level * torch.sqrt(sigma / (1 - sigma_safe))
        prev_sample_mean = (
            sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )
        transition_std = std_dev_t * torch.sqrt(-dt)
    else:
        std_dev_t = (sigma_next * math.sin(noise_level * math.pi / 2)).expand_as(sigma)
        predicted_x0 = sample - sigma * model_output
        predicted_noise = sample + (1 - sigma) * model_output
        prev_sample_mean = predicted_x0 * (1 - sigma_next) + predicted_noise * torch.sqrt(sigma_next**2 - std_dev_t**2)
        transition_std = std_dev_t

    if noise_level == 0:
        # Exactly the scheduler's Euler step; the density of a deterministic step is undefined.
        return prev_sample_mean, None, prev_sample_mean, std_dev_t

    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = prev_sample_mean + transition_std * noise

    # Gradients flow through the mean only: the sample is data, not a function of the weights.
    residual = prev_sample.detach() - prev_sample_mean
    if sde_type == "sde":
        log_prob = (
            -(residual**2) / (2 * transition_std**2) - torch.log(transition_std) - math.log(math.sqrt(2 * math.pi))
        )
    else:
        log_prob = -(residual**2)
    # A per-pixel mean, not a sum, as DDPO and Flow-GRPO do; PPO's clip range is tuned for this scale.
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t
