"""experiments/seed_statistics.py against hand-computed cases: the Student-t interval over seeds and the paired
difference of two methods on their shared seeds."""

import pytest

from experiments.seed_statistics import interval, paired_difference, t_quantile, within_noise


def test_three_seeds_by_hand():
    # (0.9, 0.8, 0.7): mean 0.8, sd 0.1, standard error 0.1 / sqrt(3) = 0.057735; t(0.975, 2) = 4.303:
    # half-width 0.248434
    result = interval([0.9, 0.8, 0.7])
    assert (result.mean, result.low, result.high, result.seeds) == pytest.approx((0.8, 0.551566, 1.048434, 3))
    # two seeds: (0.5, 0.7), sd 0.141421, standard error 0.1, t(0.975, 1) = 12.706
    assert (interval([0.5, 0.7]).low, interval([0.5, 0.7]).high) == pytest.approx((0.6 - 1.2706, 0.6 + 1.2706))
    assert t_quantile(4) == 2.776 and t_quantile(100) == 1.96


def test_one_seed_is_a_point_and_no_seed_is_an_error():
    assert interval([0.8]).as_dict() == {"mean": 0.8, "low": 0.8, "high": 0.8, "seeds": 1}
    with pytest.raises(ValueError):
        interval([])


def test_three_differences_of_one_sign_are_not_enough_to_call_two_methods_apart():
    # The percentile bootstrap's interval of (0.01, 0.02, 0.06) would be its range [0.01, 0.06], excluding 0;
    # the t interval, mean 0.03 +- 4.303 * 0.026458 / sqrt(3) = +- 0.065730, holds it.
    difference = paired_difference({0: 0.91, 1: 0.92, 2: 0.96}, {0: 0.90, 1: 0.90, 2: 0.90})
    assert (difference.low, difference.high) == pytest.approx((0.03 - 0.065730, 0.03 + 0.065730), abs=1e-6)
    assert within_noise(difference)


def test_pairing_cancels_what_a_seed_shares():
    # Each seed of a is 0.05 above the same seed of b, though both spread by 0.2 over seeds: unpaired intervals
    # overlap, the paired difference is exactly 0.05 and not within noise.
    a, b = {0: 0.90, 1: 0.80, 2: 0.70}, {0: 0.85, 1: 0.75, 2: 0.65, 3: 0.10}  # seed 3 is not shared: left out
    difference = paired_difference(a, b)
    assert (difference.mean, difference.low, difference.high, difference.seeds) == pytest.approx((0.05, 0.05, 0.05, 3))
    assert not within_noise(difference)
    assert interval(list(a.values())).low < interval([0.85, 0.75, 0.65]).high  # unpaired: overlapping
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})
