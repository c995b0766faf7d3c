"""Every CPU-scale experiment preset (conf/experiment/*.yaml on model=tiny or model=digits) runs end to end through
`python -m rl.run experiment=<name>`, cut to a few steps, after writing the data it needs (marked slow), and logs
exactly the metrics recorded in tests/golden/<preset>.json: golden runs, so that a refactor of the shared layer shows
that it changed no number. That every preset composes is checked by tests/test_config.py.

Re-record the golden metrics only for a change that is meant to change numbers, and say why in its commit:
`GOLDEN_RECORD=1 pytest -m slow tests/test_presets.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GOLDEN = ROOT / "tests" / "golden"
# the logged values that depend on the machine's speed
WALL_CLOCK = {"train/steps_per_second", "train/seconds", "train/cpu_seconds"}
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

# Overrides that cut a run to a few seconds, per algorithm (the preset's `algo._target_`): one or two epochs or steps,
# two sampling steps, and a held-out evaluation of one prompt.
TINY_EVAL = ["algo.eval.every=1", "algo.eval.max_prompts=1", "algo.eval.images_per_prompt=1",
             "algo.eval.num_inference_steps=2", "algo.eval.batch_size=1"]
TINY_POLICY = ["algo.epochs=1", "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=2",
               "algo.sampling.batch_size=4", "algo.sampling.num_inference_steps=2", *TINY_EVAL]
TINY_SUPERVISED = ["algo.train.max_steps=2", "algo.train.batch_size=2", "algo.train.gradient_accumulation_steps=1",
                   "algo.checkpoint.every=2", "algo.validation.every=2", "algo.validation.max_prompts=1",
                   "algo.validation.num_inference_steps=2"]
SHORT = {
    "rl.sample.Sample": ["algo.max_prompts=1", "algo.num_images_per_prompt=1", "algo.num_inference_steps=2"],
    "rl.grpo.GRPO": [*TINY_POLICY, "algo.ppo.batch_size=4", "algo.ppo.optimizer_steps=1", "algo.checkpoint.every=1"],
    "rl.ddpo.DDPO": [*TINY_POLICY, "algo.ppo.batch_size=4", "algo.ppo.optimizer_steps=1", "algo.checkpoint.every=1"],
    "rl.nft.NFT": [*TINY_POLICY, "algo.train.batch_size=4", "algo.train.optimizer_steps=1", "algo.checkpoint.every=1"],
    "rl.awm.AWM": [*TINY_POLICY, "algo.train.batch_size=4", "algo.train.optimizer_steps=1", "algo.checkpoint.every=1",
                   "algo.train.stratified_steps=1", "algo.train.timestep_fraction=1.0"],
    "rl.dpo.OnlineDPO": [*TINY_POLICY, "algo.train.batch_size=2", "algo.train.optimizer_steps=1",
                         "algo.checkpoint.every=1"],
    "rl.dpo.OfflineDPO": ["algo.train.max_steps=2", "algo.train.batch_size=2",
                          "algo.train.gradient_accumulation_steps=1", "algo.checkpoint.every=2",
                          "algo.train.eval_every=2", "algo.train.eval_repeats=1", "algo.train.eval_batch_size=2",
                          "data.eval_pairs=4", *TINY_EVAL],
    "rl.refl.ReFL": ["algo.train.max_steps=2", "algo.train.batch_size=1", "algo.checkpoint.every=2",
                     "algo.refl.num_inference_steps=2", "algo.refl.stop_range=[0,1]", "algo.refl.k=1", *TINY_EVAL],
    "rl.sft.SFT": TINY_SUPERVISED,
    "rl.dreambooth.DreamBooth": [*TINY_SUPERVISED, "algo.num_class_images=2", "algo.class_num_inference_steps=2"],
}


def compose_presets() -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return {name: compose(config_name="config", overrides=[f"experiment={name}"]) for name in PRESETS}


def on_cpu_scale(cfg) -> bool:
    """Built in code (tiny) or trained here (digits): no `model.path` naming a hub checkpoint or a downloaded folder."""
    return not cfg.model.get("path")


CONFIGS = compose_presets()
CPU_PRESETS = [name for name, cfg in CONFIGS.items() if on_cpu_scale(cfg)]


def data_kind(cfg) -> str | None:
    """What a preset trains on besides prompts: preference pairs, an imagefolder of digits, or nothing."""
    target = cfg.algo._target_
    if target == "rl.dpo.OfflineDPO":
        return "pairs"
    supervised = target in ("rl.sft.SFT", "rl.dreambooth.DreamBooth")
    if supervised or (target == "rl.refl.ReFL" and cfg.algo.train.pretrain_weight):
        return "imagefolder"
    return None


def short_overrides(name: str, cfg, tmp: Path) -> list[str]:
    """The preset, cut short, with its data and (for the digits world) its model folder in `tmp`."""
    overrides = [f"experiment={name}", *SHORT[cfg.algo._target_]]
    if (cfg.algo.get("sampling") or {}).get("sde_window") is not None:  # a window spans at most the 2 steps
        overrides.append("algo.sampling.sde_window=2")
    if data_kind(cfg):
        overrides.append(f"data.path={tmp / 'data'}")
    if "world" in cfg.model:  # model=digits: unpack the shipped base model here, not into the repository's data/
        overrides.append(f"model.world={tmp / 'world'}")
    return overrides


def test_cpu_presets_are_found_and_each_has_short_overrides_that_compose(tmp_path):
    assert {"grpo_jpeg_tiny", "ddpo_jpeg_tiny", "dpo_online_jpeg_tiny", "dpo_photo_pairs_tiny", "refl_aesthetic_tiny",
            "draft_aesthetic_tiny", "sft_digits_tiny", "dreambooth_digits_tiny"} <= set(CPU_PRESETS)
    assert "grpo_pickscore_sd35_medium" not in CPU_PRESETS
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in CPU_PRESETS:
            cfg = CONFIGS[name]
            assert cfg.algo._target_ in SHORT, f"{name}: add shortening overrides for {cfg.algo._target_} to SHORT"
            short = compose(config_name="config", overrides=short_overrides(name, cfg, tmp_path))
            OmegaConf.to_container(short, resolve=True)
            assert callable(instantiate(short.algo)), name  # e.g. ReFL's stop_range must fit the shortened trajectory


def write_data(kind: str, folder: Path) -> None:
    """The data a preset's comment says to write first, with the shipped scripts, small."""
    if kind == "imagefolder":
        command = ["scripts.make_digits_imagefolder", "--out", str(folder), "--limit", "16"]
    else:
        command = ["scripts.make_preference_pairs", "--out", str(folder), "--pairs", "24", "--resolution", "32"]
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_PRESETS)
def test_cpu_preset_runs_end_to_end(tmp_path, name):
    cfg = CONFIGS[name]
    kind = data_kind(cfg)
    if kind:
        write_data(kind, tmp_path / "data")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rl.run", *short_overrides(name, cfg, tmp_path), f"hydra.run.dir={run_dir}",
         "cpu_threads=1"],  # one thread: the numbers do not depend on the machine's core count
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all("step" in record for record in records)
    logged = [{k: v for k, v in record.items() if k not in WALL_CLOCK} for record in records]
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("GOLDEN_RECORD") == "1":
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(json.dumps({"preset": name, "records": logged}, indent=1) + "\n")
        return
    assert golden.is_file(), f"no golden metrics for {name}: record them with GOLDEN_RECORD=1 (see this module)"
    expected = json.loads(golden.read_text())["records"]
    assert len(logged) == len(expected), (len(logged), len(expected))
    for index, (got, want) in enumerate(zip(logged, expected, strict=True)):
        assert got.keys() == want.keys(), (index, sorted(got.keys() ^ want.keys()))
        differ = {key: (got[key], want[key]) for key in want if got[key] != want[key]}
        assert not differ, f"record {index} (step {want.get('step')}) differs from the golden run: {differ}"
