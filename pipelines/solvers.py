"""Deterministic multistep solvers for the flow-matching ODE, as pure functions (`docs/algorithms.md` section 10).

Conventions as in `pipelines/sde.py`: `x_s = (1 - s) x0 + s eps`, the model predicts `v = eps - x0`, so its data
prediction is `x0_hat = x - s v`. In DPM-Solver's terms the flow path has `alpha_s = 1 - s`, `sigma_s = s` and the
log-SNR `lambda_s = log((1 - s) / s)`.
"""

from __future__ import annotations

import torch


def dpm_solver_pp_2m_step(
    sample: torch.Tensor,
    x0: torch.Tensor,
    x0_previous: torch.Tensor | None,
    sigma_previous: float | None,
    sigma: float,
    sigma_next: float,
) -> torch.Tensor:
    """One step of DPM-Solver++ (2M, midpoint; Lu et al. 2022, arXiv 2211.01095) from `sample` at `sigma` to
    `sigma_next`, given the data prediction `x0` at `sigma` and the previous step's `x0_previous` at `sigma_previous`.

    First order (DDIM, which on the flow path is exactly the Euler step `x + (s' - s) v`) without a previous
    prediction and on a step ending at sigma 0 (diffusers' `lower_order_final`); second order otherwise:
    `x' = (s'/s) x - alpha' (e^-h - 1) (x0 + (x0 - x0_prev) / (2 r))`, `h = lambda' - lambda`,
    `r = (lambda - lambda_prev) / h`. Its steps are those of diffusers' `DPMSolverMultistepScheduler(
    algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction")` on the same sigmas
    (`tests/test_solvers.py`). A previous step at sigma 1 (log-SNR minus infinity) makes the correction 0."""
    sample, x0 = sample.float(), x0.float()
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    # alpha' (e^-h - 1) with e^-h = (alpha s') / (s alpha'), written without logarithms so that s' = 0 stays finite
    decay = alpha * sigma_next / sigma - alpha_next
    first_order = (sigma_next / sigma) * sample - decay * x0
    if x0_previous is None or sigma_next == 0.0 or sigma_previous is None or sigma_previous >= 1.0:
        return first_order
    lam_previous = torch.log(torch.tensor((1.0 - sigma_previous) / sigma_previous, dtype=torch.float64))
    lam = torch.log(torch.tensor(alpha / sigma, dtype=torch.float64))
    lam_next = torch.log(torch.tensor(alpha_next / sigma_next, dtype=torch.float64))
    ratio = float((lam - lam_previous) / (lam_next - lam))
    return first_order - 0.5 * decay * (x0 - x0_previous.float()) / ratio


def time_shift(sigma: float, shift: float) -> float:
    """SD3's timestep shift `shift s / (1 + (shift - 1) s)` (diffusers' `FlowMatchEulerDiscreteScheduler`)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift(sigma: float, shift: float) -> float:
    """The inverse of `time_shift`."""
    return sigma / (shift - (shift - 1) * sigma)


def flash_sigmas(sigmas: list[float], last_sde_step: int, ratio: float, shift: float) -> list[float]:
    """MixGRPO-Flash's schedule (`docs/algorithms.md` section 9), unshifted, without the final 0 (what
    `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)` takes: it shifts them and appends the 0).

    `sigmas` is the sampling schedule (shifted, ending with 0) and `last_sde_step` the window's last step `L`. Steps
    `0 .. L` keep their sigmas; after them the trajectory is re-gridded to `n = int(max((T - L) ratio, 1))` points,
    linear before the shift, from `sigmas[L + 1]` to 0, i.e. `n - 1` steps (MixGRPO's `dpm_post_compress_ratio`);
    at least one step. A window that ends on the last step leaves the schedule as it is."""
    num_steps = len(sigmas) - 1
    if last_sde_step >= num_steps - 1:  # the window reaches the last step: nothing follows it to re-grid
        return [unshift(s, shift) for s in sigmas[:-1]]
    points = int(max((num_steps - last_sde_step) * ratio, 1))
    start = unshift(sigmas[last_sde_step + 1], shift)
    post = [start * (1 - k / (points - 1)) for k in range(points)] if points > 1 else [start]
    kept = [unshift(s, shift) for s in sigmas[: last_sde_step + 1]]
    return kept + post[:-1] if points > 1 else kept + post
