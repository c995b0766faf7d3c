"""Supervised pieces shared by several algorithms: SD3's flow-matching loss on latents (`docs/algorithms.md`
section 6), the encoder that turns images and captions into latents and embeddings (optionally cached), and the
supervised loop that `algo=sft` and `algo=dreambooth` run. ReFL's regulariser and DPO use the loss and the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.utils.data import DataLoader

from pipelines.configs import check_values
from pipelines.errors import ConfigError
from rl import seeds
from rl.checkpoints import CheckpointConfig
from rl.context import RunContext
from rl.data import EpochBatchSampler, ImageCaptionDataset, collate
from rl.evaluation import ValidationConfig, validate
from rl.losses import check_weighting_scheme, flow_matching_loss, sample_training_timesteps
from rl.session import Session, TrainingConfig, collect, open_session


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
class SupervisedStepConfig:
    """Steps and batches of the supervised loop (`algo.train`)."""

    max_steps: int = 500  # optimiser steps
    batch_size: int = 1  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.0  # probability of training a sample on the empty prompt
    cache_latents: bool = False  # encode each image once (needs center crop and no flip)
    cache_text_embeddings: bool = False  # encode each caption once (not with text-encoder LoRA)
    max_sequence_length: int = 77  # T5 tokens
    log_every: int = 1
    num_workers: int = 0

    def __post_init__(self):
        check_values("algo.train", self, positive=("max_steps", "batch_size", "gradient_accumulation_steps",
                                                  "max_sequence_length", "log_every"),
                     at_least_zero=("caption_dropout", "num_workers"))
        if self.caption_dropout > 1:
            raise ConfigError(f"algo.train.caption_dropout is a probability, got {self.caption_dropout}")


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
    return flow_matching_loss(prediction, latents, noise, noisy, sigmas, loss.weighting_scheme,
                              loss.precondition_outputs)


class Encoder:
    """VAE latents and text embeddings for batches, optionally cached per sample key (never per step)."""

    def __init__(self, pipe, max_sequence_length: int, *, cache_latents: bool = False, cache_text: bool = False,
                 text_trainable: bool = False):
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
                self.latent_cache.update({keys[i]: (m, s) for i, m, s in zip(todo, mean, std, strict=True)})
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
        cache_keys = [f"{key}\n{caption}" for key, caption in zip(keys, captions, strict=True)]
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
            self.text_cache.update({k: (e, p) for k, e, p in zip(cache_keys, prompt_embeds, pooled, strict=True)})
        return prompt_embeds, pooled


def batches(data, batch_size: int, session: Session, collate_fn=collate, num_workers: int = 0):
    """This process's endless stream of batches of `data` (a dataset of `(index, epoch, seed)` items), from the
    session's saved data position (`rl.session.Session`)."""
    accelerator = session.accelerator
    sampler = EpochBatchSampler(len(data), batch_size, session.ctx.seed, accelerator.num_processes,
                                accelerator.process_index, start=session.state.micro_batches)
    return iter(DataLoader(data, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers))


@dataclass(kw_only=True)
class SupervisedConfig(TrainingConfig):
    """The supervised loop's options (`algo=sft`, and `algo=dreambooth`'s besides its own), and the session's."""

    loss: LossConfig = field(default_factory=LossConfig)
    train: SupervisedStepConfig = field(default_factory=SupervisedStepConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100))


def train_supervised(
    ctx: RunContext,
    dataset: ImageCaptionDataset,
    config: SupervisedConfig,
    prior: PriorPreservation | None = None,
    load_pipeline=None,
) -> None:
    """The supervised loop of `sft` and `dreambooth`: for each optimiser step, data -> encode -> loss -> backward ->
    step; log, validate and checkpoint through the session; then `<run dir>/final/`."""
    lora, loss, train, validation = config.lora, config.loss, config.train, config.validation
    if train.cache_latents and not (dataset.deterministic and (prior is None or prior.dataset.deterministic)):
        raise ConfigError(
            "cache_latents needs data.center_crop=true and data.random_flip=false (augmentations change pixels)")
    if train.cache_text_embeddings and lora is not None and lora.text_encoders:
        raise ConfigError("cache_text_embeddings cannot be used while the text encoders are trained")

    # 1. Load and prepare: frozen parts in the mixed-precision dtype, adapters or the transformer trainable; resume.
    s = open_session(ctx, config, total_steps=train.max_steps, accumulation=train.gradient_accumulation_steps,
                     gradient_checkpointing=train.gradient_checkpointing, load_pipeline=load_pipeline)
    accelerator, state = s.accelerator, s.state

    # 2. Data: this process's batches from the saved position; per-step randomness from (seed, step, rank).
    data = batches(dataset, train.batch_size, s, num_workers=train.num_workers)
    prior_data = batches(prior.dataset, train.batch_size, s, num_workers=train.num_workers) if prior else None
    encoder = Encoder(s.pipe, train.max_sequence_length, cache_latents=train.cache_latents,
                      cache_text=train.cache_text_embeddings, text_trainable=lora is not None and lora.text_encoders)
    train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(s.pipe.scheduler.config)
    samples_per_step = train.batch_size * train.gradient_accumulation_steps * accelerator.num_processes

    def caption_dropped(batch: dict, i: int) -> bool:
        generator = seeds.caption_dropout(ctx.seed, batch["epochs"][i], batch["indices"][i])
        return torch.rand(1, generator=generator).item() < train.caption_dropout

    for _ in s.steps("sft"):
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(train.gradient_accumulation_steps):
            batch = next(data)
            captions = ["" if caption_dropped(batch, i) else c for i, c in enumerate(batch["captions"])]
            keys, pixels = batch["keys"], batch["pixel_values"]
            if prior_data is not None:
                prior_batch = next(prior_data)
                captions += prior_batch["captions"]
                keys = keys + prior_batch["keys"]
                pixels = torch.cat([pixels, prior_batch["pixel_values"]])
            generator = seeds.training_step(ctx.seed, seeds.global_micro_batch(
                state.micro_batches, accelerator.num_processes, accelerator.process_index), accelerator.device)
            state.micro_batches += 1
            step_stats: dict[str, torch.Tensor] = {}
            with accelerator.accumulate(s.transformer):
                latents = encoder.latents(pixels.to(accelerator.device), keys, generator)
                prompt_embeds, pooled = encoder.text(captions, keys)
                per_sample = supervised_loss(s.transformer, latents, prompt_embeds, pooled, train_scheduler, loss,
                                             generator)
                if prior is not None:
                    instance, class_ = per_sample.chunk(2)
                    total = instance.mean() + prior.weight * class_.mean()
                    step_stats.update(loss=instance.mean(), prior_loss=class_.mean())
                else:
                    total = per_sample.mean()
                    step_stats["loss"] = total
                s.backward_and_step(total, step_stats)
            collect(stats, step_stats)
        if s.end_step(stats, samples_per_step, train.log_every, lambda step: validate(s, validation, step)):
            return

    # 3. Save: the EMA weights if kept, in diffusers' formats.
    s.finish()
