"""What a handful of seeds can say: the mean of a method's per-seed values with a confidence interval, and the paired
difference of two methods on the seeds they share (`experiments.method_comparison`).

Student's t interval, `mean +- t(0.975, n - 1) sd / sqrt(n)`, over seeds; for two methods, over the per-seed
differences on their shared seeds, so that what two runs of one seed have in common (the same held-out seeds, the
same first prompts) cancels. Not the percentile bootstrap: with 3 seeds its 95% interval of a difference is exactly
the range of the three differences (a resample of one value has probability 1/27 > 2.5%), so two methods that do not
differ at all would be called apart whenever their three differences share a sign, one time in four. The t interval
holds its 95% for normal per-seed values, and is as wide as 3 seeds make it (4.30 standard errors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# t(0.975, df) for df = 1 .. 30; past 30 the normal's 1.96 is within 4%
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its 95% interval."""

    mean: float
    low: float
    high: float
    seeds: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "seeds": self.seeds}


def t_quantile(df: int) -> float:
    """Student's t at 0.975 with `df` degrees of freedom (the 95% two-sided interval)."""
    return T_975[df - 1] if df <= len(T_975) else 1.96


def interval(values) -> Interval:
    """The mean of per-seed `values` and its 95% Student-t interval; one value: a zero-width one (nothing to say)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    n, mean = len(values), sum(values) / len(values)
    if n == 1:
        return Interval(mean, mean, mean, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Interval:
    """The mean of `a[s] - b[s]` over the seeds `s` both have, with its 95% interval."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two methods share no seed")
    return interval([a[s] - b[s] for s in shared])


def within_noise(difference: Interval) -> bool:
    """Whether a difference's interval includes 0: the seeds cannot tell the two apart."""
    return difference.contains(0.0)
