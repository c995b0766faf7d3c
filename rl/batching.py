"""Which images each process samples in an epoch, and which micro-batches it trains, for every online method (GRPO,
DDPO, online DPO, DiffusionNFT, AWM).

An epoch's images have global indices (`rl/rollouts.py`: what an image is depends on its index alone). The update's
first pass is laid out first (`dealt_chunks`: one permutation of the epoch's units, cut into micro-batch chunks, dealt
to the processes in turn), and each process samples exactly the images of the chunks it will train
(`image_indices`, `group_images`), so that N processes train, in each optimiser step, what one process trains with
the same global batch (`tests/test_policy.py`). `micro_batches` gives every pass of the update in that order, with the
stochastic steps each sample trains; `update_layout` checks the batch sizes against each other before anything loads
and counts the optimiser steps for the LR schedule (`UpdateLayout`, which the session keeps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import PartialState

from pipelines.errors import ConfigError
from rl import seeds
from rl.rollouts import SamplingConfig


@dataclass(frozen=True)
class UpdateLayout:
    """How an epoch's samples are trained: samples per process, micro-batches per optimiser step, optimiser steps in
    all (for the LR schedule)."""

    samples_per_process: int
    accumulation: int
    updates: int


def dealt_chunks(seed: int, epoch: int, units: int, chunk: int, num_processes: int, rank: int
                 ) -> list[tuple[int, list[int]]]:
    """This process's share of an epoch's first update pass, in training order, as `(global chunk number, units)`.

    The epoch's `units` (images for PPO, groups for online DPO) are put in the order of one permutation drawn from
    `(seed, epoch)` alone, cut into chunks of `chunk` units (one training micro-batch each), and dealt to the processes
    in turn: chunk c to process c mod N. When each process's optimiser step covers whole chunks, the union over the
    processes of what they train in optimiser step k is what one process trains in its step k
    (`tests/test_policy.py`)."""
    order = torch.randperm(units, generator=seeds.update_order(seed, epoch, 0)).tolist()
    chunks = [order[start : start + chunk] for start in range(0, units, chunk)]
    return [(number, chunks[number]) for number in range(rank, len(chunks), num_processes)]


def image_indices(sampling: SamplingConfig, batch_size: int, seed: int, epoch: int) -> list[int]:
    """The global indices of the images this process samples in `epoch`, for an update that trains micro-batches of
    `batch_size` images: those of the micro-batches it trains in the first pass (`dealt_chunks`)."""
    state = PartialState()
    chunks = dealt_chunks(seed, epoch, sampling.prompts_per_epoch * sampling.images_per_prompt, batch_size,
                          state.num_processes, state.process_index)
    return sorted(index for _, chunk in chunks for index in chunk)


def group_images(chunks: list[tuple[int, list[int]]], images_per_prompt: int) -> list[int]:
    """The global indices of the images of the groups in `chunks` (`dealt_chunks` over an epoch's groups, for an
    update that trains whole groups, as online DPO's pairs): the images this process samples."""
    return [group * images_per_prompt + j for _, chunk in chunks for group in chunk for j in range(images_per_prompt)]


def micro_batches(indices: list[int], total: int, num_sde: int, train, seed: int, epoch: int, inner: int,
                  num_processes: int, rank: int, draw_columns: Callable | None = None
                  ) -> list[tuple[list[int], list[int]]]:
    """One pass of the update on this process, in order: per micro-batch, the global indices of its samples and the
    stochastic step (column) each trains. `indices` are this process's samples (of `total` in the epoch).

    One permutation of all `total` samples and one draw of every sample's steps (its own random subset, or the first
    ones, or `draw_columns(total, generator)`'s) come from `(seed, epoch, inner)` alone. The first pass trains the
    chunks `dealt_chunks` gave this process (the samples it holds); later passes train this process's samples in that
    pass's permutation order (so that, with `inner_epochs > 1`, only the first pass is the same on N processes as on
    one). `train` is the update's options with their `batch_size`, `timestep_fraction` and `timestep_order`
    (`rl.ppo.PPOConfig`, `rl.matching.MatchingConfig`)."""
    generator = seeds.update_order(seed, epoch, inner)
    order = torch.randperm(total, generator=generator)
    num_train_steps = max(1, int(num_sde * train.timestep_fraction))
    if draw_columns is not None:
        columns = draw_columns(total, generator)
    elif train.timestep_order == "first":
        columns = torch.arange(num_train_steps).expand(total, -1)
    else:
        columns = torch.stack([torch.randperm(num_sde, generator=generator)[:num_train_steps] for _ in range(total)])
    if inner == 0:
        chunks = [order[s : s + train.batch_size].tolist() for s in range(0, total, train.batch_size)]
        chunks = chunks[rank::num_processes]
    else:
        mine = set(indices)
        kept = [i for i in order.tolist() if i in mine]
        chunks = [kept[s : s + train.batch_size] for s in range(0, len(kept), train.batch_size)]
    return [(chunk, columns[chunk, j].tolist()) for chunk in chunks for j in range(columns.shape[1])]


def update_layout(sampling: SamplingConfig, train, epochs: int, num_train_steps: int, group: str) -> UpdateLayout:
    """The layout of an update that trains `num_train_steps` steps of each sample in micro-batches of
    `train.batch_size` (`algo.<group>`), `train.optimizer_steps` optimiser steps per pass, checked before anything
    loads."""
    local = sampling.samples_per_process(PartialState().num_processes)
    if local % train.batch_size:
        raise ConfigError(f"{local} images per process are not a multiple of {group}.batch_size={train.batch_size}")
    forwards = (local // train.batch_size) * num_train_steps
    if forwards % train.optimizer_steps:
        raise ConfigError(
            f"{forwards} training forwards per epoch do not split into {train.optimizer_steps} optimiser steps")
    return UpdateLayout(local, forwards // train.optimizer_steps, epochs * train.inner_epochs * train.optimizer_steps)
