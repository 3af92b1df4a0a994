import math

import numpy as np
import pytest

from fedsim.metrics import (accuracy, auc, auc_ci, auc_mean_ci, delong_diff_se, logloss, paired_auc_diff, paired_auc_diff_mean,
                            pooled_mean)


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


def binormal(n, auc_target, seed):
    """Balanced labels, scores normal with unit variance; the positives shifted so the population
    AUC is auc_target (AUC = Phi(shift / sqrt 2))."""
    from statistics import NormalDist

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    shift = math.sqrt(2) * NormalDist().inv_cdf(auc_target)
    return labels, rng.normal(size=n) + shift * labels


def test_auc_ci_contains_the_point_auc_and_is_seeded():
    labels, scores = binormal(500, 0.7, 0)
    low, high = auc_ci(labels, scores, seed=3)
    assert low < auc(labels, scores) < high
    assert auc_ci(labels, scores, seed=3) == (low, high)
    assert auc_ci(labels, scores, seed=4) != (low, high)


def test_auc_ci_width_matches_the_known_standard_error():
    # 100 positives, 100 negatives at AUC 0.7: Hanley-McNeil SE = 0.0368, so the 95 % interval is
    # about +-0.072. Averaged over a few data sets so one unlucky draw does not decide.
    half = [np.subtract(*auc_ci(*binormal(200, 0.7, s))[::-1]) / 2 for s in range(5)]
    assert 0.06 < np.mean(half) < 0.085


def test_auc_ci_narrows_as_one_over_sqrt_n():
    small = np.subtract(*auc_ci(*binormal(400, 0.7, 1))[::-1])
    large = np.subtract(*auc_ci(*binormal(1600, 0.7, 2))[::-1])
    assert 1.6 < small / large < 2.5  # sqrt(1600 / 400) = 2


def test_auc_ci_is_nan_with_one_class_and_brackets_the_auc_on_two_thousand_rows():
    # No wall-clock bound: on a loaded CI machine it measures the load (~0.1 s on an idle core).
    assert all(math.isnan(x) for x in auc_ci([1, 1, 1], [0.1, 0.2, 0.3]))
    labels, scores = binormal(2000, 0.7, 0)
    low, high = auc_ci(labels, scores, n_boot=1000)
    assert low < auc(labels, scores) < high and high - low < 0.06


def test_bootstrap_resample_auc_matches_the_plain_auc_with_ties():
    # A tiny interval from many ties must equal the spread of plain auc() over the same resamples.
    from fedsim.metrics import _boot_auc, _boot_chunks, _score_groups

    labels, scores = binormal(300, 0.7, 5)
    scores = np.round(scores, 1)
    group, k = _score_groups(scores)
    idx = next(_boot_chunks(300, 20, 0))
    fast = _boot_auc(labels.astype(bool), group, k, idx)
    assert np.allclose(fast, [auc(labels[i], scores[i]) for i in idx], atol=1e-12)


def test_paired_diff_of_a_model_with_itself_is_exactly_zero():
    labels, scores = binormal(300, 0.7, 0)
    d = paired_auc_diff(labels, scores, scores)
    assert (d["diff"], d["low"], d["high"]) == (0.0, 0.0, 0.0) and d["p_value"] == 1.0


def test_paired_diff_detects_a_clearly_better_scorer():
    labels, good = binormal(1000, 0.8, 0)
    worse = good + np.random.default_rng(1).normal(scale=1.5, size=1000)  # the same signal, more noise
    d = paired_auc_diff(labels, good, worse)
    assert d["diff"] > 0 and d["low"] > 0 and d["p_value"] < 0.01
    flipped = paired_auc_diff(labels, worse, good)
    assert flipped["high"] < 0 and flipped["diff"] == -d["diff"]


def test_the_mean_over_seeds_of_paired_diffs_resamples_the_rows_the_seeds_scored():
    """One seed: paired_auc_diff's figures. Three seeds on the same rows: the mean of their
    differences, with a narrower interval than one seed's (the seeds' own noise averages out).
    Seeds on rows of their own: independent samples, so the interval narrows as ~1/sqrt(seeds)."""
    rows = np.arange(600)
    labels, good = binormal(600, 0.8, 0)
    rng = np.random.default_rng(3)
    worse = [good + rng.normal(scale=1.0, size=600) for _ in range(3)]  # three seeds of the worse arm
    better = [good + rng.normal(scale=0.3, size=600) for _ in range(3)]
    one = paired_auc_diff(labels, better[0], worse[0], seed=5)
    d = paired_auc_diff_mean([(rows, labels, better[0], worse[0])], seed=5)
    assert (d["diff"], d["low"], d["high"]) == pytest.approx((one["diff"], one["low"], one["high"]), abs=1e-12)
    d = paired_auc_diff_mean([(rows, labels, b, w) for b, w in zip(better, worse)], seed=5)
    each = [paired_auc_diff(labels, b, w, seed=5) for b, w in zip(better, worse)]
    assert d["diff"] == pytest.approx(np.mean([e["diff"] for e in each])) and d["seeds"] == 3 and d["rows"] == 600
    assert 0 < d["low"] < d["diff"] < d["high"] and d["high"] - d["low"] < min(e["high"] - e["low"] for e in each)

    # four seeds, each on 600 rows of its own (names apart): the width of one over ~sqrt(4)
    own = []
    for s in range(4):
        y, g = binormal(600, 0.8, 10 + s)
        w = g + np.random.default_rng(20 + s).normal(scale=1.0, size=600)
        own.append((np.arange(600) + 1000 * s, y, g, w))
    apart = paired_auc_diff_mean(own, seed=5)
    single = np.mean([np.subtract(*(lambda e: (e["high"], e["low"]))(paired_auc_diff(y, g, w, seed=5))) for _, y, g, w in own])
    assert apart["rows"] == 2400 and (apart["high"] - apart["low"]) == pytest.approx(single / 2, rel=0.2)
    with pytest.raises(ValueError, match=r"per seed \(row ids, labels, scores a, scores b\), one of each per row"):
        paired_auc_diff_mean([(rows, labels, better[0], worse[0][:-1])])


def test_pooling_each_seeds_interval_agrees_with_resampling_the_seeds_rows_when_they_are_disjoint():
    """The mean over seeds from each seed's (difference, interval) alone, for seeds whose rows are
    lost: on four seeds with rows of their own it is the resampled mean's figure and interval."""
    own = []
    for s in range(4):
        y, g = binormal(600, 0.8, 10 + s)
        own.append((np.arange(600) + 1000 * s, y, g, g + np.random.default_rng(20 + s).normal(scale=1.0, size=600)))
    each = [paired_auc_diff(y, g, w, seed=5) for _, y, g, w in own]
    pooled = pooled_mean([(e["diff"], e["low"], e["high"]) for e in each])
    resampled = paired_auc_diff_mean(own, seed=5)
    assert pooled["seeds"] == 4 and pooled["diff"] == pytest.approx(resampled["diff"], abs=1e-12)
    assert pooled["high"] - pooled["low"] == pytest.approx(resampled["high"] - resampled["low"], rel=0.15)
    assert pooled["low"] == pytest.approx(resampled["low"], abs=0.01) and pooled["high"] == pytest.approx(resampled["high"], abs=0.01)
    # one seed: its interval's width back, centred on its value (an interval taken as normal)
    one = pooled_mean([(0.1, 0.0, 0.3)])
    assert (one["low"], one["high"]) == pytest.approx((-0.05, 0.25))
    with pytest.raises(ValueError, match=r"pooled_mean needs per seed \(value, low, high\) with low <= value <= high"):
        pooled_mean([(0.5, 0.6, 0.7)])


def test_the_mean_over_seeds_of_one_arms_auc_has_the_interval_of_the_mean_not_of_one_seed():
    """One seed: auc and auc_ci's figures. Four seeds on rows of their own: the mean of their AUCs,
    with an interval about half as wide as one seed's (what averaging interval ends would not show)."""
    labels, scores = binormal(600, 0.8, 0)
    rows = np.arange(600)
    mean, low, high = auc_mean_ci([(rows, labels, scores)], seed=5)
    assert (mean, low, high) == pytest.approx((auc(labels, scores), *auc_ci(labels, scores, seed=5)), abs=1e-12)
    own = [(np.arange(600) + 1000 * s, *binormal(600, 0.8, 10 + s)) for s in range(4)]
    mean, low, high = auc_mean_ci(own, seed=5)
    each = [(auc(y, x), *auc_ci(y, x, seed=5)) for _, y, x in own]
    assert mean == pytest.approx(np.mean([e[0] for e in each])) and low < mean < high
    assert high - low == pytest.approx(np.mean([e[2] - e[1] for e in each]) / 2, rel=0.2)
    with pytest.raises(ValueError, match=r"auc_mean_ci needs per seed \(row ids, labels, scores\)"):
        auc_mean_ci([(rows, labels, scores[:-1])])


def test_paired_interval_is_narrower_than_unpaired_for_correlated_scorers():
    labels, a = binormal(800, 0.75, 0)
    b = a + np.random.default_rng(2).normal(scale=0.3, size=800)
    paired = paired_auc_diff(labels, a, b)
    width_a = np.subtract(*auc_ci(labels, a)[::-1])
    width_b = np.subtract(*auc_ci(labels, b, seed=1)[::-1])
    unpaired = math.hypot(width_a, width_b)  # independent intervals: widths add in quadrature
    assert paired["high"] - paired["low"] < unpaired / 3
    # DeLong's standard error agrees with the bootstrap's width.
    assert paired["high"] - paired["low"] == pytest.approx(2 * 1.96 * delong_diff_se(labels, a, b), rel=0.25)
