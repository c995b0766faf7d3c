"""`algo=dreambooth`: teach the model a subject from a few instance images and an instance prompt ("a photo of sks dog").

With prior preservation, images of the subject's class ("a photo of a dog") are generated with the base model when the
class folder holds fewer than `num_class_images` (and kept there, so later runs reuse them), and their loss is added
with `prior_loss_weight` (`docs/algorithms.md` section 6). LoRA may also adapt both CLIP text encoders
(`algo.lora.text_encoders=true`). Training is the supervised loop of `rl/sft.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import PartialState

from rl.context import RunContext
from rl.data import DataError, ImageCaptionData
from rl.lora import LoraSpec
from rl.sft import EmaConfig, LossConfig, PriorPreservation, TrainConfig, ValidationConfig, train_supervised
from rl.trainer import OptimConfig

logger = logging.getLogger(__name__)


def generate_class_images(
    pipe, folder: Path, class_prompt: str, count: int, seed: int, num_inference_steps: int, guidance_scale: float,
    resolution: int, batch_size: int = 4,
) -> None:
    """Fill `folder` up to `count` images of `class_prompt` from the base model (seed `seed + i` for image i)."""
    state = PartialState()
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / f"class_{i:05d}.png").exists()]
    with state.split_between_processes(missing) as mine:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            generators = [torch.Generator(pipe.transformer.device).manual_seed(seed + i) for i in chunk]
            images = pipe(
                [class_prompt] * len(chunk),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
            ).images
            for i, image in zip(chunk, images):
                image.save(folder / f"class_{i:05d}.png")
    state.wait_for_everyone()


def run(
    ctx: RunContext,
    *,
    instance_prompt: str,
    with_prior_preservation: bool = False,
    class_prompt: str | None = None,
    class_data_dir: str | None = None,
    num_class_images: int = 100,
    prior_loss_weight: float = 1.0,
    class_num_inference_steps: int = 28,
    class_guidance_scale: float = 4.5,
    lora: LoraSpec | None = None,
    optim: OptimConfig | None = None,
    loss: LossConfig | None = None,
    train: TrainConfig | None = None,
    validation: ValidationConfig | None = None,
    ema: EmaConfig | None = None,
) -> None:
    """DreamBooth on the instance images in `data.path` (captions, if any, are replaced by `instance_prompt`)."""
    if ctx.data is None or (ctx.data.path is None and ctx.data.dataset is None):
        raise DataError("algo=dreambooth needs the instance images: data.path=<folder of images>")
    if with_prior_preservation and not class_prompt:
        raise DataError("prior preservation needs algo.class_prompt (e.g. 'a photo of a dog')")
    instances = ctx.data.load(require_captions=False)
    instances.records = [(key, image, instance_prompt) for key, image, _ in instances.records]

    pipe = ctx.load_pipeline(device=PartialState().device)
    prior = None
    if with_prior_preservation:
        folder = Path(class_data_dir).expanduser() if class_data_dir else ctx.run_dir / "class_images"
        pipe.set_progress_bar_config(disable=True)
        generate_class_images(
            pipe, folder, class_prompt, num_class_images, ctx.seed, class_num_inference_steps, class_guidance_scale,
            ctx.data.resolution,
        )
        class_data = ImageCaptionData(
            path=str(folder),
            resolution=ctx.data.resolution,
            center_crop=ctx.data.center_crop,
            random_flip=ctx.data.random_flip,
            max_samples=num_class_images,
        ).load(require_captions=False)
        class_data.records = [(key, image, class_prompt) for key, image, _ in class_data.records]
        prior = PriorPreservation(class_data, prior_loss_weight)
    train_supervised(
        ctx, instances, lora=lora, optim=optim, loss=loss, train=train, validation=validation, ema=ema, prior=prior,
        load_pipeline=lambda device: pipe,
    )
