"""The one fixed split of scikit-learn's real handwritten digits that the digits world is built on: the generator's
half (`experiments/digits_world.py`), the reward classifier's part and the part that tests that classifier
(`scripts/train_digit_classifier.py`), so that the reward never scores digits it was trained on."""

from __future__ import annotations

import numpy as np

from rl.data import import_data_extra


def digits_split(part: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 8 x 8 in [0, 1]) and labels of one fixed part of `load_digits`: "generator" (the first 50%, for
    the text-to-image model), "classifier" (30%, to train the reward) or "held_out" (20%, to test the reward)."""
    digits = import_data_extra("sklearn.datasets").load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    bounds = {"generator": (0.0, 0.5), "classifier": (0.5, 0.8), "held_out": (0.8, 1.0)}
    low, high = (int(f * len(order)) for f in bounds[part])
    chosen = order[low:high]
    return digits.images[chosen] / 16.0, digits.target[chosen]
