"""experiments.method_comparison: the protocol's pieces (how each preset counts images, each method's knob, the fixed
evaluation points, the tuning score on validation phrasings, the analysis over seeds), what is run and what is not,
and (slow) the whole command on two methods with tiny budgets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import method_comparison as mc
from rl.prompts import load_prompts

ROOT = Path(__file__).resolve().parents[1]


def run_records(images_per_step=64, evaluations=10, images=3200, seconds=600.0, accuracy=lambda k: 0.5 + 0.04 * k,
                marks=True, stop_images=3200, cpu=650.0):
    """A finished run's metrics.jsonl under the protocol: training records, evaluations every images / evaluations
    images and at every seconds / evaluations CPU seconds."""
    out, per_eval = [], images // evaluations // images_per_step
    for step in range(stop_images // images_per_step + 1):
        if step:
            out.append({"step": step, "train/samples": step * images_per_step, "train/cpu_seconds": cpu * step / (
                stop_images // images_per_step), "train/seconds": 1.0})
        if step % per_eval == 0:
            out.append({"step": step, "eval/correct_mean": accuracy(step // per_eval)})
    if marks:
        for k in range(1, evaluations + 1):
            out.append({"step": k, "eval_seconds/correct_mean": accuracy(k) - 0.01,
                        "eval_seconds/mark": seconds * k / evaluations, "eval_seconds/seconds": 1.0})
    return out


def write(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_every_method_counts_its_images_and_fits_the_evaluation_points():
    plans = {method: mc.plan(method) for method in mc.METHODS}
    assert plans["grpo"].images_per_step == 64 and plans["grpo"].steps_option == "algo.epochs"
    assert plans["refl"].images_per_step == 8 and plans["refl"].steps_option == "algo.train.max_steps"
    assert plans["nft"].training_guidance == 1.0 and plans["awm"].training_guidance == 1.0
    assert plans["grpo"].training_guidance is None  # trains at the evaluation's 4.5
    for p in plans.values():  # every method is evaluated every 320 images and every 60 CPU seconds
        options = mc.evaluation_options(p, 3200, 600.0, 10)
        assert f"algo.eval.every={320 // p.images_per_step}" in options and "algo.eval.every_seconds=60.0" in options
    assert "algo.eval.extra_guidance_scales=[1]" in mc.evaluation_options(plans["nft"], 3200, 600.0, 10)
    assert mc.evaluation_options(plans["grpo"], 3200, 0, 10) == ["algo.eval.every=5"]  # tuning: no seconds marks
    with pytest.raises(SystemExit, match="not a whole number"):
        mc.evaluation_options(plans["grpo"], 3200, 600.0, 7)


@pytest.mark.parametrize("method", list(mc.METHODS))
def test_each_knob_starts_at_the_preset_s_value_and_composes_with_the_other(method):
    spec = mc.METHODS[method]
    assert len(spec.values) == 2 and spec.values[0] != spec.values[1] and spec.why

    def read(cfg):
        value = OmegaConf.select(cfg, spec.knob)
        return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        preset = compose(config_name="config", overrides=[f"experiment={spec.preset}"])
        assert read(preset) == spec.values[0]
        other = compose(config_name="config", overrides=[f"experiment={spec.preset}",
                                                         mc.override(spec.knob, spec.values[1])])
        assert read(other) == spec.values[1]
    from hydra.utils import instantiate

    instantiate(other.algo)  # the second value is a valid setting of the method


def test_validation_phrasings_are_neither_training_nor_held_out():
    train, held_out = load_prompts("digits_world_train.txt"), load_prompts("digits_world_eval.txt")
    validation = load_prompts(mc.VALIDATION_PROMPTS)
    assert len(validation) == 20

    def phrasings(prompts):
        return {p.text.rsplit(" ", 1)[0] for p in prompts}  # "a sketch of the number"

    assert phrasings(validation).isdisjoint(phrasings(train) | phrasings(held_out))
    assert {p.text.rsplit(" ", 1)[1] for p in validation} == {p.text.rsplit(" ", 1)[1] for p in held_out}


def test_fixed_points_are_read_or_the_run_does_not_count():
    records = run_records()
    assert mc.image_points(records, 3200, 10) == pytest.approx([0.5 + 0.04 * k for k in range(11)])
    assert mc.seconds_points(records, 600.0, 10) == pytest.approx([0.5] + [0.5 + 0.04 * k - 0.01 for k in range(1, 11)])
    assert mc.image_points(run_records(images_per_step=32), 3200, 10) is not None
    without_marks = run_records(marks=False)
    assert mc.seconds_points(without_marks, 600.0, 10) is None  # a run from before the protocol
    unfinished = run_records(stop_images=1600)
    assert mc.image_points(unfinished, 3200, 10) is None


def test_tuning_score_is_the_validation_accuracy_of_the_last_quarter():
    # points past 0.75 x 3200 = 2400 images: 2560, 2880, 3200 (k = 8, 9, 10)
    assert mc.tuning_score(run_records(), 3200, 10) == pytest.approx(0.5 + 0.04 * 9)
    assert mc.tuning_score(run_records(stop_images=1600), 3200, 10) is None


def test_analysis_names_the_best_and_what_is_within_noise_of_it():
    values = {
        "a": {"end_images": {0: 0.90, 1: 0.92, 2: 0.94}},
        "b": {"end_images": {0: 0.91, 1: 0.89, 2: 0.93}},  # differences to a: +0.01, -0.03, -0.01: holds 0
        "c": {"end_images": {0: 0.70, 1: 0.72, 2: 0.71}},  # -0.20, -0.20, -0.23: clearly below
    }
    summary = mc.analyse(values)
    column = summary["columns"]["end_images"]
    assert column["best"] == "a"
    assert column["versus_best"]["b"]["within_noise"] and not column["versus_best"]["c"]["within_noise"]
    assert column["versus_best"]["c"]["mean"] == pytest.approx(-0.21)
    assert summary["methods"]["a"]["end_images"]["mean"] == pytest.approx(0.92)
    assert mc.needs_more_seeds(summary) == {"a", "b"}
    text = mc.verdict(summary, {"a": "A", "b": "B", "c": "C"}, 3200, 600)
    assert text == "At 3200 images the highest mean is A's; within noise of it: B; below it beyond noise: C."


def test_a_finished_run_is_not_run_again_and_a_short_one_continues_on_marks_only(monkeypatch, tmp_path):
    launched = []
    monkeypatch.setattr(mc, "launch", lambda plan, seed, run_dir, steps, options, resume_force, threads=None:
                        launched.append((run_dir.name, steps, options, resume_force)))
    plan = mc.plan("nft")
    write(tmp_path / "done", run_records())
    write(tmp_path / "short_of_seconds", run_records(cpu=500.0))
    (tmp_path / "short_of_seconds" / "final").mkdir()
    mc.run_to_budgets(plan, 0, tmp_path / "done", 3200, 600.0, 10, [])
    assert launched == []
    with pytest.raises(ValueError):  # the stand-in launch adds nothing, so the loop would spin: stop it at once
        monkeypatch.setattr(mc, "used_budgets", lambda records, images, seconds: (_ for _ in ()).throw(
            ValueError()) if launched else False)
        mc.run_to_budgets(plan, 0, tmp_path / "short_of_seconds", 3200, 600.0, 10, ["x=1"])
    name, steps, options, resume_force = launched[0]
    assert name == "short_of_seconds" and resume_force and steps > 50
    assert options[-1] == "algo.eval.every=0" and "algo.eval.seconds_clock=cpu" in options and "x=1" in options


def test_tune_only_runs_four_settings_on_the_validation_phrasings(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(mc, "run_to_budgets", lambda plan, seed, run_dir, images, seconds, evaluations, extra,
                        threads=None: calls.append((seed, run_dir.name, seconds, extra)))
    best = "lr_0.006_beta_1"  # nft_digits: lr 3e-3 x (0.5, 2), beta (0.1, 1)
    monkeypatch.setattr(mc, "read_metrics", lambda run_dir: run_records(
        accuracy=lambda k: 0.9 if run_dir.name == best else 0.6))
    mc.main(["--out", str(tmp_path), "--methods", "nft", "--tune-only"])
    assert [c[1] for c in calls] == ["lr_0.0015_beta_0.1", "lr_0.0015_beta_1", "lr_0.006_beta_0.1", best]
    assert all(seed == mc.TUNING_SEED and seconds == 0 for seed, _, seconds, _ in calls)
    assert all("prompts.eval.file=digits_world_validation.txt" in extra for *_, extra in calls)
    choice, missing = mc.tune("nft", mc.plan("nft"), mc.argparse.Namespace(
        out=tmp_path, images=3200, evaluations=10, threads=None), [], run=False)
    assert missing == [] and choice["options"] == ["algo.optim.lr=0.006", "algo.policy_mix=1"]
    assert not (tmp_path / "results.md").exists()


def test_a_tie_within_float_rounding_keeps_the_earlier_setting_and_one_look_more_wins(monkeypatch, tmp_path):
    # AWM's real tuning: the same counts of correct looks read 0.7708333134651184 and 0.7708333532015482 (float32 means)
    scores = {"lr_0.0015_beta_1": 0.7708333134651184, "lr_0.0015_beta_0.1": 0.7708333532015482,
              "lr_0.006_beta_1": 0.7541666825612386, "lr_0.006_beta_0.1": 0.712499996026357}
    monkeypatch.setattr(mc, "read_metrics", lambda run_dir: run_records(accuracy=lambda k: scores[run_dir.name]))
    args = mc.argparse.Namespace(out=tmp_path, images=3200, evaluations=10, threads=None)
    choice, _ = mc.tune("awm", mc.plan("awm"), args, [], run=False)
    assert choice["run"] == "lr_0.0015_beta_1" and choice["options"][1] == "algo.ema_kl_beta=1"
    scores["lr_0.0015_beta_0.1"] = scores["lr_0.0015_beta_1"] + 1 / 240  # one correct look more of 3 x 80
    assert mc.tune("awm", mc.plan("awm"), args, [], run=False)[0]["run"] == "lr_0.0015_beta_0.1"


def test_a_seed_run_made_with_other_settings_than_the_tuned_ones_is_refused_and_not_tabled(monkeypatch, tmp_path):
    monkeypatch.setattr(mc, "launch", lambda *args, **kw: pytest.fail("a run with other settings was continued"))
    run_dir = tmp_path / "awm" / "seed_0"
    write(run_dir, run_records(cpu=500.0))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- experiment=awm_digits\n- seed=0\n- algo.optim.lr=0.0015\n"
                                                        "- algo.ema_policy.beta=0.1\n")
    tuned, awm = ["algo.optim.lr=0.0015", "algo.ema_kl_beta=1"], "rl.awm.AWM"
    assert mc.ran_with(run_dir, tuned[:1], awm) and not mc.ran_with(run_dir, tuned, awm)
    assert mc.ran_with(tmp_path / "awm" / "seed_1", tuned, awm)  # nothing ran there yet
    with pytest.raises(SystemExit, match="seed_0 ran with other settings than algo.optim.lr=0.0015 algo.ema_kl_beta"):
        mc.run_to_budgets(mc.plan("awm"), 0, run_dir, 3200, 600.0, 10, tuned)
    write(run_dir, run_records())  # finished, but with beta 0.1: not one of the tuned setting's seeds
    runs, missing = mc.read_runs(tmp_path, "awm", [0], 3200, 600.0, 10, None, tuned, awm)
    assert missing == [0] and runs.by_images == {}
    assert mc.read_runs(tmp_path, "awm", [0], 3200, 600.0, 10, None, tuned[:1], awm)[1] == []
    # a run launched before the rename (algo.ema_policy.beta=1) is the tuned setting's (algo.ema_kl_beta=1)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- experiment=awm_digits\n- algo.optim.lr=0.0015\n"
                                                        "- algo.ema_policy.beta=1\n")
    assert mc.read_runs(tmp_path, "awm", [0], 3200, 600.0, 10, None, tuned, awm)[1] == []
    assert mc.read_runs(tmp_path, "awm", [0], 3200, 600.0, 10, None, tuned, "rl.grpo.GRPO")[1] == [0]


def test_report_runs_nothing_and_tables_only_methods_with_every_run(monkeypatch, tmp_path):
    monkeypatch.setattr(mc, "launch", lambda *args, **kw: pytest.fail("--report launched a run"))
    for method, level in (("nft", 0.0), ("awm", -0.1)):
        plan, spec = mc.plan(method), mc.METHODS[method]
        for factor in mc.LR_FACTORS:
            for value in spec.values:
                name = f"lr_{plan.lr * factor:.3g}_{spec.folder_name}_{mc.slug(value)}"
                write(tmp_path / "tuning" / method / name, run_records())
        for seed in (0, 1, 2):
            records = run_records(accuracy=lambda k, seed=seed, level=level: 0.5 + 0.04 * k + level + 0.01 * seed)
            records.append({"step": 50, "eval_guidance_1/correct_mean": 0.3})
            write(tmp_path / method / f"seed_{seed}", records)
    write(tmp_path / "tuning" / "refl" / "lr_0.0005_stop_range_0-4", run_records(images_per_step=8))
    mc.main(["--out", str(tmp_path), "--report"])
    text = (tmp_path / "results.md").read_text()
    # end of images per seed 0.90, 0.91, 0.92: mean 0.91 +- 4.303 * 0.01 / sqrt(3) = 0.024843
    assert "| DiffusionNFT | lr 0.0015, policy_mix 0.1 | 3 | **0.910 [0.885, 0.935]** |" in text
    assert "| AWM |" in text and "| ReFL" not in text and "ReFL: 3 of its 4 tuning runs unfinished" in text
    assert "| 0.300 [0.300, 0.300] |" in text  # at the training guidance
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["summary"]["columns"]["end_images"]["best"] == "nft"
    assert not summary["summary"]["columns"]["end_images"]["versus_best"]["awm"]["within_noise"]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    for bad in (["--tune-only", "--report"], ["--report", "--seconds", "0"], ["--report", "--evaluations", "0"]):
        with pytest.raises(SystemExit):
            mc.main(["--out", str(tmp_path), *bad])


@pytest.mark.slow
def test_the_comparison_runs_end_to_end(tmp_path):
    """Two methods, tiny budgets (64 images, 20 CPU seconds, 2 evaluations each), one seed: 4 tuning runs each on the
    validation phrasings, then the compared run continued past its images until its CPU seconds are used, evaluated
    at the same points; the table, json and plot are written."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.method_comparison", "--out", str(out), "--methods", "nft", "refl",
         "--seeds", "0", "--extra-seeds", "--images", "128", "--seconds", "20", "--evaluations", "2", "--",
         f"model.world={tmp_path / 'world'}", "algo.eval.max_prompts=2", "algo.eval.images_per_prompt=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=3000,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["summary"]["methods"]) == {"nft", "refl"}
    assert (out / "accuracy.png").stat().st_size > 0 and "| DiffusionNFT" in (out / "results.md").read_text()
    assert len(list((out / "tuning" / "nft").iterdir())) == 4
    for method in ("nft", "refl"):
        logged = [json.loads(line) for line in (out / method / "seed_0" / "metrics.jsonl").read_text().splitlines()]
        assert max(r.get("train/cpu_seconds", 0) for r in logged) >= 20.0
        marks = sorted(r["eval_seconds/mark"] for r in logged if "eval_seconds/mark" in r)
        assert marks[:2] == [10, 20]  # (a continuation may pass one more mark before it stops)
