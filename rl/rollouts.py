"""Rollouts for the online methods (GRPO, DDPO, online DPO): which prompts an epoch samples, SDE sampling with
log-probabilities (`docs/algorithms.md` section 1), and scoring.

An epoch samples `prompts_per_epoch` prompts, each `images_per_prompt` times (a group), spread over the processes;
every image has a global index from which its seeds are derived (`rl/seeds.py`), so what an image is does not depend
on the batch size or the number of processes. Which images a process samples is decided by how the update will train
them (`rl/batching.py`): each process samples the images of the micro-batches it trains, so that N processes train,
in each optimiser step, exactly what one process trains with the same global batch.
"""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipelines import StableDiffusion3LogProbPipeline
from pipelines.configs import check_values
from pipelines.errors import ConfigError
from pipelines.pipeline_sd3_logprob import SOLVERS
from pipelines.solvers import flash_sigmas
from pipelines.text import PromptEncoder
from rewards import Reward
from rl import seeds
from rl.prompts import Prompt, source_image
from rl.tracking import info_means

if TYPE_CHECKING:  # the session imports this module (through rl.batching)
    from rl.session import Session


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
    sde_window_schedule: str = "random"  # random (Flow-GRPO-Fast) or sliding (MixGRPO: moves along the trajectory)
    sde_window_every: int = 25  # sliding: epochs before the window moves (MixGRPO: 25; Flash: 20)
    sde_window_stride: int = 1  # sliding: steps it moves by (0: a fixed window at the start, MixGRPO-Flash*)
    solver: str = "euler"  # the ODE steps' solver: euler, or dpm2 (DPM-Solver++ 2M: DiffusionNFT)
    flash_ratio: float | None = None  # MixGRPO-Flash: after the window, this fraction of the steps, DPM-Solver++ 2M
    strength: float | None = None  # image-to-image (prompts with an `image`): the source is noised to this strength
    overlap_scoring: bool | str = "auto"  # score a batch while the next samples: true, false, or auto (on CUDA only)
    rollouts_on_cpu: bool = False  # keep the trajectories in (pinned) CPU memory; training copies each micro-batch

    def __post_init__(self):
        check_values("algo.sampling", self, positive=("prompts_per_epoch", "images_per_prompt", "batch_size",
                                                     "num_inference_steps", "sde_window", "sde_window_every"),
                     at_least_zero=("noise_level", "sde_window_stride", "guidance_scale"),
                     fraction=("sde_window_range", "flash_ratio"),
                     resolution=("resolution",))
        if self.sde_window_schedule not in ("random", "sliding"):
            raise ConfigError(f"algo.sampling.sde_window_schedule must be random or sliding, got "
                              f"{self.sde_window_schedule!r}")
        if self.sde_window is not None and self.sde_window > self.num_inference_steps:
            raise ConfigError(f"algo.sampling.sde_window={self.sde_window} is longer than the "
                              f"{self.num_inference_steps} steps sampled (algo.sampling.num_inference_steps)")
        if self.flash_ratio is not None and self.sde_window is None:
            raise ConfigError("algo.sampling.flash_ratio (MixGRPO-Flash) re-grids the steps after the SDE window: set "
                              "algo.sampling.sde_window too")
        if self.solver not in SOLVERS:
            raise ConfigError(f"algo.sampling.solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        if self.strength is not None:
            check_strength("algo.sampling.strength", self.strength)
            if self.sde_window is not None:
                raise ConfigError("algo.sampling.strength (image-to-image) trains every step it takes: set "
                                  "algo.sampling.sde_window (and flash_ratio) to null")
            if self.sde_type == "cps" and self.steps_taken < 2:
                raise ConfigError(f"algo.sampling.strength={self.strength} takes {self.steps_taken} step of "
                                  f"{self.num_inference_steps}, and CPS's last step is deterministic: nothing to train")
        if self.sde_type not in ("sde", "cps"):
            raise ConfigError(f"algo.sampling.sde_type must be sde or cps, got {self.sde_type!r}")
        if str(self.overlap_scoring).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"algo.sampling.overlap_scoring must be auto, true or false, "
                              f"got {self.overlap_scoring!r}")

    @property
    def steps_taken(self) -> int:
        """The steps a trajectory takes: all N, or image-to-image's last `N - int(N - N strength)` (at least one)."""
        return steps_taken(self.num_inference_steps, self.strength)

    def overlaps_scoring(self, device: torch.device) -> bool:
        """Whether rewards are computed in a worker thread while the next batch samples. On a CPU the two would share
        the same cores, so `auto` overlaps on CUDA only (`experiments.bench` measures both)."""
        choice = str(self.overlap_scoring).lower()
        return device.type == "cuda" if choice == "auto" else choice == "true"

    def samples_per_process(self, num_processes: int) -> int:
        """The images each process samples per epoch; checked against the batch size before anything loads."""
        total = self.prompts_per_epoch * self.images_per_prompt
        if total % num_processes:
            raise ConfigError(f"{total} images per epoch do not split over {num_processes} processes")
        local = total // num_processes
        if local % self.batch_size:
            raise ConfigError(f"{local} images per process are not a multiple of sampling.batch_size={self.batch_size}")
        return local


@dataclass(frozen=True)
class SampleJob:
    """One image to sample in an epoch: its prompt, its group (one per chosen prompt), its global index, its seeds."""

    prompt_id: int  # index in the training prompt set
    group: int
    index: int  # global index of the image in the epoch
    noise_seed: int  # initial noise
    sde_seed: int  # the SDE's per-step noise


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

    def __len__(self) -> int:
        return self.latents.shape[0]


def epoch_jobs(num_prompts: int, epoch: int, seed: int, sampling: SamplingConfig, indices: list[int]
               ) -> list[SampleJob]:
    """The images with global index in `indices` (this process's share of the epoch, see `rl.batching`), in index
    order; every chosen prompt is repeated `images_per_prompt` times over all processes (image i is of group
    i // images_per_prompt).

    The prompts are drawn from an epoch-seeded permutation (cycling if the set is small); every image's initial-noise
    seed is its global index's (or its group's, with `same_initial_noise`).
    """
    generator = seeds.prompt_order(seed, epoch)
    rounds = math.ceil(sampling.prompts_per_epoch / num_prompts)
    order = torch.cat([torch.randperm(num_prompts, generator=generator) for _ in range(rounds)])
    chosen = order[: sampling.prompts_per_epoch].tolist()
    places = [(prompt_id, group, group * sampling.images_per_prompt + k)
              for group, prompt_id in enumerate(chosen) for k in range(sampling.images_per_prompt)]
    return [
        SampleJob(prompt_id, group, index,
                  noise_seed=seeds.initial_noise(seed, epoch, group if sampling.same_initial_noise else index),
                  sde_seed=seeds.sde_noise(seed, epoch, index))
        for prompt_id, group, index in (places[i] for i in sorted(indices))
    ]


def sde_window(sampling: SamplingConfig, seed: int, epoch: int) -> list[int] | None:
    """The epoch's window of consecutive stochastic (and trained) steps, the rest ODE; None without a window.

    `random` (Flow-GRPO-Fast): at a random place in the trajectory's first `sde_window_range` (under CPS never on the
    last step, whose transition is deterministic). `sliding` (MixGRPO, `docs/algorithms.md` section 9): see
    `sliding_window_start`."""
    if sampling.sde_window is None:
        return None
    steps = sampling.num_inference_steps
    if sampling.sde_window_schedule == "sliding":
        last_start = max(0, steps - 2 - sampling.sde_window)
        start = sliding_window_start(epoch, sampling.sde_window_every, sampling.sde_window_stride, last_start)
        return list(range(start, min(start + sampling.sde_window, steps)))
    end = int(steps * sampling.sde_window_range)
    if sampling.sde_type == "cps":
        end = min(end, steps - 1)
    last_start = max(0, end - sampling.sde_window)
    start = int(torch.randint(0, last_start + 1, (1,), generator=seeds.sde_window_start(seed, epoch)))
    return list(range(start, min(start + sampling.sde_window, steps)))


def sliding_window_start(epoch: int, every: int, stride: int, last_start: int) -> int:
    """MixGRPO's window: its first step starts at 0, moves by `stride` steps every `every` epochs, and rolls back to 0
    past `last_start`. MixGRPO keeps the window within the trajectory but its last two steps (`last_start` is
    `steps - 2 - window`); where MixGRPO lets the window shrink near that end, this one stops while it still fits,
    so that every epoch trains the same number of steps."""
    return (epoch // every) * stride % (last_start + 1)


def stochastic_step_count(sampling: SamplingConfig) -> int:
    """How many steps of a trajectory are stochastic (and can be trained): the window's, or every step taken but,
    under CPS, the deterministic last one."""
    if sampling.sde_window is not None:
        return min(sampling.sde_window, sampling.num_inference_steps)
    return sampling.steps_taken - (1 if sampling.sde_type == "cps" else 0)


def steps_taken(num_inference_steps: int, strength: float | None) -> int:
    """As `StableDiffusion3Img2ImgPipeline`: of N steps, image-to-image skips the first `int(N - N strength)`."""
    if strength is None:
        return num_inference_steps
    return num_inference_steps - int(max(num_inference_steps - min(num_inference_steps * strength,
                                                                   num_inference_steps), 0))


def check_strength(option: str, strength: float) -> None:
    if not 0 < strength <= 1:
        raise ConfigError(f"{option} must be in (0, 1] (the fraction of the schedule image-to-image takes), "
                          f"got {strength!r}")


class Scorer:
    """Scores each sampling batch as soon as it is sampled: in a worker thread while the next batch samples
    (`overlap`; on CUDA on a stream of its own), or in line. The calls, and so the scores, are the same either way."""

    def __init__(self, reward: Reward, overlap: bool):
        self.reward, self.overlap = reward, overlap
        self.pending: list = []
        self.worker = ThreadPoolExecutor(max_workers=1) if overlap else None
        self.stream = torch.cuda.Stream() if overlap and torch.cuda.is_available() else None

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> None:
        if self.worker is None:
            self.pending.append(score(self.reward, images, prompts, metadata))
            return
        ready = None
        if self.stream is not None and images.is_cuda:
            ready = torch.cuda.Event()
            ready.record()  # the images are complete on the sampling stream at this point

        def run():
            if ready is None:
                return score(self.reward, images, prompts, metadata)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                result = score(self.reward, images, prompts, metadata)
            torch.cuda.current_stream().wait_stream(self.stream)
            return result

        self.raise_failed()  # a batch that already failed (a served reward gone) stops the epoch now
        self.pending.append(self.worker.submit(run))

    def raise_failed(self) -> None:
        """Re-raise the error of a finished batch, after cancelling the queued ones (none is waited for)."""
        for part in self.pending:
            if not isinstance(part, tuple) and part.done() and part.exception() is not None:
                self.worker.shutdown(wait=False, cancel_futures=True)
                raise part.exception()

    def results(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every batch's scores and per-image info, in submission order."""
        try:
            parts = [p if isinstance(p, tuple) else p.result() for p in self.pending]
        except BaseException:
            if self.worker is not None:
                self.worker.shutdown(wait=False, cancel_futures=True)
            raise
        if self.worker is not None:
            self.worker.shutdown()
            if self.stream is not None:
                torch.cuda.current_stream().wait_stream(self.stream)
        scores = torch.cat([p[0] for p in parts])
        info = {name: torch.cat([p[1][name] for p in parts]) for name in parts[0][1]}
        return scores, info


@torch.no_grad()
def sample_rollouts(
    pipe: StableDiffusion3LogProbPipeline,
    text: PromptEncoder,
    prompts: list[Prompt],
    jobs: list[SampleJob],
    sampling: SamplingConfig,
    sde_steps: list[int] | None,
    scorer: Scorer | None = None,
    final_only: bool = False,
) -> tuple[Rollouts, torch.Tensor]:
    """SDE-sample the jobs in batches, each prompt's embeddings computed once (`text`); returns the rollouts and the
    decoded images (NCHW in [0, 1]). Each batch's images go to `scorer` as soon as they are decoded. `final_only`
    keeps only the final latents of each trajectory (`latents` is then (N, 1, C, H, W))."""
    device = pipe.transformer.device
    channels = pipe.transformer.config.in_channels
    schedule = dict(num_inference_steps=sampling.num_inference_steps, solver=sampling.solver)
    if sampling.flash_ratio is not None and sde_steps:
        schedule = flash_schedule(pipe.scheduler, sampling, max(sde_steps))
    size = (sampling.resolution or pipe.default_sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    guided = sampling.guidance_scale > 1
    parts, images = [], []
    for start in range(0, len(jobs), sampling.batch_size):
        batch = jobs[start : start + sampling.batch_size]
        initial = torch.stack([
            torch.randn(channels, size, size, generator=seeds.generator(job.noise_seed)) for job in batch
        ]).to(device)
        texts = [prompts[job.prompt_id].text for job in batch]
        embeds, pooled = text(texts)
        negative, negative_pooled = text.negative(len(batch)) if guided else (None, None)
        start = dict(latents=initial)
        if sampling.strength is not None:  # image-to-image: the same noise, mixed with each prompt's source image
            start = dict(image=[source_image(prompts[job.prompt_id].image) for job in batch],
                         strength=sampling.strength, image_noise=initial)
        out = pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled,
            guidance_scale=sampling.guidance_scale,
            height=sampling.resolution,
            width=sampling.resolution,
            **start,
            noise_level=sampling.noise_level,
            sde_type=sampling.sde_type,
            sde_steps=sde_steps,
            generator=[seeds.generator(job.sde_seed, device) for job in batch],
            output_type="pt",
            **schedule,
        )
        if final_only:
            out.latents = out.latents[:, -1:]
        parts.append(out)
        images.append(out.images.float())
        if scorer is not None:
            scorer.submit(images[-1], texts, [prompts[job.prompt_id].metadata for job in batch])

    def cat(name: str) -> torch.Tensor | None:
        return torch.cat([getattr(p, name) for p in parts]) if getattr(parts[0], name) is not None else None

    negative, negative_pooled = text.negative(len(jobs)) if guided else (None, None)
    latents = cat("latents")
    if sampling.rollouts_on_cpu:  # (N, T+1, C, h, w) float32: 13 GB for a 1152-image SD3.5 epoch at 512 px
        latents = latents.cpu().pin_memory() if torch.cuda.is_available() else latents.cpu()
    rollouts = Rollouts(
        latents=latents,
        log_probs=cat("log_probs"),
        sde_steps=parts[0].sde_steps,
        timesteps=parts[0].timesteps,
        scheduler=copy.deepcopy(pipe.scheduler),  # evaluation later resets the pipeline's own schedule
        prompt_embeds=cat("prompt_embeds"),
        pooled_prompt_embeds=cat("pooled_prompt_embeds"),
        negative_prompt_embeds=negative,  # one row, expanded: the same for every image
        negative_pooled_prompt_embeds=negative_pooled,
        prompts=[prompts[job.prompt_id].text for job in jobs],
        prompt_ids=torch.tensor([job.prompt_id for job in jobs], device=device),
    )
    return rollouts, torch.cat(images)


def flash_schedule(scheduler, sampling: SamplingConfig, last_sde_step: int) -> dict:
    """The pipeline's schedule arguments for MixGRPO-Flash: the usual sigmas up to the window's last step, then
    `pipelines.solvers.flash_sigmas`' coarser grid solved with DPM-Solver++ 2M (the steps before the window keep
    `sampling.solver`)."""
    if scheduler.config.get("use_dynamic_shifting"):
        raise ConfigError("algo.sampling.flash_ratio re-grids SD3's static timestep shift; this model's scheduler "
                          "shifts dynamically")
    grid = copy.deepcopy(scheduler)
    grid.set_timesteps(sampling.num_inference_steps)
    sigmas = flash_sigmas(grid.sigmas.tolist(), last_sde_step, sampling.flash_ratio, grid.config.shift)
    return dict(sigmas=sigmas, solver="dpm2", solver_from=last_sde_step + 1 if sampling.solver == "euler" else 0)


def score(reward: Reward, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
    """Rewards without gradients; per-sample tensors of the reward's info are kept for logging."""
    with torch.no_grad():
        scores, info = reward(images, prompts, metadata)
    per_sample = {k: v.float() for k, v in info.items() if isinstance(v, torch.Tensor) and v.shape == scores.shape}
    return scores.float(), per_sample


@dataclass
class EpochSamples:
    """An epoch's rollouts on this process, scored, with every process's rewards gathered (in global index order)."""

    jobs: list[SampleJob]  # this process's, in global index order (the rollouts' rows)
    rollouts: Rollouts
    rewards: torch.Tensor  # (N,) this process's
    info: dict[str, torch.Tensor]  # per-image values the reward reported, this process's
    all_rewards: torch.Tensor  # every image's of the epoch, by global index
    all_groups: torch.Tensor  # the group of each of `all_rewards`
    all_prompt_ids: torch.Tensor  # the prompt of each of `all_rewards`

    @property
    def indices(self) -> list[int]:
        """The global indices of this process's images (the rollouts' rows)."""
        return [job.index for job in self.jobs]

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """This process's rows of per-image `values` given for every image of the epoch, by global index."""
        return values[torch.tensor(self.indices, device=values.device)]


def sample_epoch(session: Session, sampling: SamplingConfig, epoch: int, sde_steps: list[int] | None,
                 indices: list[int], final_only: bool = False) -> EpochSamples:
    """Sample the images with global index in `indices` (this process's share of the epoch), score them, and gather
    every process's rewards by global index (`rl.session.Session` gives the model, reward and accelerator).
    `final_only`: keep only the final latents (`sample_rollouts`)."""
    ctx, accelerator = session.ctx, session.accelerator
    jobs = epoch_jobs(len(ctx.train_prompts), epoch, ctx.seed, sampling, indices)
    session.text.forget()  # the last epoch's training prompts
    scorer = Scorer(session.reward, sampling.overlaps_scoring(session.accelerator.device))
    with session.saving_on_failure():  # a served reward that fails for good: checkpoint, then stop
        rollouts, _ = sample_rollouts(session.pipe, session.text, ctx.train_prompts, jobs, sampling, sde_steps, scorer,
                                      final_only)
        rewards, info = scorer.results()
    device = rewards.device
    gathered_indices = accelerator.gather(torch.tensor([job.index for job in jobs], device=device))
    by_index = torch.argsort(gathered_indices)  # process order -> global index order

    def gather(values: torch.Tensor) -> torch.Tensor:
        return accelerator.gather(values.contiguous())[by_index]

    return EpochSamples(
        jobs=jobs, rollouts=rollouts, rewards=rewards, info=info, all_rewards=gather(rewards),
        all_groups=gather(torch.tensor([job.group for job in jobs], device=device)),
        all_prompt_ids=gather(rollouts.prompt_ids),
    )


def epoch_metrics(samples: EpochSamples, stats: dict[str, float], session: Session, epoch: int) -> dict[str, float]:
    """The training metrics of an epoch: reward statistics over all processes, the update's diagnostics, counters."""
    rewards = samples.all_rewards
    metrics = {"train/reward_mean": rewards.mean().item(), "train/reward_std": rewards.std().item()}
    gathered = {name: session.accelerator.gather(values.contiguous()) for name, values in samples.info.items()}
    metrics.update(info_means(gathered, "train/"))  # NaN: an image the value does not apply to
    metrics.update({f"train/{name}": value for name, value in stats.items()})
    metrics["train/lr"] = session.lr_scheduler.get_last_lr()[0]
    metrics["train/epoch"] = epoch
    metrics["train/samples"] = epoch * session.layout.samples_per_process * session.accelerator.num_processes
    return metrics
