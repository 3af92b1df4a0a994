"""MovieLens-100K download, verification and caching as Parquet."""

import csv
import hashlib
import http.client
import io
import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd

from fedsim.cache import download_wheel, fedsim_home, sha256_file

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_DIR = "recbole/dataset_example/ml-100k/"
RECBOLE_FILES_SHA256 = {
    RECBOLE_DIR + "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    RECBOLE_DIR + "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
# sha256 of canonical_ratings_csv(ratings); identical whichever source the data came from.
RATINGS_SHA256 = "3d515bb97e9f254829ec78777f0ae38247314ef846682562c27c0950bed2da08"
NUM_RATINGS, NUM_USERS, NUM_ITEMS = 100_000, 943, 1_682


class DataError(RuntimeError):
    """Dataset missing, corrupted or not matching its pinned hash."""


class _Unavailable(Exception):
    """A source could not be reached; the next source is tried."""


def _dataset_dir(home: Path | None) -> Path:
    return Path(home if home is not None else fedsim_home()) / "data" / "movielens-100k"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_ratings_csv(ratings: pd.DataFrame) -> str:
    # Integer ratings and a fixed row order make the text independent of the source's file layout.
    canon = pd.DataFrame({
        "user": ratings["user"].astype("int64"),
        "item": ratings["item"].astype("int64"),
        "rating": ratings["rating"].round().astype("int64"),
        "timestamp": ratings["timestamp"].astype("int64"),
    }).sort_values(["user", "item"], kind="stable")
    return canon.to_csv(index=False, lineterminator="\n")


def ratings_sha256(ratings: pd.DataFrame) -> str:
    return sha256_bytes(canonical_ratings_csv(ratings).encode())


def _check_hash(what: str, expected: str, actual: str) -> None:
    if expected != actual:
        raise DataError(f"sha256 mismatch for {what}: expected {expected}, got {actual}")


def _year_of(raw_titles: pd.Series) -> pd.Series:
    """Release year from a GroupLens title ending in "(1995)" (or "(1995) (V)"); <NA> when absent."""
    year = raw_titles.astype(str).str.extract(r"\((\d{4})\)(?:\s*\(V\))?\s*$")[0]
    return pd.to_numeric(year, errors="coerce").astype("Int64")


def _tidy(ratings: pd.DataFrame, items: pd.DataFrame, year: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    ratings = pd.DataFrame({
        "user": ratings["user"].astype("int64"),
        "item": ratings["item"].astype("int64"),
        "rating": ratings["rating"].astype("float32"),
        "timestamp": ratings["timestamp"].astype("int64"),
    }).sort_values(["user", "item"], kind="stable").reset_index(drop=True)
    # GroupLens titles end in " (1995)"; RecBole strips that but keeps it on item 1412,
    # whose title ends in "(1995) (V)" (video release) in the original.
    titles = items["title"].astype(str).str.replace(r"\s*\(\d{4}\)(\s*\(V\))?\s*$", "", regex=True)
    titles = titles.str.strip()
    # RecBole ships item 267 misspelt; GroupLens calls it "unknown".
    titles = titles.where(titles != "unkonwn", "unknown")
    # The year is kept apart from the title: prompts show "Title (Year)" (TALLRec's item text) or
    # the bare title (data.item_text), and two films of one name differ by it.
    items = pd.DataFrame({"item": items["item"].astype("int64"), "title": titles,
                          "year": pd.array(year, dtype="Int64")})
    return ratings, items.sort_values("item").reset_index(drop=True)


def _verify(ratings: pd.DataFrame, items: pd.DataFrame, where: str) -> None:
    _check_hash(f"ratings from {where}", RATINGS_SHA256, ratings_sha256(ratings))
    if len(items) != NUM_ITEMS or items["item"].nunique() != NUM_ITEMS:
        raise DataError(f"items from {where}: expected {NUM_ITEMS} unique items, got {len(items)} rows")
    if not ratings["item"].isin(items["item"]).all():
        raise DataError(f"items from {where} lack some rated items")


def read_grouplens_zip(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    with zipfile.ZipFile(path) as zf:
        ratings = pd.read_csv(io.BytesIO(zf.read("ml-100k/u.data")), sep="\t", header=None,
                              names=["user", "item", "rating", "timestamp"])
        items = pd.read_csv(io.BytesIO(zf.read("ml-100k/u.item")), sep="|", header=None,
                            usecols=[0, 1], names=["item", "title"], encoding="latin-1",
                            quoting=csv.QUOTE_NONE, keep_default_na=False)
    return _tidy(ratings, items, _year_of(items["title"]))


def _from_grouplens(out: Path, log) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    # A zip placed here by hand (offline machines) is used without touching the network.
    local = out / "ml-100k.zip"
    if not local.exists():
        part = out / "ml-100k.zip.part"
        try:
            with urllib.request.urlopen(GROUPLENS_URL, timeout=10) as response:
                part.write_bytes(response.read())
        except (OSError, http.client.HTTPException) as e:
            part.unlink(missing_ok=True)
            raise _Unavailable(f"cannot download {GROUPLENS_URL}: {e}") from e
        os.replace(part, local)
    log(f"fedsim: reading MovieLens-100K from {local}")
    try:
        return *read_grouplens_zip(local), str(local)
    except (zipfile.BadZipFile, KeyError) as e:
        raise _Unavailable(f"{local} is not a usable ml-100k.zip: {e}") from e


def _read_recbole_member(zf: zipfile.ZipFile, name: str) -> bytes:
    data = zf.read(name)
    _check_hash(name, RECBOLE_FILES_SHA256[name], sha256_bytes(data))
    return data


def read_recbole_wheel(wheel: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    _check_hash(wheel.name, RECBOLE_WHEEL_SHA256, sha256_file(wheel))
    with zipfile.ZipFile(wheel) as zf:
        inter = _read_recbole_member(zf, RECBOLE_DIR + "ml-100k.inter")
        item = _read_recbole_member(zf, RECBOLE_DIR + "ml-100k.item")
    ratings = pd.read_csv(io.BytesIO(inter), sep="\t", header=0,
                          names=["user", "item", "rating", "timestamp"])
    items = pd.read_csv(io.BytesIO(item), sep="\t", header=0, usecols=[0, 1, 2], names=["item", "title", "year"],
                        quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8")
    year = pd.to_numeric(items["year"], errors="coerce").astype("Int64")
    # Item 1412 keeps "(1995) (V)" in RecBole's title; GroupLens' title is the source of truth there.
    year = year.fillna(_year_of(items["title"]))
    return _tidy(ratings, items, year)


def _from_recbole(log) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    log(f"fedsim: fetching MovieLens-100K from the PyPI wheel {RECBOLE_REQUIREMENT}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wheel = download_wheel(RECBOLE_REQUIREMENT, Path(tmp))
        except RuntimeError as e:
            raise _Unavailable(str(e)) from e
        return *read_recbole_wheel(wheel), f"{wheel.name} from PyPI"


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _has_year(items_path: Path) -> bool:
    """Caches written before items had a year column are rebuilt once."""
    import pyarrow.parquet as pq

    try:
        return "year" in pq.read_schema(items_path).names
    except Exception:  # a damaged file: load_movielens_100k reports it with its path
        return True


def fetch_movielens_100k(home: Path | None = None, log=print) -> Path:
    out = _dataset_dir(home)
    ratings_path, items_path = out / "ratings.parquet", out / "items.parquet"
    if ratings_path.exists() and items_path.exists() and _has_year(items_path):
        return out
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for name, source in [("GroupLens", lambda: _from_grouplens(out, log)),
                         ("PyPI", lambda: _from_recbole(log))]:
        try:
            ratings, items, where = source()
        except _Unavailable as e:
            log(f"fedsim: {name} source unavailable ({e}); trying the next source")
            failures.append(f"{name}: {e}")
            continue
        _verify(ratings, items, where)
        _write_parquet(items, items_path)
        _write_parquet(ratings, ratings_path)
        return out
    raise DataError(
        "could not fetch MovieLens-100K, both sources failed:\n  " + "\n  ".join(failures)
        + f"\nTo install it by hand, download {GROUPLENS_URL} and save it as {out / 'ml-100k.zip'}, "
        "or point FEDSIM_HOME at a directory whose data/movielens-100k/ already holds "
        "ratings.parquet and items.parquet (e.g. copied from a machine with network access).")


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for damaged files
        raise DataError(f"cannot read {path} ({e}); delete it to fetch the data again") from e


def load_movielens_100k(home: Path | None = None, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = fetch_movielens_100k(home, log)
    ratings, items = _read_parquet(out / "ratings.parquet"), _read_parquet(out / "items.parquet")
    # Cheap (~0.1 s) and catches cache files edited or damaged after download.
    _verify(ratings, items, str(out))
    return ratings, items
