"""The one entry point: `python -m rl.run algo=<algo> model=<model> reward=<reward> prompts=<set> logger=<logger>`.

Hydra composes `conf/config.yaml`; this file turns the config into typed objects (the only place that sees a
`DictConfig`), saves the resolved config into the run directory, and calls the chosen algorithm.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rl.threads import limit_openmp_spinning, set_cpu_threads

limit_openmp_spinning()  # before torch loads OpenMP (rl/threads.py)

import hydra  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import broadcast_object_list  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from pipelines.errors import build, exit_on_user_error  # noqa: E402
from pipelines.loading import resolve_source  # noqa: E402
from rl.checkpoints import check_resume  # noqa: E402
from rl.context import RunContext  # noqa: E402


def build_context(cfg: DictConfig, run_dir: Path) -> RunContext:
    """Everything an algorithm needs, built from the config; cheap checks first, so that bad input fails fast."""
    train_prompts = build(cfg.prompts.train)
    eval_prompts = build(cfg.prompts.eval)
    if cfg.model.get("path"):
        resolve_source(str(cfg.model.path), revision=cfg.model.get("revision"))  # fails before any weights load
    reward = build(cfg.reward) if cfg.get("reward") else None
    if reward is not None:
        reward.check_prompts([p.text for p in train_prompts + eval_prompts])
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
    run_dir = shared_run_dir(Path(HydraConfig.get().runtime.output_dir))
    with exit_on_user_error():
        algorithm = build(cfg.algo)  # the algorithm's options are checked here, before any model or reward loads
        check_resume(run_dir, OmegaConf.to_container(cfg, resolve=True))  # before the run's config.yaml is replaced
        set_cpu_threads(cfg.get("cpu_threads", "auto"))
        ctx = build_context(cfg, run_dir)
        if PartialState().is_main_process:  # written once the config has built (a bad one leaves the old in place)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        with logging_redirect_tqdm():  # log lines print above the progress bar instead of inside it
            algorithm(ctx)


def check_composes(argv: list[str]) -> None:
    """Compose the command line's config before Hydra runs it, so that one that does not compose (an unknown algo or
    reward, a key that does not exist) stops with one line and exit code 2 instead of Hydra's multi-line message and
    exit code 1. Left to Hydra: its own flags (`--help`, `-m` sweeps, ...) and `hydra.*` overrides."""
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            compose("config", overrides=[arg for arg in argv if not arg.startswith("hydra.")])
    except (HydraException, OmegaConfBaseException) as error:
        message = str(error).split("Config search path")[0]  # Hydra's search path says nothing to the user
        lines = [line.strip() for line in message.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
        print(f"error: {' '.join(lines)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_composes(sys.argv[1:])
    main()
