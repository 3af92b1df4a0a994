"""APA-style exact unlearning (fedsim.unlearning, docs/unlearning.md): shard partitions, the
per-row merge, shard adapters that never mix, and a deletion that retrains only what it touches
and ends bit for bit where a run that never saw the rows ends."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim.config import ConfigError, load_config
from fedsim.models.routing import Route, StackedLoRALinear
from fedsim.unlearning.merge import neighbour_weights, row_losses
from fedsim.unlearning.partition import assign, balanced_shards, random_shards, user_shards


def _rows(n_users=30, per_user=12, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user": np.repeat(np.arange(n_users), per_user),
                         "item": rng.integers(0, 500, n_users * per_user),
                         "timestamp": np.arange(n_users * per_user) * 7 + 10**9})


# -- partitions -------------------------------------------------------------------------------------

def test_user_partition_keeps_each_user_in_one_shard_and_is_seeded():
    rows = _rows()
    s = assign(rows, "user", 4, seed=3)
    assert rows.assign(s=s).groupby("user")["s"].nunique().max() == 1
    assert set(s) == {0, 1, 2, 3}
    assert np.array_equal(s, assign(rows, "user", 4, seed=3))
    assert not np.array_equal(s, assign(rows, "user", 4, seed=4))


def test_hash_partitions_do_not_move_rows_when_others_are_deleted():
    rows = _rows()
    for method in ("random", "user"):
        full = assign(rows, method, 4, seed=1)
        kept = (rows["user"] != 5).to_numpy() & (np.arange(len(rows)) % 3 != 0)
        assert np.array_equal(assign(rows[kept], method, 4, seed=1), full[kept])
    r = random_shards(rows["user"], rows["item"], rows["timestamp"], 4, 0)
    assert np.bincount(r, minlength=4).min() > len(rows) / 4 * 0.6  # roughly balanced
    assert np.array_equal(user_shards([7, 7, 9], 3, 0)[:2], user_shards([7, 7], 3, 0))


def test_semantic_partition_is_balanced_and_follows_the_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    x = np.concatenate([c + rng.normal(0, 0.5, (n, 2)) for c, n in zip(centres, (40, 30, 20))])
    s = balanced_shards(x, 3, seed=0)
    sizes = np.bincount(s, minlength=3)
    assert sizes.tolist() == [30, 30, 30]  # the cap ceil(90 / 3): the big cluster overflows
    # the smaller clusters stay whole, the big one keeps 30 rows in its own shard
    assert len(set(s[40:70])) == 1 and len(set(s[70:])) == 1 and len({s[40], s[70]}) == 2
    assert np.bincount(s[:40], minlength=3).max() == 30
    assert np.array_equal(s, balanced_shards(x, 3, seed=0))
    loose = balanced_shards(x, 3, seed=0, cap=60)
    assert np.bincount(loose).max() <= 60 and np.bincount(loose).max() > 30
    with pytest.raises(ValueError, match="unlearning.shard_size: 20 x 3 shards holds fewer than the 90"):
        balanced_shards(x, 3, seed=0, cap=20)
    with pytest.raises(ValueError, match="unlearning.partition=semantic needs one hidden state per train row"):
        assign(_rows(), "semantic", 2, 0)


def test_unlearning_config_is_off_by_default_and_errors_name_the_key():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.unlearning.shards == 0
    ok = load_config("configs/tiny.yaml", ["unlearning.shards=4", "unlearning.partition=semantic", "unlearning.shard_size=500"])
    assert ok.unlearning.shards == 4
    cases = [(["unlearning.shards=-1"], "unlearning.shards: -1 must be >= 0"),
             (["unlearning.shards=2", "unlearning.partition=kmeans"], "unlearning.partition: 'kmeans' is not one of"),
             (["unlearning.shards=2", "unlearning.shard_size=10"], "unlearning.shard_size: 10 caps the semantic partition only"),
             (["unlearning.shards=2", "unlearning.neighbours=0"], "unlearning.neighbours: 0 must be >= 1"),
             (["unlearning.shards=2", "unlearning.merge=mean"], "unlearning.merge: 'mean' is not one of"),
             (["unlearning.shards=2", "strategy.lora_mode=stack"], "strategy.lora_mode: 'stack' exports a dense update"),
             (["unlearning.shards=2", "strategy.name=pplr"], "strategy.name: 'pplr' keeps per-client adapters"),
             (["unlearning.shards=2", "eval.split=valid"], "eval.split: 'valid' is where the merge finds"),
             (["unlearning.shards=2", "unlearning.tau=-1"], "unlearning.tau: -1.0 must be >= 0")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config("configs/tiny.yaml", overrides)


# -- the merge --------------------------------------------------------------------------------------

def test_neighbour_weights_favour_the_adapter_that_is_right_on_similar_rows():
    keys = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    # adapter 0 is right on the first two rows, adapter 1 on the last two
    loss = np.array([[0.1, 2.0], [0.1, 2.0], [2.0, 0.1], [2.0, 0.1]])
    w = neighbour_weights(np.array([[1.0, 0.05], [0.05, 1.0]]), keys, loss, neighbours=2, tau=2.0)
    expect = np.exp(-2.0 * np.array([0.1, 2.0]))
    assert np.allclose(w[0], expect / expect.sum()) and np.allclose(w[1], expect[::-1] / expect.sum())
    assert np.allclose(neighbour_weights(keys, keys, loss, 2, tau=0.0), 0.5)  # tau 0: uniform
    p, y = np.array([[0.9, 0.2]]), np.array([1])
    assert np.allclose(row_losses(p, y), [[-math.log(0.9), -math.log(0.2)]])


def test_stacked_layer_mixes_factors_or_outputs_per_row():
    torch.manual_seed(0)
    C, r, d_in, d_out, n = 3, 2, 5, 4, 6
    base = torch.nn.Linear(d_in, d_out)
    A, B = torch.randn(C, r, d_in), torch.randn(C, d_out, r)
    route = Route(C, "cpu")
    layer = StackedLoRALinear(base, A, B, 0.5, 0.0, route).eval()
    x = torch.randn(n, 1, d_in)
    w = torch.softmax(torch.randn(n, C), 1)
    route.set_weights(w, factors=True)
    got = layer(x)
    for i in range(n):
        a, b = torch.einsum("c,crd->rd", w[i], A), torch.einsum("c,cor->or", w[i], B)
        assert torch.allclose(got[i, 0], base(x[i, 0]) + 0.5 * b @ a @ x[i, 0], atol=1e-5)
    route.set_weights(w, factors=False)
    got = layer(x)
    for i in range(n):
        mix = sum(w[i, c] * B[c] @ A[c] @ x[i, 0] for c in range(C))
        assert torch.allclose(got[i, 0], base(x[i, 0]) + 0.5 * mix, atol=1e-5)
    one = torch.eye(C)[[1] * n]  # one-hot weights: the single adapter, either way
    for factors in (True, False):
        route.set_weights(one, factors=factors)
        assert torch.allclose(layer(x)[:, 0], base(x[:, 0]) + 0.5 * x[:, 0] @ A[1].T @ B[1].T, atol=1e-5)
