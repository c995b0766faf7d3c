"""`algo=sft`: supervised fine-tuning of SD3 / SD3.5 on image-caption data, full or LoRA.

The objective is SD3's rectified-flow loss (`docs/algorithms.md` section 6, `rl.losses.flow_matching_loss`), with
timesteps from diffusers' SD3 densities; the loop is `rl.supervised.train_supervised`, shared with `algo=dreambooth`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rl.context import RunContext
from rl.data import DataError
from rl.supervised import SupervisedConfig, train_supervised


@dataclass(kw_only=True)
class SFT(SupervisedConfig):
    """`algo=sft` (conf/algo/sft.yaml): the supervised loop's options and the session's."""

    def __call__(self, ctx: RunContext) -> None:
        run(ctx, self)


def run(ctx: RunContext, config: SFT) -> None:
    """Fine-tune on `ctx.data` (an imagefolder or a `datasets` dataset with captions)."""
    if ctx.data is None:
        raise DataError("algo=sft needs training data: data.path=<imagefolder> or data.dataset=<datasets name>")
    dataset = ctx.data.load(require_captions=True)
    train_supervised(ctx, dataset, config)
