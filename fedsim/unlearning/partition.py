"""Which shard each train row belongs to: pure, seeded functions of the rows (and, for the semantic
partition, of their hidden states).

`random` and `user` hash the row key / the user with the seed, so a row's shard never depends on
which other rows exist: deleting rows leaves every other row in its shard, and a run that never had
the deleted rows puts the rest exactly where the unlearned run has them. `semantic` (APA's balanced
partition) is a model fitted once on the rows: k-means on the frozen base model's hidden states of
the prompts, then a greedy nearest-centre assignment under a size cap. A deletion keeps that fitted
assignment for the remaining rows (as APA does) rather than refitting it.
"""
from __future__ import annotations

import math

import numpy as np

from fedsim.data.partition import kmeans

PARTITIONS = ("random", "user", "semantic")
_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic is what it relies on)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_columns(seed: int, *columns) -> np.ndarray:
    """A seeded 64-bit hash of each row of the integer columns."""
    with np.errstate(over="ignore"):
        h = _mix(np.full(len(columns[0]), np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64))
        for col in columns:
            h = _mix(h ^ (np.asarray(col).astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return h


def random_shards(users, items, timestamps, shards: int, seed: int) -> np.ndarray:
    """Each row (user, item, timestamp) to shard hash(seed, key) mod K."""
    return (hash_columns(seed, users, items, timestamps) % np.uint64(shards)).astype(np.int64)


def user_shards(users, shards: int, seed: int) -> np.ndarray:
    """Each row to the shard of its user, hash(seed, user) mod K: all of a user's rows in one shard."""
    return (hash_columns(seed, users) % np.uint64(shards)).astype(np.int64)


def balanced_shards(x: np.ndarray, shards: int, seed: int, cap: int | None = None) -> np.ndarray:
    """APA's balanced partition: k-means centres of `x` (k-means++ seeding, Lloyd), then every
    (row, centre) pair in increasing distance, a row taking the centre when the row is still free
    and the centre holds fewer than `cap` rows (default ceil(N / K), so shards differ by at most one)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    cap = math.ceil(n / shards) if cap is None else cap
    if cap * shards < n:
        raise ValueError(f"unlearning.shard_size: {cap} x {shards} shards holds fewer than the {n} train rows")
    labels = kmeans(x, shards, seed)
    centres = np.stack([x[labels == c].mean(0) if np.any(labels == c) else x[0] for c in range(shards)])
    d = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    out = np.full(n, -1, dtype=np.int64)
    size = np.zeros(shards, dtype=np.int64)
    for flat in np.argsort(d, axis=None, kind="stable"):
        row, c = divmod(int(flat), shards)
        if out[row] < 0 and size[c] < cap:
            out[row] = c
            size[c] += 1
    return out


def assign(rows, method: str, shards: int, seed: int, embeddings: np.ndarray | None = None,
           cap: int | None = None) -> np.ndarray:
    """The shard of each row of `rows` (a frame with user, item, timestamp)."""
    if method not in PARTITIONS:
        raise ValueError(f"unlearning.partition must be one of {', '.join(PARTITIONS)}; got {method!r}")
    if shards < 1:
        raise ValueError(f"unlearning.shards must be >= 1, got {shards}")
    if method == "random":
        return random_shards(rows["user"], rows["item"], rows["timestamp"], shards, seed)
    if method == "user":
        return user_shards(rows["user"], shards, seed)
    if shards == 1 and embeddings is None:  # one shard (plain retraining) needs no hidden states
        embeddings = np.zeros((len(rows), 1))
    if embeddings is None or len(embeddings) != len(rows):
        raise ValueError("unlearning.partition=semantic needs one hidden state per train row")
    return balanced_shards(embeddings, shards, seed, cap)
