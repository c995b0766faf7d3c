"""The README's digits-world table: every RL method in the digits world, over several seeds, and its plot.

    python -m experiments.digits_results --out outputs/digits_results            # 6 methods x seeds 0 1 2
    python -m experiments.digits_results --out DIR --methods grpo refl --seeds 0  # a part of it

Each (method, seed) runs `python -m rl.run experiment=<method>_digits seed=<seed> hydra.run.dir=<out>/<method>/seed_<s>`
one after another, so that wall times compare (a finished run is reused, an interrupted one resumes from its
checkpoint). Then prints a markdown table of held-out accuracy (`eval/correct_mean`) and reward (`eval/reward_mean`)
at the start and the end, training samples and wall time, as mean +- std over seeds (`experiments.compare` computes
them), and writes `<out>/results.md`, `<out>/results.json` and `<out>/accuracy.png` (held-out accuracy against training
samples, each method's mean with a band of one std over seeds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from experiments.compare import curve, find_runs, group_runs, plot, summarise

METHODS = {"grpo": "GRPO", "ddpo": "DDPO", "dpo_online": "online DPO", "refl": "ReFL", "nft": "DiffusionNFT",
           "awm": "AWM"}
ACCURACY, REWARD = "eval/correct_mean", "eval/reward_mean"


def run_method(method: str, seed: int, run_dir: Path, overrides: list[str]) -> None:
    """Run one seed of a method, or resume it, or reuse it when it has finished (`final/` is written last)."""
    if (run_dir / "final").exists():
        return
    command = [sys.executable, "-m", "rl.run", f"experiment={method}_digits", f"seed={seed}",
               f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(command, check=True)


def summaries(out: Path, methods: list[str], key: str) -> list[dict]:
    """`experiments.compare`'s summary of each method's seeds for `key`, against training samples."""
    runs = find_runs([out / method for method in methods])
    for run in runs:
        run.curve = curve(run, key, "metrics", "samples")
    labels = [(METHODS[method], f"*/{method}/seed_*") for method in methods]
    return [summarise(group, maximise=True) for group in group_runs(runs, labels)]


def markdown(accuracy: list[dict], reward: list[dict], methods: list[str]) -> str:
    def cell(stat: dict, digits: int = 3) -> str:
        return f"{stat['mean']:.{digits}f} +- {stat['std']:.{digits}f}"

    lines = [
        "| method | held-out accuracy, start | end | held-out reward, start | end | samples | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, a, r in zip(methods, accuracy, reward, strict=True):
        lines.append(
            f"| {a['label']}, `experiment={method}_digits` | {cell(a['start'])} | **{cell(a['final'])}** | "
            f"{cell(r['start'])} | {cell(r['final'])} | {a['samples'] or 0:.0f} | "
            f"{(a['wall_seconds'] or 0) / 60:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/digits_results"), help="parent of the run dirs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every rl.run (after --)")
    args = parser.parse_args()

    for method in args.methods:
        for seed in args.seeds:
            run_method(method, seed, args.out / method / f"seed_{seed}", args.overrides)
    accuracy, reward = (summaries(args.out, args.methods, key) for key in (ACCURACY, REWARD))
    for summary in accuracy:
        curve_text = " ".join(f"{x:.0f}:{m:.3f}"
                              for x, m in zip(summary["curve"]["x"], summary["curve"]["mean"], strict=True))
        print(f"{summary['label']}: held-out accuracy against samples (mean over seeds) {curve_text}")
    text = markdown(accuracy, reward, args.methods)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"accuracy": accuracy, "reward": reward}, indent=1))
    plot(args.out / "accuracy.png", accuracy, ACCURACY, "samples")
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'} and {args.out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
