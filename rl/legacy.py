"""Run directories written by earlier versions of this code: their `config.yaml` in today's spelling.

Until the shared training session was redesigned, configs named classes in modules that are gone (`rl.policy`,
`rl.trainer`, `rl.sft`'s shared blocks, the digits loader in `experiments/`), built algorithms as functions
(`rl.grpo.run`, `_partial_: true`) and spelled checkpoint options per algorithm (`algo.checkpoint_every`,
`algo.train.keep_checkpoints`, ...). `upgrade_config` rewrites such a config;
`experiments.evaluate` applies it when it reads a run, and

    python -m rl.legacy RUN_DIR [RUN_DIR ...]

rewrites `config.yaml` in place (keeping the original as `config.before-upgrade.yaml`). Checkpoints need no
conversion: `rl.checkpoints` reads their numbered pieces. To resume an old run, start it again with its options in
today's spelling (`algo.checkpoint.every` for `algo.checkpoint_every`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipelines.errors import UserError, exit_on_user_error

RENAMED_TARGETS = {
    "rl.policy.SamplingConfig": "rl.rollouts.SamplingConfig",
    "rl.policy.PPOConfig": "rl.ppo.PPOConfig",
    "rl.policy.EvalConfig": "rl.evaluation.EvalConfig",
    "rl.trainer.OptimConfig": "rl.optim.OptimConfig",
    "rl.session.OptimConfig": "rl.optim.OptimConfig",
    "rl.sft.EmaConfig": "rl.session.EmaConfig",
    "rl.sft.LossConfig": "rl.supervised.LossConfig",
    "rl.sft.TrainConfig": "rl.supervised.SupervisedStepConfig",
    "rl.supervised.TrainConfig": "rl.supervised.SupervisedStepConfig",  # beside rl.session.TrainingConfig: renamed
    "rl.sft.ValidationConfig": "rl.evaluation.ValidationConfig",
    "experiments.digits_world.load_digits_pipeline": "pipelines.digits.load_digits_pipeline",
    # reward files named by what they hold (issue 32): CLIP's towers, the CLIP-similarity rewards
    "rewards.clip.ClipModel": "rewards.clip_model.ClipModel",
    "rewards.clip_score.ClipSimilarityReward": "rewards.clip_similarity.ClipSimilarityReward",
    # NFT's old policy and AWM's KL-EMA share one trailing-copy config (issue 32)
    "rl.nft.OldPolicyDecay": "rl.policy_copy.TrailingCopyConfig",
    "rl.awm.EmaPolicy": "rl.policy_copy.TrailingCopyConfig",
}
# Keys of an algorithm's config renamed (old dotted key under `algo` -> new), so that `beta` / `kl_beta` name a KL
# weight in every method: DiffusionNFT's beta mixes the implicit policies; AWM's KL-EMA weight left the shared
# trailing-copy config.
RENAMED_KEYS = {
    "rl.nft.NFT": {"beta": "policy_mix"},
    "rl.awm.AWM": {"ema_policy.beta": "ema_kl_beta"},
}
# An algorithm was a function built with `_partial_: true`; it is now a config class whose instance runs it.
RENAMED_ALGORITHMS = {
    "rl.sample.run": "rl.sample.Sample", "rl.sft.run": "rl.sft.SFT", "rl.dreambooth.run": "rl.dreambooth.DreamBooth",
    "rl.grpo.run": "rl.grpo.GRPO", "rl.ddpo.run": "rl.ddpo.DDPO", "rl.dpo.run_offline": "rl.dpo.OfflineDPO",
    "rl.dpo.run_online": "rl.dpo.OnlineDPO", "rl.refl.run": "rl.refl.ReFL",
}
# Command-line options that name something renamed: the old option and its new spelling.
RENAMED_OPTIONS = {
    "algo=grpo_digits": "experiment=grpo_digits",  # the default job's preset lives only in conf/experiment/
}
# old key -> CheckpointConfig field; epoch algorithms kept them in `algo`, step algorithms in `algo.train`
CHECKPOINT_KEYS = {"checkpoint_every": "every", "keep_checkpoints": "keep", "resume": "resume",
                   "exit_after_epochs": "exit_after", "exit_after_steps": "exit_after"}


def renamed_options(argv: list[str]) -> str | None:
    """One line naming the new spelling of every renamed option on the command line `argv`; None when none is."""
    found = [f"{arg} is now {RENAMED_OPTIONS[arg]}" for arg in argv if arg in RENAMED_OPTIONS]
    return "; ".join(found) + " (renamed; run the command with the new name)" if found else None


def renamed_key_hint(argv: list[str], error: str) -> str | None:
    """For a command line that did not compose with `error`: the new name of each `algo.<key>=...` it sets that an
    algorithm renamed (`algo.beta` of DiffusionNFT is `algo.policy_mix`) and that the error names; None when none."""
    keys = {arg.lstrip("+~").split("=")[0] for arg in argv if "=" in arg}
    hints = [f"{target.rsplit('.', 1)[-1]}'s algo.{old} is now algo.{new}" for target, renamed in RENAMED_KEYS.items()
             for old, new in renamed.items() if f"algo.{old}" in keys and f"'algo.{old}'" in error]
    return "; ".join(hints) or None


def current_override(option: str, target: str) -> str:
    """A command-line `option` (`algo.beta=0.1`) of the algorithm `target` (`rl.nft.NFT`) in today's spelling."""
    key, sep, value = option.partition("=")
    for old, new in RENAMED_KEYS.get(target, {}).items():
        if key == f"algo.{old}":
            return f"algo.{new}{sep}{value}"
    return option


def rename_keys(algo: dict, renamed: dict[str, str]) -> list[str]:
    """Move each old dotted key of `algo` (a plain config dict) to its new one; a line for each move."""
    changes = []
    for old, new in renamed.items():
        *parents, leaf = old.split(".")
        node = algo
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target = algo
        for part in new_parents:
            target = target.setdefault(part, {})
        target[new_leaf] = value
        changes.append(f"algo.{old} -> algo.{new}")
    return changes


def upgrade_config(config: DictConfig) -> tuple[DictConfig, list[str]]:
    """`config` in today's spelling, and a line for each change (none for a config that is already current)."""
    data = OmegaConf.to_container(config, resolve=False)
    changes: list[str] = []

    def retarget(node, path: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if target in RENAMED_TARGETS:
                node["_target_"] = RENAMED_TARGETS[target]
                changes.append(f"{path}._target_: {target} -> {node['_target_']}")
            for key, value in node.items():
                retarget(value, f"{path}.{key}" if path else key)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                retarget(value, f"{path}[{i}]")

    retarget(data, "")
    algo = data.get("algo")
    if isinstance(algo, dict) and algo.get("_target_") in RENAMED_KEYS:
        changes += rename_keys(algo, RENAMED_KEYS[algo["_target_"]])
    if isinstance(algo, dict) and algo.get("_target_") in RENAMED_ALGORITHMS:
        changes.append(f"algo._target_: {algo['_target_']} -> {RENAMED_ALGORITHMS[algo['_target_']]}")
        algo["_target_"] = RENAMED_ALGORITHMS[algo["_target_"]]
        algo.pop("_partial_", None)
    if isinstance(algo, dict) and "checkpoint" not in algo:
        train = algo.get("train") if isinstance(algo.get("train"), dict) else {}
        source, prefix = (train, "algo.train") if "checkpoint_every" in train else (algo, "algo")
        if "checkpoint_every" in source:
            checkpoint = {"_target_": "rl.checkpoints.CheckpointConfig"}
            for old, new in CHECKPOINT_KEYS.items():
                if old in source:
                    checkpoint[new] = source.pop(old)
                    changes.append(f"{prefix}.{old} -> algo.checkpoint.{new}")
            algo["checkpoint"] = checkpoint
    return OmegaConf.create(data), changes


def upgrade_run(run_dir: Path) -> list[str]:
    """Rewrite `<run_dir>/config.yaml` in today's spelling (the original kept as `config.before-upgrade.yaml`)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory: it holds no config.yaml")
    config, changes = upgrade_config(OmegaConf.load(path))
    if changes:
        shutil.copy(path, run_dir / "config.before-upgrade.yaml")
        OmegaConf.save(config, path)
    return changes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rl.legacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories written by rl.run")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        for run_dir in args.run_dirs:
            changes = upgrade_run(run_dir)
            print(f"{run_dir}: " + (f"{len(changes)} changes" if changes else "already current"))
            for change in changes:
                print(f"  {change}")


if __name__ == "__main__":
    main()
