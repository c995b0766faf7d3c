"""The training session every algorithm runs in, supervised ones included.

`open_session` does, once and in the same order for every algorithm: the accelerator (logging to `metrics.jsonl` and
the trackers), the model (frozen parts in the mixed-precision dtype; LoRA adapters, or the whole transformer,
trainable), the optimiser and its LR schedule with their guards (`rl/optim.py`), the EMA of the trained weights, the
checkpoints (named pieces, see `rl/checkpoints.py`) and the resume. The returned `Session` then gives the algorithm's
loop what it shares with every other (and logs `train/seconds`, the wall time spent training, evaluations and
checkpoints left out, kept across resumes, and `train/cpu_seconds`, the process's CPU time over the same spans: what a
compute-matched comparison of methods budgets, the second unaffected by other work on a shared machine):

    s = open_session(ctx, config, total_steps=config.epochs, unit="epoch", layout=layout, ...)
    for epoch in s.steps("grpo", first=evaluate):  # from the resumed step to the last, with a progress bar
        ...                                        # the algorithm's own work; s.backward_and_step(loss, stats)
        if s.end_epoch(metrics, evaluate):          # EMA, log, evaluate when due, checkpoint; True: stop here
            return
    s.finish()                                     # final/ in diffusers' format, curves.png (rl/export.py)

`with s.ema_weights():` runs a block on the EMA weights (when kept); `s.reference_policy()` gives a context in which the
transformer is the frozen reference. An algorithm's "step" is whatever it counts: epochs for GRPO, DDPO and online
DPO, optimiser steps for the others; checkpoints, `exit_after` and the progress bar count the same steps.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pipelines import StableDiffusion3LogProbPipeline
from pipelines.errors import ConfigError
from pipelines.text import PromptEncoder, precompute, text_encoders
from rewards import Reward
from rewards.base import RewardUnavailableError
from rl.batching import UpdateLayout
from rl.checkpoints import CheckpointConfig, Checkpointer, Stateful, TrainState
from rl.context import RunContext
from rl.evaluation import SecondsMarks
from rl.export import export_run
from rl.lora import LoraSpec, add_text_encoder_lora, add_transformer_lora
from rl.optim import Guards, OptimConfig, build_lr_scheduler, build_optimizer, weight_norm

EVALUATION_PENDING = "evaluation_pending"  # in a checkpoint written when its step's held-out evaluation failed

logger = logging.getLogger(__name__)


@dataclass
class EmaConfig:
    """An exponential moving average of the trained weights (`algo.ema`), used for evaluation and `final/`."""

    enabled: bool = False
    decay: float = 0.999


@dataclass(kw_only=True)
class TrainingConfig:
    """The options every training algorithm's session takes (`algo.lora`, `algo.optim`, `algo.ema`,
    `algo.checkpoint`); each algorithm's config extends it with its own."""

    lora: LoraSpec | None = None  # None: train the whole transformer
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


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
    (the transformer first, then the CLIP text encoders when their LoRA trains).
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


def prompt_encoder(ctx: RunContext, pipe: StableDiffusion3LogProbPipeline, accelerator: Accelerator,
                   prompts_only: bool) -> PromptEncoder:
    """The session's `PromptEncoder`. With the model's `precompute_prompt_embeds`, and when the algorithm encodes
    nothing but its prompt sets (`prompts_only`), every training and held-out prompt is encoded now, once, into the
    disk cache (or read from it), and the text encoders move to the CPU for the rest of the run."""
    if not pipe.precompute_prompt_embeds:
        return PromptEncoder(pipe)
    if not prompts_only:
        logger.info("model.precompute_prompt_embeds does not apply: this algorithm encodes captions as it trains")
        return PromptEncoder(pipe)
    cache_dir = Path(pipe.prompt_embeds_cache or ctx.run_dir.parent / "prompt_embeds").expanduser()
    texts = [p.text for p in ctx.train_prompts + ctx.eval_prompts]
    with accelerator.main_process_first():
        store = precompute(pipe, texts, cache_dir, pipe.max_sequence_length, accelerator.is_main_process)
    for encoder in text_encoders(pipe):
        encoder.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return PromptEncoder(pipe, store=store)


def collect(stats: dict[str, list[torch.Tensor]], step_stats: dict[str, torch.Tensor]) -> None:
    """Append a micro-batch's diagnostics to the step's lists (as float scalars, without gradients)."""
    for name, value in step_stats.items():
        stats.setdefault(name, []).append(value.detach().float().reshape(()))


@dataclass
class Session:
    """What a training loop holds; built by `open_session`."""

    ctx: RunContext
    accelerator: Accelerator
    pipe: StableDiffusion3LogProbPipeline
    transformer: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    modules: list[torch.nn.Module]  # the modules holding trained parameters, the transformer first
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    reward: Reward | None
    text: PromptEncoder  # prompt embeddings, each distinct prompt encoded once
    state: TrainState
    checkpointer: Checkpointer
    ema: EMAModel | None
    lora: LoraSpec | None
    optim: OptimConfig
    guards: Guards  # the non-finite and divergence guards (rl/optim.py)
    checkpoint: CheckpointConfig
    total_steps: int  # the algorithm's steps in all (epochs, or optimiser steps)
    updates: int  # optimiser steps in all (the LR schedule's length): total_steps, or the epochs' layout's
    unit: str  # what a step is, in log lines: "epoch" or "step"
    layout: UpdateLayout | None = None  # an epoch algorithm's: samples per process, micro-batches per optimiser step
    start: int = 0  # the step this invocation started (or resumed) at
    started: float = field(default_factory=time.time)
    timing_since: float = field(default_factory=time.time)  # when the training time now counting began
    cpu_since: float = field(default_factory=time.process_time)  # the process's CPU time then
    seconds_marks: SecondsMarks | None = None  # held-out evaluations at training-seconds marks (eval.every_seconds)
    progress: tqdm | None = None
    frozen_reference: torch.nn.Module | None = None  # full fine-tuning's reference: the initial transformer
    stop_signal: int | None = None  # SIGINT or SIGTERM, once received
    outer_handlers: dict = field(default_factory=dict)  # the signal handlers in place before the step loop
    evaluation_pending: bool = False  # resumed from a checkpoint whose step's held-out evaluation failed: redo it

    # ---------------------------------------------------------------------------------------------- the loop

    def steps(self, desc: str, first: Callable[[int], None] | None = None) -> Iterator[int]:
        """The steps still to run, from the resumed one, with a progress bar; the loop body ends with `end_epoch` or
        `end_step`, which advance `state.step`. Meanwhile SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) let the
        current step finish (the progress bar says so), then write a checkpoint and exit with 130 / 143 and one line
        (`_advance`); a second signal acts at once, through the handler in place before the loop (`rl.console`).

        `first(step)`, the held-out evaluation, runs before the first step of a new run (the base model's: the curve's
        start) and of a resume from a checkpoint whose step's evaluation failed (`evaluation_pending`: that step's);
        it must evaluate whether or not its schedule has the step due."""
        if first is not None and (self.state.step == 0 or self.evaluation_pending):
            first(self.state.step)
        self.progress = tqdm(total=self.total_steps, initial=self.state.step, desc=desc,
                             disable=not self.accelerator.is_local_main_process)
        self.started = self.timing_since = time.time()
        self.cpu_since = time.process_time()
        if self.seconds_marks is not None:
            self.seconds_marks.start(self)
        self.outer_handlers = {signum: signal.signal(signum, self._on_signal)
                               for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.state.step < self.total_steps:
                yield self.state.step
        finally:
            for signum, handler in self.outer_handlers.items():
                signal.signal(signum, handler)
        self.progress.close()

    def _on_signal(self, signum: int, frame) -> None:
        self.stop_signal = signum
        for other, handler in self.outer_handlers.items():
            signal.signal(other, handler)
        if self.progress is not None:
            self.progress.set_description(f"{self.progress.desc} (stopping after this {self.unit}: "
                                          f"{signal.Signals(signum).name}; again: at once)")
        logger.debug("%s received: stopping after this %s with a checkpoint", signal.Signals(signum).name, self.unit)

    def backward_and_step(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Backward, and on a synchronising micro-batch clip the gradients (their norm goes into `stats`); then the
        optimiser and LR steps (accelerate makes them no-ops between accumulation boundaries). Call it inside
        `accelerator.accumulate(s.transformer)`.

        The non-finite guard: when the gradients' norm is NaN or infinite (a NaN or infinite reward, advantage or
        loss on any process; the norm is the same on every process), the optimiser step is skipped, the step counts
        as skipped (`train/skipped_nonfinite`), and `optim.nonfinite_patience` skipped steps in a row stop the run
        (`NonFiniteError`). Under fp16 mixed precision accelerate's loss scaler skips such steps itself."""
        self.accelerator.backward(loss)
        skip = False
        if self.accelerator.sync_gradients:
            if len(self.modules) > 1 and self.accelerator.num_processes > 1:
                for module in self.modules[1:]:  # text encoders are not DDP-wrapped: average their gradients here
                    for p in module.parameters():
                        if p.grad is not None:
                            p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            grad_norm = torch.as_tensor(self.accelerator.clip_grad_norm_(self.parameters, self.optim.max_grad_norm))
            stats["grad_norm"] = grad_norm
            norm = float(grad_norm)  # one device sync per optimiser step
            skip = self.accelerator.scaler is None and not math.isfinite(norm)
            self.guards.count(skip, norm == 0.0, self.state.step + 1)
        if not skip:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_steps_through(self, epoch: int) -> int:
        """The optimiser steps of the LR schedule once epoch `epoch` (counted from 0) has trained: each epoch takes the
        same number (`updates / total_steps`; the epoch algorithms' `UpdateLayout`)."""
        return (epoch + 1) * (self.updates // self.total_steps)

    def rewards_usable(self, rewards: torch.Tensor) -> bool:
        """Whether an epoch's rewards (gathered from every process, so every process decides alike) are all finite.
        When one is NaN or infinite, nothing may store or train on them: the epoch's update is skipped (no advantage,
        no per-prompt statistic, no pair, no optimiser step; logged as `train/nonfinite_rewards` and
        `train/skipped_nonfinite`), and it counts towards `optim.nonfinite_patience` like a skipped optimiser step."""
        return self.guards.rewards_finite(rewards, self.state.step + 1)

    def end_epoch(self, metrics: dict[str, float], evaluate: Callable[[int], None]) -> bool:
        """After an epoch's update: log `metrics`, then `_advance`. True when this invocation should stop now."""
        return self._advance(metrics, evaluate)

    def end_step(self, stats: dict[str, list[torch.Tensor]], samples_per_step: int, log_every: int,
                 evaluate: Callable[[int], None]) -> bool:
        """After an optimiser step of a step-based loop: log the means of `stats` over its micro-batches and processes
        (every `log_every` steps and the last), then `_advance`. True when this invocation should stop now."""
        step = self.state.step + 1
        metrics = None
        if step % log_every == 0 or step == self.total_steps:
            metrics = {f"train/{k}": self.accelerator.reduce(torch.stack(v).mean(), "mean").item()
                       for k, v in stats.items()}
            metrics["train/lr"] = self.lr_scheduler.get_last_lr()[0]
            metrics["train/samples"] = step * samples_per_step
            metrics["train/steps_per_second"] = (step - self.start) / (time.time() - self.started)
            if self.progress is not None:
                self.progress.set_postfix({k.split("/")[1]: f"{v:.4f}" for k, v in metrics.items()
                                           if k in ("train/loss", "train/reward_mean", "train/implicit_acc")})
        return self._advance(metrics, evaluate)

    def _advance(self, metrics: dict[str, float] | None, evaluate: Callable[[int], None]) -> bool:
        """Count the step; EMA step; log; held-out evaluation (`evaluate(step)` decides whether it is due);
        checkpoint when due. True when `checkpoint.exit_after` steps have run in this invocation: a checkpoint of
        this step is then written (a planned stop never loses work) and the run resumes from it when started again."""
        self.state.step += 1
        step = self.state.step
        self.state.seconds += time.time() - self.timing_since
        self.state.cpu_seconds += time.process_time() - self.cpu_since
        if self.ema is not None:
            self.ema.step(self.parameters)
        if self.progress is not None:
            self.progress.update(1)
        if metrics is not None:
            metrics = {**metrics, **self.guards.since_last_record(), "train/seconds": self.state.seconds,
                       "train/cpu_seconds": self.state.cpu_seconds}
            self.accelerator.log(metrics, step=step)
        self.guards.check_weights(self.parameters, step, record=metrics is not None)
        evaluate(step)
        if self.checkpointer.due(step, self.total_steps):
            self._save(step)
        self.timing_since = time.time()  # the held-out evaluation and the checkpoint are not training time
        self.cpu_since = time.process_time()
        if self._stop_requested():
            if not self.checkpointer.due(step, self.total_steps):
                self._save(step)
            name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal on another process"
            logger.warning("stopped by %s after %s %d; checkpoint %s; start the same command again to resume",
                           name, self.unit, step, self.checkpointer.directory / f"step_{step:06d}")
            if self.progress is not None:
                self.progress.close()
            self.accelerator.end_training()
            sys.exit(128 + (self.stop_signal or signal.SIGTERM))
        if self.checkpoint.exit_after is not None and step - self.start >= self.checkpoint.exit_after:
            if not self.checkpointer.due(step, self.total_steps):
                self._save(step)
            logger.info("stopped after %d %ss as asked (checkpoint.exit_after); start again to resume",
                        step - self.start, self.unit)
            if self.progress is not None:
                self.progress.close()
            self.accelerator.end_training()
            return True
        return False

    def training_seconds(self, clock: str = "wall") -> float:
        """The training seconds so far on `clock` (wall: `train/seconds`, cpu: `train/cpu_seconds`); the largest
        over the processes, so that every process takes the same decisions from it."""
        seconds = self.state.seconds if clock == "wall" else self.state.cpu_seconds
        if self.accelerator.num_processes > 1:
            value = torch.tensor(seconds, dtype=torch.float64, device=self.accelerator.device)
            seconds = float(self.accelerator.reduce(value, "max").item())
        return seconds

    @contextmanager
    def saving_on_failure(self, evaluating: bool = False) -> Iterator[None]:
        """Around work that depends on another process (a served reward, a judge's API): when it fails for good
        (`rewards.base.RewardUnavailableError`), write a checkpoint of the current step (the weights as the last
        completed step left them) before the error stops the run, so that the same command resumes there rather than
        at the last periodic checkpoint; a failure while `evaluating` the step marks the checkpoint so that the
        resumed run evaluates that step first. One process only: a checkpoint is collective, and one process's failure
        cannot make the others join it (several processes resume from their last periodic checkpoint)."""
        try:
            yield
        except RewardUnavailableError:
            step = self.state.step
            done = self.checkpointer.directory / f"step_{step:06d}"
            if step > 0 and self.accelerator.num_processes == 1 and not done.exists():
                self._save(step)
                if evaluating:
                    (done / EVALUATION_PENDING).touch()
                logger.warning("the reward server failed: checkpoint %s written; start the same command again to "
                               "resume from it", done)
            raise

    def _save(self, step: int) -> None:
        """Checkpoint `step`; never weights that are NaN, infinite or overflowing (`Guards.check_weights` stops the
        run)."""
        self.guards.check_weights(self.parameters, step, record=False)
        self.checkpointer.save(step)

    def _stop_requested(self) -> bool:
        """Whether a signal arrived on any process (all processes stop at the same step)."""
        stop = self.stop_signal is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(float(stop), device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, "max").item())
        return stop

    def finish(self) -> None:
        """Save the adapters (or weights), the EMA weights when kept, in diffusers' format into `final/` (with the
        LoRA in ComfyUI's layout and a model card); plot the held-out curves (`curves.png`); close the trackers."""
        if self.ema is not None:
            self.ema.copy_to(self.parameters)
        export_run(self.ctx, self.pipe, self.lora, self.modules, self.accelerator)
        self.accelerator.end_training()

    # -------------------------------------------------------------------------------------------- the weights

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the trained parameters hold their EMA (when one is kept); restored afterwards."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)

    def reference_policy(self) -> Callable[[], contextmanager]:
        """A context in which the transformer computes the reference policy: the base model (adapter disabled) for
        LoRA, the frozen copy of the initial weights (`open_session(..., reference=True)`) for full fine-tuning."""
        unwrapped = self.accelerator.unwrap_model(self.transformer)
        if self.lora is not None:

            @contextmanager
            def adapter_disabled():
                unwrapped.disable_adapters()
                try:
                    yield
                finally:
                    unwrapped.enable_adapters()

            return adapter_disabled
        if self.frozen_reference is None:
            raise ValueError("full fine-tuning keeps a reference only when the session is opened with reference=True")
        frozen = self.frozen_reference
        original_forward = unwrapped.forward

        @contextmanager
        def frozen_weights():
            unwrapped.forward = frozen.forward
            try:
                yield
            finally:
                unwrapped.forward = original_forward

        return frozen_weights


def open_session(
    ctx: RunContext,
    config: TrainingConfig,
    *,
    total_steps: int,
    layout: UpdateLayout | None = None,
    accumulation: int = 1,
    unit: str = "step",
    gradient_checkpointing: bool = False,
    state: dict[str, Stateful] | None = None,
    reference: bool = False,
    load_pipeline: Callable[..., StableDiffusion3LogProbPipeline] | None = None,
    prompts_only: bool = False,
) -> Session:
    """Load the model with `config.lora` (or trainable), the optimiser for `total_steps` optimiser steps of
    `accumulation` micro-batches each (an epoch algorithm's `layout` gives both instead), the EMA, the reward, the
    checkpoints with the named `state` objects beside the counters; resume from the latest checkpoint when
    `config.checkpoint.resume`. With `reference`, the session keeps the reference policy for `Session.reference_policy`
    (for full fine-tuning, a frozen copy of the weights before any resume). `prompts_only`: the algorithm encodes only
    its prompt sets (not captions), so their embeddings may be precomputed (`prompt_encoder`)."""
    lora, optim, ema, checkpoint = config.lora, config.optim, config.ema, config.checkpoint
    every_seconds = getattr(getattr(config, "eval", None), "every_seconds", 0)  # algorithms with held-out evaluation
    if every_seconds and ema.enabled:
        raise ConfigError("algo.eval.every_seconds evaluates the weights of the last step before each mark, which an "
                          "EMA does not keep: set algo.ema.enabled=false or algo.eval.every_seconds=0")
    updates = layout.updates if layout is not None else total_steps
    accumulation = layout.accumulation if layout is not None else accumulation
    accelerator = ctx.accelerator(gradient_accumulation_steps=accumulation)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = (load_pipeline or ctx.load_pipeline)(device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    modules = prepare_models(pipe, lora, gradient_checkpointing, weight_dtype, ctx.seed)
    text = prompt_encoder(ctx, pipe, accelerator, prompts_only)
    parameters = trainable_parameters(modules)
    optimizer = build_optimizer(parameters, optim)
    lr_scheduler = build_lr_scheduler(optimizer, optim, updates, accelerator.num_processes)
    transformer, optimizer, lr_scheduler = accelerator.prepare(modules[0], optimizer, lr_scheduler)
    counters = TrainState()
    ema_model = EMAModel(parameters, decay=ema.decay) if ema.enabled else None
    named: dict[str, Stateful] = {"train_state": counters}
    if ema_model is not None:
        named["ema"] = ema_model
    named.update(state or {})
    lora_modules = None
    if lora is not None:
        lora_modules = {"transformer": transformer}
        if lora.text_encoders:
            lora_modules.update(text_encoder=modules[1], text_encoder_2=modules[2])
    checkpointer = Checkpointer(accelerator, ctx.run_dir, checkpoint, named, lora_modules)
    # Full fine-tuning's reference policy is the initial weights: copied before a resume replaces them.
    frozen = copy.deepcopy(modules[0]).requires_grad_(False).eval() if reference and lora is None else None
    initial_norm = weight_norm(parameters)  # as initialised, also on resume: the bound of `optim.max_weight_growth`
    pending = False
    if checkpoint.resume:
        restored = checkpointer.restore()
        marker = checkpointer.directory / f"step_{restored or 0:06d}" / EVALUATION_PENDING
        pending = restored is not None and marker.exists()
        if ema_model is not None:
            ema_model.to(accelerator.device)  # restored on the CPU; the trained weights are on the device
    reward = ctx.reward.to(accelerator.device) if ctx.reward is not None else None
    return Session(
        ctx=ctx, accelerator=accelerator, pipe=pipe, transformer=transformer, modules=modules, parameters=parameters,
        optimizer=optimizer, lr_scheduler=lr_scheduler, reward=reward, text=text, state=counters,
        checkpointer=checkpointer,
        ema=ema_model, lora=lora, optim=optim, checkpoint=checkpoint,
        guards=Guards(optim, unit, checkpointer.latest, initial_weight_norm=initial_norm), total_steps=total_steps,
        updates=updates,
        unit=unit, layout=layout,
        start=counters.step, frozen_reference=frozen, evaluation_pending=pending,
        seconds_marks=SecondsMarks(every_seconds, config.eval.seconds_clock) if every_seconds else None,
    )
