"""Compare runs: overlay their held-out curves (mean +- std over the seeds of each configuration) and tabulate them.

    python -m experiments.compare outputs/curves/grpo_jpeg_tiny outputs/curves/ddpo_jpeg_tiny
    python -m experiments.compare multirun/2026-01-01_12-00-00 --key eval/correct_mean --x samples
    python -m experiments.compare outputs --label "GRPO=*grpo*" --label "DDPO=*ddpo*" --out grpo_vs_ddpo.png
    python -m experiments.compare RUN_A/evaluation RUN_B/evaluation              # tables of experiments.evaluate

Each argument is a run directory, a folder holding run directories (searched recursively), or an output folder of
`experiments.evaluate`. Runs are grouped by `--label NAME=GLOB` (a glob on the run directory's path), and the others
by configuration: runs whose `config.yaml` differ only in `seed` are seeds of one configuration. A group is named by
its runs' common parent folder when no other group shares it, else by the options that tell it apart.

The curve is `--key` (default `eval/reward_mean`) against the step (or `--x samples`, the training samples used), read
from each run's `evaluation/table.json` when every run has one (`--source auto`), else from `metrics.jsonl`. Printed
and saved (`--out` PNG, plus the same name with .json and .csv): per group the number of runs, the start, best and
final value and the change (mean +- std over runs, the std with n - 1), the training samples used (`train/samples`),
and the wall time. metrics.jsonl records no clock, so the wall time is read from the run directory's file times, from
the first file the run wrote to the last (a run stopped and resumed counts the pause as well); records with a `time`
field are used instead when present.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from pipelines.errors import UserError, exit_on_user_error
from rl.legacy import upgrade_config
from rl.tracking import flatten_config, metric_curve, read_metrics

# Keys that differ between seeds of one configuration without changing it.
IGNORED_KEYS = ("seed", "algo.checkpoint.resume", "algo.checkpoint.exit_after",
                # older runs
                "algo.resume", "algo.exit_after_epochs", "algo.train.resume", "algo.train.exit_after_steps")
# What training writes into a run directory (its file times give the wall time), and folders never searched for runs.
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.before-resume.jsonl", "run.log")
RUN_FOLDERS = (".hydra", "samples", "checkpoints", "final", "class_images", "tensorboard")
OUTPUT_FOLDERS = ("evaluation", "wandb", *RUN_FOLDERS)


@dataclass
class Run:
    """One run directory: its flattened config (None without config.yaml), metric records and curve."""

    path: Path
    config: dict | None
    records: list[dict]
    evaluation: dict | None = None  # experiments.evaluate's table.json
    curve: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Group:
    """Runs shown as one curve (their mean and std), e.g. the seeds of one configuration."""

    label: str
    runs: list[Run]


# ---------------------------------------------------------------------------------------------------------- reading


def read_run(path: Path, evaluation_dir: Path | None = None) -> Run:
    """A run directory's config, metrics and (from `evaluation_dir`, default `<run>/evaluation`) evaluation table."""
    config = None
    if (path / "config.yaml").is_file():  # in today's spelling, so that runs of earlier versions group with today's
        upgraded, _ = upgrade_config(OmegaConf.create(yaml.safe_load((path / "config.yaml").read_text()) or {}))
        config = flatten_config(OmegaConf.to_container(upgraded))
    records = read_metrics(path)
    table = (evaluation_dir or path / "evaluation") / "table.json"
    evaluation = json.loads(table.read_text()) if table.is_file() else None
    return Run(path, config, records, evaluation)


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()


def is_evaluation_dir(path: Path) -> bool:
    """An `experiments.evaluate` output folder: its table.json names the run it evaluated."""
    table = path / "table.json"
    return table.is_file() and not is_run_dir(path) and "run_dir" in json.loads(table.read_text())


def find_runs(paths: list[Path]) -> list[Run]:
    """Run directories named by `paths`: each a run directory, an evaluation folder, or a folder searched for runs."""
    runs: dict[Path, Run] = {}
    for path in paths:
        path = path.expanduser()
        if not path.is_dir():
            raise UserError(f"{path} is not a directory")
        if is_evaluation_dir(path):  # an experiments.evaluate output folder
            run_dir = Path(json.loads((path / "table.json").read_text())["run_dir"])
            run = read_run(run_dir if run_dir.is_dir() else path, evaluation_dir=path)
            earlier = runs.get(run_dir.resolve())
            if earlier is not None and earlier.evaluation is not None:  # one run under two protocols: not a curve
                check_one_protocol([earlier, run])
            runs[run_dir.resolve()] = run
        elif is_run_dir(path):
            runs[path.resolve()] = read_run(path)
        else:
            found = sorted({p.parent for name in ("config.yaml", "metrics.jsonl") for p in path.rglob(name)})
            found = [p for p in found if not any(part in OUTPUT_FOLDERS for part in p.relative_to(path).parts)]
            if not found:
                raise UserError(f"no run directories (config.yaml or metrics.jsonl) under {path}")
            for run_dir in found:
                runs.setdefault(run_dir.resolve(), read_run(run_dir))
    return list(runs.values())


def curve(run: Run, key: str, source: str, x: str) -> list[tuple[float, float]]:
    """The run's (x, value) points of `key`, from its evaluation table or its metrics.jsonl."""
    if source == "evaluation":
        rows = sorted(run.evaluation["rows"], key=lambda row: row["checkpoint"] == "final")
        by_step = {}
        for row in rows:  # final/ is the last checkpoint's weights again: its row counts only if that one is gone
            if row.get(key) is not None:
                by_step.setdefault(row["step"], row[key])
        points = list(by_step.items())
    else:
        points = [(step, value) for step, value in metric_curve(run.records, key) if value is not None]
    if x == "samples":
        samples = samples_by_step(run)
        points = [(samples[step], value) for step, value in points if step in samples]
    return sorted(points)


def samples_by_step(run: Run) -> dict[int, int]:
    """Training samples used by each logged step (`train/samples`), and 0 at step 0 (the base model)."""
    samples = {0: 0}
    samples.update({r["step"]: r["train/samples"] for r in run.records if "train/samples" in r})
    return samples


def samples_used(run: Run) -> int | None:
    values = [r["train/samples"] for r in run.records if "train/samples" in r]
    return max(values) if values else None


def wall_seconds(run: Run) -> float | None:
    """From the records' `time` field when they have one, else from the first file the run wrote (config.yaml comes
    before the model loads) to the last, by modification time; files written later (evaluations) are left out."""
    times = [r["time"] for r in run.records if isinstance(r.get("time"), (int, float))]
    if len(times) > 1:
        return max(times) - min(times)
    if not (run.path / "metrics.jsonl").is_file():
        return None
    files = [run.path / name for name in RUN_FILES if (run.path / name).is_file()]
    files += [p for folder in RUN_FOLDERS for p in (run.path / folder).rglob("*") if p.is_file()]
    mtimes = [p.stat().st_mtime for p in files]
    return max(mtimes) - min(mtimes)


# --------------------------------------------------------------------------------------------------------- grouping


def configuration(run: Run) -> tuple | None:
    """What identifies a run's configuration: its config without the seed (None without a config)."""
    if run.config is None:
        return None
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in run.config.items() if k not in IGNORED_KEYS))


def group_runs(runs: list[Run], labels: list[tuple[str, str]]) -> list[Group]:
    """`--label NAME=GLOB` groups first (a run goes to the first glob matching its path), then equal configurations."""
    labelled: dict[str, list[Run]] = {name: [] for name, _ in labels}
    by_config: dict[object, list[Run]] = {}
    for run in runs:
        names = {str(run.path), str(run.path.resolve())}
        name = next((n for n, pattern in labels if any(fnmatch.fnmatch(p, pattern) for p in names)), None)
        if name is not None:
            labelled[name].append(run)
        else:
            key = configuration(run)
            by_config.setdefault(key if key is not None else ("path", str(run.path)), []).append(run)
    groups = [Group(name, members) for name, members in labelled.items() if members]
    unnamed = list(by_config.values())
    groups += [Group(label, members) for label, members in zip(auto_labels(unnamed), unnamed, strict=True)]
    return groups


def auto_labels(groups: list[list[Run]]) -> list[str]:
    """A group's common parent folder's name when no other group has runs there (`curves/grpo/seed_0`, `seed_1` ->
    `grpo`); else the options that tell it apart from the others (`algo.beta=0.01`), or its first run's name."""
    parents = [{run.path.resolve().parent for run in group} for group in groups]
    labels = []
    for i, group in enumerate(groups):
        others = set().union(*(p for j, p in enumerate(parents) if j != i))
        if len(parents[i]) == 1 and not parents[i] & others:
            labels.append(next(iter(parents[i])).name)
        else:
            labels.append(differing_options(groups, i) or group[0].path.resolve().name)
    return unique(labels)


def differing_options(groups: list[list[Run]], index: int, limit: int = 3) -> str:
    """Options (not the seed) that tell group `index` apart from the others, e.g. `algo=grpo, algo.beta=0.01`: what
    is built (`algo`, `reward`, ...) when that differs, then each time the option that sets it apart from the most
    groups not yet told apart."""
    configs = [g[0].config or {} for g in groups]
    mine = configs[index]
    value = lambda config, key: json.dumps(config.get(key), sort_keys=True)  # noqa: E731
    keys = sorted(k for k in set().union(*configs) - set(IGNORED_KEYS)
                  if not (k.endswith("._target_") and k.count(".") > 1))  # nested targets follow from the algo
    keys.sort(key=lambda k: (not k.endswith("._target_"), not all(k in c for c in configs)))
    remaining = [c for j, c in enumerate(configs) if j != index]
    chosen = [k for k in keys if k.endswith("._target_") and any(value(c, k) != value(mine, k) for c in remaining)]
    remaining = [c for c in remaining if all(value(c, k) == value(mine, k) for k in chosen)]
    while remaining and len(chosen) < limit:
        key = max(keys, key=lambda k: sum(value(c, k) != value(mine, k) for c in remaining))  # the first of the best
        if all(value(c, key) == value(mine, key) for c in remaining):
            break
        chosen.append(key)
        remaining = [c for c in remaining if value(c, key) == value(mine, key)]
    return ", ".join(describe(key, mine.get(key)) for key in chosen)


def describe(key: str, value) -> str:
    """`algo._target_=rl.grpo.GRPO` -> `algo=GRPO`, `reward._target_=rewards.jpeg.JpegSizeReward` ->
    `reward=JpegSizeReward` (runs of earlier versions: `rl.grpo.run` -> `algo=grpo`); other options as `key=value`."""
    if key.endswith("._target_") and isinstance(value, str):
        legacy = key == "algo._target_" and ".run" in value
        short = value.removeprefix("rl.").removesuffix(".run") if legacy else value.rsplit(".", 1)[-1]
        return f"{key.removesuffix('._target_')}={short}"
    return f"{key}={value}"


def unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        result.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return result


# ------------------------------------------------------------------------------------------------------ statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(curves: list[list[tuple[float, float]]]) -> dict[str, list]:
    """Mean and std over runs at each x every run has (or, if they share none, at each x any run has)."""
    sets = [{x for x, _ in c} for c in curves]
    xs = sorted(set.intersection(*sets) or set.union(*sets))
    result = {"x": [], "mean": [], "std": [], "n": []}
    for x in xs:
        values = [v for c in curves for cx, v in c if cx == x]
        mean, std = mean_std(values)
        for name, value in (("x", x), ("mean", mean), ("std", std), ("n", len(values))):
            result[name].append(value)
    return result


def summarise(group: Group, maximise: bool) -> dict:
    """A group's curve and its start, best, final and change (mean and std over runs), samples and wall time."""
    best = max if maximise else min
    per_run = {
        "start": [r.curve[0][1] for r in group.runs],
        "best": [best(v for _, v in r.curve) for r in group.runs],
        "final": [r.curve[-1][1] for r in group.runs],
        "change": [r.curve[-1][1] - r.curve[0][1] for r in group.runs],
    }
    samples = [s for s in (samples_used(r) for r in group.runs) if s is not None]
    walls = [w for w in (wall_seconds(r) for r in group.runs) if w is not None]
    return {
        "label": group.label,
        "runs": [str(r.path) for r in group.runs],
        "seeds": [(r.config or {}).get("seed") for r in group.runs],
        "curve": mean_curve([r.curve for r in group.runs]),
        **{name: dict(zip(("mean", "std"), mean_std(values), strict=True)) for name, values in per_run.items()},
        "samples": statistics.mean(samples) if samples else None,
        "wall_seconds": statistics.mean(walls) if walls else None,
    }


# ---------------------------------------------------------------------------------------------------------- output


def format_table(summaries: list[dict], key: str) -> str:
    def pm(stat: dict) -> str:
        return f"{stat['mean']:.4g} +- {stat['std']:.2g}"

    def duration(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

    header = ["group", "runs", "start", "best", "final", "change", "samples", "wall time"]
    rows = [[s["label"], str(len(s["runs"])), pm(s["start"]), pm(s["best"]), pm(s["final"]), pm(s["change"]),
             "-" if s["samples"] is None else f"{s['samples']:.0f}", duration(s["wall_seconds"])] for s in summaries]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"{key} (mean +- std over runs)", "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, summaries: list[dict]) -> None:
    columns = ["label", "runs", "start_mean", "start_std", "best_mean", "best_std", "final_mean", "final_std",
               "change_mean", "change_std", "samples", "wall_seconds"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for s in summaries:
            writer.writerow([s["label"], len(s["runs"]), *(s[n][m] for n in ("start", "best", "final", "change")
                                                           for m in ("mean", "std")), s["samples"], s["wall_seconds"]])


def plot(path: Path, summaries: list[dict], key: str, x: str) -> None:
    """One line per group (its mean over runs), shaded +- one std over runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in summaries:
        c = s["curve"]
        runs = len(s["runs"])
        line, = ax.plot(c["x"], c["mean"], marker="o", markersize=3, label=f"{s['label']} (n={runs})")
        if runs > 1:
            ax.fill_between(c["x"], [m - d for m, d in zip(c["mean"], c["std"], strict=True)],
                            [m + d for m, d in zip(c["mean"], c["std"], strict=True)], color=line.get_color(),
                            alpha=0.2)
    ax.set_xlabel("training samples" if x == "samples" else "step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key)
    ax.set_title(f"{key}: mean +- std over runs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_label(text: str) -> tuple[str, str]:
    name, sep, pattern = text.partition("=")
    if not sep or not name or not pattern:
        raise UserError(f"--label {text!r}: write NAME=GLOB, e.g. --label 'GRPO=*grpo*'")
    return name, pattern


def choose_source(runs: list[Run], source: str) -> str:
    if source == "auto":
        source = "evaluation" if all(r.evaluation is not None for r in runs) else "metrics"
    if source == "evaluation":
        missing = [str(r.path) for r in runs if r.evaluation is None]
        if missing:
            raise UserError(f"no evaluation/table.json in {missing[0]}; write it with experiments.evaluate")
        check_one_protocol(runs)
    return source


def check_one_protocol(runs: list[Run]) -> None:
    """Evaluations compare only under one protocol (`experiments.evaluate ... protocol=<name>`, or none), and under a
    protocol only on one prompt set (the cards whose prompts the user passes)."""
    by_protocol: dict[str | None, Path] = {}
    by_prompts: dict[str, Path] = {}
    for run in runs:
        by_protocol.setdefault(run.evaluation.get("protocol"), run.path)
        if run.evaluation.get("protocol"):
            prompts = json.dumps(run.evaluation.get("settings", {}).get("prompts"), sort_keys=True)
            by_prompts.setdefault(prompts, run.path)
    if len(by_protocol) > 1:
        (a, path_a), (b, path_b) = list(by_protocol.items())[:2]
        raise UserError(f"these evaluations used different protocols ({a or 'none'}: {path_a}; {b or 'none'}: "
                        f"{path_b}): their numbers are not comparable; compare evaluations of one protocol")
    if len(by_prompts) > 1:
        path_a, path_b = list(by_prompts.values())[:2]
        raise UserError(f"these evaluations used one protocol on different prompt sets ({path_a}; {path_b}): their "
                        f"numbers are not comparable")


def available_keys(runs: list[Run], source: str) -> list[str]:
    rows = [row for r in runs for row in (r.evaluation["rows"] if source == "evaluation" else r.records)]
    return sorted({k for row in rows for k in row if k.startswith("eval/")})


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("paths", type=Path, nargs="+", help="run directories, folders of runs, evaluation folders")
    parser.add_argument("--key", default="eval/reward_mean", help="the metric to compare (default eval/reward_mean)")
    parser.add_argument("--label", action="append", default=[], help="NAME=GLOB: runs whose path matches form a group")
    parser.add_argument("--source", choices=["auto", "metrics", "evaluation"], default="auto",
                        help="metrics.jsonl or experiments.evaluate's table (auto: the table when every run has one)")
    parser.add_argument("--x", choices=["step", "samples"], default="step", help="the curve's x axis")
    parser.add_argument("--lower-is-better", action="store_true", help="best is the minimum (e.g. a loss)")
    parser.add_argument("--out", type=Path, default=Path("compare.png"), help="the PNG; .json and .csv beside it")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        labels = [parse_label(text) for text in args.label]
        runs = find_runs(args.paths)
        source = choose_source(runs, args.source)
        for run in runs:
            run.curve = curve(run, args.key, source, args.x)
        missing = [r for r in runs if not r.curve]
        if len(missing) == len(runs):
            keys = ", ".join(available_keys(runs, source)) or "none"
            raise UserError(f"no run has {args.key!r} in its {source}; keys there: {keys}")
        for run in missing:
            print(f"note: {run.path} has no {args.key!r} in its {source}; left out", file=sys.stderr)

    runs = [r for r in runs if r.curve]
    summaries = [summarise(group, not args.lower_is_better) for group in group_runs(runs, labels)]
    print(format_table(summaries, args.key))
    timed = all(any("time" in record for record in r.records) for r in runs)
    clock = "the records' time field" if timed else "the run directories' file times"
    print(f"source: {source}; wall time from {clock}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(args.out, summaries, args.key, args.x)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"key": args.key, "x": args.x, "source": source, "groups": summaries}, indent=1))
    write_csv(args.out.with_suffix(".csv"), summaries)
    print(f"wrote {args.out}, {args.out.with_suffix('.json')} and {args.out.with_suffix('.csv')}")
    return summaries


if __name__ == "__main__":
    main()
