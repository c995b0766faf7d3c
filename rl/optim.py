"""The optimiser, its learning-rate schedule, and the guards on what it does (`algo.optim`).

`build_optimizer` and `build_lr_scheduler` make AdamW (or bitsandbytes' 8-bit AdamW) and diffusers' LR schedule.
`Guards` watches every optimiser step of a run: updates skipped for NaN or infinite rewards or gradients (the run
stops after `nonfinite_patience` in a row: `NonFiniteError`), a gradient norm of exactly zero for `dead_after` steps (a
dead run), trained weights that grow past `max_weight_growth` times their initial norm (an exploding run) or stop being
float32 numbers (stopped at once); a dead or exploding run warns once, or stops under `stop_on_divergence`
(`DivergenceError`). The session (`rl/session.py`) calls them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler

from pipelines.configs import check_values
from pipelines.errors import ConfigError, UserError

logger = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (`algo.optim`)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit: bool = False  # bitsandbytes' 8-bit AdamW (CUDA only)
    lr_scheduler: str = "constant"  # any of diffusers.optimization's: constant, linear, cosine, ...
    warmup_steps: int = 0
    nonfinite_patience: int = 3  # optimiser steps in a row with NaN / inf gradients (skipped) before the run stops
    dead_after: int = 10  # optimiser steps in a row with a gradient norm of exactly 0: a dead run
    max_weight_growth: float = 10.0  # the trained weights' norm past this many times its initial value: exploding
    stop_on_divergence: bool = False  # a dead or exploding run stops (one line) instead of warning once

    def __post_init__(self):
        check_values("algo.optim", self, positive=("lr", "max_grad_norm", "nonfinite_patience", "dead_after",
                                                   "max_weight_growth"),
                     at_least_zero=("weight_decay", "warmup_steps"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"algo.optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        step = self.lr / (1 - self.betas[0])  # AdamW's first step: lr / (1 - beta1), in float32 arithmetic
        if step >= torch.finfo(torch.float32).max:
            raise ConfigError(f"algo.optim.lr={self.lr:g} overflows float32 in AdamW's first step (lr / (1 - beta1) = "
                              f"{step:g}); no learning rate near that trains anything")
        from diffusers.optimization import SchedulerType

        schedules = [kind.value for kind in SchedulerType]
        if self.lr_scheduler not in schedules:
            raise ConfigError(f"algo.optim.lr_scheduler must be one of {', '.join(schedules)}, got "
                              f"{self.lr_scheduler!r}")


class NonFiniteError(UserError):
    """Training produced non-finite gradients for `optim.nonfinite_patience` optimiser steps in a row."""


class DivergenceError(UserError):
    """A dead or exploding run, stopped because `optim.stop_on_divergence` is set."""


def weight_norm(parameters: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all `parameters` together (one device sync)."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach().float())
                                                       for p in parameters])))


def build_optimizer(parameters: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ConfigError("nothing to train: no parameter requires gradients (check algo.lora)")
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, eps=config.eps)
    if config.use_8bit:
        if not torch.cuda.is_available():
            raise ConfigError("algo.optim.use_8bit=true needs a CUDA GPU (bitsandbytes); set it to false")
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int, num_processes: int):
    """diffusers' LR schedule over `total_steps` optimiser steps; accelerate steps a prepared scheduler once per
    process, so warm-up and length are counted in process-steps."""
    return get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )


@dataclass
class Guards:
    """The non-finite and divergence guards over one run's optimiser steps (`OptimConfig`'s limits). `unit` names a
    step in messages ("epoch" or "step"); `latest()` is the latest checkpoint (None before the first), which the stop
    messages name."""

    optim: OptimConfig
    unit: str
    latest: Callable[[], Path | None]
    initial_weight_norm: float  # of the trained weights as initialised (before any resume)
    skipped_nonfinite: int = 0  # updates skipped for non-finite rewards or gradients since the last record
    nonfinite_rewards: int = 0  # NaN or infinite rewards since the last record
    nonfinite_in_a_row: int = 0
    zero_gradient_in_a_row: int = 0
    warned: set[str] = field(default_factory=set)  # the divergence warnings already given

    def rewards_finite(self, rewards: torch.Tensor, step: int) -> bool:
        """Whether an epoch's rewards are all finite; if not, count them and the skipped update (towards
        `nonfinite_patience`), with a warning. `step` is the step being run."""
        bad = int((~torch.isfinite(rewards)).sum())
        if bad == 0:
            return True
        self.nonfinite_rewards += bad
        logger.warning("%s %d: %d of %d rewards are NaN or infinite: this %s's update is skipped", self.unit, step,
                       bad, rewards.numel(), self.unit)
        self.count(True, False, step)
        return False

    def count(self, skipped: bool, zero: bool, step: int) -> None:
        """Count skipped (non-finite) and zero-gradient optimiser steps in a row; stop or warn past their limits."""
        self.skipped_nonfinite += int(skipped)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        if self.nonfinite_in_a_row >= self.optim.nonfinite_patience:
            latest = self.latest()
            raise NonFiniteError(
                f"{self.unit} {step}: {self.nonfinite_in_a_row} updates in a row were skipped for NaN "
                f"or infinite rewards, advantages, losses or gradients, so the run stopped; its weights are those of "
                f"the last finite step, and " + (f"the latest checkpoint ({latest.name}) holds finite weights"
                                                 if latest is not None else "no checkpoint was written yet"))
        self.zero_gradient_in_a_row = self.zero_gradient_in_a_row + 1 if zero else 0
        if self.zero_gradient_in_a_row == self.optim.dead_after:
            self.diverged("dead", f"{self.unit} {step}: the gradient norm has been exactly 0 for "
                                  f"{self.optim.dead_after} optimiser steps in a row (optim.dead_after): nothing is "
                                  f"learned; a dead run? check the learning rate and the reward")

    def check_weights(self, parameters: Iterable[torch.Tensor], step: int, record: bool) -> None:
        """After every step: weights that are NaN, infinite or so large that their norm overflows float32 (an
        exploding run past repair: such a model only makes NaN images) stop the run before anything evaluates or
        saves them. At each record (`record`): an exploding run's weights grow past `optim.max_weight_growth` times
        their initial norm (a warning, or a stop under `optim.stop_on_divergence`)."""
        norm = weight_norm(parameters)
        if not math.isfinite(norm):
            latest = self.latest()
            raise NonFiniteError(f"{self.unit} {step}: the trained weights became NaN, infinite or overflowing (their "
                                 f"norm is not a float32 number): an exploding run, stopped before evaluating or "
                                 f"saving them; " + (f"the latest checkpoint ({latest.name}) holds earlier weights"
                                                     if latest is not None else "no checkpoint was written")
                                 + "; lower the learning rate")
        if record and norm > self.optim.max_weight_growth * self.initial_weight_norm:
            self.diverged("exploding", f"{self.unit} {step}: the trained weights' norm grew from "
                                       f"{self.initial_weight_norm:.4g} to {norm:.4g}, past optim.max_weight_growth="
                                       f"{self.optim.max_weight_growth:g} times; an exploding run? lower the "
                                       f"learning rate")

    def diverged(self, kind: str, message: str) -> None:
        """Stop with `message` under `optim.stop_on_divergence` (before this step's checkpoint: the latest one holds
        the weights from before); otherwise warn, once per kind."""
        if self.optim.stop_on_divergence:
            raise DivergenceError(f"{message} (stopped: optim.stop_on_divergence=true; the latest checkpoint holds "
                                  f"earlier weights)")
        if kind not in self.warned:
            self.warned.add(kind)
            logger.warning("%s (set algo.optim.stop_on_divergence=true to stop such a run)", message)

    def since_last_record(self) -> dict[str, int]:
        """`train/skipped_nonfinite` and `train/nonfinite_rewards` since the last record (those that are not 0); the
        counts start again."""
        metrics = {}
        if self.skipped_nonfinite:
            metrics["train/skipped_nonfinite"] = self.skipped_nonfinite
            self.skipped_nonfinite = 0
        if self.nonfinite_rewards:
            metrics["train/nonfinite_rewards"] = self.nonfinite_rewards
            self.nonfinite_rewards = 0
        return metrics
