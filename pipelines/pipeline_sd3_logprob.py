"""An SD3 / SD3.5 sampling pipeline that records what reinforcement learning needs.

`StableDiffusion3LogProbPipeline` is the stock `StableDiffusion3Pipeline` with one change to the denoising loop: each
Euler step is replaced by `sde_step_with_logprob`, and the loop keeps the whole latent trajectory and the per-step
log-probabilities. With `noise_level=0` the step is the stock Euler step, so the images match the stock pipeline's.

`transition_log_probs` re-scores stored transitions under the current weights (what PPO needs), with the same
classifier-free guidance as sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from pipelines.sde import SdeType, sde_step_with_logprob
from pipelines.solvers import dpm_solver_pp_2m_step

SOLVERS = ("euler", "dpm2")


def stochastic_steps(sigmas: torch.Tensor, noise_level: float, sde_type: str, sde_steps: Sequence[int] | None
                     ) -> list[int]:
    """The steps that sample from a density and get a log-probability: those of `sde_steps` (all when None), none
    for the ODE (`noise_level == 0`), and never a deterministic transition: under CPS a step ending at sigma 0 has
    no noise (its standard deviation is `s' sin(a pi / 2) = 0`), so it can be neither scored nor trained."""
    if noise_level <= 0:
        return []
    steps = range(len(sigmas) - 1) if sde_steps is None else sde_steps
    return [i for i in steps if not (sde_type == "cps" and float(sigmas[i + 1]) == 0.0)]


@dataclass
class StableDiffusion3LogProbPipelineOutput(BaseOutput):
    """What one call of the pipeline returns.

    Attributes:
        images: PIL images, a numpy array or a tensor in [0, 1] (NCHW), by `output_type`; the final latents for
            `output_type="latent"`.
        latents: the whole trajectory, float32, shape (B, T+1, C, H, W); `latents[:, 0]` is the initial noise and
            `latents[:, -1]` the final latents. Transition `i` goes from `latents[:, i]` to `latents[:, i + 1]` at
            `timesteps[i]`.
        log_probs: per-step log-probabilities (B, T), float32 (per-pixel means), or None when `noise_level == 0`.
            With `sde_steps`, only those steps are stochastic and have log-probabilities: (B, len(sde_steps)).
        sde_steps: the indices of the stochastic steps (all steps unless `sde_steps` was given; empty for the ODE).
        timesteps: the scheduler timesteps (T,).
        sigmas: the sigmas (T+1,), ending with 0.
        prompt_embeds, pooled_prompt_embeds: the conditional text embeddings used, one row per image.
        negative_prompt_embeds, negative_pooled_prompt_embeds: the unconditional ones, or None without guidance.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor | None
    sde_steps: list[int]
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None


def guided_velocity(
    transformer: SD3Transformer2DModel,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    guidance_scale: float,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
    return_conditional: bool = False,
    detach_unconditional: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The transformer's velocity for `latents` at per-sample `timestep`, with classifier-free guidance.

    Guidance is on when `guidance_scale > 1` (as in the stock pipeline); then the negative embeddings are required, and
    the unconditional and conditional halves run as one batch `[negative; positive]`, exactly as the stock pipeline
    batches them, so that sampling and training see the same numerics. With `return_conditional`, also returns the
    conditional (unguided) velocity, which skip-layer guidance needs.

    `detach_unconditional` stops the gradient at the unconditional half, as Flow-GRPO's training forward did until
    its authors removed the detach on 2025-08-19 ("fix cfg gradient detach", a482878): the value is unchanged, and
    the gradient of the guided velocity `u + w (c - u)` reaches the weights only through `w c`. Without it, the
    gradient flows through both halves (`(1 - w) u + w c`), as Flow-GRPO, GRPO-Guard, DDPO and DanceGRPO train today.
    """
    timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])
    # A DDP-wrapped transformer has no `.dtype`; its parameters' dtype is the same thing.
    model_input = latents.to(getattr(transformer, "dtype", None) or next(transformer.parameters()).dtype)
    if guidance_scale > 1:
        if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds and negative_pooled_prompt_embeds")
        model_input = torch.cat([model_input, model_input])
        timestep = torch.cat([timestep, timestep])
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
    velocity = transformer(
        hidden_states=model_input,
        timestep=timestep,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_prompt_embeds,
        joint_attention_kwargs=joint_attention_kwargs,
        return_dict=False,
    )[0]
    velocity_text = velocity
    if guidance_scale > 1:
        velocity_uncond, velocity_text = velocity.chunk(2)
        if detach_unconditional:
            velocity_uncond = velocity_uncond.detach()
        velocity = velocity_uncond + guidance_scale * (velocity_text - velocity_uncond)
    return (velocity, velocity_text) if return_conditional else velocity


def transition_log_probs(
    transformer: SD3Transformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    guidance_scale: float,
    noise_level: float,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    sde_type: SdeType = "sde",
    joint_attention_kwargs: dict[str, Any] | None = None,
    detach_unconditional: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of a batch of stored transitions `latents -> next_latents` under the current weights.

    Each sample may sit at a different timestep. `scheduler` must hold the sampling schedule (its `set_timesteps` was
    called with the same number of steps as sampling used). Gradients flow to the transformer's trainable weights
    (with guidance and `detach_unconditional`, through the conditional half only: see `guided_velocity`).

    Returns `(log_prob, prev_sample_mean, std_dev_t)` as `sde_step_with_logprob` does; `log_prob` has shape (B,).
    """
    velocity = guided_velocity(
        transformer,
        latents,
        timesteps,
        prompt_embeds,
        pooled_prompt_embeds,
        guidance_scale,
        negative_prompt_embeds,
        negative_pooled_prompt_embeds,
        joint_attention_kwargs,
        detach_unconditional=detach_unconditional,
    )
    _, log_prob, prev_sample_mean, std_dev_t = sde_step_with_logprob(
        scheduler, velocity, timesteps, latents, noise_level, prev_sample=next_latents, sde_type=sde_type
    )
    return log_prob, prev_sample_mean, std_dev_t


class StableDiffusion3LogProbPipeline(StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` that samples with an SDE step and returns the trajectory and its log-probabilities.

    Construct it like the stock pipeline: `StableDiffusion3LogProbPipeline(**stock_pipe.components)` or
    `StableDiffusion3LogProbPipeline.from_pretrained(path_or_hub_id, ...)`.

    `max_sequence_length` is the T5 length of a call that does not give one (the stock default, 256);
    `load_pipeline(max_sequence_length=...)` sets it, so that every caller samples with the model's configured length.
    `precompute_prompt_embeds` and `prompt_embeds_cache` are the model's options for the training session
    (`pipelines/text.py`); the pipeline itself does not use them.
    """

    max_sequence_length: int = 256
    precompute_prompt_embeds: bool = False  # see pipelines/text.py; `load_pipeline` sets these two
    prompt_embeds_cache: str | None = None

    # Adapted from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.__call__
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        noise_level: float = 0.0,
        sde_type: SdeType = "sde",
        sde_steps: Sequence[int] | None = None,
        solver: str = "euler",
        solver_from: int = 0,
        image: PipelineImageInput | None = None,
        strength: float = 0.6,
        image_noise: torch.Tensor | None = None,
    ) -> StableDiffusion3LogProbPipelineOutput | tuple:
        """Generate images; the stock arguments mean what they mean for `StableDiffusion3Pipeline`.

        Extra arguments:
            noise_level: the SDE's noise scale `a` (Flow-GRPO's default for training is 0.7). 0 samples with the plain
                Euler ODE step, like the stock pipeline, and returns no log-probabilities.
            sde_type: "sde" (Flow-GRPO) or "cps" (coefficients-preserving sampling); see `sde_step_with_logprob`.
            sde_steps: step indices that use the SDE (Flow-GRPO-Fast's window); the others take the ODE step. None:
                every step. A step whose transition is deterministic (CPS's last, which ends at sigma 0) is never
                stochastic: it takes the ODE step, which is the same step, and has no log-probability.
            solver: the deterministic (ODE) steps' solver: "euler" (the stock step) or "dpm2", DPM-Solver++ 2M
                (`pipelines.solvers`; DiffusionNFT's sampler, MixGRPO-Flash's after the window), from step
                `solver_from` on; its history is every step's data prediction `x - s v`, whatever solver took the
                step (as MixGRPO-Flash keeps it).
            max_sequence_length: T5 tokens; None: the pipeline's `max_sequence_length`.
            image, strength: image-to-image, as `StableDiffusion3Img2ImgPipeline`: the images (one per prompt, or one
                for all) are encoded with the VAE, noised to the schedule's sigma at step `int(N - N strength)`, and
                sampled from there; the trajectory, log-probabilities, `timesteps`, `sigmas` and `sde_steps` then cover
                only the steps taken (step 0 is the first one taken). `strength` is in (0, 1]; 1 starts from pure noise
                (with the image's encoding drawn all the same, as the stock pipeline does). `image_noise`: the noise
                to mix with the source (training draws it from each sample's seed) instead of drawing it; the
                source's encoding is then its latent distribution's mean.

        With `return_dict=False`, returns `(images, latents, log_probs)`.
        """
        max_sequence_length = max_sequence_length or self.max_sequence_length
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        if image is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")

        self._guidance_scale = guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = joint_attention_kwargs.get("scale", None) if joint_attention_kwargs is not None else None

        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device,
            clip_skip=self.clip_skip,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        if not self.do_classifier_free_guidance:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None

        if image is None:
            latents = self.prepare_latents(
                batch_size * num_images_per_prompt,
                self.transformer.config.in_channels,
                height,
                width,
                prompt_embeds.dtype,
                device,
                generator,
                latents,
            )

        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            latent_size = latents.shape[2:] if latents is not None else (
                int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)  # img2img: not drawn yet
            image_seq_len = (latent_size[0] // self.transformer.config.patch_size) * (
                latent_size[1] // self.transformer.config.patch_size
            )
            mu = calculate_shift(
                image_seq_len,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
        if mu is not None:
            scheduler_kwargs["mu"] = mu
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs
        )
        first = 0  # the first step taken: image-to-image skips the noisiest ones
        if image is not None:
            first = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
            timesteps, num_inference_steps = timesteps[first:], num_inference_steps - first
            if latents is None:
                latents = self.image_latents(image, timesteps[:1], height, width, batch_size * num_images_per_prompt,
                                             prompt_embeds.dtype, device, generator, image_noise)
        self._num_timesteps = len(timesteps)

        if (ip_adapter_image is not None and self.is_ip_adapter_active) or ip_adapter_image_embeds is not None:
            ip_adapter_image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )
            self._joint_attention_kwargs = {
                **(self._joint_attention_kwargs or {}),
                "ip_adapter_image_embeds": ip_adapter_image_embeds,
            }

        # The trajectory is kept in float32 so that stored transitions re-score exactly (bf16 would round them).
        latents = latents.float()
        trajectory = [latents]
        log_probs = []
        schedule = self.scheduler.sigmas[first:]  # the sigmas of the steps taken, and the final 0
        stochastic = stochastic_steps(schedule, noise_level, sde_type, sde_steps)
        sigmas_list = schedule.tolist()
        x0_previous = None  # the previous step's data prediction (DPM-Solver's history)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                timestep = t.expand(latents.shape[0])
                velocity, velocity_text = guided_velocity(
                    self.transformer,
                    latents,
                    timestep,
                    prompt_embeds,
                    pooled_prompt_embeds,
                    guidance_scale,
                    negative_prompt_embeds,
                    negative_pooled_prompt_embeds,
                    self.joint_attention_kwargs,
                    return_conditional=True,
                )
                in_skip_window = num_inference_steps * skip_layer_guidance_start < i < (
                    num_inference_steps * skip_layer_guidance_stop
                )
                if self.do_classifier_free_guidance and skip_guidance_layers is not None and in_skip_window:
                    velocity_skip_layers = self.transformer(
                        hidden_states=latents.to(self.transformer.dtype),
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        pooled_projections=pooled_prompt_embeds,
                        joint_attention_kwargs=self.joint_attention_kwargs,
                        return_dict=False,
                        skip_layers=skip_guidance_layers,
                    )[0]
                    velocity = velocity + (velocity_text - velocity_skip_layers) * self._skip_layer_guidance_scale

                x0 = latents - sigmas_list[i] * velocity.float()  # the data prediction, DPM-Solver's history
                if solver == "dpm2" and i >= solver_from and i not in stochastic:
                    latents = dpm_solver_pp_2m_step(latents, x0, x0_previous, sigmas_list[i - 1] if i else None,
                                                    sigmas_list[i], sigmas_list[i + 1])
                    log_prob = None
                else:
                    step_noise = noise_level if i in stochastic else 0.0
                    latents, log_prob, _, _ = sde_step_with_logprob(
                        self.scheduler, velocity, timestep, latents, step_noise, generator=generator,
                        sde_type=sde_type
                    )
                x0_previous = x0
                trajectory.append(latents)
                if log_prob is not None:
                    log_probs.append(log_prob)

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    pooled_prompt_embeds = callback_outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()

        trajectory = torch.stack(trajectory, dim=1)
        log_probs = torch.stack(log_probs, dim=1) if log_probs else None
        if not return_dict:
            return images, trajectory, log_probs
        return StableDiffusion3LogProbPipelineOutput(
            images=images,
            latents=trajectory,
            log_probs=log_probs,
            sde_steps=stochastic,
            timesteps=timesteps,
            sigmas=schedule.clone(),
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )

    def image_latents(self, image: PipelineImageInput, timestep: torch.Tensor, height: int, width: int, batch: int,
                      dtype: torch.dtype, device: torch.device,
                      generator: torch.Generator | list[torch.Generator] | None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """Image-to-image's starting latents, drawn as `StableDiffusion3Img2ImgPipeline` draws them (the same random
        numbers in the same order): the VAE encoding sampled with `generator` (one generator per image when a list),
        shifted and scaled, repeated to `batch`, then `scheduler.scale_noise` to `timestep` with noise from
        `generator`. With `noise` given (training draws it from each sample's seed) the encoding is the latent
        distribution's mean and `noise` the only randomness of the start."""
        pixels = self.image_processor.preprocess(image, height=height, width=width).to(device=device, dtype=dtype)
        if noise is not None:  # the given noise is the start's only randomness: a group sharing it shares its start
            encoded = self.vae.encode(pixels).latent_dist.mode()
        elif isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch} images")
            encoded = torch.cat([self.vae.encode(pixels[i:i + 1]).latent_dist.sample(generator[i])
                                 for i in range(batch)])
        else:
            encoded = self.vae.encode(pixels).latent_dist.sample(generator)
        encoded = (encoded - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        if batch % encoded.shape[0]:
            raise ValueError(f"cannot repeat {encoded.shape[0]} images to a batch of {batch}")
        encoded = torch.cat([encoded] * (batch // encoded.shape[0]), dim=0)
        if noise is None:
            noise = randn_tensor(encoded.shape, generator=generator, device=device, dtype=dtype)
        elif noise.shape != encoded.shape:
            raise ValueError(f"image_noise has shape {tuple(noise.shape)}, the images' latents {tuple(encoded.shape)}")
        return self.scheduler.scale_noise(encoded, timestep.repeat(batch), noise).to(device=device, dtype=dtype)

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pt"):
        """Decode final latents to images as the stock pipeline does (unscale, unshift, VAE decode, postprocess).

        Differentiable when called with gradients enabled and `output_type="pt"` (ReFL needs that); the `pt` output is
        in [0, 1].
        """
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        if output_type == "pt":
            return (images / 2 + 0.5).clamp(0, 1)  # as VaeImageProcessor.postprocess, kept differentiable
        return self.image_processor.postprocess(images, output_type=output_type)
