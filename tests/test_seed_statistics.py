"""experiments/seed_statistics.py against hand-computed cases: the bootstrap interval over seeds and the paired
difference of two methods on their shared seeds."""

import pytest

from experiments.seed_statistics import interval, paired_difference, within_noise


def test_two_seeds_give_the_range_of_their_resampled_means():
    # Resampling (0.5, 0.7) gives means 0.5, 0.6 and 0.7 with chances 1/4, 1/2, 1/4: the 2.5th and 97.5th
    # percentiles are 0.5 and 0.7.
    result = interval([0.5, 0.7])
    assert (result.mean, result.low, result.high, result.seeds) == pytest.approx((0.6, 0.5, 0.7, 2))


def test_one_seed_is_a_point_and_no_seed_is_an_error():
    assert interval([0.8]).as_dict() == {"mean": 0.8, "low": 0.8, "high": 0.8, "seeds": 1}
    with pytest.raises(ValueError):
        interval([])


def test_the_interval_is_fixed_by_its_values():
    values = [0.71, 0.93, 0.88, 0.64, 0.9]
    assert interval(values) == interval(values)
    result = interval(values)
    assert min(values) < result.low < result.mean < result.high < max(values)


def test_pairing_cancels_what_a_seed_shares():
    # Each seed of a is 0.05 above the same seed of b, though both spread by 0.2 over seeds: unpaired intervals
    # overlap, the paired difference is exactly 0.05 and not within noise.
    a, b = {0: 0.90, 1: 0.80, 2: 0.70}, {0: 0.85, 1: 0.75, 2: 0.65, 3: 0.10}  # seed 3 is not shared: left out
    difference = paired_difference(a, b)
    assert (difference.mean, difference.low, difference.high, difference.seeds) == pytest.approx((0.05, 0.05, 0.05, 3))
    assert not within_noise(difference)
    assert interval(list(a.values())).low < interval([0.85, 0.75, 0.65]).high  # unpaired: overlapping
    mixed = paired_difference({0: 0.9, 1: 0.8}, {0: 0.85, 1: 0.85})  # +0.05 and -0.05
    assert within_noise(mixed) and mixed.mean == pytest.approx(0.0)
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})
