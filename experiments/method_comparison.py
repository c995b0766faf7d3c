"""Every RL method of this codebase in the digits world under one budget of sampled images and, separately, one of
training seconds, over seeds: the compute-matched comparison the papers do not publish.

    python -m experiments.method_comparison --out outputs/method_comparison            # 10 methods x seeds 0 1 2
    python -m experiments.method_comparison --out DIR --methods nft refl --seeds 0      # a part of it
    python -m experiments.method_comparison --out DIR --tune                            # tune each first, then compare
    python -m experiments.method_comparison --out DIR --tune-only --threads 1 --methods grpo ddpo   # tuning runs only
    python -m experiments.method_comparison --out DIR --tune --report                   # the finished runs, run nothing

Each (method, seed) runs its digits preset (`python -m rl.run experiment=<preset> seed=<s>
hydra.run.dir=<out>/<method>/seed_<s>`), one run at a time so that seconds compare, until it has used both budgets:
`--images` sampled training images and `--seconds` of training wall time (`train/seconds`: held-out evaluations and
checkpoints are left out). A run that reaches its image budget first is continued (a resume with more steps) until
its seconds are used too, so one run serves both tables. A run whose `metrics.jsonl` shows both budgets used counts
as finished from that file alone: the runs behind the README's table are kept that way in
`experiments/results/method_comparison/` (metrics and Hydra overrides, no weights), so `--out` pointed there re-makes
the table without training, and a run whose folder is deleted is run again. Every method is evaluated the same way (its preset's
held-out evaluation: 20 held-out phrasings x 4 images, 10 ODE steps, guidance 4.5, fixed seeds) about `--evaluations`
times per image budget. Finished runs are reused; an interrupted one resumes from its checkpoint.

With `--tune`, each method first tries the same number of settings (its preset's learning rate times 1/3, 1 and 3) on
a tuning seed (100, not one of the compared seeds) under the image budget, and keeps the one whose *training* reward
(the training phrasings) is highest over the last quarter of the budget: the held-out prompts play no part in the
choice. Without `--tune` the presets run as they are.

Prints and writes into `--out`: `results.md` and `results.json` (per method and budget: held-out accuracy at the end
of the budget and the best within it, mean +- std over seeds, and the images or seconds needed to first reach 0.8
and 0.9, with how many seeds reached them) and `accuracy.png` (held-out accuracy against images and against seconds,
each method's mean with a band of one std over seeds). A method is in the table with all its seeds or not at all:
one with a tuning run or a seed unfinished (with `--report`, which runs nothing and reads what `--out` holds) is
named under the table as such.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rl.tracking import read_metrics

ACCURACY, TRAIN_REWARD = "eval/correct_mean", "train/reward_mean"
THRESHOLDS = (0.8, 0.9)
TUNING_SEED = 100
LR_FACTORS = (1 / 3, 1.0, 3.0)  # the tuning search: the same tries for every method
# method -> (digits preset, label)
METHODS = {
    "grpo": ("grpo_digits", "GRPO"),
    "grpo_guard": ("grpo_guard_digits", "GRPO-Guard"),
    "mixgrpo": ("mixgrpo_digits", "MixGRPO"),
    "mixgrpo_flash": ("mixgrpo_flash_digits", "MixGRPO-Flash"),
    "ddpo": ("ddpo_digits", "DDPO"),
    "dpo_online": ("dpo_online_digits", "online DPO"),
    "refl": ("refl_digits", "ReFL"),
    "draft": ("draft_digits", "DRaFT"),
    "nft": ("nft_digits", "DiffusionNFT"),
    "awm": ("awm_digits", "AWM"),
}


@dataclass(frozen=True)
class Plan:
    """How a method's preset counts: images per step, the option that sets the steps, its learning rate."""

    method: str
    preset: str
    images_per_step: int
    steps_option: str  # algo.epochs or algo.train.max_steps
    lr: float


def plan(method: str) -> Plan:
    """Compose the method's preset (without running anything) and read how it counts."""
    from hydra import compose, initialize_config_dir

    preset = METHODS[method][0]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        algo = compose(config_name="config", overrides=[f"experiment={preset}"]).algo
    if "sampling" in algo:  # the online methods count epochs of prompts x images
        return Plan(method, preset, algo.sampling.prompts_per_epoch * algo.sampling.images_per_prompt, "algo.epochs",
                    algo.optim.lr)
    return Plan(method, preset, algo.train.batch_size, "algo.train.max_steps", algo.optim.lr)  # ReFL, DRaFT


def launch(plan: Plan, seed: int, run_dir: Path, steps: int, eval_every: int, extra: list[str],
           resume_force: bool, threads: int | None = None) -> None:
    command = [sys.executable, "-m", "rl.run", f"experiment={plan.preset}", f"seed={seed}", f"hydra.run.dir={run_dir}",
               f"{plan.steps_option}={steps}", f"algo.eval.every={eval_every}", *extra]
    if resume_force:  # more steps than the run was started with: continue it
        command.append("algo.checkpoint.resume=force")
    subprocess.run(command, check=True, env=child_env(threads))


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of a run: this one, with `OMP_NUM_THREADS=threads` (torch's intra-op threads) when given."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def last(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else 0.0


def used_budgets(records: list[dict], images: int, seconds: float) -> bool:
    """Whether a run's records show `images` sampled and `seconds` trained (False for no records)."""
    return bool(records) and last(records, "train/samples") >= images and last(records, "train/seconds") >= seconds


def run_to_budgets(plan: Plan, seed: int, run_dir: Path, images: int, seconds: float, evaluations: int,
                   extra: list[str], threads: int | None = None) -> None:
    """Run (or resume, or continue) one seed until it has sampled `images` and trained `seconds`."""
    steps = math.ceil(images / plan.images_per_step)
    eval_every = max(1, round(steps / evaluations))
    if used_budgets(read_metrics(run_dir), images, seconds):  # finished: its metrics.jsonl alone is enough
        return
    if not (run_dir / "final").exists():  # a new run, or one interrupted before its first end: run (or resume) it
        launch(plan, seed, run_dir, steps, eval_every, extra, resume_force=False, threads=threads)
    for _ in range(5):  # continue until both budgets are used (the rate is measured, so this rarely loops twice)
        records = read_metrics(run_dir)
        if used_budgets(records, images, seconds):
            return
        done = max(r["step"] for r in records)  # epochs or optimiser steps
        used_seconds = last(records, "train/seconds")
        more = 0
        if used_seconds < seconds:  # at the measured rate (a run without train/seconds, from before it was logged: x2)
            more = math.ceil((seconds - used_seconds) / (used_seconds / done)) + 1 if used_seconds > 0 else done
        launch(plan, seed, run_dir, max(steps, done + more), eval_every, extra, resume_force=True, threads=threads)


# -------------------------------------------------------------------------------------------------------- reading


def evaluations_of(records: list[dict]) -> list[tuple[float, float, float]]:
    """`(images, seconds, held-out accuracy)` at each held-out evaluation (0, 0, start at step 0)."""
    images, seconds = {0: 0.0}, {0: 0.0}
    for r in records:
        if "train/samples" in r:
            images[r["step"]] = r["train/samples"]
        if "train/seconds" in r:
            seconds[r["step"]] = r["train/seconds"]
    points = {r["step"]: r[ACCURACY] for r in records if ACCURACY in r}
    return [(images[s], seconds[s], value) for s, value in sorted(points.items()) if s in images and s in seconds]


def within(points: list[tuple[float, float, float]], axis: int, budget: float) -> list[tuple[float, float]]:
    """`(x, accuracy)` of the evaluations at or before `budget` on `axis` (0: images, 1: seconds)."""
    return [(p[axis], p[2]) for p in points if p[axis] <= budget + 1e-9]


def first_reach(curve: list[tuple[float, float]], threshold: float) -> float | None:
    """The x of the first evaluation at or above `threshold`, None if none is.

    Accuracies are logged as float32 (72/80 is stored as 0.89999998), so a value within 1e-6 of the threshold,
    far below one held-out image's share, counts as reaching it."""
    return next((x for x, value in curve if value >= threshold - 1e-6), None)


def value_at(curve: list[tuple[float, float]], x: float) -> float:
    """The accuracy of the latest evaluation at or before `x` (the model one would have at that point)."""
    return [value for cx, value in curve if cx <= x + 1e-9][-1]


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(label: str, runs: list[list[tuple[float, float, float]]], axis: int, budget: float) -> dict:
    """One method under one budget: end and best accuracy (mean +- std over seeds), the x needed to reach each
    threshold (the mean over the seeds that reached it, and how many did), and the mean curve on a common grid."""
    curves = [within(points, axis, budget) for points in runs]
    reach = {}
    for threshold in THRESHOLDS:
        xs = [first_reach(c, threshold) for c in curves]
        hit = [x for x in xs if x is not None]
        reach[str(threshold)] = {"mean": statistics.mean(hit) if hit else None, "reached": len(hit), "of": len(xs)}
    grid = sorted({x for c in curves for x, _ in c}) if axis == 0 else [budget * k / 40 for k in range(41)]
    values = [[value_at(c, x) for c in curves] for x in grid]
    return {
        "label": label,
        "end": mean_std([c[-1][1] for c in curves]),
        "best": mean_std([max(v for _, v in c) for c in curves]),
        "reach": reach,
        "curve": {"x": grid, "mean": [statistics.mean(v) for v in values],
                  "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]},
    }


def tuning_score(records: list[dict], images: int) -> float:
    """The mean training reward over the last quarter of the image budget (training phrasings only)."""
    values = [r[TRAIN_REWARD] for r in records if TRAIN_REWARD in r and r.get("train/samples", 0) > 0.75 * images]
    return statistics.mean(values) if values else -math.inf


# --------------------------------------------------------------------------------------------------------- output


def markdown(rows: list[tuple[str, dict, dict, str]], images: int, seconds: float) -> str:
    def cell(stat: dict) -> str:
        return f"{stat['mean']:.3f} +- {stat['std']:.3f}"

    def reach(stat: dict, unit: str) -> str:
        if not stat["reached"]:
            return "not reached"
        return f"{stat['mean']:.0f} {unit} ({stat['reached']}/{stat['of']})"

    lines = [f"| method | settings | accuracy at {images} images | best | images to 0.8 | images to 0.9 | "
             f"accuracy at {seconds:.0f} s | best | seconds to 0.8 | seconds to 0.9 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, by_images, by_seconds, settings in rows:
        lines.append(
            f"| {label} | {settings} | **{cell(by_images['end'])}** | {cell(by_images['best'])} | "
            f"{reach(by_images['reach']['0.8'], 'images')} | {reach(by_images['reach']['0.9'], 'images')} | "
            f"**{cell(by_seconds['end'])}** | {cell(by_seconds['best'])} | "
            f"{reach(by_seconds['reach']['0.8'], 's')} | {reach(by_seconds['reach']['0.9'], 's')} |")
    return "\n".join(lines)


def plot(path: Path, by_images: list[dict], by_seconds: list[dict], cores: str = "2 CPU cores") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, summaries, xlabel in ((axes[0], by_images, "sampled training images"),
                                  (axes[1], by_seconds, f"training seconds ({cores})")):
        for s in summaries:
            c = s["curve"]
            line, = ax.plot(c["x"], c["mean"], label=s["label"])
            ax.fill_between(c["x"], [m - d for m, d in zip(c["mean"], c["std"])],
                            [m + d for m, d in zip(c["mean"], c["std"])], color=line.get_color(), alpha=0.15)
        for threshold in THRESHOLDS:
            ax.axhline(threshold, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (mean +- std over seeds)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/method_comparison"), help="parent of the run dirs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=3200, help="sampled training images per run")
    parser.add_argument("--seconds", type=float, default=600.0, help="training seconds per run")
    parser.add_argument("--evaluations", type=int, default=10, help="held-out evaluations per image budget")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of every run (default: inherited; 1 lets two comparisons share 2 cores)")
    parser.add_argument("--tune", action="store_true", help="choose each method's learning rate first (see above)")
    parser.add_argument("--tune-only", action="store_true",
                        help="only the tuning runs (their images, not their seconds, count: they may share the CPU); "
                             "a later --tune reuses them")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: the table, json and plot of the finished runs in --out (a method with a "
                             "tuning run or seed unfinished is listed as such and left out)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every rl.run (after --)")
    args = parser.parse_args(argv)

    if args.report and args.tune_only:
        parser.error("--report reads finished runs and --tune-only makes tuning runs: give one of them")

    rows, by_images, by_seconds, chosen, pending = [], [], [], {}, []
    for method in args.methods:
        method_plan, label = plan(method), METHODS[method][1]
        extra, settings = list(args.overrides), "preset"
        if args.tune or args.tune_only:
            scores = {}
            for factor in LR_FACTORS:
                lr = method_plan.lr * factor
                run_dir = args.out / "tuning" / method / f"lr_{lr:.3g}"
                if not args.report:
                    run_to_budgets(method_plan, TUNING_SEED, run_dir, args.images, 0, args.evaluations,
                                   [*extra, f"algo.optim.lr={lr}"], args.threads)
                records = read_metrics(run_dir)
                if used_budgets(records, args.images, 0):
                    scores[lr] = tuning_score(records, args.images)
            if len(scores) < len(LR_FACTORS):  # only with --report (or a run that could not finish)
                pending.append(f"{label}: tuning, {len(scores)} of {len(LR_FACTORS)} runs finished")
                continue
            best_lr = max(scores, key=scores.get)
            extra, settings = [*extra, f"algo.optim.lr={best_lr}"], f"lr {best_lr:.3g}"
            chosen[method] = {"lr": best_lr, "training_reward_by_lr": {f"{k:.3g}": v for k, v in scores.items()}}
        if args.tune_only:
            continue
        runs = []
        for seed in args.seeds:
            run_dir = args.out / method / f"seed_{seed}"
            if not args.report:
                run_to_budgets(method_plan, seed, run_dir, args.images, args.seconds, args.evaluations, extra,
                               args.threads)
            records = read_metrics(run_dir)
            if used_budgets(records, args.images, args.seconds):
                runs.append(evaluations_of(records))
        if len(runs) < len(args.seeds):
            pending.append(f"{label}: {len(runs)} of {len(args.seeds)} seeds finished")
            continue
        by_images.append(summarise(label, runs, 0, args.images))
        by_seconds.append(summarise(label, runs, 1, args.seconds))
        rows.append((f"{label}, `experiment={method_plan.preset}`", by_images[-1], by_seconds[-1], settings))

    if args.tune_only:
        (args.out / "tuning").mkdir(parents=True, exist_ok=True)
        record = args.out / "tuning" / "tuned.json"  # merged: several --tune-only runs may share one --out
        with open(args.out / "tuning" / ".tuned.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time, so that no run's choices are lost
            merged = {**(json.loads(record.read_text()) if record.exists() else {}), **chosen}
            record.write_text(json.dumps(merged, indent=1))
        print(json.dumps(chosen, indent=1))
        return
    text = markdown(rows, args.images, args.seconds)
    if pending:  # every seed of a method, or none of it: a method's row is never the mean of fewer seeds
        text += "\n\nNot finished yet, left out of the table: " + "; ".join(pending) + "."
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"images": args.images, "seconds": args.seconds, "seeds": args.seeds, "threads": args.threads, "tuned": chosen,
         "by_images": by_images, "by_seconds": by_seconds, "pending": pending}, indent=1))
    cores = "2 CPU cores" if args.threads is None else f"{args.threads} thread{'s' * (args.threads > 1)} per run"
    written = [args.out / "results.md", args.out / "results.json"]
    if rows:  # nothing to draw while no method has all its seeds
        plot(args.out / "accuracy.png", by_images, by_seconds, cores)
        written.append(args.out / "accuracy.png")
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
