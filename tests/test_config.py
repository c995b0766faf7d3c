"""Every config in conf/ composes, and its objects build (models as partials: no weights are loaded here)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from pipelines.option_types import check_option_types

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())  # Hydra lists every folder of conf/ as a group
# Blocks shared by the algos (conf/algo/*.yaml pull them in with `- /<group>@<group>: <option>`); a user picks one with
# `<group>@algo.<group>=<option>` and changes a value with `algo.<group>.<key>=<value>`.
BLOCKS = ["checkpoint", "ema", "eval", "lora", "loss", "optim", "ppo", "sampling"]
CARDS = ["protocol"]  # evaluation protocols, read by experiments.evaluate (tests/test_protocols.py), not run options
TOP_LEVEL = [g for g in GROUPS if g not in BLOCKS + CARDS]
OPTIONS = [(group, path.stem) for group in TOP_LEVEL for path in sorted((CONF / group).glob("*.yaml"))]
BLOCK_OPTIONS = [(group, path.stem) for group in BLOCKS for path in sorted((CONF / group).glob("*.yaml"))]


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_group_has_options():
    assert {"algo", "model", "prompts", "reward", "logger", "experiment"} <= set(TOP_LEVEL)
    assert set(BLOCKS) <= set(GROUPS)
    assert all(any(g == group for g, _ in OPTIONS + BLOCK_OPTIONS) for group in GROUPS if group not in CARDS)


def algos_using(group: str) -> list[str]:
    """The algos whose defaults pull in a block of `group`."""
    return [p.stem for p in sorted((CONF / "algo").glob("*.yaml")) if f"- /{group}@{group}:" in p.read_text()]


@pytest.mark.parametrize("group, option", BLOCK_OPTIONS, ids=[f"{g}={o}" for g, o in BLOCK_OPTIONS])
def test_every_shared_block_composes_into_the_algos_that_use_its_group(group, option):
    algos = algos_using(group)
    assert algos, f"no algo uses conf/{group}"
    for algo in algos:
        cfg = compose_with(f"algo={algo}", f"{group}@algo.{group}={option}")
        block = cfg.algo[group]
        assert block._target_ and callable(instantiate(cfg.algo)), (algo, group, option)
        expected = OmegaConf.load(CONF / group / f"{option}.yaml")
        for key, value in expected.items():  # the option's own values arrive (unless the algo sets them itself)
            if key != "defaults" and key not in OmegaConf.load(CONF / "algo" / f"{algo}.yaml").get(group, {}):
                assert block[key] == value, (algo, group, option, key)


def test_score_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="score", overrides=["images=photos/", "reward=jpeg_compressibility"])
    assert cfg.images == "photos/" and cfg.reward._target_ == "rewards.jpeg.JpegSizeReward"


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_config_composes_and_builds(group, option):
    required = ["model.path=/data/my-sd3-folder"] if (group, option) == ("model", "checkpoint") else []  # `???`
    cfg = compose_with(f"{group}={option}", *required)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["seed"] == cfg.seed
    for section in ("algo", "model", "reward", "prompts", "data", "logger"):  # every value of its declared type
        check_option_types(cfg.get(section), section)
    assert callable(instantiate(cfg.algo))
    assert callable(instantiate(cfg.model, _partial_=True))
    train, held_out = instantiate(cfg.prompts.train), instantiate(cfg.prompts.eval)
    assert train and held_out
    if cfg.prompts.train.file == cfg.prompts.eval.file:
        assert not {p.text for p in train} & {p.text for p in held_out}, "held-out prompts must not be trained on"
    instantiate(cfg.logger)
    if cfg.get("data"):
        assert instantiate(cfg.data).split  # data sources are cheap descriptions; nothing is read here
    if cfg.get("reward"):  # built with tiny weights in tests/test_rewards.py; here, the class must exist
        assert hasattr(get_class(cfg.reward._target_), "differentiable")


def test_model_presets_point_at_the_published_checkpoints():
    expected = {
        "sd3_medium": "stabilityai/stable-diffusion-3-medium-diffusers",
        "sd35_medium": "stabilityai/stable-diffusion-3.5-medium",
        "sd35_large": "stabilityai/stable-diffusion-3.5-large",
    }
    for option, hub_id in expected.items():
        cfg = compose_with(f"model={option}")
        assert cfg.model.path == hub_id and cfg.model.dtype == "bfloat16"
    assert compose_with("model=tiny").model.path is None  # the tiny model is built in code
    assert "tiny_seed" not in compose_with("model=sd35_medium").model  # real checkpoints carry no tiny-model options


def test_the_default_run_is_grpo_in_the_digits_world_and_naming_an_algo_replaces_it():
    from rl.run import DEFAULT_JOB, with_default_job

    assert with_default_job([]) == [DEFAULT_JOB] == ["experiment=grpo_digits"]
    assert with_default_job(["seed=1", "model=tiny"]) == ["seed=1", "model=tiny", DEFAULT_JOB]
    assert with_default_job(["algo=ddpo", "reward=aesthetic"]) == ["algo=ddpo", "reward=aesthetic"]
    assert with_default_job(["experiment=nft_digits"]) == ["experiment=nft_digits"]
    assert with_default_job(["-m", "algo=grpo,ddpo"]) == ["-m", "algo=grpo,ddpo"]
    cfg = compose_with(*with_default_job([]))
    assert cfg.algo._target_ == "rl.grpo.GRPO" and cfg.algo.sampling.sde_window == 3 and cfg.algo.epochs == 50
    assert cfg.model._target_ == "pipelines.digits.load_digits_pipeline"
    assert cfg.reward._target_ == "rewards.digits.DigitReward" and cfg.prompts.eval.file == "digits_world_eval.txt"
    assert compose_with(*with_default_job(["model=tiny"])).model._target_ == "pipelines.load_pipeline"  # CLI wins
    plain = compose_with("algo=grpo")  # an algo on its own starts from the tiny model, no reward, Flow-GRPO's settings
    assert plain.model._target_ != cfg.model._target_ and plain.get("reward") is None and plain.algo.epochs != 50
    assert not (CONF / "algo" / "grpo_digits.yaml").exists()  # the preset lives in conf/experiment/ only


def test_a_renamed_option_fails_in_one_line_naming_the_new_one(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rl.run", "algo=grpo_digits", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=300, cwd=CONF.parent)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: algo=grpo_digits is now experiment=grpo_digits (renamed; run the command with the new name)"]
    assert not (tmp_path / "run").exists()
    out = subprocess.run([sys.executable, "-m", "rl.run", "experiment=nft_digits", "algo.beta=0.1",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                         cwd=CONF.parent)
    (line,) = out.stderr.strip().splitlines()
    assert out.returncode == 2 and line.startswith("error: ") and line.endswith(
        "(NFT's algo.beta is now algo.policy_mix)"), line
    assert not (tmp_path / "run").exists()
    from rl.legacy import renamed_key_hint  # only for a key the error names: AWM's algo.beta is valid, the typo is not

    typo = "Could not override 'algo.epoch'. To append to your config use +algo.epoch=3"
    assert renamed_key_hint(["experiment=awm_digits", "algo.beta=0.01", "algo.epoch=3"], typo) is None


def test_dpo_and_refl_configs_carry_the_published_defaults():
    offline, online, refl = (compose_with(f"algo={a}").algo for a in ("dpo", "dpo_online", "refl"))
    assert offline.beta == 5000 and offline.optim.lr == 1e-5 and offline.lora.rank == 8  # Diffusion-DPO / diffusers
    assert online.beta == 100  # Flow-GRPO's online DPO on SD3.5
    assert refl.refl.num_inference_steps == 40 and list(refl.refl.stop_range) == [30, 39]  # ImageReward's ReFL
    assert refl.refl.target == 2 and refl.refl.scale == 1e-3 and refl.optim.lr == 1e-5
    pickapic = compose_with("experiment=dpo_pickapic_sd35_medium")
    assert pickapic.data.dataset == "yuvalkirstain/pickapic_v2" and pickapic.data.eval_split == "validation_unique"
    assert list(pickapic.data.image_columns) == ["jpg_0", "jpg_1"] and pickapic.data.label_column == "label_0"


def test_help_lists_exactly_the_selectable_groups():
    """`python -m rl.run --help` names every group a user can set with `group=option`, and nothing else."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rl.run", "--help"], capture_output=True, text=True, timeout=300,
                         cwd=CONF.parent, check=True).stdout
    listed = out.split("== Configuration groups ==")[1].split("==")[0]
    names = {line.split(":")[0] for line in listed.splitlines() if ": " in line}  # "algo: ddpo, dpo, ..."
    assert names == set(GROUPS), out  # the blocks too: each is selectable as <group>@algo.<group>=<option>


def test_flow_grpo_presets_carry_the_published_settings():
    """The SD3.5 presets train Flow-GRPO's first steps in order with numpy's std; the fast preset is flow_grpo's fast
    config (docs/algorithms.md section 2)."""
    geneval = compose_with("experiment=grpo_geneval_sd35_medium").algo
    assert geneval.ppo.timestep_order == "first" and geneval.ppo.timestep_fraction == 0.99
    assert geneval.advantage_ddof == 0 and geneval.advantage_std == "global" and geneval.beta == 0.04
    fast = compose_with("experiment=grpo_fast_pickscore_sd35_medium").algo
    assert (fast.sampling.sde_type, fast.sampling.noise_level, fast.sampling.sde_window) == ("cps", 0.8, 3)
    assert fast.sampling.guidance_scale == 1.0 and fast.eval.guidance_scale == 1.0  # no CFG anywhere
    assert (fast.ppo.clip_range, fast.ppo.timestep_fraction, fast.beta) == (1e-5, 1.0, 0.0)
    from rl.rollouts import sde_window

    sampling = instantiate(fast).sampling
    assert {sde_window(sampling, seed=0, epoch=epoch)[0] for epoch in range(200)} == {0, 1, 2}  # 3 steps from 0-2


@pytest.mark.parametrize("preset, every", [("mixgrpo_pickscore_sd35_medium", 25),
                                           ("mixgrpo_flash_pickscore_sd35_medium", 20)])
def test_mixgrpo_presets_carry_mixgrpo_s_own_cadence(preset, every):
    """MixGRPO's scripts: 32 prompts x 12 images per iteration, 4 optimiser steps each, the window moved every 25
    iterations (Flash: 20) over 300: 9,600 images per window position (Flash: 7,680), not Flow-GRPO's 48 x 24 x 25."""
    algo = compose_with(f"experiment={preset}").algo
    sampling = algo.sampling
    assert (sampling.prompts_per_epoch, sampling.images_per_prompt, algo.ppo.optimizer_steps, algo.epochs) == (
        32, 12, 4, 300)
    assert (sampling.sde_window, sampling.sde_window_every, sampling.num_inference_steps) == (4, every, 25)
    assert sampling.prompts_per_epoch * sampling.images_per_prompt * sampling.sde_window_every == 384 * every
    from rl.ppo import ppo_layout

    with pytest.MonkeyPatch.context() as patch:  # the layout on MixGRPO's 8 GPUs per node: 48 images per GPU
        patch.setattr("rl.batching.PartialState", lambda: type("State", (), {"num_processes": 8})())
        layout = ppo_layout(instantiate(sampling), instantiate(algo.ppo), algo.epochs)
    assert (layout.samples_per_process, layout.updates) == (48, 300 * 4)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_no_preset_trains_a_real_checkpoint_in_float32_by_accident(preset):
    """`rl.run.check_precision` refuses a real checkpoint trained with mixed_precision=no in a bf16 / fp16 dtype
    (the session would up-cast it); every preset passes it, and the ones on a real checkpoint say their precision."""
    from rl.run import check_precision

    cfg = compose_with(f"experiment={preset}")
    check_precision(cfg, instantiate(cfg.algo))
    if cfg.model.get("path") and preset.startswith(("grpo", "ddpo", "dpo", "refl", "draft", "sft", "dreambooth")):
        assert cfg.mixed_precision in ("bf16", "fp16") or cfg.model.dtype == "float32"


def test_flow_grpo_presets_encode_128_t5_tokens_and_precompute_their_prompts():
    for preset in ("grpo_geneval_sd35_medium", "grpo_pickscore_sd35_medium", "grpo_ocr_sd35_medium",
                   "grpo_fast_pickscore_sd35_medium", "sample_sd35_medium"):
        model = compose_with(f"experiment={preset}").model
        assert model.max_sequence_length == 128 and model.precompute_prompt_embeds, preset
    assert not compose_with("model=tiny").model.precompute_prompt_embeds
