"""The one entry point: `python -m rl.run algo=<algo> model=<model> reward=<reward> prompts=<set> logger=<logger>`.

Hydra composes `conf/config.yaml`; this file turns the config into typed objects (the only place that sees a
`DictConfig`), saves the resolved config into the run directory, and calls the chosen algorithm.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rl.console import stop_on_signal

if __name__ == "__main__":
    stop_on_signal()  # from here on, SIGINT / SIGTERM stop with one line (rl/console.py), also during the imports

from rl.threads import limit_openmp_spinning, set_cpu_threads  # noqa: E402

limit_openmp_spinning()  # before torch loads OpenMP (rl/threads.py)

import hydra  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import broadcast_object_list  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from hydra.utils import get_class  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from pipelines.configs import build  # noqa: E402
from pipelines.errors import ConfigError, exit_on_user_error  # noqa: E402
from pipelines.geometry import ModelGeometry, model_geometry  # noqa: E402
from pipelines.loading import check_model_source  # noqa: E402
from pipelines.option_types import check_option_types  # noqa: E402
from rl.checkpoints import check_resume  # noqa: E402
from rl.context import RunContext  # noqa: E402
from rl.evaluation import check_prompt_images  # noqa: E402
from rl.legacy import renamed_key_hint, renamed_options  # noqa: E402
from rl.run_lock import LOCK_FILE, hold_run_dir, release_run_dir  # noqa: E402

logger = logging.getLogger(__name__)

# What `python -m rl.run` runs when the command line names neither an algo nor an experiment: GRPO in the digits world
# (conf/experiment/grpo_digits.yaml), a few minutes on a CPU. Naming an algo (`algo=ddpo reward=aesthetic`) or another
# experiment replaces it.
DEFAULT_JOB = "experiment=grpo_digits"


def with_default_job(argv: list[str]) -> list[str]:
    """The command line `argv` with `DEFAULT_JOB` added when it names neither `algo=` nor `experiment=`."""
    named = {arg.lstrip("+~").split("=")[0] for arg in argv if "=" in arg and not arg.startswith("-")}
    return argv if named & {"algo", "experiment"} else [*argv, DEFAULT_JOB]


def check_config(cfg: DictConfig, run_dir: Path) -> object:
    """Everything about the input that can be checked without loading weights, cheapest first; raises `UserError`.

    The algorithm's options (each config class checks its own values when Hydra builds it), a real checkpoint's
    training precision, the prompt files, the model's location, every image size against the model's own (from its
    config files: a multiple of its patch in pixels, within its positional embedding), a resume's options against the
    run directory's, and write access to the run directory. Sets `data.resolution=null` to the model's native size.
    Returns the algorithm."""
    check_run_options(cfg)
    for section in ("model", "reward", "data", "logger"):  # built later; their options are checked now
        if cfg.get(section) is not None:
            check_option_types(cfg[section], section)
    algorithm = build(cfg.algo)
    if hasattr(algorithm, "check_reward") and cfg.get("reward") is not None:  # ReFL, DRaFT: by the reward's class
        reward_class = get_class(cfg.reward._target_)
        algorithm.check_reward(reward_class.__name__, getattr(reward_class, "differentiable", None))
    check_precision(cfg, algorithm)
    check_image_prompts(algorithm, build(cfg.prompts.train), build(cfg.prompts.eval))
    if any(cfg.model.get(option) for option in ("path", "config", "transformer_file")):
        check_model_source(OmegaConf.to_container(cfg.model, resolve=True))
    geometry = set_native_resolution(cfg)
    if geometry is not None:
        for option, value in resolution_options(algorithm, "algo"):
            geometry.check(option, value)
        if cfg.get("data") and cfg.data.get("resolution") is not None:
            geometry.check("data.resolution", cfg.data.resolution)
    check_resume(run_dir, OmegaConf.to_container(cfg, resolve=True))
    check_writable(run_dir)
    return algorithm


def check_run_options(cfg: DictConfig) -> None:
    """The top-level options: `seed` a whole number, `mixed_precision` one of accelerate's, `cpu_threads` auto or a
    positive number."""
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed must be a whole number, got {cfg.get('seed')!r}")
    if cfg.get("mixed_precision") not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {cfg.get('mixed_precision')!r}")
    threads = cfg.get("cpu_threads", "auto")
    if threads != "auto" and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"cpu_threads must be auto or a positive whole number, got {threads!r}")


def check_image_prompts(algorithm: object, train: list, held_out: list) -> None:
    """Image-to-image prompts (a source `image` each) and `strength` go together: the training prompts with the
    algorithm's `sampling.strength`, the held-out ones with `eval.strength`. Algorithms that train without sampling
    rollouts (ReFL, DRaFT, offline DPO, SFT) take text training prompts only."""
    sampling, evaluation = getattr(algorithm, "sampling", None), getattr(algorithm, "eval", None)
    if any(p.image is not None for p in train) and not hasattr(sampling, "strength"):
        raise ConfigError("this algorithm trains from text prompts only; prompts with an 'image' (image-to-image) "
                          "train with grpo, ddpo, dpo_online, nft and awm")
    if hasattr(sampling, "strength"):
        check_prompt_images(train, sampling.strength, "algo.sampling.strength", "training")
    if hasattr(evaluation, "strength"):
        check_prompt_images(held_out, evaluation.strength, "algo.eval.strength", "held-out")


def check_precision(cfg: DictConfig, algorithm: object) -> None:
    """A real checkpoint trained with `mixed_precision=no` runs in float32 throughout: the training session casts the
    frozen weights (T5-XXL, the CLIPs, the VAE, the base transformer) to float32, twice the memory of bf16 and fp32
    matmuls. Refused unless the command says so with `model.dtype=float32`."""
    from rl.session import TrainingConfig

    if not (cfg.model.get("path") and isinstance(algorithm, TrainingConfig)):
        return
    if cfg.mixed_precision == "no" and cfg.model.get("dtype", "float32") != "float32":
        raise ConfigError(f"model.path={cfg.model.path} in model.dtype={cfg.model.dtype} would train in float32 "
                          f"(mixed_precision=no casts it up): add mixed_precision=bf16, or model.dtype=float32 to "
                          f"train in float32 on purpose")


def set_native_resolution(cfg: DictConfig) -> ModelGeometry | None:
    """`data.resolution=null` becomes the model's native size (so the run's saved config says which); returns the
    model's geometry, from its config files (None when unknown)."""
    geometry = model_geometry(OmegaConf.to_container(cfg.model, resolve=True))
    if geometry is not None and cfg.get("data") and "resolution" in cfg.data and cfg.data.resolution is None:
        cfg.data.resolution = geometry.native
    return geometry


def resolution_options(config: object, prefix: str) -> Iterator[tuple[str, int | None]]:
    """Every `resolution` field of a config and its nested configs, by its option name (`algo.sampling.resolution`)."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name == "resolution":
            yield f"{prefix}.resolution", value
        elif dataclasses.is_dataclass(value):
            yield from resolution_options(value, f"{prefix}.{item.name}")


def check_writable(run_dir: Path) -> None:
    """The run directory (or the nearest folder above it that exists, where it will be created) takes a file."""
    existing = run_dir.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write the run directory {run_dir}: {existing}: {error.strerror or error}; set "
                          f"hydra.run.dir=<a writable folder>") from None


def build_context(cfg: DictConfig, run_dir: Path) -> RunContext:
    """Everything an algorithm needs, built from the config (after `check_config`, which also sets a null
    `data.resolution` to the model's native size)."""
    reward = build(cfg.reward) if cfg.get("reward") else None
    train_prompts, eval_prompts = build(cfg.prompts.train), build(cfg.prompts.eval)
    if reward is not None:
        reward.check_prompts([p.text for p in train_prompts + eval_prompts])
        reward.check_metadata([p.text for p in train_prompts + eval_prompts],
                              [p.metadata for p in train_prompts + eval_prompts])
    return RunContext(
        run_dir=run_dir,
        seed=cfg.seed,
        load_pipeline=build(cfg.model, _partial_=True),
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        logger=build(cfg.logger),
        config=OmegaConf.to_container(cfg, resolve=True),
        mixed_precision=cfg.mixed_precision,
        reward=reward,
        data=build(cfg.data) if cfg.get("data") else None,
    )


def start_processes() -> PartialState:
    """accelerate's process state, created first and for the CPU where there is no CUDA: then `torchrun` and
    `accelerate launch` give N gloo ranks on a CPU machine (accelerate would otherwise decide, without CUDA, that the
    run is not distributed, and each process would run alone). Every rank says once who it is; a single process on a
    machine with several GPUs says how to use them all."""
    state = PartialState(cpu=not torch.cuda.is_available())
    logger.info("rank %d of %d (%s, %s, %s)", state.process_index, state.num_processes, state.distributed_type.value,
                state.backend or "no backend", state.device)
    if state.distributed_type.value == "MULTI_CPU" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        logger.warning("accelerate shards with FSDP on GPUs only: on this CPU machine the run is plain DDP (gloo)")
    gpus = torch.cuda.device_count()
    if state.num_processes == 1 and gpus > 1:
        logger.warning("this machine has %d GPUs and this run uses one; to train on all of them: accelerate launch "
                       "--config_file scripts/accelerate/multi_gpu.yaml --num_processes %d -m rl.run ... "
                       "(docs/models.md, \"Distributed training\")", gpus, gpus)
    return state


def shared_run_dir(local_run_dir: Path) -> Path:
    """The main process's run directory, on every process.

    Under `accelerate launch` each process composes its own config, and `${now:...}` in the run directory's name can
    differ between processes started a second apart; all of them must write into the main process's directory.
    """
    state = PartialState()
    if state.num_processes == 1:
        return local_run_dir
    shared = [str(local_run_dir)]
    broadcast_object_list(shared, from_process=0)
    run_dir = Path(shared[0])
    if run_dir != local_run_dir and not state.is_main_process:
        shutil.rmtree(local_run_dir, ignore_errors=True)  # only Hydra's own files are in it yet
    return run_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    start_processes()
    run_dir = shared_run_dir(Path(HydraConfig.get().runtime.output_dir))
    if PartialState().is_main_process:
        with exit_on_user_error():
            hold_run_dir(run_dir)  # one run per directory (rl/run_lock.py); a second stops here, removing nothing
    fresh = not (run_dir / "config.yaml").exists()
    try:
        with exit_on_user_error():
            algorithm = check_config(cfg, run_dir)  # again: a multirun's jobs were not checked before
            set_cpu_threads(cfg.get("cpu_threads", "auto"))
            ctx = build_context(cfg, run_dir)
            if PartialState().is_main_process:  # written once the config has built (a bad one leaves the old in place)
                OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            with logging_redirect_tqdm():  # log lines print above the progress bar instead of inside it
                algorithm(ctx)
    except SystemExit as stop:
        if stop.code == 2 and fresh and PartialState().is_main_process:
            remove_if_only_hydra(run_dir)  # a run stopped on bad input leaves no directory behind
        raise
    finally:
        release_run_dir(run_dir)  # a multirun's next job, in this process, is another directory


def remove_if_only_hydra(run_dir: Path) -> None:
    """Delete a new run directory that holds nothing but what was written at start: Hydra's `.hydra/`, its `run.log`
    (what the console showed) and the run's `config.yaml`."""
    started = {Path(".hydra"), Path("config.yaml"), Path(LOCK_FILE),
               *(Path(".hydra") / p.name for p in (run_dir / ".hydra").glob("*"))}
    for path in run_dir.rglob("*"):
        if path.relative_to(run_dir) not in started and path.suffix != ".log":
            return
    release_run_dir(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


def check_before_start(argv: list[str]) -> Path | None:
    """Compose the command line's config and `check_config` it before Hydra runs it, so that bad input stops with one
    line and exit code 2 before Hydra creates (or touches) the run directory: a config that does not compose (an
    unknown algo or reward, a key that does not exist; Hydra itself would print several lines and exit 1) and every
    bad value `check_config` finds. Left to Hydra: its own flags (`--help`, `-m` sweeps, ...). Returns the run
    directory (None when left to Hydra)."""
    renamed = renamed_options(argv)
    if renamed:
        print(f"error: {renamed}", file=sys.stderr)
        sys.exit(2)
    if any(arg.startswith("-") for arg in argv):
        return None
    try:
        with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=argv, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the run directory's name
            run_dir = Path(cfg.hydra.run.dir)
            with open_dict(cfg):
                del cfg["hydra"]
            OmegaConf.to_container(cfg, resolve=True)  # interpolation errors are composition errors too
    except (HydraException, OmegaConfBaseException) as error:
        message = str(error).split("Config search path")[0]  # Hydra's search path says nothing to the user
        lines = [line.strip() for line in message.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
        hint = renamed_key_hint(argv, message)  # an option an algorithm renamed: say the new name
        print(f"error: {' '.join(lines)}" + (f" ({hint})" if hint else ""), file=sys.stderr)
        sys.exit(2)
    with exit_on_user_error():
        check_config(cfg, run_dir)
    return run_dir


if __name__ == "__main__":
    sys.argv[1:] = with_default_job(sys.argv[1:])
    checked_dir = check_before_start(sys.argv[1:])
    if checked_dir is not None and checked_dir.is_dir() and os.environ.get("RANK", "0") == "0":
        with exit_on_user_error():  # an existing run directory: refuse a second run before Hydra writes into it
            hold_run_dir(checked_dir, announce=False)  # its warnings, if any, once Hydra has set up logging
    main()
