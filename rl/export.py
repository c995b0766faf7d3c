"""A run's end: `<run dir>/final/` (the trained LoRA in diffusers' format and in the layout ComfyUI reads, or the
whole fine-tuned pipeline; a model card), and the held-out curves (`curves.png`). The session calls `export_run` once
its last step is done (`Session.finish`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import StableDiffusion3Pipeline

from pipelines import StableDiffusion3LogProbPipeline
from pipelines.lora_layout import ORIGINAL_FILE, write_original
from rl.context import RunContext
from rl.lora import LoraSpec, save_lora
from rl.model_card import write_model_card
from rl.tracking import plot_eval_curves

logger = logging.getLogger(__name__)


def save_final(
    directory: Path, pipe: StableDiffusion3LogProbPipeline, lora: LoraSpec | None, modules: list[torch.nn.Module],
    accelerator: Accelerator,
) -> None:
    """Write `<run dir>/final/`: the LoRA in diffusers' format and in the layout ComfyUI reads
    (pipelines/lora_layout.py), or a full `StableDiffusion3Pipeline` folder."""
    if not accelerator.is_main_process:
        return
    directory.mkdir(parents=True, exist_ok=True)
    unwrapped = [accelerator.unwrap_model(m) for m in modules]
    if lora is not None:
        encoders = unwrapped[1:] if lora.text_encoders else [None, None]
        save_lora(directory, unwrapped[0], *encoders)
        try:  # the ComfyUI layout is a convenience: a LoRA it cannot express leaves the run's end intact
            write_original(directory, layers=len(unwrapped[0].transformer_blocks))
        except ValueError as error:
            logger.warning("final/%s not written: %s", ORIGINAL_FILE, error)
    else:
        components = {**pipe.components, "transformer": unwrapped[0]}
        StableDiffusion3Pipeline(**components).save_pretrained(directory)


def export_run(ctx: RunContext, pipe: StableDiffusion3LogProbPipeline, lora: LoraSpec | None,
               modules: list[torch.nn.Module], accelerator: Accelerator) -> None:
    """`final/` with the trained weights as `modules` hold them now (`save_final`), its model card
    (`final/README.md`, rl/model_card.py), and `curves.png` from the run's held-out evaluations."""
    run_dir = ctx.run_dir
    save_final(run_dir / "final", pipe, lora, modules, accelerator)
    if accelerator.is_main_process:
        prompts = ctx.eval_prompts or ctx.train_prompts
        write_model_card(run_dir, ctx.config, example_prompt=prompts[0].text if prompts else "a photo")
    if accelerator.is_main_process and plot_eval_curves(run_dir) is not None:
        logger.info("held-out curves: %s; image grids: %s", run_dir / "curves.png", run_dir / "samples")
