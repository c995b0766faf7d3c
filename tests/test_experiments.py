"""`experiments.evaluate` and `experiments.compare` on real run directories of the tiny model (GRPO with LoRA and EMA,
ReFL with full fine-tuning, and every other algorithm), and compare's statistics on hand-made runs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pipelines
from experiments import compare, evaluate
from pipelines.configs import build
from rl.data import digits_imagefolder
from rl.run import build_context
from scripts.make_preference_pairs import make_pairs

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = ["algo.eval.every=1", "algo.eval.max_prompts=2", "algo.eval.num_inference_steps=2"]
GRPO = [
    "algo=grpo", "reward=jpeg_compressibility", "algo.epochs=2", "algo.checkpoint.every=1", "algo.optim.lr=5e-2",
    "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=4", "algo.sampling.batch_size=8",
    "algo.sampling.num_inference_steps=2", "algo.ppo.batch_size=8", "algo.ppo.optimizer_steps=1", *TINY_EVAL,
]
REFL_FULL = [
    "algo=refl", "reward=digits", "prompts=digits", "algo.lora=null", "algo.optim.lr=1e-3", "algo.train.max_steps=2",
    "algo.checkpoint.every=1", "algo.refl.num_inference_steps=2", "algo.refl.stop_range=[0,1]",
    "algo.refl.loss=negative", "algo.train.batch_size=1", *TINY_EVAL,
]
SUPERVISED = [
    "data.resolution=32", "algo.optim.lr=1e-2", "algo.train.max_steps=2", "algo.checkpoint.every=1",
    "algo.train.gradient_accumulation_steps=1", "algo.validation.every=2", "algo.validation.num_inference_steps=2",
]


def train(run_dir: Path, overrides: list[str]) -> Path:
    """What `python -m rl.run <overrides> hydra.run.dir=<run_dir>` does, in this process (no start-up cost)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", *overrides])
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    build(cfg.algo)(build_context(cfg, run_dir))
    return run_dir


def logged(run_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        image.verify()  # a complete, valid PNG
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's tensors are so small that handing each op to a second thread costs more than it saves (10x
    on a busy two-core machine); the numbers do not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("grpo") / "run", GRPO)


@pytest.fixture(scope="module")
def grpo_evaluation(grpo_run):
    return evaluate.main([str(grpo_run)]), grpo_run / "evaluation"


@pytest.fixture(scope="module")
def refl_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("refl") / "run", REFL_FULL)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything builds the model (the run's config instantiates `pipelines.load_pipeline`)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipelines, "load_pipeline", refuse)


# ------------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_lora_run_reproduces_the_runs_own_held_out_curve(grpo_run, grpo_evaluation):
    rows, out = grpo_evaluation
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("base", 0), ("step_000001", 1), ("step_000002", 2)]
    # Same model, prompts, seeds and settings as the run's evaluations, with the EMA weights it evaluated: equal.
    assert {r["step"]: r["eval/reward_mean"] for r in rows} == logged(grpo_run, "eval/reward_mean")
    assert {r["step"]: r["eval/jpeg_kb_std"] for r in rows} == logged(grpo_run, "eval/jpeg_kb_std")
    assert [r["samples"] for r in rows] == [0, 8, 16]
    table = json.loads((out / "table.json").read_text())
    assert table["settings"]["ema"] is True and len(table["settings"]["prompts"]) == 2
    assert (out / "table.csv").read_text().splitlines()[0].startswith("checkpoint,step,samples")
    assert pixels(out / "curve.png").shape[1] > 300
    grids = [pixels(out / f"grid_step_{step:06d}.png") for step in (0, 1, 2)]
    # One row per prompt (two prompts, one image each), 32 px enlarged to 64, 2 px padding, a 220 px caption strip
    assert grids[0].shape == grids[2].shape == (2 * 66 + 2, 220 + 68, 3)
    strip = grids[0][:, :220]
    assert (strip[2:66] < 128).any() and (strip[68:132] < 128).any()  # each row's prompt is written beside it
    assert np.abs(grids[2] - grids[0]).max() > 0  # the adapter changed the images


def test_evaluating_one_checkpoint_again_gives_the_same_numbers_and_scores_more_rewards(grpo_run, grpo_evaluation,
                                                                                         tmp_path):
    rows = evaluate.main([str(grpo_run / "checkpoints" / "step_000002"), "--out", str(tmp_path),
                          "--checkpoint", "final", "reward=jpeg_compressibility", "reward=jpeg_incompressibility",
                          "reward.quality=50"])
    row, final = rows
    before = next(r for r in grpo_evaluation[0] if r["checkpoint"] == "step_000002")
    assert row["eval/reward_mean"] == before["eval/reward_mean"]  # deterministic
    assert final["checkpoint"] == "final" and final["eval/reward_mean"] == row["eval/reward_mean"]  # final/ is the EMA
    assert row["eval/jpeg_incompressibility/reward_mean"] > 0  # a second reward, with its own override
    assert row["eval/jpeg_incompressibility/reward_mean"] != -row["eval/reward_mean"]  # quality 50, not 95
    assert (tmp_path / "grid_step_000002.png").exists() and not (tmp_path / "grid_step_000000.png").exists()


def test_rows_already_evaluated_with_the_same_settings_are_reused(grpo_run, grpo_evaluation, no_model_loads):
    rows = evaluate.main([str(grpo_run)])
    assert rows == grpo_evaluation[0]


def test_evaluate_full_fine_tuning_run(refl_run):
    rows = evaluate.main([str(refl_run), "--checkpoint", "final", "--checkpoint", "base", "--checkpoint", "2",
                          "--checkpoint", "step_1"])
    assert [r["checkpoint"] for r in rows] == ["base", "step_000001", "step_000002", "final"]
    final = rows.pop()
    assert final["step"] == 2 and final["eval/reward_mean"] == rows[2]["eval/reward_mean"]  # the saved pipeline
    for key in ("eval/reward_mean", "eval/correct_mean"):
        assert {r["step"]: r[key] for r in rows} == logged(refl_run, key)
    assert rows[0]["eval/reward_mean"] != rows[2]["eval/reward_mean"]  # the transformer's weights changed
    assert all(math.isfinite(r["eval/reward_std"]) for r in rows)
    out = refl_run / "evaluation"
    assert np.abs(pixels(out / "grid_step_000002.png") - pixels(out / "grid_step_000000.png")).max() > 0


@pytest.mark.parametrize("case", ["not_a_run", "no_checkpoints", "unknown_checkpoint", "unknown_reward",
                                  "no_reward", "bad_prompt_file"])
def test_bad_input_stops_in_one_line_before_the_model_loads(grpo_run, tmp_path, capsys, no_model_loads, case):
    bare = tmp_path / "bare"
    bare.mkdir()
    config = OmegaConf.load(grpo_run / "config.yaml")
    if case == "no_reward":
        config.reward = None
    OmegaConf.save(config, bare / "config.yaml")
    argv = {
        "not_a_run": [str(tmp_path / "missing")],
        "no_checkpoints": [str(bare)],
        "unknown_checkpoint": [str(grpo_run), "--checkpoint", "step_7"],
        "unknown_reward": [str(grpo_run), "reward=no_such_reward"],
        "no_reward": [str(bare), "--checkpoint", "base"],
        "bad_prompt_file": [str(grpo_run), "--prompts-file", str(tmp_path / "none.txt")],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    expected = {"not_a_run": "not a run directory", "no_checkpoints": "no complete checkpoints",
                "unknown_checkpoint": "available: base, step_000001, step_000002, final",
                "unknown_reward": "unknown reward", "no_reward": "has no reward", "bad_prompt_file": "not found"}[case]
    assert expected in message


# -------------------------------------------------------------------------------------------------------- compare


def fake_run(path: Path, seed: int, values: list[float], lr: float = 0.1) -> Path:
    path.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": seed, "algo": {"_target_": "rl.grpo.GRPO", "optim": {"lr": lr}}}),
                   path / "config.yaml")
    records = []
    for step, value in enumerate(values):
        if step:
            records.append({"step": step, "train/samples": 8 * step})
        records.append({"step": step, "eval/reward_mean": value})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_groups_seeds_and_gives_their_mean_and_std(tmp_path, capsys):
    fake_run(tmp_path / "grpo" / "seed_0", 0, [1.0, 2.0, 4.0])
    fake_run(tmp_path / "grpo" / "seed_1", 1, [3.0, 2.0, 6.0])
    fake_run(tmp_path / "other" / "seed_0", 0, [0.0, -1.0, 1.0], lr=0.5)
    out = tmp_path / "plots" / "compare.png"
    summaries = compare.main([str(tmp_path), "--out", str(out)])
    by_label = {s["label"]: s for s in summaries}
    assert set(by_label) == {"grpo", "other"}  # seeds grouped: configs equal except the seed
    grpo = by_label["grpo"]
    root2 = math.sqrt(2)
    assert grpo["curve"]["x"] == [0, 1, 2] and grpo["curve"]["mean"] == [2.0, 2.0, 5.0]
    assert grpo["curve"]["std"] == pytest.approx([root2, 0.0, root2])
    assert grpo["start"] == pytest.approx({"mean": 2.0, "std": root2})
    assert grpo["best"] == pytest.approx({"mean": 5.0, "std": root2})  # each seed's best: 4 and 6
    assert grpo["final"] == pytest.approx({"mean": 5.0, "std": root2})
    assert grpo["change"] == pytest.approx({"mean": 3.0, "std": 0.0})
    assert grpo["samples"] == 16 and grpo["wall_seconds"] >= 0
    assert by_label["other"]["best"] == {"mean": 1.0, "std": 0.0}
    printed = capsys.readouterr().out
    assert "grpo" in printed and "2 +- 1.4" in printed  # start of the grpo group
    pixels(out)
    assert json.loads(out.with_suffix(".json").read_text())["groups"][0]["label"] in by_label
    assert len(out.with_suffix(".csv").read_text().splitlines()) == 3
    # Labels by glob override the grouping; --x samples puts the curve on training samples.
    summaries = compare.main([str(tmp_path / "grpo"), str(tmp_path / "other"), "--label", "all=*seed_0",
                              "--x", "samples", "--out", str(out)])
    assert [(s["label"], len(s["runs"])) for s in summaries] == [("all", 2), ("grpo", 1)]
    assert summaries[0]["curve"]["x"] == [0, 8, 16]


def test_compare_reads_evaluation_tables(grpo_run, grpo_evaluation, tmp_path):
    rows, folder = grpo_evaluation
    (summary,) = compare.main([str(folder), "--out", str(tmp_path / "c.png")])
    assert summary["curve"]["mean"] == [r["eval/reward_mean"] for r in rows]
    (summary,) = compare.main([str(grpo_run), "--key", "eval/jpeg_kb_mean", "--source", "metrics",
                               "--lower-is-better", "--out", str(tmp_path / "c.png")])
    assert summary["best"]["mean"] == min(logged(grpo_run, "eval/jpeg_kb_mean").values())


def test_compare_command_line_errors_are_one_line(tmp_path):
    fake_run(tmp_path / "run", 0, [1.0, 2.0])
    for args, expected in [([str(tmp_path / "missing")], "is not a directory"),
                           ([str(tmp_path / "run"), "--key", "eval/nothing"], "keys there: eval/reward_mean")]:
        result = subprocess.run([sys.executable, "-m", "experiments.compare", *args, "--out", str(tmp_path / "c.png")],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------- every algorithm


@pytest.mark.parametrize("algo", ["ddpo", "dpo", "dpo_online", "sft", "dreambooth"])
def test_evaluate_and_compare_work_on_every_algorithm(tmp_path, algo):
    overrides = {
        "ddpo": [o for o in GRPO if o != "algo=grpo"] + ["algo=ddpo", "algo.min_count=2"],
        "dpo_online": ["algo=dpo_online", "reward=jpeg_compressibility", "algo.epochs=2", "algo.checkpoint.every=1",
                       "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=4",
                       "algo.sampling.batch_size=8", "algo.sampling.num_inference_steps=2", "algo.train.batch_size=2",
                       "algo.train.optimizer_steps=1", "algo.optim.lr=5e-2", *TINY_EVAL],
        "dpo": ["algo=dpo", "data=preferences", "data.resolution=32", "data.eval_pairs=4", "algo.train.max_steps=2",
                "algo.checkpoint.every=1", "algo.train.eval_every=1", "algo.train.batch_size=2", "algo.lora=null",
                "algo.optim.lr=1e-2", *TINY_EVAL[1:]],
        "sft": ["algo=sft", *SUPERVISED],
        "dreambooth": ["algo=dreambooth", "algo.instance_prompt=a photo of sks dog", "algo.lora.text_encoders=true",
                       *SUPERVISED],
    }[algo]
    if algo == "dpo":
        overrides.append(f"data.path={make_pairs(tmp_path / 'pairs', pairs=12, resolution=32)}")
    if algo in ("sft", "dreambooth"):
        overrides.append(f"data.path={digits_imagefolder(tmp_path / 'digits', resolution=32, limit=8)}")
    run_dir = train(tmp_path / "run", overrides)
    rewards = [] if algo in ("ddpo", "dpo_online") else ["reward=jpeg_compressibility"]
    rows = evaluate.main([str(run_dir), *rewards])
    assert [r["step"] for r in rows] == [0, 1, 2]
    if not rewards:
        assert {r["step"]: r["eval/reward_mean"] for r in rows} == logged(run_dir, "eval/reward_mean")
    assert len({r["eval/reward_mean"] for r in rows}) > 1  # the checkpoints' weights differ
    (summary,) = compare.main([str(run_dir), "--out", str(tmp_path / "c.png")])
    assert summary["curve"]["x"] == [0, 1, 2]


def test_compare_names_groups_in_one_folder_by_the_options_that_differ(tmp_path):
    fake_run(tmp_path / "0_seed=0", 0, [1.0, 2.0])
    fake_run(tmp_path / "1_seed=1", 1, [1.0, 3.0])
    fake_run(tmp_path / "2_lr=0.5", 0, [1.0, 0.0], lr=0.5)
    summaries = compare.main([str(tmp_path), "--out", str(tmp_path / "c.png")])
    labels = sorted((s["label"], len(s["runs"])) for s in summaries)
    assert labels == [("algo.optim.lr=0.1", 2), ("algo.optim.lr=0.5", 1)]
