import numpy as np
import pandas as pd
import pytest

from fedsim.data.partition import partition_stats, partition_users, write_shards
from fedsim.data.samples import build_samples, user_embeddings
from fedsim.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(seed=0)


@pytest.fixture(scope="module")
def synthetic_samples(synthetic):
    return build_samples(*synthetic)


@pytest.fixture(scope="module")
def embedded_users(synthetic):
    ratings, _ = synthetic
    return user_embeddings(ratings)


# ---------------------------------------------------------------- synthetic data

def test_synthetic_is_deterministic_and_seed_dependent():
    a_ratings, a_items = make_synthetic(seed=3)
    b_ratings, b_items = make_synthetic(seed=3)
    pd.testing.assert_frame_equal(a_ratings, b_ratings)
    pd.testing.assert_frame_equal(a_items, b_items)
    c_ratings, _ = make_synthetic(seed=4)
    assert not a_ratings["rating"].equals(c_ratings["rating"])


def test_synthetic_schema_and_balance(synthetic):
    ratings, items = synthetic
    assert ratings.dtypes.to_dict() == {"user": "int64", "item": "int64", "rating": "float32",
                                        "timestamp": "int64", "cluster": "int64"}
    assert len(ratings) == 200 * 40
    assert ratings["user"].min() == 1 and items["item"].min() == 1
    assert set(ratings["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 0.35 <= (ratings["rating"] > 3).mean() <= 0.65
    assert ratings.groupby("user")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()
    assert items["title"].is_unique and len(items) == 300
    assert not ratings.duplicated(["user", "item"]).any()


# ---------------------------------------------------------------- samples

def hand_made():
    ratings = pd.DataFrame({
        "user":      [1,  1,  1,  1,  1,  2,  2,  2],
        "item":      [10, 11, 12, 13, 14, 10, 12, 11],
        "rating":    [5., 2., 4., 3., 1., 4., 4., 1.],
        "timestamp": [100, 200, 300, 400, 500, 150, 250, 250],
    })
    items = pd.DataFrame({"item": [10, 11, 12, 13, 14], "title": ["A", "B", "C", "D", "E"]})
    return ratings, items


def test_build_samples_history_and_labels():
    ratings, items = hand_made()
    samples = build_samples(ratings, items, history_len=2, split=(0.5, 0.25, 0.25))
    assert len(samples) == (5 - 1) + (3 - 1)  # every rating but each user's first
    assert samples.dtypes.astype(str).to_dict() == {
        "user": "int64", "item": "int64", "timestamp": "int64", "rating": "float32",
        "label": "int64", "title": "str", "liked": "object", "disliked": "object", "split": "str"}
    assert (samples["label"] == (samples["rating"] > 3).astype(int)).all()
    by_key = samples.set_index(["user", "item"])
    # User 1 at t=400 sees the two items before it: B (2, disliked) then C (4, liked).
    assert by_key.loc[(1, 13), "liked"] == ["C"]
    assert by_key.loc[(1, 13), "disliked"] == ["B"]
    assert by_key.loc[(1, 14), "liked"] == ["C"] and by_key.loc[(1, 14), "disliked"] == ["D"]
    assert by_key.loc[(1, 11), "liked"] == ["A"] and by_key.loc[(1, 11), "disliked"] == []
    # Same timestamp: ties are broken by item id, so item 11 comes before item 12.
    assert by_key.loc[(2, 11), "liked"] == ["A"]
    assert by_key.loc[(2, 12), "liked"] == ["A"] and by_key.loc[(2, 12), "disliked"] == ["B"]
    assert by_key.loc[(1, 13), "title"] == "D"


def test_build_samples_history_is_strictly_earlier_and_bounded(synthetic):
    ratings, items = synthetic
    samples = build_samples(ratings, items, history_len=5)
    title_of = items.set_index("item")["title"]
    ordered = ratings.sort_values(["user", "timestamp", "item"])
    for (user, item), row in samples.set_index(["user", "item"]).sample(50, random_state=0).iterrows():
        seq = ordered[ordered["user"] == user]
        pos = np.flatnonzero(seq["item"].to_numpy() == item)[0]
        earlier = seq.iloc[max(0, pos - 5):pos]
        assert row["liked"] == title_of[earlier.loc[earlier["rating"] > 3, "item"]].tolist()
        assert row["disliked"] == title_of[earlier.loc[earlier["rating"] <= 3, "item"]].tolist()
    assert (samples["liked"].map(len) + samples["disliked"].map(len)).between(1, 5).all()


def test_build_samples_splits_in_time_order(synthetic_samples):
    s = synthetic_samples
    counts = s["split"].value_counts()
    assert abs(counts["train"] / len(s) - 0.8) < 0.01
    assert abs(counts["valid"] / len(s) - 0.1) < 0.01
    ts = s.groupby("split")["timestamp"]
    assert ts.max()["train"] <= ts.min()["valid"]
    assert ts.max()["valid"] <= ts.min()["test"]
    assert ts.max()["train"] <= ts.min()["test"]


@pytest.mark.parametrize("split", [(0.8, 0.2, 0.0), (0.5, 0.3, 0.3), (0.9, 0.1)])
def test_build_samples_rejects_bad_split(split):
    with pytest.raises(ValueError, match="data.split"):
        build_samples(*hand_made(), split=split)


def test_user_embeddings_deterministic(synthetic):
    ratings, _ = synthetic
    ids, emb = user_embeddings(ratings, dim=8)
    ids2, emb2 = user_embeddings(ratings.sample(frac=1.0, random_state=1), dim=8)
    assert (ids == np.arange(1, 201)).all() and emb.shape == (200, 8)
    np.testing.assert_allclose(emb, emb2, atol=1e-9)


# ---------------------------------------------------------------- partitioning

def client_like_rates(ratings, users, client, num_clients):
    per_user = (ratings["rating"] > 3).groupby(ratings["user"]).mean()
    return np.array([per_user[users[client == c]].mean() for c in range(num_clients)])


@pytest.mark.parametrize("method", ["iid", "dirichlet", "kmeans"])
def test_every_user_assigned_once_and_no_empty_client(method, embedded_users):
    users, emb = embedded_users
    for num_clients in (3, 10, 50):
        client = partition_users(users, num_clients, method, seed=1, alpha=0.1, embeddings=emb)
        assert client.dtype == np.int64 and client.shape == users.shape
        assert client.min() == 0 and client.max() == num_clients - 1
        assert (np.bincount(client, minlength=num_clients) > 0).all()
        again = partition_users(users, num_clients, method, seed=1, alpha=0.1, embeddings=emb)
        assert (client == again).all()


def test_iid_is_balanced(embedded_users):
    users, _ = embedded_users
    sizes = np.bincount(partition_users(users, 7, "iid", seed=5))
    assert sizes.max() - sizes.min() <= 1


def test_clustered_partitions_are_non_iid(synthetic, embedded_users):
    ratings, _ = synthetic
    users, emb = embedded_users
    spread = {}
    for method in ("iid", "kmeans", "dirichlet"):
        client = partition_users(users, 4, method, seed=0, alpha=0.1, embeddings=emb)
        spread[method] = client_like_rates(ratings, users, client, 4).std()
    # Planted clusters differ in like-rate by ~0.4; random clients average that away.
    assert spread["kmeans"] > 3 * spread["iid"]
    assert spread["dirichlet"] > 2 * spread["iid"]
    assert spread["kmeans"] > 0.1


def test_dirichlet_alpha_controls_skew(synthetic, embedded_users):
    ratings, _ = synthetic
    users, emb = embedded_users
    spread = [client_like_rates(ratings, users,
                                partition_users(users, 4, "dirichlet", seed=s, alpha=a, embeddings=emb), 4).std()
              for a in (0.05, 100.0) for s in range(5)]
    assert np.mean(spread[:5]) > 2 * np.mean(spread[5:])


def test_partition_errors_name_config_keys(embedded_users):
    users, emb = embedded_users
    with pytest.raises(ValueError, match=r"partition\.method.*iid, dirichlet, kmeans"):
        partition_users(users, 4, "random")
    with pytest.raises(ValueError, match=r"clients\.num"):
        partition_users(users, len(users) + 1, "iid")
    for method in ("dirichlet", "kmeans"):
        with pytest.raises(ValueError, match="embeddings"):
            partition_users(users, 4, method)


# ---------------------------------------------------------------- shards

def test_write_shards(tmp_path, synthetic_samples, embedded_users):
    users, emb = embedded_users
    client = partition_users(users, 5, "kmeans", embeddings=emb)
    client_of_user = dict(zip(users.tolist(), client.tolist()))
    paths = write_shards(synthetic_samples, client_of_user, tmp_path / "a", 5)
    assert [p.name for p in paths] == [f"client_{i:04d}.parquet" for i in range(5)]
    shards = [pd.read_parquet(p) for p in paths]
    assert sum(len(s) for s in shards) == len(synthetic_samples)
    for c, shard in enumerate(shards):
        assert (shard["client"] == c).all()
        assert shard["user"].map(client_of_user).eq(c).all()
        assert list(shard.columns) == list(synthetic_samples.columns) + ["client"]
    assert list(shards[0]["liked"].iloc[0]) == synthetic_samples.set_index(
        ["user", "item"]).loc[tuple(shards[0][["user", "item"]].iloc[0]), "liked"]


def test_write_shards_caps_deterministically(tmp_path, synthetic_samples, embedded_users):
    users, emb = embedded_users
    client_of_user = dict(zip(users.tolist(), partition_users(users, 4, "iid").tolist()))
    caps = {"train": 100, "valid": None, "test": 7}
    first = [pd.read_parquet(p) for p in write_shards(synthetic_samples, client_of_user, tmp_path / "a",
                                                       4, max_rows=caps, seed=3)]
    second = [pd.read_parquet(p) for p in write_shards(synthetic_samples, client_of_user, tmp_path / "b",
                                                        4, max_rows=caps, seed=3)]
    other = [pd.read_parquet(p) for p in write_shards(synthetic_samples, client_of_user, tmp_path / "c",
                                                       4, max_rows=caps, seed=4)]
    full = synthetic_samples.assign(client=synthetic_samples["user"].map(client_of_user))
    for c in range(4):
        counts = first[c]["split"].value_counts()
        assert counts["train"] == 100 and counts["test"] == 7
        assert counts["valid"] == ((full["client"] == c) & (full["split"] == "valid")).sum()
        pd.testing.assert_frame_equal(first[c], second[c])
    assert any(not first[c]["item"].equals(other[c]["item"]) for c in range(4))


def test_write_shards_rejects_unassigned_users(tmp_path, synthetic_samples):
    with pytest.raises(ValueError, match="no client"):
        write_shards(synthetic_samples, {1: 0}, tmp_path, 1)


def test_partition_stats(tmp_path, synthetic_samples, embedded_users):
    users, _ = embedded_users
    client_of_user = dict(zip(users.tolist(), partition_users(users, 3, "iid").tolist()))
    stats = partition_stats(write_shards(synthetic_samples, client_of_user, tmp_path, 3))
    assert list(stats.columns) == ["client", "users", "train", "valid", "test", "like_rate"]
    assert stats["client"].tolist() == [0, 1, 2]
    assert stats["users"].sum() == 200
    assert stats[["train", "valid", "test"]].to_numpy().sum() == len(synthetic_samples)
    assert stats["like_rate"].between(0, 1).all()


# ---------------------------------------------------------------- baselines on synthetic data

def test_baselines_accept_shard_rows(tmp_path, synthetic_samples, embedded_users):
    # Rows read back from Parquet hold history as numpy arrays rather than lists.
    from fedsim.baselines import baseline_scores, evaluate_baselines

    users, _ = embedded_users
    client_of_user = dict(zip(users.tolist(), partition_users(users, 2, "iid").tolist()))
    shards = pd.concat([pd.read_parquet(p) for p in write_shards(synthetic_samples, client_of_user, tmp_path, 2)])
    train = synthetic_samples[synthetic_samples["split"] == "train"]
    from_memory = synthetic_samples[synthetic_samples["split"] == "test"]
    from_disk = shards[shards["split"] == "test"].sort_values(["timestamp", "user", "item"])
    a, b = baseline_scores(train, from_memory), baseline_scores(train, from_disk)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6)
    result = evaluate_baselines(train, from_memory)
    assert set(result) == {"popularity", "history_share", "history_popularity", "logistic_mf"}
    # The combination's log-odds are the sum of its two parts' log-odds.
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    np.testing.assert_allclose(logit(a["history_popularity"]), logit(a["history_share"]) + logit(a["popularity"]))
    # Planted tastes are learnable: the factor model must beat item popularity clearly.
    assert result["logistic_mf"]["auc"] > result["popularity"]["auc"] + 0.05
