"""`algo=sft`: supervised fine-tuning of SD3 / SD3.5 on image-caption data, full or LoRA.

The objective is SD3's rectified-flow loss (`docs/algorithms.md` section 6, `rl.losses.flow_matching_loss`), with
timesteps from diffusers' SD3 densities. The loop reads top to bottom: load, prepare, resume, then for each optimiser
step (data -> encode -> loss -> backward -> step -> log -> checkpoint -> validate), then save `<run dir>/final/`.
`rl/dreambooth.py` runs the same loop with its own data and a prior-preservation term.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rl.config import ConfigError
from rl.context import RunContext
from rl.data import DataError, EpochBatchSampler, ImageCaptionDataset, collate, sample_generator
from rl.lora import LoraSpec
from rl.losses import check_weighting_scheme, flow_matching_loss, sample_training_timesteps
from rl.trainer import (
    Checkpointer,
    OptimConfig,
    TrainState,
    build_lr_scheduler,
    build_optimizer,
    make_ema,
    prepare_models,
    sample_validation_images,
    save_final,
    save_validation,
    step_generator,
    trainable_parameters,
)

logger = logging.getLogger(__name__)


@dataclass
class LossConfig:
    """The SD3 flow-matching loss (`algo.loss`); defaults are the SD3 paper's / diffusers' recipe."""

    weighting_scheme: str = "logit_normal"  # logit_normal, mode, cosmap, sigma_sqrt or none
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False

    def __post_init__(self):
        check_weighting_scheme(self.weighting_scheme)


@dataclass
class TrainConfig:
    """Steps, batches and bookkeeping (`algo.train`)."""

    max_steps: int = 500  # optimiser steps
    batch_size: int = 1  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.0  # probability of training a sample on the empty prompt
    cache_latents: bool = False  # encode each image once (needs center crop and no flip)
    cache_text_embeddings: bool = False  # encode each caption once (not with text-encoder LoRA)
    max_sequence_length: int = 77  # T5 tokens
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int | None = 3
    resume: bool = True  # resume from the latest checkpoint in the run directory
    exit_after_steps: int | None = None  # stop this invocation after N steps, as a kill would (resume later)
    num_workers: int = 0


@dataclass
class ValidationConfig:
    """Images sampled at fixed seeds for held-out prompts during training (`algo.validation`)."""

    every: int = 100  # steps; 0 disables
    max_prompts: int = 4
    num_inference_steps: int = 28
    guidance_scale: float = 4.5
    resolution: int | None = None


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.999


@dataclass
class PriorPreservation:
    """DreamBooth's class-image term: its data and the weight of its loss."""

    dataset: ImageCaptionDataset
    weight: float = 1.0


def supervised_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    loss: LossConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Noise the latents at SD3-density timesteps, predict, and return the per-sample flow-matching loss (B,)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps, sigmas = sample_training_timesteps(
        scheduler, latents.shape[0], loss.weighting_scheme, loss.logit_mean, loss.logit_std, loss.mode_scale, generator
    )
    s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - s) * latents + s * noise
    prediction = transformer(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_prompt_embeds,
        return_dict=False,
    )[0]
    return flow_matching_loss(prediction, latents, noise, noisy, sigmas, loss.weighting_scheme, loss.precondition_outputs)


class Encoder:
    """VAE latents and text embeddings for batches, optionally cached per sample key (never per step)."""

    def __init__(self, pipe, cache_latents: bool, cache_text: bool, max_sequence_length: int, text_trainable: bool):
        self.pipe, self.cache_latents, self.cache_text = pipe, cache_latents, cache_text
        self.text_trainable = text_trainable  # gradients through the text encoders only when their LoRA trains
        self.max_sequence_length = max_sequence_length
        self.latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def latents(self, pixels: torch.Tensor, keys: list[str], generator: torch.Generator) -> torch.Tensor:
        """Scaled latents sampled from each image's VAE posterior (the posterior is what gets cached)."""
        vae = self.pipe.vae
        if self.cache_latents:
            todo = [i for i, key in enumerate(keys) if key not in self.latent_cache]
            if todo:
                mean, std = self._encode(pixels[todo])
                self.latent_cache.update({keys[i]: (m, s) for i, m, s in zip(todo, mean, std)})
            mean = torch.stack([self.latent_cache[key][0] for key in keys])
            std = torch.stack([self.latent_cache[key][1] for key in keys])
        else:
            mean, std = self._encode(pixels)
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return ((sample - vae.config.shift_factor) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.pipe.vae.encode(pixels.to(self.pipe.vae.device, self.pipe.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def text(self, captions: list[str], keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and pooled embeddings; the cache is keyed by sample key plus caption (a dropped caption is "")."""
        cache_keys = [f"{key}\n{caption}" for key, caption in zip(keys, captions)]
        if self.cache_text and all(k in self.text_cache for k in cache_keys):
            embeds = [self.text_cache[k] for k in cache_keys]
            return torch.stack([e for e, _ in embeds]), torch.stack([p for _, p in embeds])
        with torch.enable_grad() if self.text_trainable else torch.no_grad():
            prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=captions,
                prompt_2=None,
                prompt_3=None,
                device=self.pipe.transformer.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        if self.cache_text:
            self.text_cache.update({k: (e, p) for k, e, p in zip(cache_keys, prompt_embeds, pooled)})
        return prompt_embeds, pooled


def run(
    ctx: RunContext,
    *,
    lora: LoraSpec | None = None,
    optim: OptimConfig | None = None,
    loss: LossConfig | None = None,
    train: TrainConfig | None = None,
    validation: ValidationConfig | None = None,
    ema: EmaConfig | None = None,
) -> None:
    """Fine-tune on `ctx.data` (an imagefolder or a `datasets` dataset with captions)."""
    if ctx.data is None:
        raise DataError("algo=sft needs training data: data.path=<imagefolder> or data.dataset=<datasets name>")
    dataset = ctx.data.load(require_captions=True)
    train_supervised(ctx, dataset, lora=lora, optim=optim, loss=loss, train=train, validation=validation, ema=ema)


def train_supervised(
    ctx: RunContext,
    dataset: ImageCaptionDataset,
    *,
    lora: LoraSpec | None = None,
    optim: OptimConfig | None = None,
    loss: LossConfig | None = None,
    train: TrainConfig | None = None,
    validation: ValidationConfig | None = None,
    ema: EmaConfig | None = None,
    prior: PriorPreservation | None = None,
    load_pipeline=None,
) -> None:
    """The supervised loop shared by `sft` and `dreambooth`."""
    optim, loss, train = optim or OptimConfig(), loss or LossConfig(), train or TrainConfig()
    validation, ema = validation or ValidationConfig(), ema or EmaConfig()
    if train.cache_latents and not (dataset.deterministic and (prior is None or prior.dataset.deterministic)):
        raise ConfigError("cache_latents needs data.center_crop=true and data.random_flip=false (augmentations change pixels)")
    if train.cache_text_embeddings and lora is not None and lora.text_encoders:
        raise ConfigError("cache_text_embeddings cannot be used while the text encoders are trained")

    # 1. Load and prepare: frozen parts in the mixed-precision dtype, adapters or the transformer trainable.
    accelerator = ctx.accelerator(gradient_accumulation_steps=train.gradient_accumulation_steps)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = (load_pipeline or ctx.load_pipeline)(device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    modules = prepare_models(pipe, lora, train.gradient_checkpointing, weight_dtype, ctx.seed)
    parameters = trainable_parameters(modules)
    optimizer = build_optimizer(parameters, optim)
    num_processes = accelerator.num_processes
    lr_scheduler = build_lr_scheduler(
        optimizer,
        OptimConfig(**{**optim.__dict__, "warmup_steps": optim.warmup_steps * num_processes}),
        train.max_steps * num_processes,  # accelerate steps a prepared scheduler once per process
    )
    transformer, optimizer, lr_scheduler = accelerator.prepare(modules[0], optimizer, lr_scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    ema_model = make_ema(parameters, ema.decay) if ema.enabled else None
    if ema_model is not None:
        accelerator.register_for_checkpointing(ema_model)
    lora_modules = None
    if lora is not None:
        lora_modules = {"transformer": transformer}
        if lora.text_encoders:
            lora_modules.update(text_encoder=modules[1], text_encoder_2=modules[2])
    checkpointer = Checkpointer(accelerator, ctx.run_dir, train.checkpoint_every, train.keep_checkpoints, lora_modules)
    if train.resume:
        checkpointer.restore()
    start_step = state.step

    # 2. Data: this process's batches from the saved position; per-step randomness from (seed, step, rank).
    def loader(data: ImageCaptionDataset) -> DataLoader:
        sampler = EpochBatchSampler(
            len(data), train.batch_size, ctx.seed, num_processes, accelerator.process_index, start=state.micro_batches
        )
        return DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=train.num_workers)

    batches = iter(loader(dataset))
    prior_batches = iter(loader(prior.dataset)) if prior is not None else None
    text_encoders_trained = lora is not None and lora.text_encoders
    encoder = Encoder(
        pipe, train.cache_latents, train.cache_text_embeddings, train.max_sequence_length, text_encoders_trained
    )
    train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def caption_dropped(batch: dict, i: int) -> bool:
        generator = sample_generator(ctx.seed + 1, batch["epochs"][i], batch["indices"][i])
        return torch.rand(1, generator=generator).item() < train.caption_dropout

    progress = tqdm(
        total=train.max_steps, initial=start_step, desc="sft", disable=not accelerator.is_local_main_process
    )
    started, steps_this_run = time.time(), 0
    while state.step < train.max_steps:
        step_losses, prior_losses = [], []
        for _ in range(train.gradient_accumulation_steps):
            batch = next(batches)
            captions = ["" if caption_dropped(batch, i) else c for i, c in enumerate(batch["captions"])]
            keys = batch["keys"]
            pixels = batch["pixel_values"]
            if prior_batches is not None:
                prior_batch = next(prior_batches)
                captions += prior_batch["captions"]
                keys = keys + prior_batch["keys"]
                pixels = torch.cat([pixels, prior_batch["pixel_values"]])
            generator = step_generator(ctx.seed, state.micro_batches, accelerator.process_index, accelerator.device)
            state.micro_batches += 1
            with accelerator.accumulate(transformer):
                latents = encoder.latents(pixels.to(accelerator.device), keys, generator)
                prompt_embeds, pooled = encoder.text(captions, keys)
                per_sample = supervised_loss(transformer, latents, prompt_embeds, pooled, train_scheduler, loss, generator)
                if prior is not None:
                    instance, class_ = per_sample.chunk(2)
                    total = instance.mean() + prior.weight * class_.mean()
                    prior_losses.append(class_.mean().detach())
                    step_losses.append(instance.mean().detach())
                else:
                    total = per_sample.mean()
                    step_losses.append(total.detach())
                accelerator.backward(total)
                if accelerator.sync_gradients:
                    if text_encoders_trained and num_processes > 1:
                        for module in modules[1:]:  # not DDP-wrapped: average their adapter gradients by hand
                            for p in module.parameters():
                                if p.grad is not None:
                                    p.grad = accelerator.reduce(p.grad, reduction="mean")
                    grad_norm = accelerator.clip_grad_norm_(parameters, optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        state.step += 1
        steps_this_run += 1
        if ema_model is not None:
            ema_model.step(parameters)
        progress.update(1)

        if state.step % train.log_every == 0 or state.step == train.max_steps:
            metrics = {
                "train/loss": accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean").item(),
                "train/grad_norm": float(grad_norm),
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/samples": state.step * train.batch_size * train.gradient_accumulation_steps * num_processes,
                "train/steps_per_second": steps_this_run / (time.time() - started),
            }
            if prior_losses:
                metrics["train/prior_loss"] = accelerator.reduce(torch.stack(prior_losses).mean(), "mean").item()
            accelerator.log(metrics, step=state.step)
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
        if state.step % train.checkpoint_every == 0 or state.step == train.max_steps:
            checkpointer.save(state.step)
        if validation.every and (state.step % validation.every == 0 or state.step == train.max_steps):
            validate(ctx, accelerator, pipe, parameters, ema_model, validation, state.step)
        if train.exit_after_steps is not None and steps_this_run >= train.exit_after_steps:
            if state.step % train.checkpoint_every:
                checkpointer.save(state.step)  # a planned stop never loses the steps done
            logger.info("stopping after %d steps as asked (exit_after_steps); start again to resume", steps_this_run)
            accelerator.end_training()
            return
    progress.close()

    # 3. Save: the EMA weights if kept, in diffusers' formats.
    if ema_model is not None:
        ema_model.copy_to(parameters)
    save_final(ctx.run_dir / "final", pipe, lora, modules, accelerator)
    accelerator.end_training()


def validate(ctx, accelerator, pipe, parameters, ema_model, validation: ValidationConfig, step: int) -> None:
    """Sample the first held-out prompts at fixed seeds (with EMA weights when kept) and save the grid."""
    if not accelerator.is_main_process or not ctx.eval_prompts:
        accelerator.wait_for_everyone()
        return
    if ema_model is not None:
        ema_model.store(parameters)
        ema_model.copy_to(parameters)
    prompts = ctx.eval_prompts[: validation.max_prompts]
    images = sample_validation_images(
        pipe,
        prompts,
        ctx.seed,
        validation.num_inference_steps,
        validation.guidance_scale,
        validation.resolution,
    )
    if ema_model is not None:
        ema_model.restore(parameters)
    save_validation(accelerator, ctx.run_dir, images, step, [p.text for p in prompts])
    accelerator.wait_for_everyone()

