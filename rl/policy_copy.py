"""A second copy of the trained weights that trails them: DiffusionNFT's old policy, AWM's KL-EMA
(`docs/algorithms.md` section 10).

Both methods update the copy once per epoch with their own decay schedule (`capped_linear_decay`), which diffusers'
`EMAModel` cannot follow (it imposes its `(1 + s) / (10 + s)` warm-up and decays 0 at its first step), so the update
is a plain `lerp_params_`. The copy holds the trained parameters only (LoRA adapters, or the whole transformer) and is
swapped into the model for the forwards that need it (`swapped_in`), as `EMAModel.store / copy_to / restore` do; it is
saved in every checkpoint (a named piece of the session's state, `rl/checkpoints.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pipelines.configs import check_values
from pipelines.errors import ConfigError


@dataclass
class TrailingCopyConfig:
    """How fast the copy trails the trained weights (NFT's `algo.old_policy`, AWM's `algo.ema_policy`): after each
    epoch, `copy <- d copy + (1 - d) theta` with `d = capped_linear_decay(optimiser steps so far, rate, cap, flat)`
    (DiffusionNFT's decay type 1: rate 0.001, cap 0.5; type 2, OCR: rate 0.0075, cap 0.999, flat 75; AWM's KL-EMA:
    rate 0.001, cap 0.3)."""

    rate: float = 0.001
    cap: float = 0.5
    flat: int = 0  # optimiser steps with d = 0 (the copy follows the weights exactly) before the ramp

    def check(self, section: str) -> None:
        """Raise `ConfigError` naming `<section>.<field>` for a value out of its range."""
        check_values(section, self, at_least_zero=("rate", "flat"))
        if not 0 <= self.cap <= 1:
            raise ConfigError(f"{section}.cap must be in [0, 1], got {self.cap!r}")


@torch.no_grad()
def lerp_params_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], decay: float) -> None:
    """In place: `target <- decay * target + (1 - decay) * source`, for each pair."""
    torch._foreach_lerp_(list(targets), [s.detach() for s in sources], 1.0 - decay)


def capped_linear_decay(step: int, rate: float, cap: float, flat: int = 0) -> float:
    """`0` for the first `flat` steps, then `rate * (step - flat)`, at most `cap` (DiffusionNFT's `return_decay`
    types 1 and 2, AWM's KL-EMA)."""
    return 0.0 if step < flat else min(rate * (step - flat), cap)


class PolicyCopy:
    """A copy of `parameters`, made on first use or restored from a checkpoint."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] | None = None

    def ensure(self, parameters: Sequence[torch.Tensor]) -> None:
        """Copy `parameters` unless a copy exists already (restored by a resume)."""
        if self.tensors is None:
            self.tensors = [p.detach().clone() for p in parameters]
        else:
            self.tensors = [t.to(p.device) for t, p in zip(self.tensors, parameters, strict=True)]

    def update(self, parameters: Sequence[torch.Tensor], decay: float) -> None:
        """`copy <- decay * copy + (1 - decay) * parameters`."""
        lerp_params_(self.tensors, parameters, decay)

    @contextmanager
    def swapped_in(self, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """Within the block `parameters` hold the copy's values (use it without gradients); restored afterwards."""
        saved = [p.data for p in parameters]
        for p, t in zip(parameters, self.tensors, strict=True):
            p.data = t
        try:
            yield
        finally:
            for p, data in zip(parameters, saved, strict=True):
                p.data = data

    def deviation(self, parameters: Sequence[torch.Tensor]) -> float:
        """`|theta - copy| / |copy|` over all parameters: how far the trained weights have moved from the copy."""
        difference = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm((p.detach() - t).float())
                                                           for p, t in zip(parameters, self.tensors, strict=True)]))
        size = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in self.tensors]))
        return float(difference / size.clamp(min=1e-12))

    def state_dict(self) -> dict:
        return {"tensors": [t.cpu() for t in self.tensors] if self.tensors is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.tensors = state["tensors"]
