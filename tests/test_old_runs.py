"""Run directories written by an earlier version of this code still resume and still evaluate.

`tests/fixtures/old_runs/<case>/run` was written before the redesign of the shared training session (issue 13) by a
run stopped after its first checkpoint, as a killed run would be: accelerate's numbered checkpoint pieces
(`custom_checkpoint_<i>.pkl`), a config naming modules that are gone. `expected.json` holds the metrics of the same run
left uninterrupted, and the overrides that started it in the spelling of that version. Today's code must evaluate the
old directory as it is and continue it, started with the same options in today's spelling, to the uninterrupted run's
curve; `python -m rl.legacy` must rewrite its config in today's spelling.

The fixtures were recorded with the code that wrote them (`GOLDEN_RECORD=1 pytest tests/test_old_runs.py` at commit
2519d8c; ddpo_tiny with the same code, added after a review); they are never re-recorded to make a later version
pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from experiments import evaluate
from pipelines.configs import build
from pipelines.errors import ConfigError
from rl import legacy
from rl.checkpoints import check_resume
from rl.run import build_context

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "old_runs"
TINY_EVAL = ["algo.eval.every=1", "algo.eval.max_prompts=2", "algo.eval.num_inference_steps=2"]
CASES = {  # the overrides of each fixture's run and of its stop, in today's spelling
    "grpo_tiny": {  # an epoch-based algorithm with LoRA and EMA
        "run": ["algo=grpo", "reward=jpeg_compressibility", "algo.epochs=2", "algo.checkpoint.every=1",
                "algo.optim.lr=5e-2", "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=4",
                "algo.sampling.batch_size=8", "algo.sampling.num_inference_steps=2", "algo.ppo.batch_size=8",
                "algo.ppo.optimizer_steps=1", "algo.advantage_ddof=1", *TINY_EVAL],  # ddof: the earlier code's
        "stop": ["algo.checkpoint.exit_after=1"],
        "ema": True,  # GRPO's default
    },
    "ddpo_tiny": {  # an epoch-based algorithm with a stat tracker and EMA (three numbered pieces)
        "run": ["algo=ddpo", "reward=jpeg_compressibility", "algo.epochs=2", "algo.checkpoint.every=1",
                "algo.optim.lr=5e-2", "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=4",
                "algo.sampling.batch_size=8", "algo.sampling.num_inference_steps=2", "algo.ppo.batch_size=8",
                "algo.ppo.optimizer_steps=1", "algo.min_count=2", "algo.ema.enabled=true", *TINY_EVAL],
        "stop": ["algo.checkpoint.exit_after=1"],
        "ema": True,
    },
    "refl_tiny": {  # a step-based algorithm with LoRA
        "run": ["algo=refl", "reward=digits", "prompts=digits", "algo.optim.lr=1e-3", "algo.train.max_steps=2",
                "algo.checkpoint.every=1", "algo.refl.num_inference_steps=2", "algo.refl.stop_range=[0,1]",
                "algo.refl.loss=negative", "algo.train.batch_size=1", *TINY_EVAL],
        "stop": ["algo.checkpoint.exit_after=1"],
        "ema": False,
    },
}
COMPARED = ("train/reward_mean", "train/loss", "eval/reward_mean")


def train(run_dir: Path, overrides: list[str]) -> None:
    """What `python -m rl.run <overrides> hydra.run.dir=<run_dir>` does, in this process."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    build(cfg.algo)(build_context(cfg, run_dir))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to share (as tests/test_experiments.py)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_old_run_directory_evaluates_and_resumes(tmp_path, case):
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURES / case / "run", run_dir)
    expected = json.loads((FIXTURES / case / "expected.json").read_text())

    # It evaluates as it is: the base model and the checkpoint it left give the held-out numbers the run logged.
    logged = {r["step"]: r["eval/reward_mean"] for r in records(run_dir) if "eval/reward_mean" in r}
    rows = evaluate.main([str(run_dir)])
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("base", 0), ("step_000001", 1)]
    # Equal up to float rounding: since issue 16 each prompt is encoded on its own (a batch of one), which rounds the
    # pooled CLIP projection differently from the batched encoding these runs were recorded with (~1e-6 relative).
    assert {r["step"]: r["eval/reward_mean"] for r in rows} == pytest.approx(logged, rel=1e-5, abs=1e-7)

    # Its saved config, read in today's spelling, has the options it is resumed with (`rl.run` checks that first).
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", *CASES[case]["run"]])
    check_resume(run_dir, OmegaConf.to_container(cfg, resolve=True))

    # Resumed with other options than it was written with (with or without an EMA), it stops with one line.
    with pytest.raises(ConfigError, match="numbered pieces"):
        train(run_dir, CASES[case]["run"] + [f"algo.ema.enabled={str(not CASES[case]['ema']).lower()}"])

    # It resumes: started again with the same options, it continues to the uninterrupted run's curve.
    train(run_dir, CASES[case]["run"])
    resumed, whole = records(run_dir), expected["records"]
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    for a, b in zip(resumed, whole, strict=True):
        for key in COMPARED:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("case", sorted(CASES))
def test_legacy_rewrites_an_old_config_in_todays_spelling(tmp_path, case):
    """`python -m rl.legacy RUN_DIR` rewrites the config; it then composes with today's classes, and a second run
    changes nothing."""
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURES / case / "run", run_dir)
    original = (run_dir / "config.yaml").read_text()
    legacy.main([str(run_dir)])
    assert (run_dir / "config.before-upgrade.yaml").read_text() == original
    config = OmegaConf.load(run_dir / "config.yaml")
    algo = instantiate(config.algo)
    assert callable(algo) and algo.checkpoint.every == 1 and algo.checkpoint.keep == 3
    assert "rl.policy" not in (run_dir / "config.yaml").read_text()
    assert legacy.upgrade_run(run_dir) == []  # already current


def test_a_config_from_before_the_session_split_and_renames_upgrades_and_builds():
    """Issue 32 moved `OptimConfig` to `rl.optim`, renamed `rl.supervised.TrainConfig` and two reward files: a run
    directory written before (its config naming the old targets) reads in today's spelling."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        today = compose("config", overrides=["algo=sft", "model=tiny", "reward=pickscore"])
    text = OmegaConf.to_yaml(today)
    for old, new in (("rl.session.OptimConfig", "rl.optim.OptimConfig"),
                     ("rl.supervised.TrainConfig", "rl.supervised.SupervisedStepConfig"),
                     ("rewards.clip.ClipModel", "rewards.clip_model.ClipModel"),
                     ("rewards.clip_score.ClipSimilarityReward", "rewards.clip_similarity.ClipSimilarityReward")):
        assert new in text
        text = text.replace(new, old)
    upgraded, changes = legacy.upgrade_config(OmegaConf.create(text))
    assert sorted(changes) == [
        "algo.optim._target_: rl.session.OptimConfig -> rl.optim.OptimConfig",
        "algo.train._target_: rl.supervised.TrainConfig -> rl.supervised.SupervisedStepConfig",
        "reward._target_: rewards.clip_score.ClipSimilarityReward -> rewards.clip_similarity.ClipSimilarityReward",
        "reward.clip._target_: rewards.clip.ClipModel -> rewards.clip_model.ClipModel"]
    assert upgraded == today
    algo = instantiate(upgraded.algo)
    assert type(algo.optim).__module__ == "rl.optim" and type(algo.train).__name__ == "SupervisedStepConfig"


@pytest.mark.parametrize("preset", ["nft_digits", "awm_digits"])
def test_nft_and_awm_configs_from_before_the_shared_trailing_copy_upgrade_and_build(preset):
    """DiffusionNFT's `algo.beta` (the implicit policies' mix) is `algo.policy_mix`, AWM's `algo.ema_policy.beta` is
    `algo.ema_kl_beta`, and both trailing copies are `rl.policy_copy.TrailingCopyConfig`: an old config reads so."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        today = compose("config", overrides=[f"experiment={preset}"])
    old = OmegaConf.to_container(today)
    algo = old["algo"]
    if preset == "nft_digits":
        algo["beta"] = algo.pop("policy_mix")
        algo["old_policy"]["_target_"] = "rl.nft.OldPolicyDecay"
    else:
        algo["ema_policy"]["beta"] = algo.pop("ema_kl_beta")
        algo["ema_policy"]["_target_"] = "rl.awm.EmaPolicy"
        del algo["ema_policy"]["flat"]  # AWM's old config had none (its schedule had no flat start)
    upgraded, changes = legacy.upgrade_config(OmegaConf.create(old))
    renamed = {"nft_digits": "algo.beta -> algo.policy_mix", "awm_digits": "algo.ema_policy.beta -> algo.ema_kl_beta"}
    assert renamed[preset] in changes and len(changes) == 2
    if preset == "awm_digits":
        assert "flat" not in upgraded.algo.ema_policy  # the dataclass default (0, as AWM's schedule) fills it
        upgraded.algo.ema_policy.flat = 0
    assert upgraded == today
    built = instantiate(upgraded.algo)
    assert type(built.old_policy if preset == "nft_digits" else built.ema_policy).__name__ == "TrailingCopyConfig"
    assert legacy.current_override("algo.beta=0.1", "rl.nft.NFT") == "algo.policy_mix=0.1"
    assert legacy.current_override("algo.beta=0.1", "rl.grpo.GRPO") == "algo.beta=0.1"  # GRPO's beta is a KL weight
    assert legacy.current_override("algo.ema_policy.beta=1", "rl.awm.AWM") == "algo.ema_kl_beta=1"
