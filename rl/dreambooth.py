"""`algo=dreambooth`: teach the model a subject from a few instance images and an instance prompt
("a photo of sks dog").

With prior preservation, images of the subject's class ("a photo of a dog") are generated with the base model when the
class folder holds fewer than `num_class_images` (and kept there, so later runs reuse them), and their loss is added
with `prior_loss_weight` (`docs/algorithms.md` section 6). LoRA may also adapt both CLIP text encoders
(`algo.lora.text_encoders=true`). Training is the supervised loop of `rl/supervised.py`, as for `algo=sft`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState

from rl import seeds
from rl.context import RunContext
from rl.data import DataError, ImageCaptionData
from rl.supervised import PriorPreservation, SupervisedConfig, train_supervised

logger = logging.getLogger(__name__)


def generate_class_images(
    pipe, folder: Path, class_prompt: str, count: int, *, seed: int, num_inference_steps: int, guidance_scale: float,
    resolution: int, batch_size: int = 4,
) -> None:
    """Fill `folder` up to `count` images of `class_prompt` from the base model (image i from seed `seed + i`)."""
    state = PartialState()
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / f"class_{i:05d}.png").exists()]
    with state.split_between_processes(missing) as mine:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            generators = [seeds.generator(seed + i, pipe.transformer.device) for i in chunk]
            images = pipe(
                [class_prompt] * len(chunk),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
            ).images
            for i, image in zip(chunk, images, strict=True):
                image.save(folder / f"class_{i:05d}.png")
    state.wait_for_everyone()


@dataclass(kw_only=True)
class DreamBooth(SupervisedConfig):
    """`algo=dreambooth` (conf/algo/dreambooth.yaml): the subject, the class images of prior preservation, and the
    supervised loop's options."""

    instance_prompt: str  # the prompt that names the subject, e.g. "a photo of sks dog"
    with_prior_preservation: bool = False
    class_prompt: str | None = None  # e.g. "a photo of a dog"; needed with prior preservation
    class_data_dir: str | None = None  # None: <run dir>/class_images
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_num_inference_steps: int = 28
    class_guidance_scale: float = 4.5

    def __call__(self, ctx: RunContext) -> None:
        run(ctx, self)


def run(ctx: RunContext, config: DreamBooth) -> None:
    """DreamBooth on the instance images in `data.path` (captions, if any, are replaced by `instance_prompt`)."""
    if ctx.data is None or (ctx.data.path is None and ctx.data.dataset is None):
        raise DataError("algo=dreambooth needs the instance images: data.path=<folder of images>")
    if config.with_prior_preservation and not config.class_prompt:
        raise DataError("prior preservation needs algo.class_prompt (e.g. 'a photo of a dog')")
    instances = ctx.data.load(require_captions=False)
    instances.records = [(key, image, config.instance_prompt) for key, image, _ in instances.records]

    pipe = ctx.load_pipeline(device=PartialState().device)
    prior = None
    if config.with_prior_preservation:
        folder = Path(config.class_data_dir).expanduser() if config.class_data_dir else ctx.run_dir / "class_images"
        pipe.set_progress_bar_config(disable=True)
        generate_class_images(
            pipe, folder, config.class_prompt, config.num_class_images, seed=ctx.seed,
            num_inference_steps=config.class_num_inference_steps, guidance_scale=config.class_guidance_scale,
            resolution=ctx.data.resolution,
        )
        class_data = ImageCaptionData(
            path=str(folder),
            resolution=ctx.data.resolution,
            center_crop=ctx.data.center_crop,
            random_flip=ctx.data.random_flip,
            max_samples=config.num_class_images,
        ).load(require_captions=False)
        class_data.records = [(key, image, config.class_prompt) for key, image, _ in class_data.records]
        prior = PriorPreservation(class_data, config.prior_loss_weight)
    train_supervised(ctx, instances, config, prior=prior, load_pipeline=lambda device: pipe)
