"""What a handful of seeds can say: the mean of a method's per-seed values with a bootstrap confidence interval, and the
paired difference of two methods on the seeds they share (`experiments.method_comparison`).

Percentile bootstrap over seeds: resample the seeds with replacement, take the mean, and read the interval off the
resampled means. With 3 seeds there are only 10 distinct resamples, so the interval is coarse (about the range of the
seeds); it is what 3 seeds support, and it says so by being wide. The paired difference resamples the shared seeds
jointly, so that what two runs of one seed have in common (the same held-out seeds, the same first prompts) cancels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its bootstrap interval."""

    mean: float
    low: float
    high: float
    seeds: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "seeds": self.seeds}


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """`resamples` means of `values` (one per row when 2-D: the rows resampled together), each over a resample of
    the columns (the seeds) with replacement; fixed generator, so the same values give the same interval."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    generator = np.random.default_rng(seed)
    picks = generator.integers(0, values.shape[1], size=(resamples, values.shape[1]))
    return values[:, picks].mean(axis=2)


def interval(values, level: float = LEVEL, resamples: int = RESAMPLES) -> Interval:
    """The mean of per-seed `values` and its percentile-bootstrap interval at `level`; one value: a zero-width one."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values")
    if values.size == 1:
        return Interval(float(values[0]), float(values[0]), float(values[0]), 1)
    means = bootstrap_means(values, resamples)[0]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high), int(values.size))


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = LEVEL,
                      resamples: int = RESAMPLES) -> Interval:
    """The mean of `a[s] - b[s]` over the seeds `s` both have, with the percentile-bootstrap interval of resampling
    those seeds jointly."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two methods share no seed")
    return interval([a[s] - b[s] for s in shared], level, resamples)


def within_noise(difference: Interval) -> bool:
    """Whether a difference's interval includes 0: the seeds cannot tell the two apart."""
    return difference.contains(0.0)
