"""Pure parts of the training step: the per-epoch class-balanced draw."""

from __future__ import annotations

import numpy as np

from melanoma.train import epoch_draw


def test_epoch_draw_balances_classes_by_the_power():
    labels = np.array([0] * 900 + [1] * 100)
    natural = epoch_draw(labels, 1000, 0.0, seed=1)
    assert sorted(natural) == list(range(1000))  # power 0 over the whole set: a shuffle
    balanced = epoch_draw(labels, 20000, 1.0, seed=1)
    assert abs((labels[balanced] == 1).mean() - 0.5) < 0.02
    sqrt = epoch_draw(labels, 20000, 0.5, seed=1)
    assert abs((labels[sqrt] == 1).mean() - 0.25) < 0.02  # 100 * 100**-0.5 / (100 * 100**-0.5 + 900 * 900**-0.5)
