"""scikit-learn's bundled 8×8 digits (1,797 images, 17 grey levels): the default small image set."""

from __future__ import annotations

import numpy as np
import torch

TEST_FRACTION = 0.25
SPLIT_SEED = 0  # the train/test split is fixed so every run and every method sees the same test set


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train [1348, 64] float32 in [0, 1], y_train [1348] int64, x_test [449, 64], y_test [449])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(y)))
    n_test = round(TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
