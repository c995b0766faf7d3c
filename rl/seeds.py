"""Every random stream of a run, named, in one place.

Each stream is a function of the run's `seed` and of where in the run it is used (epoch, step, global sample or
micro-batch index), never of the batch size, of what ran before or of the process, so that a resumed run draws exactly
what an uninterrupted one would, and a run on N processes what one process draws for the same global batch. The large
odd multipliers keep the streams of different epochs, steps and samples apart; changing any of them
changes every number a run produces (the golden runs in tests/golden/ would say so).
"""

from __future__ import annotations

import torch

_SPREAD = 1_000_003  # separates the epochs (or steps) of one seed, and the samples of one epoch


def generator(value: int, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on `device` (the CPU by default) seeded with `value`."""
    return (torch.Generator(device) if device is not None else torch.Generator()).manual_seed(value)


# ------------------------------------------------------------------------------------------------ sampling an epoch


def prompt_order(seed: int, epoch: int) -> torch.Generator:
    """Which training prompts an epoch samples (a permutation of the set)."""
    return generator(seed * 7919 + epoch)


def initial_noise(seed: int, epoch: int, index: int) -> int:
    """The seed of the initial noise of image `index` of an epoch (or of group `index`, with shared noise)."""
    return (seed * _SPREAD + epoch) * _SPREAD + index


def sde_noise(seed: int, epoch: int, index: int) -> int:
    """The seed of the SDE's per-step noise of image `index` of an epoch."""
    return (seed * _SPREAD + epoch) * _SPREAD + 500_009 + index


def sde_window_start(seed: int, epoch: int) -> torch.Generator:
    """Where an epoch's SDE window starts (Flow-GRPO-Fast)."""
    return generator(seed + epoch)


# ------------------------------------------------------------------------------------------------------- training


def update_order(seed: int, epoch: int, inner: int) -> torch.Generator:
    """The order of an epoch's samples (and their trained steps) in one pass of its update, over all processes."""
    return generator((seed * _SPREAD + epoch) * 101 + inner * 7)


def training_noise(seed: int, epoch: int, inner: int, index: int, step: int) -> int:
    """The seed of the noise that re-noises final image `index` of an epoch at its trained step `step` in pass
    `inner` of the update (DiffusionNFT, AWM)."""
    return ((seed * _SPREAD + epoch) * 101 + inner) * _SPREAD + index * 1_009 + step


def training_step(seed: int, micro_batch: int, device: torch.device | str) -> torch.Generator:
    """Randomness of one micro-batch (noise, timesteps, prompts, VAE samples), from its global number.

    The step-based algorithms number micro-batches over all processes (`global_micro_batch`); online DPO numbers its
    pair batches within an epoch (`online_pair_batch`)."""
    return generator((seed * _SPREAD + micro_batch) * 1_009, device)


def global_micro_batch(local: int, num_processes: int, rank: int) -> int:
    """The global number of a process's `local`-th micro-batch: process `rank` runs micro-batches rank, rank + N, ...,
    so that N processes with `a` micro-batches each per optimiser step run what one process runs with `a * N`."""
    return local * num_processes + rank


def online_pair_batch(epoch: int, inner: int, inner_epochs: int, start: int) -> int:
    """The `training_step` number of online DPO's pair batch starting at `start` in pass `inner` of `epoch`."""
    return (epoch * inner_epochs + inner) * 1_000 + start


def data_sample(seed: int, epoch: int, index: int) -> torch.Generator:
    """Per-sample randomness of a dataset item (crop, flip) in a data epoch: survives any resume."""
    return generator((seed * _SPREAD + epoch) * _SPREAD + index)


def caption_dropout(seed: int, epoch: int, index: int) -> torch.Generator:
    """Whether a dataset item's caption is dropped in a data epoch (a stream apart from its crop and flip)."""
    return data_sample(seed + 1, epoch, index)


def data_order(seed: int, data_epoch: int) -> torch.Generator:
    """The permutation of a dataset in one of its epochs."""
    return generator(seed + data_epoch)


# ----------------------------------------------------------------------------------------------------- evaluation


def held_out(seed: int) -> int:
    """The first seed of the held-out images (image `i` of the held-out set uses `held_out(seed) + i`)."""
    return seed + 10_000_019


def validation(seed: int) -> int:
    """The first seed of the supervised algorithms' validation grids (image `i` uses `validation(seed) + i`)."""
    return seed


def sampled_image(seed: int, index: int) -> int:
    """`algo=sample`: the seed of image `index` of the set (prompt by prompt), whatever the batch or process."""
    return seed + index


def held_out_pairs(seed: int, start: int, repeat: int, device: torch.device | str) -> torch.Generator:
    """Offline DPO's held-out pairs: draw `repeat` of the batch starting at pair `start` (fixed at every evaluation)."""
    return generator(seed + 20_000_003 + start * 1_009 + repeat, device)
