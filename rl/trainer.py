"""Training plumbing shared by every algorithm: trainable parameters, optimiser, checkpoints, EMA, validation, saving.

These are small pieces the algorithm files call (composition, not a base class). Checkpoints are accelerate's
`save_state` folders: model or adapter, optimiser, LR scheduler, RNG states, and any registered object (the step
counter, EMA weights, stat trackers). A run started again in the same run directory resumes from the latest one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import StableDiffusion3Pipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from pipelines import StableDiffusion3LogProbPipeline
from rl.config import ConfigError
from rl.lora import LoraSpec, add_text_encoder_lora, add_transformer_lora, load_lora, save_lora
from rl.prompts import Prompt
from rl.tracking import image_grid, log_image

logger = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (`algo.optim`)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit: bool = False  # bitsandbytes' 8-bit AdamW (CUDA only)
    lr_scheduler: str = "constant"  # any of diffusers.optimization's: constant, linear, cosine, ...
    warmup_steps: int = 0


def build_optimizer(parameters: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("nothing to train: no parameter requires gradients")
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, eps=config.eps)
    if config.use_8bit:
        if not torch.cuda.is_available():
            raise ConfigError("algo.optim.use_8bit=true needs a CUDA GPU (bitsandbytes); set it to false")
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    return get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )


@dataclass
class TrainState:
    """The counters a resume needs; registered with accelerate so it is saved in every checkpoint."""

    step: int = 0  # optimiser steps done
    micro_batches: int = 0  # data batches consumed by this process (the data position)
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_batches": self.micro_batches, "extra": self.extra}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_batches, self.extra = state["step"], state["micro_batches"], state.get("extra", {})


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Randomness for one training step (noise, timesteps) that depends only on (seed, step, rank)."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype=dtype)` when that changes anything (diffusers warns on every dtype cast, even a no-op)."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)


def prepare_models(
    pipe: StableDiffusion3LogProbPipeline,
    lora: LoraSpec | None,
    gradient_checkpointing: bool,
    weight_dtype: torch.dtype,
    seed: int,
) -> list[torch.nn.Module]:
    """Freeze what is not trained, add adapters (LoRA) or unfreeze the transformer (full fine-tuning).

    Frozen modules are cast to `weight_dtype` (bf16 / fp16 under mixed precision); trained parameters stay float32.
    The adapters' random initialisation depends on `seed` only. Returns the modules that hold trainable parameters
    (the transformer first).
    """
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False)
            cast(module, weight_dtype)
    trained: list[torch.nn.Module] = [pipe.transformer]
    if lora is not None:
        cast(pipe.transformer, weight_dtype)
        with torch.random.fork_rng():  # seeds CPU and CUDA generators, restores them afterwards
            torch.manual_seed(seed)
            add_transformer_lora(pipe.transformer, lora)
            if lora.text_encoders:
                for encoder in (pipe.text_encoder, pipe.text_encoder_2):
                    add_text_encoder_lora(encoder, lora)
                    trained.append(encoder)
    else:
        pipe.transformer.requires_grad_(True)
    for module in trained:
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    return trained


def trainable_parameters(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for module in modules for p in module.parameters() if p.requires_grad]


class Checkpointer:
    """Saves and restores accelerate state folders `checkpoints/step_<N>/` in the run directory.

    With LoRA only the adapters are written (in diffusers' LoRA format), not the frozen base weights.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        every: int,
        keep: int | None = 3,
        lora_modules: dict[str, torch.nn.Module] | None = None,
    ):
        self.accelerator, self.run_dir, self.every, self.keep = accelerator, run_dir, every, keep
        self.directory = run_dir / "checkpoints"
        self.lora_modules = lora_modules
        if lora_modules is not None:
            accelerator.register_save_state_pre_hook(self._save_adapters)
            accelerator.register_load_state_pre_hook(self._load_adapters)

    def _save_adapters(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            modules = {name: self.accelerator.unwrap_model(m) for name, m in self.lora_modules.items()}
            save_lora(Path(output_dir), **modules)
        weights.clear()  # the frozen base weights are not checkpointed
        models.clear()

    def _load_adapters(self, models, input_dir):
        modules = {name: self.accelerator.unwrap_model(m) for name, m in self.lora_modules.items()}
        load_lora(Path(input_dir), **modules)
        models.clear()

    def latest(self) -> Path | None:
        steps = sorted(
            (int(m.group(1)), p) for p in self.directory.glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name))
        )
        complete = [p for _, p in steps if (p / "done").exists()]
        return complete[-1] if complete else None

    def save(self, step: int) -> Path:
        path = self.directory / f"step_{step:06d}"
        self.accelerator.save_state(str(path))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (path / "done").touch()  # a checkpoint cut off by a kill has no marker and is never resumed from
            if self.keep is not None:
                finished = sorted(p for p in self.directory.glob("step_*") if (p / "done").exists())
                for old in finished[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def restore(self) -> int | None:
        """Load the latest complete checkpoint, if any; returns its step (also the metric records are cut back to
        it, keeping the original file as `metrics.before-resume.jsonl`)."""
        path = self.latest()
        if path is None:
            return None
        self.accelerator.load_state(str(path))
        step = int(path.name.removeprefix("step_"))
        metrics = self.run_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and metrics.exists():
            shutil.copy(metrics, self.run_dir / "metrics.before-resume.jsonl")
            records = [line for line in metrics.read_text().splitlines() if line.strip()]
            kept = [line for line in records if (json.loads(line).get("step") or 0) <= step]
            metrics.write_text("".join(line + "\n" for line in kept))
        logger.info("resumed from %s", path)
        return step


def make_ema(parameters: list[torch.nn.Parameter], decay: float) -> EMAModel:
    return EMAModel(parameters, decay=decay)


@torch.no_grad()
def sample_validation_images(
    pipe: StableDiffusion3LogProbPipeline,
    prompts: list[Prompt],
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int | None,
    batch_size: int = 8,
) -> torch.Tensor:
    """ODE samples for `prompts` with fixed per-image seeds (the same at every validation), as NCHW in [0, 1]."""
    device = pipe.transformer.device
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(seed + start + i) for i in range(len(chunk))]
        images.append(
            pipe(
                [p.text for p in chunk],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type="pt",
            ).images.float().cpu()
        )
    return torch.cat(images)


def save_validation(
    accelerator: Accelerator, run_dir: Path, images: torch.Tensor, step: int, prompts: list[str], images_per_prompt: int = 1
):
    """Write `samples/step_<N>.png` (one row per prompt, captioned with it) and send it to the image trackers."""
    if not accelerator.is_main_process:
        return
    grid = image_grid(images, nrow=images_per_prompt, row_labels=prompts)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    grid.save(run_dir / "samples" / f"step_{step:06d}.png")
    log_image(accelerator, "validation", grid, step)


def save_final(
    directory: Path,
    pipe: StableDiffusion3LogProbPipeline,
    lora: LoraSpec | None,
    modules: list[torch.nn.Module],
    accelerator: Accelerator,
) -> None:
    """Write `<run dir>/final/`: the LoRA in diffusers' format, or a full `StableDiffusion3Pipeline` folder."""
    if not accelerator.is_main_process:
        return
    directory.mkdir(parents=True, exist_ok=True)
    unwrapped = [accelerator.unwrap_model(m) for m in modules]
    if lora is not None:
        encoders = unwrapped[1:] if lora.text_encoders else [None, None]
        save_lora(directory, unwrapped[0], *encoders)
    else:
        components = {**pipe.components, "transformer": unwrapped[0]}
        StableDiffusion3Pipeline(**components).save_pretrained(directory)


def total_norm(parameters: list[torch.nn.Parameter]) -> float:
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return math.sqrt(sum(float(n) ** 2 for n in norms)) if norms else 0.0
