"""Held-out evaluation: ODE samples of the held-out prompts at fixed seeds, scored by the reward; used by every
algorithm during training and by `experiments/evaluate.py` on saved checkpoints, so both give the same numbers.

The supervised algorithms, which have no reward, sample a validation grid instead (`validate`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from pipelines import StableDiffusion3LogProbPipeline
from pipelines.configs import check_values
from pipelines.errors import ConfigError
from pipelines.text import PromptEncoder
from rewards import Reward
from rl import seeds
from rl.policy_copy import PolicyCopy
from rl.prompts import Prompt, source_image
from rl.rollouts import check_strength, score
from rl.tracking import image_grid, info_means, log_image, metric_name

if TYPE_CHECKING:  # the session imports this module
    from rl.session import Session

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Held-out evaluation: ODE samples at fixed seeds (`algo.eval`)."""

    every: int = 5  # steps (epochs for GRPO, DDPO, online DPO); 0 disables; else the first and last are evaluated too
    max_prompts: int = 16
    images_per_prompt: int = 1
    num_inference_steps: int = 40
    guidance_scale: float = 4.5
    resolution: int | None = None
    batch_size: int = 8
    strength: float | None = None  # image-to-image (held-out prompts with an `image`): the source's noising strength
    every_seconds: float = 0.0  # also at every multiple of this many training seconds (0: never), the weights of
    #                             the last step that ended at or before each mark (`eval_seconds/*`; `SecondsMarks`)
    seconds_clock: str = "wall"  # every_seconds counts train/seconds (wall) or train/cpu_seconds (cpu)
    extra_guidance_scales: list[float] = field(default_factory=list)  # also at these guidance scales, e.g. a
    #                                                                    method's training guidance (eval_guidance_*)

    def __post_init__(self):
        check_values("algo.eval", self, positive=("max_prompts", "images_per_prompt", "num_inference_steps",
                                                 "batch_size"), at_least_zero=("every", "guidance_scale",
                                                                               "every_seconds"),
                     resolution=("resolution",))
        if self.strength is not None:
            check_strength("algo.eval.strength", self.strength)
        if self.seconds_clock not in ("wall", "cpu"):
            raise ConfigError(f"algo.eval.seconds_clock must be wall or cpu, got {self.seconds_clock!r}")
        self.extra_guidance_scales = [float(g) for g in self.extra_guidance_scales]
        if any(g < 0 for g in self.extra_guidance_scales):
            raise ConfigError(f"algo.eval.extra_guidance_scales must be at least 0, got {self.extra_guidance_scales}")

    def due(self, step: int, last: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last)


@dataclass
class ValidationConfig:
    """Images sampled at fixed seeds for held-out prompts during supervised training (`algo.validation`)."""

    every: int = 100  # steps; 0 disables
    max_prompts: int = 4
    num_inference_steps: int = 28
    guidance_scale: float = 4.5
    resolution: int | None = None

    def __post_init__(self):
        check_values("algo.validation", self, positive=("max_prompts", "num_inference_steps"), at_least_zero=("every",),
                     resolution=("resolution",))


@torch.no_grad()
def sample_images(
    pipe: StableDiffusion3LogProbPipeline,
    prompts: list[Prompt],
    seed: int,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int | None,
    batch_size: int = 8,
    text: PromptEncoder | None = None,
    first_index: int = 0,
    strength: float | None = None,
) -> torch.Tensor:
    """ODE samples for `prompts`, image `i` from seed `seed + first_index + i` (the same at every evaluation, and for
    a shard of a longer list that starts at `first_index`), as NCHW in [0, 1]. The prompts' embeddings come from
    `text` (kept for the run: computed at the first evaluation only). With `strength`, image-to-image from each
    prompt's source image."""
    device = pipe.transformer.device
    text = text or PromptEncoder(pipe)
    guided = guidance_scale > 1
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [seeds.generator(seed + first_index + start + i, device) for i in range(len(chunk))]
        embeds, pooled = text([p.text for p in chunk], keep=True)
        negative, negative_pooled = text.negative(len(chunk)) if guided else (None, None)
        start = {} if strength is None else dict(image=[source_image(p.image) for p in chunk], strength=strength)
        images.append(
            pipe(
                **start,
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                negative_prompt_embeds=negative,
                negative_pooled_prompt_embeds=negative_pooled,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type="pt",
            ).images.float().cpu()
        )
    return torch.cat(images)


def save_grid(
    accelerator: Accelerator, run_dir: Path, images: torch.Tensor, step: int, prompts: list[str],
    images_per_prompt: int = 1,
) -> None:
    """Write `samples/step_<N>.png` (one row per prompt, captioned with it) and send it to the image trackers."""
    if not accelerator.is_main_process:
        return
    grid = image_grid(images, nrow=images_per_prompt, row_labels=prompts)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    grid.save(run_dir / "samples" / f"step_{step:06d}.png")
    log_image(accelerator, "validation", grid, step)


def check_prompt_images(prompts: list[Prompt], strength: float | None, option: str, kind: str) -> None:
    """Image-to-image prompts (a source `image` each) and a `strength` go together: every prompt of the set has an
    image when `strength` is set, and none has when it is not; `ConfigError` (one line) otherwise."""
    with_image = sum(p.image is not None for p in prompts)
    if with_image and with_image < len(prompts):
        raise ConfigError(f"{with_image} of the {len(prompts)} {kind} prompts carry an image: image-to-image needs one "
                          f"for every prompt")
    if with_image and strength is None:
        raise ConfigError(f"the {kind} prompts carry source images: set {option} (image-to-image: the fraction of the "
                          f"schedule to take, e.g. 0.6)")
    if strength is not None and not with_image:
        raise ConfigError(f"{option}={strength} is image-to-image: it needs a prompt set with an 'image' per prompt "
                          f"(a .jsonl with prompt and image keys)")


def held_out_prompts(prompts: list[Prompt], config: EvalConfig) -> list[Prompt]:
    """The prompts of the held-out images, each repeated `images_per_prompt` times."""
    return [p for p in prompts[: config.max_prompts] for _ in range(config.images_per_prompt)]


def evaluate(
    pipe: StableDiffusion3LogProbPipeline, reward: Reward, prompts: list[Prompt], config: EvalConfig, seed: int,
    text: PromptEncoder | None = None, accelerator: Accelerator | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """ODE samples of the held-out prompts at fixed seeds; the mean and std of the reward and each of its parts.

    With an `accelerator` of several processes, each samples and scores a contiguous share of the images (each image
    keeps its seed) and the scores are gathered in image order: every process returns the metrics and all images."""
    chosen = held_out_prompts(prompts, config)
    rank, processes = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    first, last = len(chosen) * rank // processes, len(chosen) * (rank + 1) // processes
    mine = chosen[first:last]
    device = pipe.transformer.device
    if mine:
        images = sample_images(pipe, mine, seeds.held_out(seed), num_inference_steps=config.num_inference_steps,
                               guidance_scale=config.guidance_scale, resolution=config.resolution,
                               batch_size=config.batch_size, text=text, first_index=first, strength=config.strength)
        scores, info = score(reward, images.to(device), [p.text for p in mine], [p.metadata for p in mine])
    else:
        images, scores, info = torch.empty(0), torch.empty(0), {}
    if processes > 1:
        shares = gather_object([(first, images, scores.cpu(), {k: v.cpu() for k, v in info.items()})])
        shares = [share for share in sorted(shares, key=lambda share: share[0]) if len(share[2])]
        images = torch.cat([share[1] for share in shares])
        scores = torch.cat([share[2] for share in shares])
        info = {name: torch.cat([share[3][name] for share in shares]) for name in shares[0][3]}
    return eval_metrics(scores, info), images


def eval_metrics(scores: torch.Tensor, info: dict[str, torch.Tensor]) -> dict[str, float]:
    """`eval/reward_mean` and `_std` of a reward's scores, and `eval/<name>_mean` and `_std` of each per-image value it
    reports (the std is 0 for one image)."""
    def spread(values: torch.Tensor) -> float:
        return values.std().item() if len(values) > 1 else 0.0

    metrics = {"eval/reward_mean": scores.mean().item(), "eval/reward_std": spread(scores)}
    metrics.update(info_means(info, "eval/", std=True))  # NaN: an image the value does not apply to
    return metrics


def held_out(session: Session, config: EvalConfig, step: int, force: bool = False) -> None:
    """Evaluate after `step` steps of a `rl.session.Session` when due (every `config.every`, and the last) or
    `force`d, with the EMA weights when kept: log `eval/*` (and `eval_guidance_<g>/*` at each extra guidance scale),
    print a line, save the grid. Then the evaluations at training-seconds marks this step passed (`SecondsMarks`)."""
    ctx, accelerator = session.ctx, session.accelerator
    if (config.due(step, session.total_steps) or force) and ctx.eval_prompts:
        with session.saving_on_failure(evaluating=True), session.ema_weights():  # each process scores its share
            metrics, images = evaluate(session.pipe, session.reward, ctx.eval_prompts, config, ctx.seed, session.text,
                                       accelerator)
            for scale in config.extra_guidance_scales:
                extra, _ = evaluate(session.pipe, session.reward, ctx.eval_prompts,
                                    replace(config, guidance_scale=scale), ctx.seed, session.text, accelerator)
                metrics.update({f"eval_guidance_{scale:g}/{name[5:]}": value for name, value in extra.items()})
        if accelerator.is_main_process:
            metrics["eval/epoch"] = step
            accelerator.log(metrics, step=step)
            logger.info("%s %d, held out: %s", session.unit, step, "  ".join(
                f"{metric_name(name[5:-5])} {value:.4f}" for name, value in metrics.items()
                if name.startswith("eval/") and name.endswith("_mean")))
            prompts = [p.text for p in ctx.eval_prompts[: config.max_prompts]]
            save_grid(accelerator, ctx.run_dir, images, step, prompts, config.images_per_prompt)
        accelerator.wait_for_everyone()
    marks = session.seconds_marks
    if marks is not None and ctx.eval_prompts and not force:
        marks.after_step(session, config, step)


class SecondsMarks:
    """Held-out evaluations at fixed marks of training seconds (`algo.eval.every_seconds`), so that methods whose steps
    last different times are evaluated at the same points of their training time: at each mark, the weights of the
    last step that ended at or before it. The session keeps a copy of the trained weights (LoRA adapters: small) from
    each step's end to the next's; a step that passes a mark evaluates that copy, logged as `eval_seconds/*` with
    `eval_seconds/mark`, `eval_seconds/step` and `eval_seconds/seconds` (the copy's step and its own training seconds,
    at most the mark), at the step that passed the mark (trackers such as wandb drop records of an earlier step).
    The copy is taken when the loop starts (after a resume, the restored weights), so a resumed run evaluates the
    same weights at the same marks as one that never stopped. Not with an EMA (the EMA's own past is not kept)."""

    def __init__(self, every: float, clock: str) -> None:
        self.every, self.clock = every, clock
        self.copy = PolicyCopy()
        self.copy_seconds, self.copy_step = 0.0, 0

    def start(self, session: Session) -> None:
        """At the loop's start: copy the weights the first step begins from."""
        self.copy.tensors = None
        self.copy.ensure(session.parameters)
        self.copy_seconds, self.copy_step = session.training_seconds(self.clock), session.state.step

    def after_step(self, session: Session, config: EvalConfig, step: int) -> None:
        """After `step`: evaluate the copy (the previous step's end) at each mark in [its seconds, now), then copy the
        weights of this step's end."""
        ctx, accelerator = session.ctx, session.accelerator
        now = session.training_seconds(self.clock)
        index = max(1, math.ceil(self.copy_seconds / self.every))  # the first mark at or after the copy's seconds
        mark = index * self.every
        while mark < now:
            with session.saving_on_failure(evaluating=True), self.copy.swapped_in(session.parameters):
                metrics, _ = evaluate(session.pipe, session.reward, ctx.eval_prompts, config, ctx.seed, session.text,
                                      accelerator)
            if accelerator.is_main_process:
                record = {f"eval_seconds/{name[5:]}": value for name, value in metrics.items()}
                record.update({"eval_seconds/mark": mark, "eval_seconds/seconds": self.copy_seconds,
                               "eval_seconds/step": self.copy_step})
                accelerator.log(record, step=step)
                logger.info("%s %d at %.0f of the %.0f-second mark, held out: %s", session.unit, self.copy_step,
                            self.copy_seconds, mark, "  ".join(f"{metric_name(name[5:-5])} {value:.4f}"
                                                               for name, value in metrics.items()
                                                               if name.endswith("_mean")))
            accelerator.wait_for_everyone()
            index += 1
            mark = index * self.every
        self.copy.update(session.parameters, 0.0)
        self.copy_seconds, self.copy_step = now, step


def validate(session: Session, validation: ValidationConfig, step: int) -> None:
    """When due, sample the first held-out prompts at fixed seeds (with the EMA weights when kept) and save the
    grid; nothing is scored."""
    ctx, accelerator = session.ctx, session.accelerator
    due = validation.every and (step % validation.every == 0 or step == session.total_steps)
    if not due:
        return
    if accelerator.is_main_process and ctx.eval_prompts:
        prompts = ctx.eval_prompts[: validation.max_prompts]
        with session.ema_weights():
            images = sample_images(session.pipe, prompts, seeds.validation(ctx.seed),
                                   num_inference_steps=validation.num_inference_steps,
                                   guidance_scale=validation.guidance_scale, resolution=validation.resolution,
                                   text=session.text)
        save_grid(accelerator, ctx.run_dir, images, step, [p.text for p in prompts])
    accelerator.wait_for_everyone()
