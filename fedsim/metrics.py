"""Binary classification metrics in plain numpy."""

import math
from statistics import NormalDist

import numpy as np

_EPS = 1e-7


def _midranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks; a tie group spanning ranks a..b gets (a + b) / 2."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def auc(labels, scores) -> float:
    """ROC AUC as the Mann-Whitney statistic; tied scores share their average rank."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _midranks(scores)[labels].sum()
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


# ---------------------------------------------------------------------------------------------
# Uncertainty: bootstrap intervals over rows, paired differences on shared rows

# Resampled rows held at once: each (resamples x rows) int64 array is 8 MB, a few live at a time, so
# 1000 resamples of 100k rows stay in tens of MB.
_CHUNK_CELLS = 1_000_000


def _score_groups(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Each row's index among the distinct scores (ascending) and how many there are."""
    _, group = np.unique(scores, return_inverse=True)
    return group.ravel(), int(group.max()) + 1 if len(group) else 0


def _boot_chunks(n: int, n_boot: int, seed):
    """Resampled row indices, (chunk, n) at a time; one seeded stream, so a metric and its rival
    scored with the same seed see the same resamples."""
    rng = np.random.default_rng(seed)
    per = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, n_boot, per):
        yield rng.integers(0, n, size=(min(per, n_boot - start), n))


def _boot_auc(pos: np.ndarray, group: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """AUC of every resample (a row of idx) at once: count positives and negatives per distinct
    score, then each positive beats the negatives below its score and ties half of those level
    with it (the Mann-Whitney statistic). nan where a resample drew one class only."""
    b = idx.shape[0]
    g = group[idx] + k * np.arange(b)[:, None]
    y = pos[idx]
    p = np.bincount(g[y], minlength=b * k).reshape(b, k)
    q = np.bincount(g[~y], minlength=b * k).reshape(b, k)
    return _auc_of_counts(p, q)


def _boot_auc_weighted(pos: np.ndarray, group: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """_boot_auc with each resample given as how often it drew each row (w: resamples x rows)."""
    b = w.shape[0]
    g = group[None, :] + k * np.arange(b)[:, None]
    p = np.bincount(g[:, pos].ravel(), weights=w[:, pos].ravel(), minlength=b * k).reshape(b, k)
    q = np.bincount(g[:, ~pos].ravel(), weights=w[:, ~pos].ravel(), minlength=b * k).reshape(b, k)
    return _auc_of_counts(p, q)


def _auc_of_counts(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per resample, positives p and negatives q per distinct score (ascending) -> the AUC."""
    below = np.cumsum(q, axis=1) - q
    wins = (p * below).sum(1) + 0.5 * (p * q).sum(1)
    pairs = p.sum(1) * q.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.maximum(pairs, 1), np.nan)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def auc_ci(labels, scores, seed: int = 0, n_boot: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC: rows resampled with replacement, resamples that
    drew one class skipped. (nan, nan) when the rows hold one class."""
    pos = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if pos.all() or not pos.any():
        return float("nan"), float("nan")
    group, k = _score_groups(scores)
    boots = np.concatenate([_boot_auc(pos, group, k, idx) for idx in _boot_chunks(len(pos), n_boot, seed)])
    return _percentiles(boots, level)


def _delong_components(pos: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-positive and per-negative placement values (DeLong 1988): the share of the other class
    each row beats, ties counting half; their means are the AUC."""
    x, y = scores[pos], scores[~pos]
    both = _midranks(np.r_[x, y])
    v10 = (both[:len(x)] - _midranks(x)) / len(y)
    v01 = 1.0 - (both[len(x):] - _midranks(y)) / len(x)
    return v10, v01


def delong_diff_se(labels, scores_a, scores_b) -> float:
    """DeLong's standard error of AUC(a) - AUC(b) on the same rows (0 for identical scorers)."""
    pos = np.asarray(labels).astype(bool).ravel()
    a10, a01 = _delong_components(pos, np.asarray(scores_a, dtype=np.float64).ravel())
    b10, b01 = _delong_components(pos, np.asarray(scores_b, dtype=np.float64).ravel())
    d10, d01 = a10 - b10, a01 - b01
    var = sum(np.var(d, ddof=1) / len(d) for d in (d10, d01) if len(d) > 1)
    return float(np.sqrt(max(var, 0.0)))


def paired_auc_diff(labels, scores_a, scores_b, seed: int = 0, n_boot: int = 1000,
                    level: float = 0.95) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same rows, with a percentile bootstrap interval that resamples the
    same rows for both (what a and b share cancels out, so it is narrower than two separate
    intervals), and DeLong's standard error and two-sided p-value."""
    pos = np.asarray(labels).astype(bool).ravel()
    a = np.asarray(scores_a, dtype=np.float64).ravel()
    b = np.asarray(scores_b, dtype=np.float64).ravel()
    if not (len(pos) == len(a) == len(b)):
        raise ValueError(f"paired_auc_diff needs one score per row: {len(pos)} labels, {len(a)} and {len(b)} scores")
    diff = auc(pos, a) - auc(pos, b)
    if pos.all() or not pos.any():
        nan = float("nan")
        return {"diff": nan, "low": nan, "high": nan, "se": nan, "p_value": nan, "rows": len(pos)}
    ga, ka = _score_groups(a)
    gb, kb = _score_groups(b)
    boots = np.concatenate([_boot_auc(pos, ga, ka, idx) - _boot_auc(pos, gb, kb, idx)
                            for idx in _boot_chunks(len(pos), n_boot, seed)])
    low, high = _percentiles(boots, level)
    se = delong_diff_se(pos, a, b)
    p = math.erfc(abs(diff) / se / math.sqrt(2)) if se > 0 else float(diff == 0)
    return {"diff": float(diff), "low": low, "high": high, "se": se, "p_value": float(p), "rows": len(pos)}


def _seed_draws(ids: list[np.ndarray], n_boot: int, seed):
    """Bootstrap draws for seeds that scored overlapping sets of rows: the union of their rows is
    resampled with replacement, a row several seeds scored drawn for all of them. Yields, a chunk of
    resamples at a time, per seed how often each of its rows was drawn (resamples x its rows)."""
    union, where = np.unique(np.concatenate(ids), return_inverse=True)
    where = np.split(where.ravel(), np.cumsum([len(i) for i in ids])[:-1])  # each seed's rows in the union
    n = len(union)
    for idx in _boot_chunks(n, n_boot, seed):
        draws = np.bincount((idx + n * np.arange(len(idx))[:, None]).ravel(), minlength=len(idx) * n)
        draws = draws.reshape(len(idx), n).astype(np.float64)
        yield [draws[:, w] for w in where]


def paired_auc_diff_mean(pairs, seed: int = 0, n_boot: int = 1000, level: float = 0.95) -> dict[str, float]:
    """The mean over seeds of AUC(a) - AUC(b). `pairs`: per seed (row ids, labels, scores a, scores
    b), a and b scored on the same rows; seeds may score other rows (a sweep's seed also draws its
    evaluation rows). The interval resamples with replacement the rows any seed scored, a row that
    several seeds scored drawn for all of them, and takes each seed's difference on its own rows'
    draws: seeds on the same rows stay paired, seeds on other rows count as independent samples.
    It covers the rows' noise in the mean, not the spread between seeds (2-3 seeds cannot estimate
    that: report each seed's difference beside it). One seed: paired_auc_diff's figures."""
    ids = [np.asarray(p[0]).ravel() for p in pairs]
    sides = [tuple(np.asarray(x, dtype=np.float64).ravel() for x in p[2:]) for p in pairs]
    if not pairs or any(len(a) != len(i) or len(b) != len(i) or len(np.asarray(p[1]).ravel()) != len(i)
                        for i, (a, b), p in zip(ids, sides, pairs)):
        raise ValueError("paired_auc_diff_mean needs per seed (row ids, labels, scores a, scores b), one of each per row")
    labels = [np.asarray(p[1]).astype(bool).ravel() for p in pairs]
    diff = float(np.mean([auc(y, a) - auc(y, b) for y, (a, b) in zip(labels, sides)]))
    nan = float("nan")
    out = {"diff": diff, "low": nan, "high": nan, "rows": len(np.unique(np.concatenate(ids))), "seeds": len(pairs)}
    if any(y.all() or not y.any() for y in labels):
        return {**out, "diff": nan}
    groups = [(_score_groups(a), _score_groups(b)) for a, b in sides]
    boots = [np.mean([_boot_auc_weighted(y, *ga, w) - _boot_auc_weighted(y, *gb, w)
                      for y, w, (ga, gb) in zip(labels, ws, groups)], axis=0) for ws in _seed_draws(ids, n_boot, seed)]
    out["low"], out["high"] = _percentiles(np.concatenate(boots), level)
    return out


def pooled_mean(estimates, level: float = 0.95) -> dict[str, float]:
    """The mean over seeds of a figure known only by each seed's (value, low, high) at `level`, the
    seeds scored on rows of their own: each interval taken as normal (standard error its width over
    2 z), the seeds' errors independent. For seeds whose rows are gone (their run directories lost)
    while their figures remain; with the rows at hand, paired_auc_diff_mean and auc_mean_ci resample
    them instead, and on disjoint rows they agree with this (tests/test_metrics.py). Seeds that
    share rows have correlated errors, which this interval would understate."""
    est = [tuple(float(x) for x in e) for e in estimates]
    if not est or any(len(e) != 3 or not e[1] <= e[0] <= e[2] for e in est):
        raise ValueError(f"pooled_mean needs per seed (value, low, high) with low <= value <= high; got {estimates!r}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    mean = float(np.mean([e[0] for e in est]))
    se = math.sqrt(sum(((h - lo) / (2 * z)) ** 2 for _, lo, h in est)) / len(est)
    return {"diff": mean, "low": mean - z * se, "high": mean + z * se, "seeds": len(est)}


def auc_mean_ci(seeds, seed: int = 0, n_boot: int = 1000, level: float = 0.95) -> tuple[float, float, float]:
    """The mean over seeds of one arm's AUC with its percentile bootstrap interval. `seeds`: per seed
    (row ids, labels, scores); rows resampled as in paired_auc_diff_mean (a row several seeds scored
    drawn for all of them). Like it, the interval covers the rows' noise in the mean, not the spread
    between seeds. One seed: auc and auc_ci's figures."""
    ids = [np.asarray(s[0]).ravel() for s in seeds]
    labels = [np.asarray(s[1]).astype(bool).ravel() for s in seeds]
    scores = [np.asarray(s[2], dtype=np.float64).ravel() for s in seeds]
    if not seeds or any(len(y) != len(i) or len(x) != len(i) for i, y, x in zip(ids, labels, scores)):
        raise ValueError("auc_mean_ci needs per seed (row ids, labels, scores), one of each per row")
    if any(y.all() or not y.any() for y in labels):
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean([auc(y, x) for y, x in zip(labels, scores)]))
    groups = [_score_groups(x) for x in scores]
    boots = [np.mean([_boot_auc_weighted(y, *g, w) for y, w, g in zip(labels, ws, groups)], axis=0)
             for ws in _seed_draws(ids, n_boot, seed)]
    return (mean, *_percentiles(np.concatenate(boots), level))


def _stat_summary(point_a: np.ndarray, point_b: np.ndarray, boot_a: np.ndarray, boot_b: np.ndarray,
                  stat, level: float) -> dict[str, float]:
    """One across-client statistic (mean, min, gap) of a and of b, and of a - b, with intervals."""
    va, vb = stat(boot_a), stat(boot_b)
    out = {"a": float(stat(point_a[:, None])[0]), "b": float(stat(point_b[:, None])[0])}
    out["diff"] = out["a"] - out["b"]
    out["a_low"], out["a_high"] = _percentiles(va, level)
    out["b_low"], out["b_high"] = _percentiles(vb, level)
    out["low"], out["high"] = _percentiles(va - vb, level)
    return out


CLIENT_STATS = {  # each maps (clients x resamples) AUCs to one value per resample
    "mean": lambda x: np.nanmean(x, axis=0),
    "min": lambda x: np.nanmin(x, axis=0),
    "gap": lambda x: np.nanmax(x, axis=0) - np.nanmin(x, axis=0),
}


def paired_client_aucs(labels, scores_a, scores_b, clients, seed: int = 0, n_boot: int = 1000,
                       level: float = 0.95) -> dict:
    """Per-client AUCs of scorers a and b on the same rows, and what a fairness comparison reads from
    them: the mean, the worst client (min) and the gap (max - min), each for a, b and a - b with a
    percentile bootstrap interval. Rows are resampled within each client, the same resample for a
    and b, so every resample keeps each client's row count and the comparison stays paired. A client
    whose rows hold one class has no AUC and is left out (listed under `skipped`)."""
    pos = np.asarray(labels).astype(bool).ravel()
    a = np.asarray(scores_a, dtype=np.float64).ravel()
    b = np.asarray(scores_b, dtype=np.float64).ravel()
    clients = np.asarray(clients).ravel()
    per, boot_a, boot_b, skipped = [], [], [], []
    for c in np.unique(clients):
        m = clients == c
        pc, ac, bc = pos[m], a[m], b[m]
        if pc.all() or not pc.any():
            skipped.append(int(c))
            continue
        (ga, ka), (gb, kb) = _score_groups(ac), _score_groups(bc)
        # A seed per client, so adding a client does not change the others' resamples.
        pairs = [(_boot_auc(pc, ga, ka, idx), _boot_auc(pc, gb, kb, idx))
                 for idx in _boot_chunks(int(m.sum()), n_boot, [seed, int(c)])]
        boot_a.append(np.concatenate([p[0] for p in pairs]))
        boot_b.append(np.concatenate([p[1] for p in pairs]))
        row = {"client": int(c), "rows": int(m.sum()), "positives": int(pc.sum()), "a": auc(pc, ac), "b": auc(pc, bc)}
        row["a_low"], row["a_high"] = _percentiles(boot_a[-1], level)
        row["b_low"], row["b_high"] = _percentiles(boot_b[-1], level)
        row["diff"] = row["a"] - row["b"]
        row["low"], row["high"] = _percentiles(boot_a[-1] - boot_b[-1], level)
        per.append(row)
    if not per:
        raise ValueError("no client's rows hold both classes: there is no per-client AUC to compare")
    point_a, point_b = np.array([r["a"] for r in per]), np.array([r["b"] for r in per])
    ba, bb = np.stack(boot_a), np.stack(boot_b)
    out = {"clients": per, "skipped": skipped, "rows": int(sum(r["rows"] for r in per))}
    for name, stat in CLIENT_STATS.items():
        out[name] = _stat_summary(point_a, point_b, ba, bb, stat, level)
    return out
