"""The phases shared by the policy-gradient methods (`rl/grpo.py`, `rl/ddpo.py`): which prompts an epoch samples,
SDE sampling with log-probabilities, scoring, the PPO-clip update over stored transitions, and held-out evaluation.

Each algorithm file strings these together in order and adds only what is its own (advantages, KL, stat tracker).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator, PartialState

from pipelines import StableDiffusion3LogProbPipeline, transition_log_probs
from rewards import Reward
from rl.config import ConfigError
from rl.losses import kl_to_reference, ppo_clip_loss
from rl.prompts import Prompt
from rl.tracking import metric_name, plot_eval_curves
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
    trainable_parameters,
)

logger = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How an epoch's images are sampled (`algo.sampling`)."""

    prompts_per_epoch: int = 8  # distinct prompts per epoch, over all processes
    images_per_prompt: int = 8  # GRPO's group size G; DDPO's samples per prompt
    batch_size: int = 8  # images per sampling forward pass, per process
    num_inference_steps: int = 10
    guidance_scale: float = 4.5
    noise_level: float = 0.7  # the SDE's noise level a
    sde_type: str = "sde"  # sde (Flow-GRPO) or cps
    resolution: int | None = None  # None: the model's native size
    same_initial_noise: bool = False  # one initial noise per group (Flow-GRPO's same_latent)
    sde_window: int | None = None  # Flow-GRPO-Fast: only this many consecutive steps are stochastic and trained
    sde_window_range: float = 0.5  # ... placed at random within this first fraction of the trajectory


@dataclass
class PPOConfig:
    """The PPO-clip update over stored transitions (`algo.ppo`)."""

    clip_range: float = 1e-4  # tiny because log-probs are per-pixel means (Flow-GRPO, DDPO)
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip]
    timestep_fraction: float = 0.99  # fraction of the (stochastic) steps trained per sample
    inner_epochs: int = 1  # passes over an epoch's samples
    batch_size: int = 8  # samples per training forward, per process
    optimizer_steps: int = 2  # optimiser steps per inner epoch (gradients accumulate in between)
    recompute_old_log_probs: bool = True  # old log-probs in the training layout: the first ratio is exactly 1


@dataclass
class EvalConfig:
    """Held-out evaluation: ODE samples at fixed seeds (`algo.eval`)."""

    every: int = 5  # epochs; 0 disables (the first and last epochs are always evaluated otherwise)
    max_prompts: int = 16
    images_per_prompt: int = 1
    num_inference_steps: int = 40
    guidance_scale: float = 4.5
    resolution: int | None = None
    batch_size: int = 8


@dataclass
class Rollouts:
    """One process's sampled trajectories with what training needs."""

    latents: torch.Tensor  # (N, T+1, C, H, W) float32
    log_probs: torch.Tensor  # (N, K): one per stochastic step
    sde_steps: list[int]  # which of the T steps are stochastic (K of them)
    timesteps: torch.Tensor  # (T,)
    scheduler: object  # a copy of the scheduler holding the sampling schedule, for re-scoring the transitions
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None
    prompts: list[str]
    prompt_ids: torch.Tensor  # (N,) index of the prompt in the training set
    rewards: torch.Tensor | None = None  # (N,)
    reward_info: dict | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]


def check_layout(sampling: SamplingConfig, ppo: PPOConfig, num_processes: int) -> int:
    """Validate batch sizes against each other before anything loads; returns the samples per process."""
    total = sampling.prompts_per_epoch * sampling.images_per_prompt
    if total % num_processes:
        raise ConfigError(f"{total} images per epoch do not split over {num_processes} processes")
    local = total // num_processes
    if local % sampling.batch_size:
        raise ConfigError(f"{local} images per process are not a multiple of sampling.batch_size={sampling.batch_size}")
    if local % ppo.batch_size:
        raise ConfigError(f"{local} images per process are not a multiple of ppo.batch_size={ppo.batch_size}")
    return local


def epoch_jobs(
    num_prompts: int, epoch: int, seed: int, sampling: SamplingConfig, num_processes: int, rank: int
) -> list[dict]:
    """This process's share of the epoch: each chosen prompt repeated `images_per_prompt` times over all processes.

    The prompts are drawn from an epoch-seeded permutation (cycling if the set is small); every image has a global
    index, and its initial-noise seed is that index's (or its group's, with `same_initial_noise`).
    """
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    rounds = math.ceil(sampling.prompts_per_epoch / num_prompts)
    order = torch.cat([torch.randperm(num_prompts, generator=generator) for _ in range(rounds)])
    chosen = order[: sampling.prompts_per_epoch].tolist()
    jobs = [
        {"prompt_id": prompt_id, "group": group, "index": group * sampling.images_per_prompt + k}
        for group, prompt_id in enumerate(chosen)
        for k in range(sampling.images_per_prompt)
    ]
    local = len(jobs) // num_processes
    mine = jobs[rank * local : (rank + 1) * local]
    base = (seed * 1_000_003 + epoch) * 1_000_003
    for job in mine:
        job["noise_seed"] = base + (job["group"] if sampling.same_initial_noise else job["index"])
        job["sde_seed"] = base + 500_009 + job["index"]
    return mine


def sde_window(sampling: SamplingConfig, seed: int, epoch: int) -> list[int] | None:
    """Flow-GRPO-Fast: a window of consecutive stochastic steps at a random place in the trajectory's first part."""
    if sampling.sde_window is None:
        return None
    last_start = max(0, int(sampling.num_inference_steps * sampling.sde_window_range) - sampling.sde_window)
    start = int(torch.randint(0, last_start + 1, (1,), generator=torch.Generator().manual_seed(seed + epoch)))
    return list(range(start, min(start + sampling.sde_window, sampling.num_inference_steps)))


@torch.no_grad()
def sample_rollouts(
    pipe: StableDiffusion3LogProbPipeline,
    prompts: list[Prompt],
    jobs: list[dict],
    sampling: SamplingConfig,
    sde_steps: list[int] | None,
) -> tuple[Rollouts, torch.Tensor]:
    """SDE-sample the jobs in batches; returns the rollouts and the decoded images (NCHW in [0, 1])."""
    device = pipe.transformer.device
    channels = pipe.transformer.config.in_channels
    size = (sampling.resolution or pipe.default_sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    parts, images = [], []
    for start in range(0, len(jobs), sampling.batch_size):
        batch = jobs[start : start + sampling.batch_size]
        initial = torch.stack([
            torch.randn(channels, size, size, generator=torch.Generator().manual_seed(job["noise_seed"]))
            for job in batch
        ]).to(device)
        out = pipe(
            [prompts[job["prompt_id"]].text for job in batch],
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            height=sampling.resolution,
            width=sampling.resolution,
            latents=initial,
            noise_level=sampling.noise_level,
            sde_type=sampling.sde_type,
            sde_steps=sde_steps,
            generator=[torch.Generator(device).manual_seed(job["sde_seed"]) for job in batch],
            output_type="pt",
        )
        parts.append(out)
        images.append(out.images.float())
    cat = lambda name: torch.cat([getattr(p, name) for p in parts]) if getattr(parts[0], name) is not None else None  # noqa: E731
    rollouts = Rollouts(
        latents=cat("latents"),
        log_probs=cat("log_probs"),
        sde_steps=parts[0].sde_steps,
        timesteps=parts[0].timesteps,
        scheduler=copy.deepcopy(pipe.scheduler),  # evaluation later resets the pipeline's own schedule
        prompt_embeds=cat("prompt_embeds"),
        pooled_prompt_embeds=cat("pooled_prompt_embeds"),
        negative_prompt_embeds=cat("negative_prompt_embeds"),
        negative_pooled_prompt_embeds=cat("negative_pooled_prompt_embeds"),
        prompts=[prompts[job["prompt_id"]].text for job in jobs],
        prompt_ids=torch.tensor([job["prompt_id"] for job in jobs], device=device),
    )
    return rollouts, torch.cat(images)


def score(reward: Reward, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
    """Rewards without gradients; per-sample tensors of the reward's info are kept for logging."""
    with torch.no_grad():
        scores, info = reward(images, prompts, metadata)
    per_sample = {k: v.float() for k, v in info.items() if isinstance(v, torch.Tensor) and v.shape == scores.shape}
    return scores.float(), per_sample


def ppo_update(
    accelerator: Accelerator,
    transformer: torch.nn.Module,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    sampling: SamplingConfig,
    ppo: PPOConfig,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    parameters: list[torch.nn.Parameter],
    max_grad_norm: float,
    seed: int,
    epoch: int,
    kl_beta: float = 0.0,
    reference: Callable | None = None,
) -> dict[str, float]:
    """PPO-clip over this process's stored transitions; returns the mean diagnostics.

    Samples are shuffled, and each sample trains on its own random subset of `timestep_fraction` of its stochastic
    steps, in random order, with a new layout for each inner epoch. The old log-probabilities are the sampling policy's
    in every inner epoch (re-scored in each layout before the first update, or the stored ones). `reference()` is a context in which `transformer` is the reference policy (the LoRA
    adapter disabled); with `kl_beta > 0` the loss adds `kl_beta * kl_to_reference`.
    """
    count, num_sde = len(rollouts), len(rollouts.sde_steps)
    num_train_steps = max(1, int(num_sde * ppo.timestep_fraction))
    stats: dict[str, list[torch.Tensor]] = {}

    def forward(index: torch.Tensor, column: torch.Tensor):
        steps = torch.tensor(rollouts.sde_steps, device=column.device)[column]
        negatives = rollouts.negative_prompt_embeds
        return transition_log_probs(
            transformer,
            rollouts.scheduler,
            rollouts.latents[index, steps],
            rollouts.latents[index, steps + 1],
            rollouts.timesteps[steps],
            rollouts.prompt_embeds[index],
            rollouts.pooled_prompt_embeds[index],
            sampling.guidance_scale,
            sampling.noise_level,
            negatives[index] if negatives is not None else None,
            rollouts.negative_pooled_prompt_embeds[index] if negatives is not None else None,
            sde_type=sampling.sde_type,
        )

    device = rollouts.latents.device
    layouts = []  # per inner epoch: a list of (sample indices, per-sample step columns)
    for inner in range(ppo.inner_epochs):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 101 + inner * 7 + accelerator.process_index)
        order = torch.randperm(count, generator=generator)
        columns = torch.stack([torch.randperm(num_sde, generator=generator)[:num_train_steps] for _ in range(count)])
        layouts.append([
            (order[s : s + ppo.batch_size].to(device), columns[order[s : s + ppo.batch_size], j].to(device))
            for s in range(0, count, ppo.batch_size)
            for j in range(num_train_steps)
        ])
    if ppo.recompute_old_log_probs:
        # The behaviour policy's log-probs, re-scored in each training layout before any update.
        with torch.no_grad():
            old_log_probs = [[forward(index, column)[0] for index, column in layout] for layout in layouts]
    else:
        old_log_probs = [[rollouts.log_probs[index, column] for index, column in layout] for layout in layouts]

    for layout, olds in zip(layouts, old_log_probs):
        for (index, column), old in zip(layout, olds):
            with accelerator.accumulate(transformer):
                log_prob, mean, std_dev_t = forward(index, column)
                loss, step_stats = ppo_clip_loss(log_prob, old, advantages[index], ppo.clip_range)
                if kl_beta > 0:
                    with torch.no_grad(), (reference() if reference is not None else nullcontext()):
                        _, reference_mean, _ = forward(index, column)
                    kl = kl_to_reference(mean, reference_mean, std_dev_t).mean()
                    loss = loss + kl_beta * kl
                    step_stats["kl"] = kl.detach()
                step_stats["loss"] = loss.detach()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    step_stats["grad_norm"] = torch.as_tensor(accelerator.clip_grad_norm_(parameters, max_grad_norm))
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for name, value in step_stats.items():
                stats.setdefault(name, []).append(value.float().reshape(()))
    return {name: accelerator.reduce(torch.stack(values).mean(), "mean").item() for name, values in stats.items()}


def micro_batches_per_optimizer_step(local_samples: int, sampling: SamplingConfig, ppo: PPOConfig) -> int:
    """Gradient accumulation: the training forwards of one inner epoch, split into `ppo.optimizer_steps` steps."""
    num_sde = min(sampling.sde_window or sampling.num_inference_steps, sampling.num_inference_steps)
    num_train_steps = max(1, int(num_sde * ppo.timestep_fraction))
    forwards = (local_samples // ppo.batch_size) * num_train_steps
    if forwards % ppo.optimizer_steps:
        raise ConfigError(f"{forwards} training forwards per epoch do not split into {ppo.optimizer_steps} optimiser steps")
    return forwards // ppo.optimizer_steps


def evaluate(
    pipe: StableDiffusion3LogProbPipeline,
    reward: Reward,
    prompts: list[Prompt],
    config: EvalConfig,
    seed: int,
) -> tuple[dict[str, float], torch.Tensor]:
    """ODE samples of the held-out prompts at fixed seeds; the mean and std of the reward and each of its parts."""
    chosen = [p for p in prompts[: config.max_prompts] for _ in range(config.images_per_prompt)]
    images = sample_validation_images(
        pipe, chosen, seed + 10_000_019, config.num_inference_steps, config.guidance_scale, config.resolution,
        config.batch_size,
    )
    scores, info = score(reward, images.to(pipe.transformer.device), [p.text for p in chosen],
                         [p.metadata for p in chosen])
    return eval_metrics(scores, info), images


def eval_metrics(scores: torch.Tensor, info: dict[str, torch.Tensor]) -> dict[str, float]:
    """`eval/reward_mean` and `_std` of a reward's scores, and `eval/<name>_mean` and `_std` of each per-image value it
    reports (the std is 0 for one image)."""
    def spread(values: torch.Tensor) -> float:
        return values.std().item() if len(values) > 1 else 0.0

    metrics = {"eval/reward_mean": scores.mean().item(), "eval/reward_std": spread(scores)}
    for name, values in info.items():
        metrics[f"eval/{name}_mean"] = values.mean().item()
        metrics[f"eval/{name}_std"] = spread(values)
    return metrics


@dataclass
class Setup:
    """Everything a policy-gradient loop holds (built by `setup`)."""

    accelerator: Accelerator
    pipe: StableDiffusion3LogProbPipeline
    transformer: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    modules: list[torch.nn.Module]
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    reward: Reward | None
    state: object
    checkpointer: object
    ema: object | None
    local_samples: int


def ppo_layout(sampling: SamplingConfig, ppo: PPOConfig, epochs: int) -> tuple[int, int, int]:
    """Samples per process, micro-batches per optimiser step and optimiser steps in all, for a PPO method; the batch
    sizes are checked against each other before anything loads."""
    local = check_layout(sampling, ppo, PartialState().num_processes)
    return local, micro_batches_per_optimizer_step(local, sampling, ppo), epochs * ppo.inner_epochs * ppo.optimizer_steps


def setup(
    ctx,
    lora,
    optim,
    local_samples: int,
    accumulation: int,
    updates: int,
    ema_decay: float | None,
    checkpoint_every: int,
    keep_checkpoints: int | None,
    resume: bool,
    registered: list | None = None,
    gradient_checkpointing: bool = False,
) -> Setup:
    """Load the model with LoRA (or trainable), the optimiser for `updates` optimiser steps with `accumulation`
    micro-batches each, the reward, checkpoints; resume. `local_samples` is the samples per process per epoch."""
    num_processes = PartialState().num_processes
    accelerator = ctx.accelerator(gradient_accumulation_steps=accumulation)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = ctx.load_pipeline(device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    modules = prepare_models(pipe, lora, gradient_checkpointing, weight_dtype, ctx.seed)
    parameters = trainable_parameters(modules)
    optimizer = build_optimizer(parameters, optim)
    lr_scheduler = build_lr_scheduler(
        optimizer, OptimConfig(**{**optim.__dict__, "warmup_steps": optim.warmup_steps * num_processes}),
        updates * num_processes,
    )
    transformer, optimizer, lr_scheduler = accelerator.prepare(modules[0], optimizer, lr_scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    ema = make_ema(parameters, ema_decay) if ema_decay else None
    for item in [ema, *(registered or [])]:
        if item is not None:
            accelerator.register_for_checkpointing(item)
    checkpointer = Checkpointer(
        accelerator, ctx.run_dir, checkpoint_every, keep_checkpoints, {"transformer": transformer} if lora else None
    )
    if resume:
        checkpointer.restore()
    reward = ctx.reward.to(accelerator.device) if ctx.reward is not None else None
    return Setup(accelerator, pipe, transformer, modules, parameters, optimizer, lr_scheduler, reward, state,
                 checkpointer, ema, local_samples)


def require_reward(ctx, algo: str) -> None:
    if ctx.reward is None:
        raise ConfigError(f"algo={algo} needs a reward: reward=<name> (e.g. reward=jpeg_compressibility)")


def reference_policy(s: Setup, lora) -> Callable:
    """A context in which the transformer computes the reference policy: the base model (adapter disabled) for LoRA,
    a frozen copy of the initial weights for full fine-tuning."""
    unwrapped = s.accelerator.unwrap_model(s.transformer)
    if lora is not None:

        @contextmanager
        def adapter_disabled():
            unwrapped.disable_adapters()
            try:
                yield
            finally:
                unwrapped.enable_adapters()

        return adapter_disabled
    frozen = copy.deepcopy(unwrapped).requires_grad_(False).eval()
    original_forward = unwrapped.forward

    @contextmanager
    def frozen_weights():
        unwrapped.forward = frozen.forward
        try:
            yield
        finally:
            unwrapped.forward = original_forward

    return frozen_weights


def maybe_evaluate(
    ctx, s: Setup, config: EvalConfig, epoch: int, epochs: int, force: bool = False, unit: str = "epoch"
) -> None:
    """Evaluate after `epoch` epochs (or steps: `unit`) when due (every `config.every`, and the last), with EMA weights
    when kept."""
    due = bool(config.every) and (epoch % config.every == 0 or epoch == epochs)
    if not (due or force) or not ctx.eval_prompts:
        return
    if s.accelerator.is_main_process:
        if s.ema is not None:
            s.ema.store(s.parameters)
            s.ema.copy_to(s.parameters)
        metrics, images = evaluate(s.pipe, s.reward, ctx.eval_prompts, config, ctx.seed)
        if s.ema is not None:
            s.ema.restore(s.parameters)
        metrics["eval/epoch"] = epoch
        s.accelerator.log(metrics, step=epoch)
        logger.info("%s %d, held out: %s", unit, epoch, "  ".join(
            f"{metric_name(name[5:-5])} {value:.4f}" for name, value in metrics.items() if name.endswith("_mean")))
        prompts = [p.text for p in ctx.eval_prompts[: config.max_prompts]]
        save_validation(s.accelerator, ctx.run_dir, images, epoch, prompts, config.images_per_prompt)
    s.accelerator.wait_for_everyone()


def gather_rewards(s: Setup, rewards: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All processes' rewards and labels (group or prompt ids), in process order."""
    return s.accelerator.gather(rewards.contiguous()), s.accelerator.gather(labels.contiguous())


def local_slice(s: Setup, values: torch.Tensor) -> torch.Tensor:
    rank = s.accelerator.process_index
    return values[rank * s.local_samples : (rank + 1) * s.local_samples]


def epoch_metrics(rewards: torch.Tensor, info: dict, stats: dict, s: Setup, epoch: int) -> dict:
    """The training metrics of an epoch: reward statistics over all processes, PPO diagnostics, counters."""
    metrics = {"train/reward_mean": rewards.mean().item(), "train/reward_std": rewards.std().item()}
    for name, values in info.items():
        metrics[f"train/{name}_mean"] = s.accelerator.gather(values.contiguous()).mean().item()
    metrics.update({f"train/{name}": value for name, value in stats.items()})
    metrics["train/lr"] = s.lr_scheduler.get_last_lr()[0]
    metrics["train/epoch"] = epoch
    metrics["train/samples"] = epoch * s.local_samples * s.accelerator.num_processes
    return metrics


def end_epoch(
    ctx, s: Setup, metrics: dict, config: EvalConfig, epoch: int, epochs: int, checkpoint_every: int, start: int,
    exit_after_epochs: int | None,
) -> bool:
    """After an epoch's update: EMA step, log, held-out evaluation when due, checkpoint. True when this invocation
    should stop now (`exit_after_epochs`); the run then resumes from the checkpoint just written."""
    if s.ema is not None:
        s.ema.step(s.parameters)
    s.state.step = epoch + 1
    s.accelerator.log(metrics, step=s.state.step)
    maybe_evaluate(ctx, s, config, s.state.step, epochs)
    if s.state.step % checkpoint_every == 0 or s.state.step == epochs:
        s.checkpointer.save(s.state.step)
    if exit_after_epochs is not None and s.state.step - start >= exit_after_epochs:
        if s.state.step % checkpoint_every:
            s.checkpointer.save(s.state.step)  # a planned stop never loses the epochs done
        s.accelerator.end_training()
        return True
    return False


def finish(ctx, s: Setup, lora) -> None:
    """Save the adapter (or weights), the EMA weights when kept, in diffusers' format; plot the held-out curves
    (`curves.png`); close the trackers."""
    if s.ema is not None:
        s.ema.copy_to(s.parameters)
    save_final(ctx.run_dir / "final", s.pipe, lora, s.modules, s.accelerator)
    if s.accelerator.is_main_process and plot_eval_curves(ctx.run_dir) is not None:
        logger.info("held-out curves: %s; image grids: %s", ctx.run_dir / "curves.png", ctx.run_dir / "samples")
    s.accelerator.end_training()


# ------------------------------------------------------------------------------ step-based loops (dpo offline, refl)


def backward_and_step(s: Setup, loss: torch.Tensor, max_grad_norm: float, stats: dict[str, torch.Tensor]) -> None:
    """Backward, and on a synchronising micro-batch clip the gradients (their norm goes into `stats`); then the
    optimiser and LR steps (accelerate makes them no-ops between accumulation boundaries)."""
    s.accelerator.backward(loss)
    if s.accelerator.sync_gradients:
        stats["grad_norm"] = torch.as_tensor(s.accelerator.clip_grad_norm_(s.parameters, max_grad_norm))
    s.optimizer.step()
    s.lr_scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)


def collect(stats: dict[str, list[torch.Tensor]], step_stats: dict[str, torch.Tensor]) -> None:
    for name, value in step_stats.items():
        stats.setdefault(name, []).append(value.detach().float().reshape(()))


def end_step(
    s: Setup, stats: dict[str, list[torch.Tensor]], train, samples_per_step: int, started: float, steps_this_run: int,
    evaluate: Callable[[int], None], progress=None,
) -> bool:
    """After an optimiser step of a step-based loop (`steps_this_run` counts it): EMA, log (every
    `train.log_every`), held-out evaluation when due, checkpoint. `train` has `max_steps`, `log_every`,
    `checkpoint_every` and `exit_after_steps`. True when this invocation should stop now (`exit_after_steps`); the
    run then resumes from the checkpoint just written."""
    state = s.state
    state.step += 1
    if s.ema is not None:
        s.ema.step(s.parameters)
    if progress is not None:
        progress.update(1)
    if state.step % train.log_every == 0 or state.step == train.max_steps:
        metrics = {f"train/{k}": s.accelerator.reduce(torch.stack(v).mean(), "mean").item() for k, v in stats.items()}
        metrics["train/lr"] = s.lr_scheduler.get_last_lr()[0]
        metrics["train/samples"] = state.step * samples_per_step
        metrics["train/steps_per_second"] = steps_this_run / (time.time() - started)
        s.accelerator.log(metrics, step=state.step)
        if progress is not None:
            progress.set_postfix({k.split("/")[1]: f"{v:.4f}" for k, v in metrics.items()
                                  if k in ("train/loss", "train/reward_mean", "train/implicit_acc")})
    evaluate(state.step)
    if state.step % train.checkpoint_every == 0 or state.step == train.max_steps:
        s.checkpointer.save(state.step)
    if train.exit_after_steps is not None and steps_this_run >= train.exit_after_steps:
        if state.step % train.checkpoint_every:
            s.checkpointer.save(state.step)  # a planned stop never loses the steps done
        s.accelerator.end_training()
        return True
    return False
