"""Where the time and memory of a run go, measured as ratios inside one run (never as timed tests).

    python -m experiments.bench                          # CPU: P1, P2, P3 and memory on the tiny / digits models
    python -m experiments.bench --only p1 p3             # a part of it
    python -m experiments.bench --device cuda            # a GPU: the real SD3.5-Medium and -Large architectures
    python -m experiments.bench --device cpu --models tiny --gpu-mode   # the GPU mode's code path, on the CPU

CPU mode (the default; under 10 minutes on two cores):

- P1: the log-prob pipeline / the stock `StableDiffusion3Pipeline` on the same components, batch, steps and seed, for
  ODE and SDE sampling (the stock pipeline has only the ODE: the SDE row is what the SDE step and its log-probability
  add), on the tiny model and the digits world's; the two alternate, and the ratio of their fastest calls is shown
  (the least disturbed by other work on the machine), with the median of the per-pair ratios beside it.
- P2: where an epoch's time goes, in short runs of GRPO, DDPO, online DPO, ReFL, DiffusionNFT and AWM in the digits
  world through the real entry point (`rl.run`'s config, check and context): the transformer while sampling, the
  training forwards (KL reference and old policy included), backward, the VAE, the text encoders, the reward, the
  old-log-prob re-scoring, held-out evaluation, and everything else. Each part's time is its own (nested parts are
  subtracted from their parent).
  Also GRPO's epoch time with rewards scored in a worker thread beside sampling / in line (`overlap_scoring`).
- P3: text-encoder rows per distinct prompt, counted with forward hooks: per epoch for the training prompts, per run
  for the held-out prompts and the negative prompt, and what encoding every image's prompt would have cost.
- Memory: the process's peak RSS after each part (it only grows; on a GPU `torch.cuda.max_memory_allocated` per part).

GPU mode (`--device cuda`, or `--gpu-mode` on any device): builds each architecture of `--models` (default on CUDA:
SD3.5-Medium and SD3.5-Large from their published configs, random weights, no download) in bf16 with the SD3 VAE,
LoRA (rank 32) on the transformer, and measures, at the published GRPO preset's per-GPU batch (12 samples with CFG at
512 px, 10 steps): images per second when sampling, seconds per training step (forward, backward, AdamW) with and
without gradient checkpointing, peak memory of each, and the same after `torch.compile` (applied after the LoRA
injection). Prompt embeddings are random tensors of the real shapes: the presets precompute them, so the text
encoders are not on the GPU while training.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from rl.threads import limit_openmp_spinning, set_cpu_threads

limit_openmp_spinning()  # before torch loads OpenMP (rl/threads.py)

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[1]

# The published transformer configs (the hub's transformer/config.json of each checkpoint) and SD3's VAE.
ARCHITECTURES = {
    "sd35_medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd35_large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                       attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                       caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                       dual_attention_layers=(), qk_norm="rms_norm"),
}
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
CLIP_TOKENS, T5_TOKENS = 77, 128  # the presets' prompt length: 77 CLIP tokens and Flow-GRPO's 128 T5 tokens


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: torch.device | str) -> float:
    """Peak GPU memory allocated since the last reset, or the process's peak RSS on the CPU (it only grows)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------------- P1


def p1(device: str, repeats: int) -> list[dict]:
    """Log-prob pipeline / stock pipeline, ODE and SDE, on the tiny and the digits models."""
    from pipelines import load_pipeline
    from pipelines.digits import load_digits_pipeline

    rows = []
    for name, load, prompts, steps in (
        ("tiny", lambda: load_pipeline(None, device=device), ["a photo of a cat", "a dog on the grass"] * 4, 10),
        ("digits", lambda: load_digits_pipeline(device=device), ["a handwritten digit 3"] * 16, 10),
    ):
        ours = load()
        ours.set_progress_bar_config(disable=True)
        stock = StableDiffusion3Pipeline(**ours.components)
        stock.set_progress_bar_config(disable=True)
        kwargs = dict(num_inference_steps=steps, guidance_scale=4.5, output_type="pt",
                      max_sequence_length=ours.max_sequence_length)

        def timed(pipe, **extra):
            sync(device)
            start = time.perf_counter()
            pipe(prompts, generator=torch.Generator(device).manual_seed(0), **kwargs, **extra)
            sync(device)
            return time.perf_counter() - start

        for mode, extra in (("ODE", {}), ("SDE", {"noise_level": 0.7})):
            timed(ours, **extra), timed(stock)  # warm-up
            pairs = [(timed(ours, **extra), timed(stock)) for _ in range(repeats)]
            ours_best, stock_best = min(p[0] for p in pairs), min(p[1] for p in pairs)
            rows.append({"model": name, "sampler": mode, "batch": len(prompts), "steps": steps,
                         "ratio": ours_best / stock_best,
                         "median_pair_ratio": statistics.median(a / b for a, b in pairs), "pairs": pairs})
    return rows


# ----------------------------------------------------------------------------------------------------------- P2, P3


class Clock:
    """Exclusive time per part: entering a part pauses its parent's clock. An `opaque` part (held-out evaluation,
    the re-scoring) keeps everything inside it as its own."""

    def __init__(self, device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.stack = ["everything else"]
        self.mark = time.perf_counter()
        self.opaque = 0

    @contextlib.contextmanager
    def part(self, name: str, opaque: bool = False):
        if self.opaque:
            yield
            return
        self._switch()
        self.stack.append(name)
        self.opaque += opaque
        try:
            yield
        finally:
            self.opaque -= opaque
            self._switch()
            self.stack.pop()

    def _switch(self):
        sync(self.device)
        now = time.perf_counter()
        self.totals[self.stack[-1]] += now - self.mark
        self.mark = now

    def finish(self) -> dict[str, float]:
        self._switch()
        return dict(self.totals)


@contextlib.contextmanager
def patched(target, name: str, wrapper):
    original = getattr(target, name)
    setattr(target, name, wrapper(original))
    try:
        yield
    finally:
        setattr(target, name, original)


def timed_by(clock: Clock, part, opaque: bool = False):
    """A wrapper that runs a function inside `clock.part(part(...))` (`part`: a name, or a function of no argument
    giving one when called)."""
    def wrap(original):
        @functools.wraps(original)
        def inner(*args, **kwargs):
            with clock.part(part() if callable(part) else part, opaque):
                return original(*args, **kwargs)
        return inner
    return wrap


class Instruments:
    """The parts of P2 and the counts of P3, installed on the real code paths for one run."""

    def __init__(self, device):
        self.clock = Clock(device)
        self.sampling = 0  # inside a pipeline call
        self.in_eval = 0
        self.rows = Counter()  # text-encoder rows: training sampling, held-out, other
        self.epoch_prompts: list[int] = []  # distinct training prompts of each epoch
        self.epoch_images: list[int] = []
        self.evaluations = 0

    @contextlib.contextmanager
    def installed(self):
        import accelerate

        import rl.evaluation
        import rl.ppo
        import rl.rollouts
        import rl.session
        from pipelines import StableDiffusion3LogProbPipeline
        from pipelines.text import NEGATIVE_PROMPT, PromptEncoder
        from rewards import Reward

        clock = self.clock

        def transformer_part():
            return "transformer: sampling" if self.sampling else "transformer: training forward"

        def in_pipeline(original):
            def inner(*args, **kwargs):
                self.sampling += 1
                try:
                    with clock.part("sampling: the rest (scheduler, SDE step, log-prob)"):
                        return original(*args, **kwargs)
                finally:
                    self.sampling -= 1
            return inner

        def in_eval(original):
            def inner(*args, **kwargs):
                self.evaluations += 1
                self.in_eval += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self.in_eval -= 1
            return inner

        def counted_encode(original):
            def inner(encoder, text):
                if encoder.store is None:
                    where = "held-out" if self.in_eval else "training" if self.sampling_epoch else "other"
                    self.rows["negative" if text == NEGATIVE_PROMPT else where] += 1
                return original(encoder, text)
            return inner

        def counted_jobs(original):
            def inner(*args, **kwargs):
                jobs = original(*args, **kwargs)
                self.epoch_prompts.append(len({job.prompt_id for job in jobs}))
                self.epoch_images.append(len(jobs))
                return jobs
            return inner

        self.sampling_epoch = 0

        def in_epoch(original):
            def inner(*args, **kwargs):
                self.sampling_epoch += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self.sampling_epoch -= 1
            return inner

        with contextlib.ExitStack() as stack:
            enter = stack.enter_context
            enter(patched(SD3Transformer2DModel, "forward", timed_by(clock, transformer_part)))
            enter(patched(AutoencoderKL, "decode", timed_by(clock, "VAE")))
            enter(patched(StableDiffusion3LogProbPipeline, "encode_prompt", timed_by(clock, "text encoders")))
            enter(patched(StableDiffusion3LogProbPipeline, "__call__", in_pipeline))
            enter(patched(PromptEncoder, "_encode", counted_encode))
            enter(patched(Reward, "forward", timed_by(clock, "reward")))
            enter(patched(accelerate.Accelerator, "backward", timed_by(clock, "backward")))
            enter(patched(rl.ppo, "old_log_probs", timed_by(clock, "old-log-prob re-scoring", opaque=True)))
            enter(patched(rl.evaluation, "evaluate", in_eval))
            enter(patched(rl.evaluation, "evaluate", timed_by(clock, "held-out evaluation", opaque=True)))
            enter(patched(rl.session.Checkpointer, "save", timed_by(clock, "checkpoints, final/ and curves", True)))
            enter(patched(rl.session.Session, "finish", timed_by(clock, "checkpoints, final/ and curves", True)))
            enter(patched(rl.rollouts, "epoch_jobs", counted_jobs))
            enter(patched(rl.rollouts, "sample_epoch", in_epoch))
            for module in ALGORITHM_MODULES:  # they imported these names
                imported = sys.modules[module]
                enter(patched(imported, "open_session", timed_by(clock, "start-up (load, LoRA, optimiser)", True)))
                if hasattr(imported, "sample_epoch"):
                    enter(patched(imported, "sample_epoch", lambda _: rl.rollouts.sample_epoch))
            yield self


P2_RUNS = {  # preset, overrides: a few epochs / steps of each method in the digits world
    "GRPO": ("grpo_digits", ["algo.epochs=2", "algo.eval.every=2", "algo.eval.max_prompts=8",
                             "algo.eval.images_per_prompt=1", "algo.checkpoint.every=100"]),
    "DDPO": ("ddpo_digits", ["algo.epochs=2", "algo.eval.every=2", "algo.eval.max_prompts=8",
                             "algo.eval.images_per_prompt=1", "algo.checkpoint.every=100"]),
    "online DPO": ("dpo_online_digits", ["algo.epochs=2", "algo.eval.every=2", "algo.eval.max_prompts=8",
                                         "algo.eval.images_per_prompt=1", "algo.checkpoint.every=100"]),
    "ReFL": ("refl_digits", ["algo.train.max_steps=8", "algo.eval.every=8", "algo.eval.max_prompts=8",
                             "algo.eval.images_per_prompt=1", "algo.checkpoint.every=100"]),
    "DiffusionNFT": ("nft_digits", ["algo.epochs=2", "algo.eval.every=2", "algo.eval.max_prompts=8",
                                    "algo.eval.images_per_prompt=1", "algo.checkpoint.every=100"]),
    "AWM": ("awm_digits", ["algo.epochs=2", "algo.eval.every=2", "algo.eval.max_prompts=8",
                           "algo.eval.images_per_prompt=1", "algo.checkpoint.every=100"]),
}
ALGORITHM_MODULES = ("rl.grpo", "rl.ddpo", "rl.dpo", "rl.refl", "rl.nft", "rl.awm")


def run_preset(preset: str, overrides: list[str], run_dir: Path) -> None:
    """A run as `python -m rl.run experiment=<preset> ...` makes it: compose, check, build the context, run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from rl.run import build_context, check_config

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}", *overrides, f"hydra.run.dir={run_dir}"],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    algorithm = check_config(cfg, run_dir)
    algorithm(build_context(cfg, run_dir))


def p2(device: str, work: Path, names: list[str]) -> tuple[list[dict], dict, list[dict]]:
    """Each method's time by part and its text-encoder counts; GRPO with and without overlapped scoring."""
    for module in ALGORITHM_MODULES:  # the modules whose imported names get patched
        importlib.import_module(module)

    rows, counts = [], {}
    for name in names:
        preset, overrides = P2_RUNS[name]
        reset_peak(device)
        instruments = Instruments(device)
        start = time.perf_counter()
        with instruments.installed():
            run_preset(preset, overrides, work / preset)
        total = time.perf_counter() - start
        parts = instruments.clock.finish()
        rows.append({"method": name, "seconds": total, "parts": parts, "peak_memory_gb": peak_memory_gb(device)})
        counts[name] = {"rows": dict(instruments.rows), "epoch_prompts": instruments.epoch_prompts,
                        "epoch_images": instruments.epoch_images, "evaluations": instruments.evaluations,
                        "eval_prompts": 8}
    overlap = []
    if "GRPO" in names:
        preset, overrides = P2_RUNS["GRPO"]
        short = [*overrides, "algo.epochs=1", "algo.eval.every=0"]
        times = defaultdict(list)
        for repeat in range(2):
            for choice in ("false", "true"):
                start = time.perf_counter()
                run_preset(preset, [*short, f"algo.sampling.overlap_scoring={choice}"],
                           work / f"overlap_{choice}_{repeat}")
                times[choice].append(time.perf_counter() - start)
        overlap.append({"overlapped": min(times["true"]), "sequential": min(times["false"]),
                        "ratio": min(times["true"]) / min(times["false"])})
    return rows, counts, overlap


# ----------------------------------------------------------------------------------------------------------- GPU mode


def gpu_mode(device: str, models: list[str], compile_too: bool) -> list[dict]:
    """Sampling throughput and training-step time of each architecture at the GRPO preset's per-GPU batch."""
    from peft import LoraConfig

    from pipelines import StableDiffusion3LogProbPipeline, transition_log_probs
    from pipelines.tiny import TRANSFORMER_CONFIG, VAE_CONFIG

    dtype = torch.bfloat16
    rows = []
    for name in models:
        if name == "tiny":  # the same code path, sized for a CPU test
            transformer_config, vae_config, resolution, batch, steps = TRANSFORMER_CONFIG, VAE_CONFIG, 32, 4, 3
        else:
            transformer_config, vae_config, resolution, batch, steps = ARCHITECTURES[name], SD3_VAE, 512, 12, 10
        reset_peak(device)
        torch.manual_seed(0)
        with torch.device(device):
            transformer = SD3Transformer2DModel(**transformer_config).to(dtype)
            vae = AutoencoderKL(**vae_config).to(dtype)
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        pipe = StableDiffusion3LogProbPipeline(transformer=transformer, vae=vae,
                                               scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                                               text_encoder=None, tokenizer=None, text_encoder_2=None,
                                               tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        width = transformer.config.joint_attention_dim
        tokens = CLIP_TOKENS + (T5_TOKENS if name != "tiny" else 16)
        embeds = torch.randn(batch, tokens, width, device=device, dtype=dtype)
        pooled = torch.randn(batch, transformer.config.pooled_projection_dim, device=device, dtype=dtype)
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        parameters = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5)
        params = sum(p.numel() for p in transformer.parameters())

        def sample():
            return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                        negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=steps, guidance_scale=4.5,
                        height=resolution, width=resolution, noise_level=0.7, output_type="pt",
                        generator=torch.Generator(device).manual_seed(0))

        def train_step(out):
            with torch.autocast(torch.device(device).type, dtype=dtype):
                log_prob, _, _ = transition_log_probs(
                    transformer, pipe.scheduler, out.latents[:, 0], out.latents[:, 1], out.timesteps[0].expand(batch),
                    embeds, pooled, 4.5, 0.7, negative, negative_pooled)
            log_prob.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def measure(label: str, repeats: int = 2) -> dict:
            reset_peak(device)
            out = sample()  # warm-up (and compilation)
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                out = sample()
            sync(device)
            sampling = (time.perf_counter() - start) / repeats
            sampling_memory = peak_memory_gb(device)
            result = {"model": name, "setting": label, "parameters": params, "batch": batch, "resolution": resolution,
                      "steps": steps, "images_per_second": batch / sampling, "sampling_peak_gb": sampling_memory}
            for checkpointing in (False, True):
                transformer.gradient_checkpointing = False
                if checkpointing:
                    transformer.enable_gradient_checkpointing()
                else:
                    transformer.disable_gradient_checkpointing()
                reset_peak(device)
                train_step(out)  # warm-up
                sync(device)
                start = time.perf_counter()
                for _ in range(repeats):
                    train_step(out)
                sync(device)
                key = "checkpointed" if checkpointing else "plain"
                result[f"train_step_seconds_{key}"] = (time.perf_counter() - start) / repeats
                result[f"train_peak_gb_{key}"] = peak_memory_gb(device)
            transformer.disable_gradient_checkpointing()
            return result

        rows.append(measure("eager"))
        if compile_too:
            transformer.compile()  # after the LoRA injection: the compiled graph includes the adapters
            rows.append(measure("torch.compile"))
        pipe = transformer = vae = optimizer = None  # free this architecture before the next
        reset_peak(device)
    return rows


# ----------------------------------------------------------------------------------------------------------- report


def print_p1(rows: list[dict]) -> None:
    print("\nP1: log-prob pipeline / stock StableDiffusion3Pipeline (same components, batch, steps, seed)")
    print("| model | sampler | batch x steps | fastest / fastest | median of the pairs' ratios |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['sampler']} | {r['batch']} x {r['steps']} | {r['ratio']:.3f} | "
              f"{r['median_pair_ratio']:.3f} |")


PART_ORDER = ["transformer: sampling", "transformer: training forward", "backward", "VAE", "text encoders", "reward",
              "old-log-prob re-scoring", "held-out evaluation", "sampling: the rest (scheduler, SDE step, log-prob)",
              "start-up (load, LoRA, optimiser)", "checkpoints, final/ and curves", "everything else"]


def print_p2(rows: list[dict], overlap: list[dict]) -> None:
    print("\nP2: share of each run's time by part (exclusive time; held-out evaluation and re-scoring whole)")
    print("| part | " + " | ".join(r["method"] for r in rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    for part in PART_ORDER:
        cells = [f"{100 * r['parts'].get(part, 0.0) / r['seconds']:.1f}%" for r in rows]
        print(f"| {part} | " + " | ".join(cells) + " |")
    print("| (seconds in all) | " + " | ".join(f"{r['seconds']:.1f}" for r in rows) + " |")
    print("| (peak memory, GB) | " + " | ".join(f"{r['peak_memory_gb']:.2f}" for r in rows) + " |")
    for r in overlap:
        print(f"\nGRPO epoch with rewards scored beside sampling / in line: {r['ratio']:.3f} "
              f"({r['overlapped']:.1f} s / {r['sequential']:.1f} s; best of 2 each)")


def print_p3(counts: dict) -> None:
    print("\nP3: text-encoder rows (forward hooks) per distinct prompt")
    print("| method | training, per epoch | held-out, per run | negative prompt, per run | images per training prompt "
          "(rows each when encoded per image, x2 with CFG) |")
    print("| --- | --- | --- | --- | --- |")
    for name, c in counts.items():
        epochs = len(c["epoch_prompts"])
        distinct = sum(c["epoch_prompts"])
        training = c["rows"].get("training", 0)
        per_image = sum(c["epoch_images"]) / distinct if distinct else float("nan")
        if distinct:
            train_cell = f"{training / distinct:.2f} ({training} rows / {distinct} prompts, {epochs} epochs)"
            would_be = f"{per_image:.1f}"
        else:
            train_cell, would_be = "- (no sampling epochs)", "-"
        held = c["rows"].get("held-out", 0)
        held_cell = f"{held / c['eval_prompts']:.2f} ({held} rows / {c['eval_prompts']} prompts, {c['evaluations']} " \
                    f"evaluations)"
        print(f"| {name} | {train_cell} | {held_cell} | {c['rows'].get('negative', 0)} | {would_be} |")


def print_gpu(rows: list[dict]) -> None:
    print("\nGPU mode: the GRPO preset's per-GPU batch (bf16, LoRA rank 32)")
    print("| model | setting | params | batch @ px x steps | images/s sampling | train step s (plain / checkpointed) "
          "| peak GB sampling / train plain / checkpointed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['setting']} | {r['parameters'] / 1e6:,.0f}M | {r['batch']} @ {r['resolution']} x "
              f"{r['steps']} | {r['images_per_second']:.2f} | {r['train_step_seconds_plain']:.3f} / "
              f"{r['train_step_seconds_checkpointed']:.3f} | {r['sampling_peak_gb']:.1f} / "
              f"{r['train_peak_gb_plain']:.1f} / {r['train_peak_gb_checkpointed']:.1f} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=["p1", "p2", "p3", "gpu"], help="parts to run (P3 comes with P2)")
    parser.add_argument("--methods", nargs="+", default=list(P2_RUNS), choices=list(P2_RUNS), help="P2's methods")
    parser.add_argument("--repeats", type=int, default=9, help="P1's alternating pairs per row")
    parser.add_argument("--gpu-mode", action="store_true", help="run the GPU mode on --device (CUDA turns it on)")
    parser.add_argument("--models", nargs="+", default=None, help="the GPU mode's architectures: sd35_medium, "
                                                                    "sd35_large, tiny")
    parser.add_argument("--no-compile", action="store_true", help="GPU mode: skip the torch.compile rows")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    set_cpu_threads("auto")
    device = args.device
    gpu = args.gpu_mode or torch.device(device).type == "cuda"
    parts = set(args.only or (["gpu"] if gpu else ["p1", "p2", "p3"]))
    results: dict = {"device": device, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None}
    print(f"experiments.bench on {results['gpu'] or 'the CPU'} ({torch.get_num_threads()} torch threads)")
    if "gpu" in parts:
        models = args.models or (["sd35_medium", "sd35_large"] if torch.device(device).type == "cuda" else ["tiny"])
        results["gpu_mode"] = gpu_mode(device, models, not args.no_compile)
        print_gpu(results["gpu_mode"])
    if "p1" in parts:
        results["p1"] = p1(device, args.repeats)
        print_p1(results["p1"])
    if parts & {"p2", "p3"}:
        with tempfile.TemporaryDirectory() as work:
            rows, counts, overlap = p2(device, Path(work), args.methods)
        results.update(p2=rows, p3=counts, overlap=overlap)
        print_p2(rows, overlap)
        print_p3(counts)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
