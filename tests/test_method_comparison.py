"""experiments.method_comparison: how each preset counts images, how curves are read against the two budgets, and
(slow) the whole command on two methods with tiny budgets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import method_comparison as mc

ROOT = Path(__file__).resolve().parents[1]


def records(points):
    """metrics.jsonl records: per (step, images, seconds, accuracy) a training record and an evaluation record."""
    out = []
    for step, images, seconds, accuracy in points:
        if step:
            out.append({"step": step, "train/samples": images, "train/seconds": seconds, "train/reward_mean": 0.1})
        out.append({"step": step, "eval/correct_mean": accuracy})
    return out


def test_every_method_has_a_preset_that_counts_its_images():
    plans = {method: mc.plan(method) for method in mc.METHODS}
    assert plans["grpo"].images_per_step == 64 and plans["grpo"].steps_option == "algo.epochs"
    assert plans["refl"].images_per_step == 8 and plans["refl"].steps_option == "algo.train.max_steps"
    assert plans["draft"].steps_option == "algo.train.max_steps"
    assert all(p.images_per_step > 0 and p.lr > 0 for p in plans.values())


def test_curves_against_images_and_seconds():
    points = mc.evaluations_of(records([(0, 0, 0, 0.45), (5, 320, 40.0, 0.7), (10, 640, 90.0, 0.85),
                                        (15, 960, 130.0, 0.92)]))
    assert points == [(0, 0, 0.45), (320, 40.0, 0.7), (640, 90.0, 0.85), (960, 130.0, 0.92)]
    by_images = mc.within(points, 0, 700)
    assert by_images == [(0, 0.45), (320, 0.7), (640, 0.85)]
    assert mc.first_reach(by_images, 0.8) == 640 and mc.first_reach(by_images, 0.9) is None
    # 72 of 80 held-out images, as the float32 the metrics file holds, reaches 0.9; 71 of 80 does not
    assert mc.first_reach([(0, float(np.float32(72 / 80))), (5, 1.0)], 0.9) == 0
    assert mc.first_reach([(0, float(np.float32(71 / 80))), (5, 1.0)], 0.9) == 5
    by_seconds = mc.within(points, 1, 100.0)
    assert mc.value_at(by_seconds, 89.9) == 0.7 and mc.value_at(by_seconds, 100.0) == 0.85


def test_summary_over_seeds():
    a = mc.evaluations_of(records([(0, 0, 0, 0.4), (5, 320, 50.0, 0.8), (10, 640, 100.0, 0.9)]))
    b = mc.evaluations_of(records([(0, 0, 0, 0.5), (5, 320, 60.0, 0.6), (10, 640, 120.0, 0.7)]))
    by_images = mc.summarise("X", [a, b], 0, 640)
    assert by_images["end"]["mean"] == pytest.approx(0.8) and by_images["best"]["mean"] == pytest.approx(0.8)
    assert by_images["reach"]["0.8"] == {"mean": 320, "reached": 1, "of": 2}
    assert by_images["curve"]["x"] == [0, 320, 640] and by_images["curve"]["mean"][1] == pytest.approx(0.7)
    by_seconds = mc.summarise("X", [a, b], 1, 100.0)
    assert by_seconds["end"]["mean"] == pytest.approx((0.9 + 0.6) / 2)  # b's 120 s evaluation is past the budget
    assert len(by_seconds["curve"]["x"]) == 41 and by_seconds["curve"]["x"][-1] == 100.0
    text = mc.markdown([("X", by_images, by_seconds, "preset")], 640, 100.0)
    assert "| X | preset | **0.800 +- 0.141** |" in text and "320 images (1/2)" in text
    only_b = mc.summarise("Y", [b], 0, 640)
    assert "not reached" in mc.markdown([("Y", only_b, only_b, "lr 1e-3")], 640, 100.0)


def test_tuning_score_reads_the_training_reward_of_the_last_quarter():
    logged = [{"step": s, "train/samples": 64 * s, "train/reward_mean": r} for s, r in ((1, 0.1), (4, 0.5), (5, 0.7))]
    assert mc.tuning_score(logged, 320) == pytest.approx(0.6)  # samples 256 and 320 are past 0.75 * 320 = 240


def test_threads_reach_the_runs_environment(monkeypatch, tmp_path):
    """--threads sets OMP_NUM_THREADS for every run (torch's intra-op threads); without it the environment is kept."""
    seen = []
    monkeypatch.setattr(mc.subprocess, "run", lambda command, check, env: seen.append((command, env)))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    plan = mc.Plan("nft", "nft_digits", 32, "algo.epochs", 3e-3)
    mc.launch(plan, 0, tmp_path, 4, 2, [], resume_force=False, threads=1)
    mc.launch(plan, 0, tmp_path, 4, 2, [], resume_force=True)
    assert [env["OMP_NUM_THREADS"] for _, env in seen] == ["1", "7"]
    assert seen[1][0][-1] == "algo.checkpoint.resume=force" and "algo.epochs=4" in seen[0][0]


def test_a_run_whose_metrics_show_both_budgets_used_is_not_run_again(monkeypatch, tmp_path):
    """The recorded runs (metrics.jsonl only, no checkpoints or final/) are reused as they are; a run short of either
    budget is launched."""
    launched = []
    monkeypatch.setattr(mc, "launch", lambda plan, seed, run_dir, steps, *rest, **kw: launched.append(run_dir.name))
    plan = mc.Plan("nft", "nft_digits", 32, "algo.epochs", 3e-3)
    for name, images, seconds in (("done", 3200, 650.0), ("short_of_seconds", 3200, 500.0), ("short", 1600, 650.0)):
        (tmp_path / name).mkdir()
        lines = [{"step": 100, "train/samples": images, "train/seconds": seconds}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        mc.run_to_budgets(plan, 0, tmp_path / name, 3200, 600.0, 10, [])
    assert "done" not in launched and "short_of_seconds" in launched and "short" in launched
    assert mc.used_budgets([], 0, 0) is False


def test_tune_only_runs_the_tuning_seed_and_records_the_best_lr(monkeypatch, tmp_path):
    """--tune-only: the three learning rates on the tuning seed under the image budget alone, nothing else; the
    choice (highest training reward) merged into tuning/tuned.json."""
    calls = []
    monkeypatch.setattr(mc, "run_to_budgets", lambda plan, seed, run_dir, images, seconds, *rest: calls.append(
        (seed, run_dir.name, images, seconds)))
    reward = {"lr_0.001": 0.6, "lr_0.003": 0.9, "lr_0.009": 0.7}  # nft_digits' lr is 3e-3
    monkeypatch.setattr(mc, "read_metrics", lambda run_dir: [
        {"step": 50, "train/samples": 3200, "train/reward_mean": reward[run_dir.name]}])
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "tuned.json").write_text(json.dumps({"refl": {"lr": 1.0}}))
    mc.main(["--out", str(tmp_path), "--methods", "nft", "--tune-only"])
    assert calls == [(mc.TUNING_SEED, name, 3200, 0) for name in reward]
    tuned = json.loads((tmp_path / "tuning" / "tuned.json").read_text())
    assert tuned["nft"]["lr"] == pytest.approx(3e-3) and tuned["refl"] == {"lr": 1.0}
    assert not (tmp_path / "results.md").exists()


@pytest.mark.slow
def test_the_comparison_runs_end_to_end(tmp_path):
    """Two methods, one seed, budgets of 2 NFT epochs (or 16 ReFL steps) and 30 s: each run is extended past its
    image budget until its training seconds are used, and the table, json and plot are written."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.method_comparison", "--out", str(out), "--methods", "nft", "refl",
         "--seeds", "0", "--images", "128", "--seconds", "30", "--evaluations", "2", "--",
         f"model.world={tmp_path / 'world'}", "algo.eval.max_prompts=2", "algo.eval.images_per_prompt=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert [s["label"] for s in summary["by_images"]] == ["DiffusionNFT", "ReFL"]
    assert (out / "accuracy.png").stat().st_size > 0 and "| DiffusionNFT" in (out / "results.md").read_text()
    for method in ("nft", "refl"):
        logged = [json.loads(line) for line in (out / method / "seed_0" / "metrics.jsonl").read_text().splitlines()]
        assert max(r.get("train/samples", 0) for r in logged) > 128  # continued past the image budget ...
        assert max(r.get("train/seconds", 0) for r in logged) >= 30.0  # ... until the seconds were used


def test_report_runs_nothing_and_leaves_out_methods_with_unfinished_runs(monkeypatch, tmp_path):
    """--report reads what --out holds: a method whose three tuning runs and every seed used both budgets is in the
    table (with the lr its tuning chose), one with a seed short of the seconds budget or a tuning run missing is
    named under it; nothing is launched."""
    monkeypatch.setattr(mc, "launch", lambda *args, **kw: pytest.fail("--report launched a run"))

    def write(run_dir, reward, seconds, accuracy):
        run_dir.mkdir(parents=True)
        lines = [{"step": 0, "eval/correct_mean": 0.5},
                 {"step": 50, "train/samples": 3200, "train/seconds": seconds, "train/reward_mean": reward},
                 {"step": 50, "eval/correct_mean": accuracy}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    for name, reward in (("lr_0.001", 0.6), ("lr_0.003", 0.7), ("lr_0.009", 0.9)):  # nft_digits' lr is 3e-3
        write(tmp_path / "tuning" / "nft" / name, reward, 300.0, 0.8)
    for seed, accuracy in ((0, 0.9), (1, 0.8)):
        write(tmp_path / "nft" / f"seed_{seed}", 0.9, 610.0, accuracy)
    for name in ("lr_0.000333", "lr_0.001"):  # refl_digits' lr is 1e-3: its 3e-3 run is missing
        write(tmp_path / "tuning" / "refl" / name, 0.99, 200.0, 0.8)
    mc.main(["--out", str(tmp_path), "--methods", "nft", "refl", "--seeds", "0", "1", "--tune", "--report"])
    text = (tmp_path / "results.md").read_text()
    assert "| DiffusionNFT, `experiment=nft_digits` | lr 0.009 | **0.850 +- 0.071** |" in text
    assert "ReFL: tuning, 2 of 3 runs finished" in text and "| ReFL" not in text
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["tuned"]["nft"]["lr"] == pytest.approx(9e-3) and summary["pending"] == [
        "ReFL: tuning, 2 of 3 runs finished"]
    (tmp_path / "nft" / "seed_1" / "metrics.jsonl").write_text(json.dumps(
        {"step": 50, "train/samples": 3200, "train/seconds": 500.0}) + "\n")  # short of the seconds budget
    mc.main(["--out", str(tmp_path), "--methods", "nft", "--seeds", "0", "1", "--tune", "--report"])
    assert "DiffusionNFT: 1 of 2 seeds finished" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        mc.main(["--out", str(tmp_path), "--tune-only", "--report"])
