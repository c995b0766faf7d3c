"""The training objectives, as small pure functions with unit tests (`tests/test_losses.py`).

Notation as in `ALGORITHMS.md`: `x_s = (1 - s) x0 + s eps`, the transformer predicts the velocity `v = eps - x0`.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from rl.config import ConfigError

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
    """Draw training timesteps and their sigmas from the SD3 timestep density (`ALGORITHMS.md` section 6).

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
