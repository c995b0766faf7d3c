"""`algo=refl`: direct reward fine-tuning, ReFL (Xu et al. 2023, arXiv 2304.05977) and DRaFT-K (Clark et al. 2023,
arXiv 2309.17400), for SD3 / SD3.5 (`docs/algorithms.md` section 5).

Both sample with the ODE from noise, without gradients, then let gradients flow through the last part of the
trajectory only, decode with gradients through the (frozen) VAE, and score with a *differentiable* reward:

- **ReFL** (`method=refl`): stop at a random step drawn from `stop_range`, take one prediction with gradients, and
  score the one-step estimate `x0 = x_s - s v`.
- **DRaFT-K** (`method=draft`): run the last K Euler steps with gradients (gradient checkpointing on the transformer)
  and score the final sample; with `randomize_k`, K is drawn from 1..k at each step (AlignProp's randomised truncation).

The loss is `relu(target - R) * scale` (ReFL) or `-R * scale`. Optionally the supervised flow-matching loss on an
image-caption dataset (`data=`) is added with weight `pretrain_weight`, ReFL's regulariser against reward hacking.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from pipelines import StableDiffusion3LogProbPipeline, guided_velocity
from pipelines.configs import check_values
from pipelines.errors import ConfigError
from pipelines.text import PromptEncoder
from rewards import Reward
from rl import seeds
from rl.checkpoints import CheckpointConfig
from rl.context import RunContext
from rl.data import DataError, ImageCaptionData
from rl.evaluation import EvalConfig, held_out
from rl.prompts import Prompt
from rl.session import TrainingConfig, collect, open_session
from rl.supervised import Encoder, LossConfig, batches, supervised_loss

METHODS = ("refl", "draft")
LOSSES = ("relu", "negative")


@dataclass
class ReFLConfig:
    """What is back-propagated and how the reward becomes a loss (`algo.refl`)."""

    method: str = "refl"  # refl or draft
    num_inference_steps: int = 40  # ODE steps of the sampled trajectory (ImageReward: 40)
    guidance_scale: float = 4.5
    detach_unconditional: bool = False  # with guidance, gradients through the conditional half only (ImageReward's
    #                                     ReFL trains without guidance; NeMo's DRaFT+ through both halves)
    stop_range: tuple[int, int] = (30, 39)  # refl: the step with gradients is drawn from this range (inclusive)
    k: int = 1  # draft: the last K steps carry gradients (DRaFT: K = 1 is usually best)
    randomize_k: bool = False  # draft: K uniform in 1..k at each step (AlignProp)
    loss: str = "relu"  # relu: relu(target - R) * scale; negative: -R * scale
    target: float = 2.0  # ImageReward's ReFL: 2
    scale: float = 1.0e-3  # ImageReward's ReFL: 1e-3
    resolution: int | None = None  # None: the model's native size

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown refl.method {self.method!r}; choose one of {list(METHODS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown refl.loss {self.loss!r}; choose one of {list(LOSSES)}")
        low, high = self.stop_range
        if self.method == "refl" and not 0 <= low <= high < self.num_inference_steps:
            raise ConfigError(
                f"refl.stop_range={list(self.stop_range)} must lie within 0..{self.num_inference_steps - 1}"
            )
        if self.method == "draft" and not 1 <= self.k <= self.num_inference_steps:
            raise ConfigError(f"refl.k={self.k} must be between 1 and num_inference_steps={self.num_inference_steps}")


@dataclass
class ReFLTrainConfig:
    """Steps, batches and the regulariser (`algo.train`)."""

    max_steps: int = 1000  # optimiser steps
    batch_size: int = 2  # prompts per process and micro-batch
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True  # DRaFT back-propagates through K transformer calls
    pretrain_weight: float = 0.0  # weight of the supervised loss on `data=` (0: no regulariser)
    pretrain_batch_size: int = 1  # image-caption pairs per process and micro-batch
    max_sequence_length: int | None = None  # T5 tokens; None: the model's (`model.max_sequence_length`)
    log_every: int = 1

    def __post_init__(self):
        check_values("algo.train", self, positive=("max_steps", "batch_size", "gradient_accumulation_steps",
                                                  "pretrain_batch_size", "max_sequence_length", "log_every"),
                     at_least_zero=("pretrain_weight",))


def sampling_scheduler(pipe: StableDiffusion3LogProbPipeline, num_inference_steps: int, latent_size: int, device):
    """A copy of the pipeline's scheduler set to its sampling schedule (with SD3.5's resolution shift when the
    scheduler uses dynamic shifting), as the pipeline itself sets it."""
    scheduler = copy.deepcopy(pipe.scheduler)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", None):
        patch = pipe.transformer.config.patch_size
        kwargs["mu"] = calculate_shift(
            (latent_size // patch) ** 2,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    retrieve_timesteps(scheduler, num_inference_steps, device, **kwargs)
    return scheduler


def gradient_steps(refl: ReFLConfig, generator: torch.Generator) -> tuple[int, int]:
    """Which steps of the trajectory carry gradients: `(first, last)`, both inclusive. ReFL: one random step in
    `stop_range`; DRaFT: the last K (K random in 1..k with `randomize_k`)."""
    if refl.method == "refl":
        stop = int(torch.randint(refl.stop_range[0], refl.stop_range[1] + 1, (1,), generator=generator))
        return stop, stop
    k = int(torch.randint(1, refl.k + 1, (1,), generator=generator)) if refl.randomize_k else refl.k
    return refl.num_inference_steps - k, refl.num_inference_steps - 1


def reward_loss(
    pipe: StableDiffusion3LogProbPipeline,
    transformer: torch.nn.Module,
    reward: Reward,
    prompts: list[Prompt],
    refl: ReFLConfig,
    generator: torch.Generator,
    text: PromptEncoder | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Sample `prompts` with the ODE, back-propagating only through the configured steps, decode with gradients,
    score; returns `(loss, diagnostics, images)`. Gradients reach `transformer` only through the reward's scores.
    The prompts' embeddings come from `text` (default: the model's T5 length, each distinct prompt once)."""
    device = pipe.transformer.device
    guided = refl.guidance_scale > 1
    text = text or PromptEncoder(pipe)
    prompt_embeds, pooled = text([p.text for p in prompts])
    negative_embeds, negative_pooled = text.negative(len(prompts)) if guided else (None, None)
    size = (refl.resolution or pipe.default_sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    latents = torch.randn(len(prompts), pipe.transformer.config.in_channels, size, size, generator=generator,
                          device=generator.device).to(device)
    scheduler = sampling_scheduler(pipe, refl.num_inference_steps, size, device)
    first, last = gradient_steps(refl, generator)

    def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return guided_velocity(transformer, x, timestep, prompt_embeds, pooled, refl.guidance_scale,
                               negative_embeds if guided else None, negative_pooled if guided else None,
                               detach_unconditional=refl.detach_unconditional).float()

    sigmas = scheduler.sigmas.to(device)
    for i, timestep in enumerate(scheduler.timesteps[: last + 1]):
        with torch.set_grad_enabled(i >= first):
            v = velocity(latents, timestep)
            if refl.method == "refl" and i == last:
                latents = latents - sigmas[i] * v  # the one-step x0 estimate
            else:
                latents = latents + (sigmas[i + 1] - sigmas[i]) * v  # an Euler step of the ODE
    images = pipe.decode_latents(latents)
    scores, info = reward(images, [p.text for p in prompts], [p.metadata for p in prompts])
    if refl.loss == "relu":
        loss = torch.relu(refl.target - scores).mean() * refl.scale
    else:
        loss = -scores.mean() * refl.scale
    stats = {"reward_mean": scores.detach().mean(), "gradient_steps": torch.tensor(float(last - first + 1))}
    stats.update({f"{k}_mean": v.detach().float().mean() for k, v in info.items()
                  if isinstance(v, torch.Tensor) and v.shape == scores.shape})
    return loss, stats, images.detach()


@dataclass(kw_only=True)
class ReFL(TrainingConfig):
    """`algo=refl` (conf/algo/refl.yaml): what is back-propagated (`refl`), steps and batches (`train`), the
    regulariser's loss, held-out evaluation, and the session's options (`TrainingConfig`)."""

    refl: ReFLConfig = field(default_factory=ReFLConfig)
    train: ReFLTrainConfig = field(default_factory=ReFLTrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100))

    def __call__(self, ctx: RunContext) -> None:
        run(ctx, self)

    @staticmethod
    def check_reward(name: str, differentiable: bool | None) -> None:
        """ReFL and DRaFT back-propagate through the reward: refuse one that is not differentiable (None: not known
        yet, e.g. a weighted sum before its parts are built). `rl.run` asks with the reward's class before anything
        loads, the run again with the built reward."""
        if differentiable is False:
            raise ConfigError(
                f"algo=refl back-propagates through the reward, and {name} is not differentiable; use aesthetic, "
                f"clip_score, pickscore, hpsv2 or imagereward (or a policy-gradient method: algo=grpo)")


def run(ctx: RunContext, config: ReFL) -> None:
    """ReFL or DRaFT-K for `train.max_steps` steps; held-out evaluation every `eval.every` steps."""
    refl, train, loss, eval = config.refl, config.train, config.loss, config.eval
    reward = ctx.require_reward("refl")
    config.check_reward(type(reward).__name__, reward.differentiable)
    pretraining = None
    if train.pretrain_weight > 0:
        if not isinstance(ctx.data, ImageCaptionData):
            raise DataError("train.pretrain_weight > 0 needs image-caption data: data.path=<imagefolder>")
        pretraining = ctx.data.load(require_captions=True)

    # 1. Load and prepare; resume.
    s = open_session(ctx, config, total_steps=train.max_steps, accumulation=train.gradient_accumulation_steps,
                     gradient_checkpointing=train.gradient_checkpointing,
                     prompts_only=pretraining is None and train.max_sequence_length is None)
    accelerator, state = s.accelerator, s.state
    max_sequence_length = train.max_sequence_length or s.pipe.max_sequence_length
    text = s.text if train.max_sequence_length is None else PromptEncoder(s.pipe, max_sequence_length)
    if pretraining is not None:
        pretrain_batches = batches(pretraining, train.pretrain_batch_size, s)
        encoder = Encoder(s.pipe, max_sequence_length)
        train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(s.pipe.scheduler.config)

    # 2. Train: sample -> decode -> reward -> loss (+ regulariser) -> step; log, evaluate, checkpoint.
    samples_per_step = train.batch_size * train.gradient_accumulation_steps * accelerator.num_processes
    for _ in s.steps(refl.method, first=lambda step: held_out(s, eval, step, force=True)):
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(train.gradient_accumulation_steps):
            generator = seeds.training_step(ctx.seed, seeds.global_micro_batch(
                state.micro_batches, accelerator.num_processes, accelerator.process_index), accelerator.device)
            state.micro_batches += 1
            chosen = torch.randint(len(ctx.train_prompts), (train.batch_size,), generator=generator,
                                   device=generator.device)
            prompts = [ctx.train_prompts[i] for i in chosen.tolist()]
            text.forget()  # the last step's prompts
            with accelerator.accumulate(s.transformer):
                total, step_stats, _ = reward_loss(s.pipe, s.transformer, s.reward, prompts, refl, generator, text)
                step_stats["reward_loss"] = total.detach()
                if pretraining is not None:
                    batch = next(pretrain_batches)
                    latents = encoder.latents(batch["pixel_values"].to(accelerator.device), batch["keys"], generator)
                    embeds, pooled = encoder.text(batch["captions"], batch["keys"])
                    pretrain = supervised_loss(s.transformer, latents, embeds, pooled, train_scheduler, loss,
                                               generator).mean()
                    step_stats["pretrain_loss"] = pretrain.detach()
                    total = total + train.pretrain_weight * pretrain
                s.backward_and_step(total, step_stats)
            collect(stats, {**step_stats, "loss": total})
        if s.end_step(stats, samples_per_step, train.log_every, lambda step: held_out(s, eval, step)):
            return
    s.finish()
