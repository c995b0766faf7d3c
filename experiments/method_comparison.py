"""Every RL method of this codebase in the digits world under one protocol: the same tuning effort, the same
evaluation points, budgets of sampled images and of CPU seconds, seeds with confidence intervals (`docs/comparison.md`
states the protocol and reads the results).

    python -m experiments.method_comparison                                  # the whole protocol, all methods
    python -m experiments.method_comparison --methods nft refl --threads 1   # a part of it (two drivers share 2 cores)
    python -m experiments.method_comparison --tune-only --methods grpo       # the tuning runs only
    python -m experiments.method_comparison --report                         # the finished runs' table; runs nothing

The protocol, the same for every method:
1. **Tuning**: 4 runs per method on seed 100 (not a compared seed) under the image budget: the preset's learning rate
   times 0.5 and 2, crossed with two values of one method-specific knob named in advance (`METHODS`; the first value is
   the preset's). The runs are evaluated on the *validation* phrasings (`digits_world_validation.txt`: neither the
   training nor the held-out phrasings) and the setting with the highest validation accuracy over the last quarter of
   the image budget is kept; a tie (within float rounding, `TIE`) keeps the earlier setting of the grid. The held-out
   prompts play no part in any choice.
2. **Compared runs**: each method with its chosen setting on seeds 0, 1, 2, each until it has sampled `--images`
   training images *and* trained `--seconds` seconds of its process's CPU time (`train/cpu_seconds`: other work on the
   machine changes it little; held-out evaluations and checkpoints are not counted). Methods within noise of the
   best at a budget's end (step 4) get two more seeds (3, 4), and so does the best.
3. **Evaluation points**: held-out accuracy (20 held-out phrasings x 4 images, 10 ODE steps, guidance 4.5, fixed
   seeds) after every `--images / --evaluations` images (the image table) and at every `--seconds / --evaluations`
   CPU seconds, of the weights of the last step that ended by then (the seconds table, `algo.eval.every_seconds`):
   the same 11 points for every method in each table, so "best" is the best of the same number of looks. Methods that
   train at another guidance than the evaluation's (DiffusionNFT and AWM, 1) are also evaluated at it.
4. **Statistics**: per method, the mean over seeds with a 95% Student-t interval; each method against the best by
   the t interval of their per-seed differences on their shared seeds (paired), "within noise" where it holds 0
   (`experiments/seed_statistics.py` says why not the percentile bootstrap).

Each run is `python -m rl.run experiment=<preset> seed=<s> hydra.run.dir=<out>/<method>/seed_<s> ...`, one run per
driver at a time. A run whose `metrics.jsonl` shows both budgets used counts as finished from that file alone, so the
committed runs (metrics and Hydra overrides, no weights) re-make the table with `--report`, and an interrupted run
resumes from its checkpoint. Writes `results.md`, `results.json` and `accuracy.png` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments.seed_statistics import Interval, interval, paired_difference, within_noise
from rl.legacy import current_override
from rl.tracking import read_metrics

ACCURACY = "eval/correct_mean"  # held-out accuracy at the image points (or the validation accuracy when tuning)
SECONDS_ACCURACY = "eval_seconds/correct_mean"  # at the seconds marks
CLOCK = "train/cpu_seconds"
TUNING_SEED = 100
VALIDATION_PROMPTS = "digits_world_validation.txt"
LR_FACTORS = (0.5, 2.0)
# Validation accuracies are counts of correct looks logged as float32 means: two settings with the same counts can
# differ by ~1e-7 of rounding, while one correct look more moves the score (the mean of 3 evaluations of 80 looks at
# the default budget) by 1/240.
TIE = 1e-6
BASE_SEEDS = (0, 1, 2)
EXTRA_SEEDS = (3, 4)
DEFAULT_OUT = Path("results/method_comparison")


@dataclass(frozen=True)
class Method:
    """A method's digits preset, its label and its knob: an override and two values, the preset's first."""

    preset: str
    label: str
    knob: str
    values: tuple
    why: str  # why this knob: the one the method's own papers or presets vary, or a known weakness of the preset
    folder: str = ""  # the knob's name in the tuning runs' folders, if not its last part (named before a rename)

    @property
    def folder_name(self) -> str:
        return self.folder or self.knob.rsplit(".", 1)[-1]


METHODS = {
    "grpo": Method("grpo_digits", "GRPO", "algo.sampling.noise_level", (0.7, 1.0),
                   "the SDE's exploration (Flow-GRPO 0.7; DanceGRPO-style samplers higher)"),
    "grpo_guard": Method("grpo_guard_digits", "GRPO-Guard", "algo.ppo.clip_range", (2e-6, 0.2),
                         "Guard's SD3.5 clip clips most samples here; 0.2 is the world's GRPO clip"),
    "mixgrpo": Method("mixgrpo_digits", "MixGRPO", "algo.sampling.sde_window_stride", (1, 0),
                      "the window sliding away from the early steps, or fixed there (Flash*'s choice)"),
    "mixgrpo_flash": Method("mixgrpo_flash_digits", "MixGRPO-Flash", "algo.sampling.sde_window_stride", (1, 0),
                            "as MixGRPO: sliding or fixed window"),
    "ddpo": Method("ddpo_digits", "DDPO", "algo.sampling.noise_level", (0.7, 1.0), "as GRPO: the SDE's exploration"),
    "dpo_online": Method("dpo_online_digits", "online DPO", "algo.beta", (1000.0, 100.0),
                         "DPO's beta: the world's preset, or Flow-GRPO's online DPO on SD3.5"),
    "refl": Method("refl_digits", "ReFL", "algo.refl.stop_range", ([0, 4], [5, 9]),
                   "where the one gradient step is: early (the preset) or late (as ImageReward's last quarter)"),
    "draft": Method("draft_digits", "DRaFT", "algo.refl.k", (10, 1),
                    "K: all steps (the preset) or DRaFT-1, the paper's usual best"),
    "nft": Method("nft_digits", "DiffusionNFT", "algo.policy_mix", (0.1, 1.0),
                  "DiffusionNFT's beta: its OCR and GenEval values", folder="beta"),
    "awm": Method("awm_digits", "AWM", "algo.ema_kl_beta", (1.0, 0.1),
                  "the weight of the KL to the trailing copy (AWM: 1)", folder="beta"),
}


def show(value) -> str:
    """A knob's value as Hydra reads it on the command line: `[0,4]`, `0.1`, `2e-06`, `10`."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def slug(value) -> str:
    """A knob's value in a run folder's name (Hydra's run dir takes no brackets): `0-4`, `0.1`."""
    return show(value).strip("[]").replace(",", "-")


def override(knob: str, value) -> str:
    return f"{knob}={show(value)}"


@dataclass(frozen=True)
class Plan:
    """How a method's preset counts: images per step, the option that sets the steps, its learning rate, and the
    guidance it trains at when that differs from the held-out evaluation's (else None)."""

    method: str
    preset: str
    images_per_step: int
    steps_option: str  # algo.epochs or algo.train.max_steps
    lr: float
    target: str  # the algorithm's config class (`rl.nft.NFT`): which of its options were renamed (rl/legacy.py)
    training_guidance: float | None = None


def plan(method: str) -> Plan:
    """Compose the method's preset (without running anything) and read how it counts."""
    from hydra import compose, initialize_config_dir

    preset = METHODS[method].preset
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        algo = compose(config_name="config", overrides=[f"experiment={preset}"]).algo
    if "sampling" in algo:  # the online methods count epochs of prompts x images
        guidance = algo.sampling.guidance_scale
        return Plan(method, preset, algo.sampling.prompts_per_epoch * algo.sampling.images_per_prompt, "algo.epochs",
                    algo.optim.lr, algo._target_, guidance if guidance != algo.eval.guidance_scale else None)
    guidance = algo.refl.guidance_scale  # ReFL, DRaFT
    return Plan(method, preset, algo.train.batch_size * algo.train.gradient_accumulation_steps, "algo.train.max_steps",
                algo.optim.lr, algo._target_, guidance if guidance != algo.eval.guidance_scale else None)


# ------------------------------------------------------------------------------------------------------- running


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of a run: this one, with `OMP_NUM_THREADS=threads` (torch's intra-op threads) when given."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def launch(plan: Plan, seed: int, run_dir: Path, steps: int, options: list[str], resume_force: bool,
           threads: int | None = None) -> None:
    command = [sys.executable, "-m", "rl.run", f"experiment={plan.preset}", f"seed={seed}", f"hydra.run.dir={run_dir}",
               f"{plan.steps_option}={steps}", *options]
    if resume_force:  # more steps than the run was started with: continue it
        command.append("algo.checkpoint.resume=force")
    subprocess.run(command, check=True, env=child_env(threads))


def last(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else 0.0


def used_budgets(records: list[dict], images: int, seconds: float) -> bool:
    """Whether a run's records show `images` sampled and `seconds` of CPU time trained (False for no records)."""
    return bool(records) and last(records, "train/samples") >= images and last(records, CLOCK) >= seconds


def evaluation_options(plan: Plan, images: int, seconds: float, evaluations: int) -> list[str]:
    """The held-out evaluation's cadence: every `images / evaluations` images (a whole number of the method's steps),
    at every `seconds / evaluations` CPU seconds when there is a seconds budget, and at the training guidance."""
    spacing = images // evaluations
    if images % evaluations or spacing % plan.images_per_step:
        raise SystemExit(f"error: {images} images in {evaluations} evaluations is not a whole number of "
                         f"{plan.method}'s {plan.images_per_step}-image steps apart")
    options = [f"algo.eval.every={spacing // plan.images_per_step}"]
    if seconds > 0:  # the spacing in full (repr), so that the last mark is the budget to the 6th decimal
        options += [f"algo.eval.every_seconds={seconds / evaluations!r}", "algo.eval.seconds_clock=cpu"]
    if plan.training_guidance is not None:
        options.append(f"algo.eval.extra_guidance_scales=[{plan.training_guidance:g}]")
    return options


def ran_with(run_dir: Path, options: list[str], target: str = "") -> bool:
    """Whether the run in `run_dir` was launched with every one of `options` (True where nothing ran yet), both read
    in today's spelling of the algorithm `target`'s options (a run launched before a rename still counts)."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.exists():
        return True
    given = {current_override(line.removeprefix("- ").strip(), target) for line in overrides.read_text().splitlines()}
    return all(current_override(option, target) in given for option in options)


def run_to_budgets(plan: Plan, seed: int, run_dir: Path, images: int, seconds: float, evaluations: int,
                   extra: list[str], threads: int | None = None) -> None:
    """Run (or resume, or continue) one seed until it has sampled `images` and trained `seconds` CPU seconds. Past
    the image budget, only the seconds marks are evaluated."""
    if not ran_with(run_dir, extra, plan.target):
        raise SystemExit(f"{run_dir} ran with other settings than {' '.join(extra)} (a tuning choice changed since?): "
                         "move it away and run again")
    steps = math.ceil(images / plan.images_per_step)
    options = [*evaluation_options(plan, images, seconds, evaluations), *extra]
    if used_budgets(read_metrics(run_dir), images, seconds):  # finished: its metrics.jsonl alone is enough
        return
    if not (run_dir / "final").exists():  # a new run, or one interrupted before its first end: run (or resume) it
        launch(plan, seed, run_dir, steps, options, resume_force=False, threads=threads)
    for _ in range(5):  # continue until the seconds are used (the rate is measured, so this rarely loops twice)
        records = read_metrics(run_dir)
        if used_budgets(records, images, seconds):
            return
        done = max(r["step"] for r in records)  # epochs or optimiser steps
        used = last(records, CLOCK)
        more = math.ceil((seconds - used) / (used / done)) + 1 if used > 0 else done
        launch(plan, seed, run_dir, max(steps, done + more), [*options, "algo.eval.every=0"], resume_force=True,
               threads=threads)


# -------------------------------------------------------------------------------------------------------- reading


def values_by_images(records: list[dict], key: str) -> dict[int, float]:
    """`key`'s value by the sampled images of the step it was logged at."""
    samples = {0: 0}
    for r in records:
        if "train/samples" in r:
            samples[r["step"]] = r["train/samples"]
    return {samples[r["step"]]: r[key] for r in records if key in r and r["step"] in samples}


def image_points(records: list[dict], images: int, evaluations: int) -> list[float] | None:
    """Held-out accuracy at 0, 1, ..., `evaluations` x `images / evaluations` sampled images; None when one is
    missing (a run not made under this protocol, or unfinished)."""
    at = values_by_images(records, ACCURACY)
    wanted = [images * k // evaluations for k in range(evaluations + 1)]
    return [at[x] for x in wanted] if all(x in at for x in wanted) else None


def seconds_points(records: list[dict], seconds: float, evaluations: int) -> list[float] | None:
    """Held-out accuracy at 0 (the base model) and at each of the `evaluations` marks of `seconds / evaluations` CPU
    seconds; None when one is missing."""
    start = [r[ACCURACY] for r in records if r.get("step") == 0 and ACCURACY in r]
    at = {round(r["eval_seconds/mark"], 6): r[SECONDS_ACCURACY] for r in records if SECONDS_ACCURACY in r}
    wanted = [round(seconds * k / evaluations, 6) for k in range(1, evaluations + 1)]
    if not start or not all(x in at for x in wanted):
        return None
    return [start[0], *(at[x] for x in wanted)]


def tuning_score(records: list[dict], images: int, evaluations: int) -> float | None:
    """The mean validation accuracy at the image points past three quarters of the budget; None if unfinished."""
    points = image_points(records, images, evaluations)
    if points is None:
        return None
    late = [value for k, value in enumerate(points) if images * k / evaluations > 0.75 * images]
    return sum(late) / len(late)


@dataclass
class Runs:
    """A method's finished compared runs: per seed, the accuracy at the image points and at the seconds marks, and at
    the training guidance at the end of the image budget (None for methods evaluated at their training guidance)."""

    by_images: dict[int, list[float]]
    by_seconds: dict[int, list[float]]
    at_training_guidance: dict[int, float]


def read_runs(out: Path, method: str, seeds: list[int], images: int, seconds: float, evaluations: int,
              guidance: float | None, options: list[str], target: str = "") -> tuple[Runs, list[int]]:
    """The finished runs among `seeds` made with `options`, and the seeds not finished (or made with others)."""
    runs, missing = Runs({}, {}, {}), []
    for seed in seeds:
        run_dir = out / method / f"seed_{seed}"
        if not ran_with(run_dir, options, target):
            missing.append(seed)
            continue
        records = read_metrics(run_dir)
        by_images = image_points(records, images, evaluations)
        by_seconds = seconds_points(records, seconds, evaluations)
        if not used_budgets(records, images, seconds) or by_images is None or by_seconds is None:
            missing.append(seed)
            continue
        runs.by_images[seed], runs.by_seconds[seed] = by_images, by_seconds
        if guidance is not None:  # the accuracy at the training guidance at the end of the image budget
            at = values_by_images(records, f"eval_guidance_{guidance:g}/correct_mean")
            if images in at:
                runs.at_training_guidance[seed] = at[images]
    return runs, missing


# ------------------------------------------------------------------------------------------------------ analysis

COLUMNS = ("end_images", "best_images", "end_seconds", "best_seconds")


def per_seed(runs: Runs) -> dict[str, dict[int, float]]:
    """Each table column's value per seed: the end of each budget and the best of its 11 points."""
    return {"end_images": {s: v[-1] for s, v in runs.by_images.items()},
            "best_images": {s: max(v) for s, v in runs.by_images.items()},
            "end_seconds": {s: v[-1] for s, v in runs.by_seconds.items()},
            "best_seconds": {s: max(v) for s, v in runs.by_seconds.items()}}


def analyse(values: dict[str, dict[str, dict[int, float]]]) -> dict:
    """Per method and column: the mean with its interval; per column: the best method (highest mean) and each other
    method's paired difference to it, and whether that is within noise."""
    summary = {"methods": {}, "columns": {}}
    for method, columns in values.items():
        summary["methods"][method] = {c: interval(list(v.values())).as_dict() for c, v in columns.items() if v}
    for column in COLUMNS:
        present = {m: v[column] for m, v in values.items() if v.get(column)}
        if not present:
            continue
        best = max(present, key=lambda m: sum(present[m].values()) / len(present[m]))
        versus = {}
        for method, seeds in present.items():
            if method != best:
                difference = paired_difference(seeds, present[best])
                versus[method] = {**difference.as_dict(), "within_noise": within_noise(difference)}
        summary["columns"][column] = {"best": best, "versus_best": versus}
    return summary


def needs_more_seeds(summary: dict) -> set[str]:
    """The methods that get the extra seeds: the best at either budget's end and every method within noise of it."""
    chosen = set()
    for column in ("end_images", "end_seconds"):
        if column in summary["columns"]:
            entry = summary["columns"][column]
            chosen.add(entry["best"])
            chosen.update(m for m, d in entry["versus_best"].items() if d["within_noise"])
    return chosen


# --------------------------------------------------------------------------------------------------------- output


def cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def markdown(summary: dict, labels: dict[str, str], settings: dict[str, str], guidance: dict[str, Interval],
             images: int, seconds: float, evaluations: int) -> str:
    def versus(method: str, column: str) -> str:
        entry = summary["columns"][column]
        if method == entry["best"]:
            return "best"
        d = entry["versus_best"][method]
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" + (" within noise" if d["within_noise"] else "")

    looks = f"best of {evaluations + 1} looks"
    header = (f"| method | tuned setting | seeds | accuracy at {images} images | {looks} | vs best | accuracy "
              f"at {seconds:.0f} CPU s | {looks} | vs best | at training guidance ({images} images) |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = sorted(summary["methods"], key=lambda m: -summary["methods"][m]["end_images"]["mean"])
    for method in order:
        stats = summary["methods"][method]
        trained = cell(guidance[method].as_dict()) if method in guidance else "(the same)"
        lines.append(f"| {labels[method]} | {settings[method]} | {stats['end_images']['seeds']} | "
                     f"**{cell(stats['end_images'])}** | {cell(stats['best_images'])} | {versus(method, 'end_images')} "
                     f"| **{cell(stats['end_seconds'])}** | {cell(stats['best_seconds'])} | "
                     f"{versus(method, 'end_seconds')} | {trained} |")
    return "\n".join(lines)


def verdict(summary: dict, labels: dict[str, str], images: int, seconds: float) -> str:
    """What the ranking is sure of, per budget, in words."""
    out = []
    for column, budget in (("end_images", f"{images} images"), ("end_seconds", f"{seconds:.0f} CPU seconds")):
        entry = summary["columns"].get(column)
        if entry is None:
            continue
        tied = [labels[m] for m, d in entry["versus_best"].items() if d["within_noise"]]
        below = [labels[m] for m, d in entry["versus_best"].items() if not d["within_noise"]]
        text = f"At {budget} the highest mean is {labels[entry['best']]}'s"
        text += f"; within noise of it: {', '.join(tied)}" if tied else "; no other method is within noise of it"
        text += f"; below it beyond noise: {', '.join(below)}." if below else "."
        out.append(text)
    return " ".join(out)


def plot(path: Path, curves: dict[str, tuple[list[list[float]], list[list[float]]]],
         images: int, seconds: float, evaluations: int) -> None:
    """Mean held-out accuracy with its bootstrap band at the fixed points, against images and CPU seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    grids = ([images * k / evaluations for k in range(evaluations + 1)],
             [seconds * k / evaluations for k in range(evaluations + 1)])
    for label, (by_images, by_seconds) in curves.items():
        for ax, grid, series in ((axes[0], grids[0], by_images), (axes[1], grids[1], by_seconds)):
            stats = [interval([run[k] for run in series]) for k in range(len(grid))]
            line, = ax.plot(grid, [s.mean for s in stats], marker=".", label=label)
            ax.fill_between(grid, [s.low for s in stats], [s.high for s in stats], color=line.get_color(), alpha=0.12)
    axes[0].set_xlabel("sampled training images")
    axes[1].set_xlabel("training CPU seconds (one core)")
    axes[0].set_ylabel("held-out accuracy (mean, 95% bootstrap band over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main


def tune(method: str, base: Plan, args, extra: list[str], run: bool) -> tuple[dict | None, list[str]]:
    """Run (with `run`) and read the method's 4 tuning runs: the chosen overrides with every run's validation
    accuracy, or None and the runs unfinished."""
    spec = METHODS[method]
    knob = spec.knob.rsplit(".", 1)[-1]
    scores, chosen, missing = {}, None, []
    for factor in LR_FACTORS:
        for value in spec.values:
            lr = base.lr * factor
            name = f"lr_{lr:.3g}_{spec.folder_name}_{slug(value)}"
            run_dir = args.out / "tuning" / method / name
            options = [f"algo.optim.lr={lr:g}", override(spec.knob, value)]
            if run:
                run_to_budgets(base, TUNING_SEED, run_dir, args.images, 0, args.evaluations,
                               [*extra, *options, f"prompts.eval.file={VALIDATION_PROMPTS}"], args.threads)
            score = tuning_score(read_metrics(run_dir), args.images, args.evaluations)
            if score is None:
                missing.append(name)
                continue
            scores[name] = score
            if chosen is None or score > scores[chosen["run"]] + TIE:  # a tie keeps the earlier setting of the grid
                chosen = {"run": name, "options": options, "setting": f"lr {lr:.3g}, {knob} {show(value)}"}
    if missing:
        return None, missing
    return {**chosen, "validation_accuracy": scores}, []


def read_method(out: Path, plan: Plan, options: list[str], args) -> tuple[Runs | None, list[int]]:
    """A method's finished base seeds made with the tuned `options`, with its extra seeds once all of them are in;
    None and the unfinished base seeds if any is."""
    runs, missing = read_runs(out, plan.method, args.seeds, args.images, args.seconds, args.evaluations,
                              plan.training_guidance, options, plan.target)
    if missing:
        return None, missing
    more, more_missing = read_runs(out, plan.method, args.extra_seeds, args.images, args.seconds, args.evaluations,
                                   plan.training_guidance, options, plan.target)
    if args.extra_seeds and not more_missing:
        for part in ("by_images", "by_seconds", "at_training_guidance"):
            getattr(runs, part).update(getattr(more, part))
    return runs, []


def report(args, plans: dict[str, Plan]) -> tuple[dict, dict, dict, list[str]]:
    """Read every method's tuning and compared runs in `args.out`: the chosen settings, the finished runs, the
    analysis, and what is unfinished."""
    chosen, runs_of, pending = {}, {}, []
    for method in METHODS:
        choice, missing = tune(method, plans[method], args, list(args.overrides), run=False)
        if choice is None:
            pending.append(f"{METHODS[method].label}: {len(missing)} of its 4 tuning runs unfinished")
            continue
        chosen[method] = choice
        runs, missing = read_method(args.out, plans[method], [*args.overrides, *choice["options"]], args)  # as run
        if runs is None:
            pending.append(f"{METHODS[method].label}: seeds {missing} unfinished (or run with other settings than "
                           "the tuned ones)")
            continue
        runs_of[method] = runs
    values = {m: per_seed(r) for m, r in runs_of.items()}
    return chosen, runs_of, analyse(values) if values else {"methods": {}, "columns": {}}, pending


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parent of the run dirs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(BASE_SEEDS))
    parser.add_argument("--extra-seeds", type=int, nargs="*", default=list(EXTRA_SEEDS),
                        help="for the best method and those within noise of it, once every method has its seeds")
    parser.add_argument("--images", type=int, default=3200, help="sampled training images per run")
    parser.add_argument("--seconds", type=float, default=600.0, help="training CPU seconds per run")
    parser.add_argument("--evaluations", type=int, default=10, help="held-out evaluations per budget (+1 at 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of every run (default: inherited; 1 lets two drivers share 2 cores)")
    parser.add_argument("--tune-only", action="store_true", help="only the tuning runs")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: the table, json and plot of the finished runs in --out")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every rl.run (after --)")
    args = parser.parse_args(argv)
    if args.report and args.tune_only:
        parser.error("--report reads finished runs and --tune-only makes tuning runs: give one of them")
    if args.evaluations < 1 or args.images < args.evaluations or args.seconds <= 0:
        parser.error("--evaluations must be at least 1, --images at least --evaluations, and --seconds above 0 (the "
                     "seconds table needs its marks)")

    plans = {method: plan(method) for method in METHODS}
    if not args.report:
        for method in args.methods:  # 1. tuning, then 2. the base seeds, method by method
            choice, _ = tune(method, plans[method], args, list(args.overrides), run=True)
            if args.tune_only or choice is None:
                continue
            for seed in args.seeds:
                run_to_budgets(plans[method], seed, args.out / method / f"seed_{seed}", args.images, args.seconds,
                               args.evaluations, [*args.overrides, *choice["options"]], args.threads)
    if args.tune_only:
        chosen = {m: tune(m, plans[m], args, [], run=False)[0] for m in args.methods}
        print(json.dumps(chosen, indent=1))
        return
    chosen, runs_of, summary, pending = report(args, plans)
    complete = not pending
    if complete and not args.report and args.extra_seeds:  # 3. extra seeds where the top is within noise
        for method in sorted(needs_more_seeds(summary) & set(args.methods)):
            for seed in args.extra_seeds:
                run_to_budgets(plans[method], seed, args.out / method / f"seed_{seed}", args.images, args.seconds,
                               args.evaluations, [*args.overrides, *chosen[method]["options"]], args.threads)
        chosen, runs_of, summary, pending = report(args, plans)
    values = {m: per_seed(r) for m, r in runs_of.items()}
    wanted = len(args.seeds) + len(args.extra_seeds)
    short = [METHODS[m].label for m in sorted(needs_more_seeds(summary)) if len(values[m]["end_images"]) < wanted] \
        if complete else []

    labels = {m: METHODS[m].label for m in METHODS}
    settings = {m: chosen[m]["setting"] for m in values}
    guidance = {m: interval(list(r.at_training_guidance.values())) for m, r in runs_of.items()
                if r.at_training_guidance}
    text = (markdown(summary, labels, settings, guidance, args.images, args.seconds, args.evaluations) if values
            else "(no method yet)")
    if values:
        text += "\n\n" + verdict(summary, labels, args.images, args.seconds)
    if short:
        text += (f"\n\nThe best and those within noise of it get seeds {args.extra_seeds} too; still short of them: "
                 f"{', '.join(short)} (run the command again).")
    if pending:
        text += "\n\nNot finished yet, left out of the table: " + "; ".join(pending) + "."
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"protocol": {"images": args.images, "cpu_seconds": args.seconds, "evaluations": args.evaluations,
                      "seeds": args.seeds, "extra_seeds": args.extra_seeds, "lr_factors": LR_FACTORS,
                      "knobs": {m: {"option": s.knob, "values": list(s.values), "why": s.why}
                                for m, s in METHODS.items()},
                      "tuning_seed": TUNING_SEED, "validation_prompts": VALIDATION_PROMPTS,
                      "threads": args.threads if not args.report else "as the runs were made (docs/comparison.md)"},
         "tuned": chosen, "summary": summary,
         "at_training_guidance": {m: g.as_dict() for m, g in guidance.items()},
         "per_seed": values, "pending": pending}, indent=1))
    written = [args.out / "results.md", args.out / "results.json"]
    if values:
        curves = {labels[m]: (list(r.by_images.values()), list(r.by_seconds.values())) for m, r in runs_of.items()}
        plot(args.out / "accuracy.png", curves, args.images, args.seconds, args.evaluations)
        written.append(args.out / "accuracy.png")
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
