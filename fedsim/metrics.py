"""Binary classification metrics in plain numpy."""

import numpy as np

_EPS = 1e-7


def auc(labels, scores) -> float:
    """ROC AUC as the Mann-Whitney statistic; tied scores share their average rank."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Ranks are 1-based: a tie group spanning ranks a..b gets (a + b) / 2.
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels, probs) -> float:
    labels = np.asarray(labels, dtype=np.float64).ravel()
    probs = np.clip(np.asarray(probs, dtype=np.float64).ravel(), _EPS, 1.0 - _EPS)
    if len(labels) == 0:
        return float("nan")
    return float(-np.mean(labels * np.log(probs) + (1.0 - labels) * np.log(1.0 - probs)))


def accuracy(labels, probs) -> float:
    labels = np.asarray(labels).astype(bool).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if len(labels) == 0:
        return float("nan")
    return float(np.mean((probs >= 0.5) == labels))
