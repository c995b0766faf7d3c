"""`algo=sample`: generate images for a prompt set, save them and a grid into the run directory.

Each image has its own seed (`seed + its index in the set`), so an image does not depend on the batch size or the
number of processes, and an interrupted run started again in the same directory skips the images already saved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import PIL.Image
import torch
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from rl import seeds
from rl.context import RunContext
from rl.tracking import image_grid, info_means, log_image


@dataclass(kw_only=True)
class Sample:
    """`algo=sample` (conf/algo/sample.yaml): which prompts, how many images, how they are sampled."""

    prompt_set: Literal["train", "eval"] = "eval"
    max_prompts: int | None = None
    num_images_per_prompt: int = 2
    num_inference_steps: int = 28
    guidance_scale: float = 4.5
    resolution: int | None = None
    noise_level: float = 0.0
    batch_size: int = 8

    def __call__(self, ctx: RunContext) -> None:
        run(ctx, self)


def run(ctx: RunContext, config: Sample) -> None:
    """Sample `num_images_per_prompt` images for each prompt of the chosen set into `<run dir>/samples/`.

    Writes `samples/<prompt>_<image>.png`, `samples/index.jsonl` (file, prompt, seed) and `samples/grid.png`, and logs
    the count (and the mean reward, when a reward is configured) to `metrics.jsonl`.
    """
    num_images_per_prompt, batch_size = config.num_images_per_prompt, config.batch_size
    prompts = (ctx.eval_prompts if config.prompt_set == "eval" else ctx.train_prompts)[: config.max_prompts]
    jobs = [
        {
            "file": f"{p:04d}_{i:02d}.png",
            "prompt": prompt.text,
            "prompt_index": p,
            "seed": seeds.sampled_image(ctx.seed, p * num_images_per_prompt + i),
        }
        for p, prompt in enumerate(prompts)
        for i in range(num_images_per_prompt)
    ]
    sample_dir = ctx.run_dir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)

    accelerator = ctx.accelerator()
    pipe = ctx.load_pipeline(device=accelerator.device)
    reward = ctx.reward.to(accelerator.device) if ctx.reward is not None else None
    pipe.set_progress_bar_config(disable=True)
    todo = [job for job in jobs if not (sample_dir / job["file"]).exists()]  # what a resumed run still lacks
    accelerator.wait_for_everyone()  # every process has listed it before any writes: they split the same list
    with accelerator.split_between_processes(todo) as my_jobs:
        batches = [my_jobs[i : i + batch_size] for i in range(0, len(my_jobs), batch_size)]
        for batch in tqdm(batches, desc="sampling", disable=not accelerator.is_local_main_process):
            generators = [seeds.generator(job["seed"], accelerator.device) for job in batch]
            images = pipe(
                [job["prompt"] for job in batch],
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                height=config.resolution,
                width=config.resolution,
                noise_level=config.noise_level,
                generator=generators,
                output_type="pil",
            ).images
            for job, image in zip(batch, images, strict=True):
                image.save(sample_dir / job["file"])
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        with (sample_dir / "index.jsonl").open("w") as index:
            for job in jobs:
                index.write(json.dumps(job) + "\n")
        images = torch.stack([pil_to_tensor(PIL.Image.open(sample_dir / job["file"])) for job in jobs]).float() / 255
        grid = image_grid(images, nrow=num_images_per_prompt, row_labels=[p.text for p in prompts])
        grid.save(sample_dir / "grid.png")
        metrics = {"sample/num_images": len(jobs), "sample/num_prompts": len(prompts)}
        if reward is not None:
            metadata = [prompts[job["prompt_index"]].metadata for job in jobs]
            with torch.no_grad():
                scores, info = reward(images, [job["prompt"] for job in jobs], metadata)
            metrics.update({"sample/reward_mean": scores.mean().item(), "sample/reward_std": scores.std().item()})
            metrics.update(info_means(info, "sample/", count=len(scores)))
        accelerator.log(metrics, step=0)
        log_image(accelerator, "samples", grid, step=0)
    accelerator.end_training()
