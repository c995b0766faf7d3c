"""Run a training configuration over several seeds and print its held-out reward curve: start, end, and every point.

    python -m experiments.learning_curve --seeds 0 1 2 --out outputs/curves/grpo -- \
        algo=grpo reward=jpeg_compressibility

Everything after `--` is passed to `python -m rl.run`. Each seed runs in `<out>/seed_<S>/` (an existing run directory
resumes from its checkpoint). Prints one line per seed and the mean and spread over seeds, and writes `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rl.tracking import metric_curve, read_metrics


def eval_curve(run_dir: Path, key: str = "eval/reward_mean") -> list[tuple[int, float]]:
    """The (step, value) points of a held-out metric in a run directory's metrics.jsonl."""
    return metric_curve(read_metrics(run_dir), key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run")
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the seeds' run directories")
    parser.add_argument("--key", default="eval/reward_mean", help="held-out metric to report")
    parser.add_argument("overrides", nargs="*", help="overrides for rl.run (after --)")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        run_dir = args.out / f"seed_{seed}"
        started = time.time()
        command = [sys.executable, "-m", "rl.run", *args.overrides, f"seed={seed}", f"hydra.run.dir={run_dir}"]
        subprocess.run(command, check=True)
        curve = eval_curve(run_dir, args.key)
        rows.append({"seed": seed, "start": curve[0][1], "end": curve[-1][1], "curve": curve,
                     "wall_seconds": round(time.time() - started, 1)})
        print(f"seed {seed}: start {curve[0][1]:.4f}  end {curve[-1][1]:.4f}  "
              f"curve {' '.join(f'{step}:{value:.4f}' for step, value in curve)}", flush=True)

    starts, ends = [r["start"] for r in rows], [r["end"] for r in rows]
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    deltas = [e - s for s, e in zip(starts, ends, strict=True)]
    print(f"{args.key} over {len(rows)} seed(s): start {statistics.mean(starts):.4f} +- {spread(starts):.4f}, "
          f"end {statistics.mean(ends):.4f} +- {spread(ends):.4f}, change {statistics.mean(deltas):+.4f} "
          f"+- {spread(deltas):.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"overrides": args.overrides, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
