import math

import numpy as np

from fedsim.metrics import accuracy, auc, logloss


def brute_force_auc(labels, scores):
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 200))
        labels = rng.integers(0, 2, n)
        if labels.min() == labels.max():
            continue
        scores = rng.integers(0, 6, n) / 5.0  # few distinct values, so many ties
        assert math.isclose(auc(labels, scores), brute_force_auc(labels, scores), abs_tol=1e-12)


def test_auc_edge_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_logloss_hand_cases():
    assert math.isclose(logloss([1, 0], [0.5, 0.5]), math.log(2))
    assert math.isclose(logloss([1], [0.8]), -math.log(0.8))
    # Clipping at 1e-7 keeps a confident mistake finite.
    assert math.isclose(logloss([1], [0.0]), -math.log(1e-7), rel_tol=1e-9)
    assert logloss([1, 0], [1.0, 0.0]) < 1e-6


def test_accuracy_hand_cases():
    assert accuracy([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.6]) == 0.5
    assert accuracy([1, 0], [0.5, 0.49]) == 1.0  # 0.5 counts as a positive prediction
