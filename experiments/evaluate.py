"""Evaluate a run's checkpoints on held-out prompts: ODE samples at fixed seeds, scored by one or more rewards.

    python -m experiments.evaluate RUN_DIR                               # the base model (step 0) and every checkpoint
    python -m experiments.evaluate RUN_DIR --checkpoint step_20          # one checkpoint (repeatable; also base, final)
    python -m experiments.evaluate RUN_DIR/checkpoints/step_000020       # the same
    python -m experiments.evaluate RUN_DIR reward=digits                 # another reward (a name in conf/reward/)
    python -m experiments.evaluate RUN_DIR reward=aesthetic reward.clip.model=tiny-ViT-768 reward.clip.pretrained=null \
        reward=jpeg_compressibility                                      # several rewards, each with its own overrides
    python -m experiments.evaluate RUN_DIR --prompts-file my_prompts.txt --images-per-prompt 4 --steps 40

By default everything comes from the run's `config.yaml`: the model, the held-out prompts (`prompts.eval`), the reward,
the seed and the held-out settings (`algo.eval`, or `algo.validation` for sft / dreambooth), so that step 0 and each
checkpoint score exactly as the run's own `eval/*` metrics did (with the EMA weights when the run kept them; `--no-ema`
for the raw weights). Options change the prompts (`--prompts-file`, `--max-prompts`), the sampling (`--steps`,
`--images-per-prompt`, `--guidance-scale`, `--resolution`, `--seed`) and the rewards: `reward=<name>` starts a reward
(Hydra's `conf/reward` group, as in `python -m rewards.score`) and `reward.<key>=<value>` / `+reward@...` overrides
after it apply to it; `reward.<key>=<value>` before any `reward=<name>` change the run's own reward.

Writes into `RUN_DIR/evaluation/` (or `--out`): `table.csv` and `table.json` (one row per checkpoint: its step, the
training samples used by then, and each reward's mean and std over the images, named as in metrics.jsonl -
`eval/reward_mean`, `eval/<info>_mean` - for the first reward and `eval/<name>/reward_mean` for each further one),
`curve.png` (reward against step) and `grid_step_<N>.png` (the images of each checkpoint; one row per prompt with
`--images-per-prompt` > 1). Rows already in the table with the same settings are kept and not recomputed
(`--recompute` to do them again). Only the newest `algo.checkpoint.keep` checkpoints survive training: set
`algo.checkpoint.keep=null` for a full curve.

Bad input (not a run directory, no checkpoints, an unknown checkpoint or reward, a missing prompt file) stops with one
line on stderr and exit code 2, before any model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.threads import limit_openmp_spinning, set_cpu_threads

limit_openmp_spinning()  # before torch loads OpenMP (rl/threads.py)

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from experiments.protocols import Protocol, load_protocol, pinned_options, report, split_protocol  # noqa: E402
from pipelines.configs import build  # noqa: E402
from pipelines.errors import UserError, exit_on_user_error  # noqa: E402
from pipelines.loading import check_model_source  # noqa: E402
from rl.checkpoints import complete_checkpoints, has_ema, read_ema  # noqa: E402
from rl.evaluation import EvalConfig, check_prompt_images, eval_metrics, evaluate, held_out_prompts  # noqa: E402
from rl.legacy import upgrade_config  # noqa: E402
from rl.lora import load_lora  # noqa: E402
from rl.prompts import Prompt, load_prompts  # noqa: E402
from rl.rollouts import score  # noqa: E402
from rl.session import prepare_models, trainable_parameters  # noqa: E402
from rl.tracking import image_grid, metric_curve, metric_name, read_metrics, step_unit  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# reward options a protocol lets the command line set: where the weights are, where the reward runs
WEIGHT_OPTIONS = ("detector", "detector_dtype", "clip.model", "clip.pretrained", "clip.processor", "clip.dtype",
                  "model_dir", "device", "head", "weights", "checkpoint", "med_config", "url")
CHECKPOINT_NAME = re.compile(r"(?:step_)?(\d+)")
MIXED_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Checkpoint:
    """What to evaluate: the base model (`path` None), a `checkpoints/step_<N>/` folder, or `final/`."""

    name: str  # base, step_000020 or final
    step: int
    path: Path | None


@dataclass
class NamedReward:
    """A reward's config and the name its columns carry (its choice in `conf/reward`, or the run's own)."""

    name: str
    config: DictConfig


# ------------------------------------------------------------------------------------------------- the run directory


def locate(path: Path) -> tuple[Path, str | None]:
    """The run directory and, when `path` is a checkpoint or `final/` folder inside one, that checkpoint's name."""
    path = path.expanduser()
    if (path / "config.yaml").is_file():
        return path, None
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path.name
    if path.name == "final" and (path.parent / "config.yaml").is_file():
        return path.parent, "final"
    what = "does not exist" if not path.exists() else "holds no config.yaml"
    raise UserError(f"{path} is not a run directory: it {what} (give a directory written by rl.run)")


def saved_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints (those with the `done` marker a finished save writes), by step."""
    return [Checkpoint(path.name, step, path) for step, path in complete_checkpoints(run_dir)]


def last_logged_step(run_dir: Path) -> int | None:
    steps = [r["step"] for r in read_metrics(run_dir) if isinstance(r.get("step"), int)]
    return max(steps) if steps else None


def select_checkpoints(run_dir: Path, names: list[str] | None) -> list[Checkpoint]:
    """The checkpoints to evaluate, base first: `names` (base, final, step_20, step_000020 or 20), or the base model
    and every saved checkpoint. Raises `UserError` for an unknown name or a run without checkpoints."""
    saved = saved_checkpoints(run_dir)
    if not names:
        if not saved:
            hint = " (--checkpoint final evaluates final/)" if (run_dir / "final").is_dir() else ""
            raise UserError(f"{run_dir} has no complete checkpoints in checkpoints/{hint}; "
                                       f"--checkpoint base evaluates the base model")
        return [Checkpoint("base", 0, None), *saved]
    by_step = {c.step: c for c in saved}
    available = ", ".join(["base", *(c.name for c in saved), *(["final"] if (run_dir / "final").is_dir() else [])])
    chosen = []
    for name in names:
        match = CHECKPOINT_NAME.fullmatch(name)
        if name == "base":
            chosen.append(Checkpoint("base", 0, None))
        elif name == "final" and (run_dir / "final").is_dir():
            step = last_logged_step(run_dir)
            chosen.append(Checkpoint("final", step if step is not None else max(by_step, default=0), run_dir / "final"))
        elif match and int(match.group(1)) in by_step:
            chosen.append(by_step[int(match.group(1))])
        else:
            raise UserError(f"no checkpoint {name!r} in {run_dir}; available: {available}")
    order = {"base": 0, "final": 2}
    return sorted(set(chosen), key=lambda c: (order.get(c.name, 1), c.step))


def samples_at(records: list[dict], step: int) -> int | None:
    """Training samples used up to `step` (`train/samples` at the last record at or before it; 0 for step 0)."""
    if step == 0:
        return 0
    logged = [(r["step"], r["train/samples"]) for r in records if "train/samples" in r and r["step"] <= step]
    return max(logged)[1] if logged else None


# --------------------------------------------------------------------------------------------------------- rewards


def available_rewards() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "reward").glob("*.yaml"))


def split_reward_overrides(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """Split command-line overrides into those for the run's own reward (`reward.<key>=...` before any
    `reward=<name>`) and one list per `reward=<name>` (the choice and the overrides after it), as Hydra parses
    them."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UserError(f"cannot parse the reward overrides: {str(error).splitlines()[0]}") from None
    own, groups = [], []
    for text, override in zip(overrides, parsed, strict=True):
        key, package = override.key_or_group, override.package
        choice = key == "reward" and package is None and not (override.is_add() or override.is_delete())
        of_reward = key.startswith("reward.") or (key == "reward" and package is not None)
        if choice:
            groups.append([text])
        elif groups and of_reward:
            groups[-1].append(text)
        elif not groups and key.startswith("reward.") and not (override.is_add() or override.is_delete()):
            own.append(text)
        else:
            raise UserError(
                f"unexpected argument {override!r}: reward overrides are reward=<name> followed by its "
                f"reward.<key>=<value> / +reward@... options, or reward.<key>=<value> for the run's own reward"
            )
    return own, groups


def compose_reward(group: list[str]) -> DictConfig:
    """The reward config `reward=<name> ...overrides` selects from `conf/reward`, composed by Hydra as
    `python -m rewards.score` composes it."""
    name = group[0].removeprefix("reward=")
    if name not in available_rewards():
        raise UserError(f"unknown reward {name!r}; choose from {', '.join(available_rewards())}")
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("score", overrides=group).reward
    except HydraException as error:
        raise UserError(f"reward overrides {group}: {str(error).splitlines()[0]}") from None


def choose_rewards(run_cfg: DictConfig, run_dir: Path, overrides: list[str]) -> list[NamedReward]:
    """The rewards to score with: the run's own (with any `reward.<key>=` changes) unless `reward=<name>` is given."""
    own, groups = split_reward_overrides(overrides)
    rewards = [NamedReward(group[0].removeprefix("reward="), compose_reward(group)) for group in groups]
    if rewards and own:
        raise UserError(f"{own[0]!r} comes before any reward=<name>; put it after the reward it changes")
    if rewards:
        return rewards
    if run_cfg.get("reward") is None:
        raise UserError(
            f"the run in {run_dir} has no reward; choose one: reward=<name> ({', '.join(available_rewards())})"
        )
    config = run_cfg.reward.copy()
    if own:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist([o.removeprefix("reward.") for o in own]))
    return [NamedReward(run_reward_name(run_dir), config)]


def run_reward_name(run_dir: Path) -> str:
    """The run's reward choice as Hydra recorded it (`.hydra/hydra.yaml`), or "reward" when that is not there."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        choices = OmegaConf.load(hydra_file).hydra.runtime.get("choices", {})
        if choices.get("reward"):
            return str(choices["reward"])
    return "reward"


# ------------------------------------------------------------------------------------------------------ settings


def run_eval_config(algo: DictConfig) -> EvalConfig:
    """The run's own held-out settings: `algo.eval` (policy-gradient, DPO, ReFL) or `algo.validation` (sft,
    dreambooth, which sample at the same fixed seeds but do not score)."""
    if algo.get("eval") is not None:
        return build(algo.eval)
    if algo.get("validation") is not None:
        v = algo.validation
        return EvalConfig(max_prompts=v.max_prompts, num_inference_steps=v.num_inference_steps,
                          guidance_scale=v.guidance_scale, resolution=v.resolution)
    return EvalConfig()


def eval_config(algo: DictConfig, args: argparse.Namespace, num_prompts: int) -> EvalConfig:
    """The run's held-out settings with the command line's changes (a prompt file is used whole by default)."""
    changes = {
        "max_prompts": args.max_prompts or (num_prompts if args.prompts_file else None),
        "images_per_prompt": args.images_per_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "strength": args.strength,
    }
    return dataclasses.replace(run_eval_config(algo), **{k: v for k, v in changes.items() if v is not None})


def protocol_prompts(protocol: Protocol, prompts_file: str | None) -> list[Prompt]:
    """The protocol's prompt set (a card without a shipped set takes `--prompts-file`, whole)."""
    if protocol.prompts.file is None:
        if prompts_file is None:
            raise UserError(f"protocol={protocol.name} needs its prompt set, which is not shipped here: --prompts-file "
                            f"FILE (conf/protocol/{protocol.name}.yaml says which)")
        return load_prompts(prompts_file, unique=protocol.prompts.unique)
    if prompts_file is not None:
        raise UserError(f"--prompts-file changes what protocol={protocol.name} pins (its prompt set "
                        f"{protocol.prompts.file}); drop it, or evaluate without a protocol")
    return load_prompts(protocol.prompts.file, protocol.prompts.start, protocol.prompts.stop,
                        unique=protocol.prompts.unique)


def protocol_eval_config(protocol: Protocol, num_prompts: int, batch_size: int | None) -> EvalConfig:
    return EvalConfig(max_prompts=num_prompts, images_per_prompt=protocol.images_per_prompt,
                      num_inference_steps=protocol.num_inference_steps, guidance_scale=protocol.guidance_scale,
                      resolution=protocol.resolution, **({"batch_size": batch_size} if batch_size else {}))


def protocol_rewards(protocol: Protocol, overrides: list[str]) -> list[NamedReward]:
    """The protocol's rewards; `reward.<key>=<value>` on the command line applies to its first, and only for the keys
    that say where its weights are or where it runs (`reward.detector=DIR`, `reward.clip.pretrained=FILE`,
    `reward.device=cuda`; recorded with the results): anything else would change what the card pins."""
    own, groups = split_reward_overrides(overrides)
    if groups:
        raise UserError(f"protocol={protocol.name} pins its rewards ({', '.join(g[0] for g in protocol.rewards)}); "
                        f"{groups[0][0]} would change them: evaluate without a protocol for other rewards")
    for override in own:
        key = override.split("=", 1)[0].removeprefix("reward.")
        if key not in WEIGHT_OPTIONS:
            raise UserError(f"{override.split('=', 1)[0]} changes what protocol={protocol.name} pins; under a protocol "
                            f"only where the weights are or run may change: "
                            f"{', '.join('reward.' + k for k in WEIGHT_OPTIONS)}")
    return [NamedReward(group[0].removeprefix("reward="), compose_reward([*group, *(own if i == 0 else [])]))
            for i, group in enumerate(protocol.rewards)]


def settings_record(prompts: list[Prompt], config: EvalConfig, seed: int, rewards: list[NamedReward], use_ema: bool,
                    run_cfg: DictConfig, protocol: Protocol | None = None) -> dict:
    """What determines the numbers: rows computed under equal settings can be reused."""
    return {
        "protocol": protocol.as_record() if protocol else None,
        "prompts": [{"text": p.text, "metadata": p.metadata} for p in prompts[: config.max_prompts]],
        "eval": {k: v for k, v in dataclasses.asdict(config).items() if not (k == "strength" and v is None)},
        "seed": seed,
        "rewards": [{"name": r.name, "config": OmegaConf.to_container(r.config, resolve=True)} for r in rewards],
        "ema": use_ema,
        "model": OmegaConf.to_container(run_cfg.model, resolve=True),
    }


# ------------------------------------------------------------------------------------------------------- weights


def lora_modules(modules: list[torch.nn.Module], text_encoders: bool) -> list[torch.nn.Module | None]:
    """`(transformer, text_encoder, text_encoder_2)` as `rl.lora.load_lora` takes them."""
    return [modules[0], *(modules[1:3] if text_encoders else [None, None])]


def load_weights(checkpoint: Checkpoint, modules: list[torch.nn.Module], lora, use_ema: bool) -> None:
    """Set the trained weights to a checkpoint's: the adapter (LoRA) or the transformer (full fine-tuning), then the
    EMA weights when the checkpoint holds them and `use_ema` (they are what the run evaluated and saved as final/)."""
    path = checkpoint.path
    if lora is not None:
        if not (path / "pytorch_lora_weights.safetensors").is_file():
            raise UserError(f"{path} holds no LoRA adapter (pytorch_lora_weights.safetensors)")
        load_lora(path, *lora_modules(modules, lora.text_encoders))
    else:
        modules[0].load_state_dict(full_weights(path))
    if use_ema and checkpoint_has_ema(checkpoint):  # final/ holds none: it already is the EMA weights
        ema = read_ema(path)
        parameters = trainable_parameters(modules)
        if not isinstance(ema, dict) or len(ema.get("shadow_params", [])) != len(parameters):
            raise UserError(f"the EMA in {path} is not the EMA of this run's trained weights")
        with torch.no_grad():
            for parameter, shadow in zip(parameters, ema["shadow_params"], strict=True):
                parameter.copy_(shadow)


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    """A full fine-tuning checkpoint's transformer weights: accelerate's `model.safetensors` (or `pytorch_model.bin`)
    in `checkpoints/step_<N>/`, or the `transformer/` folder of a saved pipeline in `final/`."""
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    shards = sorted((path / "transformer").glob("*.safetensors"))
    if shards:
        return {key: value for shard in shards for key, value in load_file(shard).items()}
    raise UserError(f"{path} holds no transformer weights (model.safetensors) and no LoRA adapter")


def checkpoint_has_ema(checkpoint: Checkpoint) -> bool:
    return checkpoint.path is not None and has_ema(checkpoint.path)


# ---------------------------------------------------------------------------------------------------- evaluation


def prefixed(metrics: dict[str, float], name: str) -> dict[str, float]:
    """`eval/reward_mean` -> `eval/<name>/reward_mean`: a further reward's columns carry its name."""
    return {f"eval/{name}/{key.removeprefix('eval/')}": value for key, value in metrics.items()}


def evaluate_weights(pipe, rewards: list[tuple[str, Any]], prompts: list[Prompt], config: EvalConfig,
                     seed: int) -> tuple[dict[str, float], torch.Tensor]:
    """`rl.evaluation.evaluate` with the first reward (so the numbers are the run's own `eval/*`), and the same images
    scored by each further reward."""
    metrics, images = evaluate(pipe, rewards[0][1], prompts, config, seed)
    chosen = held_out_prompts(prompts, config)
    for name, reward in rewards[1:]:
        scores, info = score(reward, images, [p.text for p in chosen], [p.metadata for p in chosen])
        metrics.update(prefixed(eval_metrics(scores, info), name))
    return metrics, images


def reusable_rows(out: Path, settings: dict) -> dict[str, dict]:
    """Rows of an earlier table in `out` computed under the same settings, by checkpoint name."""
    path = out / "table.json"
    if not path.is_file():
        return {}
    table = json.loads(path.read_text())
    if table.get("settings") != json.loads(json.dumps(settings)):
        return {}
    return {row["checkpoint"]: row for row in table.get("rows", [])}


def sort_rows(rows: list[dict]) -> list[dict]:
    """The base model first, then checkpoints by step, then final/."""
    return sorted(rows, key=lambda r: ({"base": 0, "final": 2}.get(r["checkpoint"], 1), r["step"]))


def write_table(out: Path, rows: list[dict], settings: dict, run_dir: Path) -> None:
    """`table.json` (rows and the settings that produced them) and `table.csv` (the rows)."""
    protocol = (settings.get("protocol") or {}).get("name")  # numbers compare only under one protocol
    (out / "table.json").write_text(json.dumps({"run_dir": str(run_dir.resolve()), "protocol": protocol,
                                                "settings": settings, "rows": rows}, indent=1))
    columns = ["checkpoint", "step", "samples"]
    columns += sorted({k for row in rows for k in row} - set(columns), key=lambda k: (k.count("/"), k))
    with (out / "table.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def mean_columns(row: dict) -> list[tuple[str, str]]:
    """`(key, label)` of each held-out mean in a table row, as the docs' tables name them: `eval/reward_mean` -> reward,
    `eval/correct_mean` -> accuracy, `eval/aesthetic/reward_mean` -> aesthetic/reward."""
    columns = []
    for key in row:
        if key.startswith("eval/") and key.endswith("_mean"):
            *reward, name = key[len("eval/"):-len("_mean")].split("/")
            columns.append((key, "/".join([*reward, metric_name(name)])))
    return columns


def plot_curve(path: Path, rows: list[dict], rewards: list[str], logged: list[tuple[int, float]] | None,
               title: str, unit: str = "step") -> None:
    """Each reward's mean against step, shaded +- one standard error over the images; the curve the run logged
    during training, dashed, when scored with the run's own reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = sorted(rows, key=lambda r: r["step"])
    fig, axes = plt.subplots(1, len(rewards), figsize=(5 * len(rewards), 3.6), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], rewards, strict=True)):
        prefix = "eval/" if i == 0 else f"eval/{name}/"
        steps = [r["step"] for r in rows]
        means = [r[f"{prefix}reward_mean"] for r in rows]
        errors = [r[f"{prefix}reward_std"] / math.sqrt(r["images"]) for r in rows]
        ax.plot(steps, means, marker="o", label="evaluated")
        ax.fill_between(steps, [m - e for m, e in zip(means, errors, strict=True)],
                        [m + e for m, e in zip(means, errors, strict=True)], alpha=0.25, label="+- s.e. over images")
        if i == 0 and logged:
            ax.plot(*zip(*logged, strict=True), linestyle="--", marker=".", color="grey", label="logged in training")
        ax.set_xlabel(unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{name} reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grid_name(checkpoint: Checkpoint) -> str:
    return "grid_final.png" if checkpoint.name == "final" else f"grid_step_{checkpoint.step:06d}.png"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("run_dir", type=Path, help="a run directory (or one of its checkpoints/step_<N> or final)")
    parser.add_argument("overrides", nargs="*", help="reward=<name> [reward.<key>=<value> ...] (several allowed)")
    parser.add_argument("--checkpoint", action="append", help="base, step_<N>, <N> or final (repeatable); "
                        "default: base and every saved checkpoint")
    parser.add_argument("--prompts-file", help="a .txt (one prompt a line) or .jsonl prompt file; default: the run's "
                        "held-out prompts")
    parser.add_argument("--max-prompts", type=int, help="use the first N prompts (default: the run's setting)")
    parser.add_argument("--images-per-prompt", type=int, help="images per prompt, each with its own fixed seed")
    parser.add_argument("--steps", type=int, help="ODE sampling steps")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance")
    parser.add_argument("--resolution", type=int, help="image size in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, help="images per sampling forward pass")
    parser.add_argument("--strength", type=float, help="image-to-image prompts (an 'image' each): the noising strength "
                                                       "(default: the run's algo.eval.strength)")
    parser.add_argument("--seed", type=int, help="base seed of the images (default: the run's seed)")
    parser.add_argument("--no-ema", action="store_true", help="the raw trained weights, not the run's EMA")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/evaluation)")
    parser.add_argument("--recompute", action="store_true", help="evaluate again checkpoints already in the table")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv: list[str] | None = None) -> list[dict]:
    """Evaluate and write the table, plot and grids; returns the table's rows."""
    args = parse_args(argv)
    with exit_on_user_error():
        # 1. Everything cheap first, so that bad input fails before any weights load.
        run_dir, named = locate(args.run_dir)
        checkpoints = select_checkpoints(run_dir, [*(args.checkpoint or []), *([named] if named else [])])
        run_cfg, _ = upgrade_config(OmegaConf.load(run_dir / "config.yaml"))  # also a run of an earlier version
        if argv is None:  # run as a program; a caller in the same process keeps its own thread count
            set_cpu_threads(run_cfg.get("cpu_threads", "auto"))
        protocol_name, overrides = split_protocol(args.overrides)
        protocol = load_protocol(protocol_name) if protocol_name else None
        if protocol is not None:  # everything the numbers depend on comes from the card
            pinned_options(protocol, {"--images-per-prompt": args.images_per_prompt, "--steps": args.steps,
                                      "--guidance-scale": args.guidance_scale, "--resolution": args.resolution,
                                      "--seed": args.seed, "--max-prompts": args.max_prompts,
                                      "--strength": args.strength})
            prompts = protocol_prompts(protocol, args.prompts_file)
            config = protocol_eval_config(protocol, len(prompts), args.batch_size)
            seed = protocol.seed
            named_rewards = protocol_rewards(protocol, overrides)
        else:
            prompts = load_prompts(args.prompts_file) if args.prompts_file else build(run_cfg.prompts.eval)
            config = eval_config(run_cfg.algo, args, len(prompts))
            seed = args.seed if args.seed is not None else int(run_cfg.seed)
            named_rewards = choose_rewards(run_cfg, run_dir, overrides)
        check_prompt_images(prompts, config.strength, "--strength" if args.strength else "algo.eval.strength",
                            "evaluation")
        ema_enabled = bool(OmegaConf.select(run_cfg, "algo.ema.enabled", default=False))
        use_ema = ema_enabled and not args.no_ema and any(checkpoint_has_ema(c) for c in checkpoints)
        if any(run_cfg.model.get(option) for option in ("path", "config", "transformer_file")):
            check_model_source(OmegaConf.to_container(run_cfg.model, resolve=True))
        out = args.out or run_dir / "evaluation" / (protocol.name if protocol else "")
        settings = settings_record(prompts, config, seed, named_rewards, use_ema, run_cfg, protocol)
        done = {} if args.recompute else reusable_rows(out, settings)
        todo = [c for c in checkpoints if c.name not in done]

        # 2. The rewards and the model, prepared as the run prepared it (adapters added with the run's seed).
        automatic = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(automatic if args.device == "auto" else args.device)
        rewards = [(r.name, build(r.config).to(device)) for r in named_rewards] if todo else []
        chosen = [p.text for p in prompts[: config.max_prompts]]
        for _, reward in rewards:
            reward.check_prompts(chosen)  # before the model loads
            reward.check_metadata(chosen, [p.metadata for p in prompts[: config.max_prompts]])
        lora = build(run_cfg.algo.lora) if run_cfg.algo.get("lora") is not None else None
        mixed = MIXED_PRECISION.get(str(run_cfg.get("mixed_precision", "no")))
        pipe = build(run_cfg.model, _partial_=True)(device=device) if todo else None

    # 3. Each checkpoint: set its weights, sample the prompts at fixed seeds, score, save the grid.
    out.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir)
    rows = dict(done)
    if todo:
        pipe.set_progress_bar_config(disable=True)
        modules = prepare_models(pipe, lora, False, mixed or torch.float32, int(run_cfg.seed))
        # Training forwards ran under accelerate's autocast with mixed precision; evaluation does the same.
        autocast = torch.autocast(device.type, dtype=mixed) if mixed else contextlib.nullcontext()
        progress = tqdm(todo, desc="evaluate")
        for checkpoint in progress:
            progress.set_postfix(checkpoint=checkpoint.name)
            if checkpoint.path is not None:
                with exit_on_user_error():
                    load_weights(checkpoint, modules, lora, use_ema)
            with autocast:
                metrics, images = evaluate_weights(pipe, rewards, prompts, config, seed)
            image_grid(images, nrow=config.images_per_prompt, row_labels=chosen).save(out / grid_name(checkpoint))
            rows[checkpoint.name] = {"checkpoint": checkpoint.name, "step": checkpoint.step,
                                     "samples": samples_at(records, checkpoint.step), "images": len(images), **metrics}
            if protocol is not None:
                rows[checkpoint.name].update(report(protocol, rows[checkpoint.name]))
            progress.set_postfix(checkpoint=checkpoint.name, reward=f"{metrics['eval/reward_mean']:.4g}")

    # 4. The table, the curve, and a summary on stdout.
    table = sort_rows(list(rows.values()))
    write_table(out, table, settings, run_dir)
    # The run's own curve is comparable only when everything that sets the numbers is the run's own.
    changed = args.overrides or args.prompts_file or args.seed is not None  # a protocol is an override too
    as_run = config == run_eval_config(run_cfg.algo) and not changed
    logged = metric_curve(records, "eval/reward_mean") if as_run and records else None
    title = (f"{run_dir.name}: {len(settings['prompts'])} prompts x {config.images_per_prompt}, "
             f"{config.num_inference_steps} ODE steps, seed {seed}")
    unit = step_unit(records)
    plot_curve(out / "curve.png", table, [r.name for r in named_rewards], logged, title, unit)
    for row in table:
        values = "  ".join(f"{label} {row[key]:.4g} +- {row[key[:-5] + '_std']:.3g}"
                           for key, label in mean_columns(row))
        print(f"{row['checkpoint']:>12}  {unit} {row['step']:>6}  {values}")
        summary = {k: v for k, v in row.items() if k.startswith("geneval/")}
        if summary:
            tasks = "  ".join(f"{k.removeprefix('geneval/')} {v:.3f}" for k, v in summary.items())
            print(" " * 14 + "GenEval: " + tasks)
    print(f"wrote {out}/table.csv, table.json, curve.png and grid_*.png")
    return table


if __name__ == "__main__":
    main()
