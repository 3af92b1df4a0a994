"""Your own data (`data.dataset: interactions`): an interaction log and an items table, CSV or Parquet.

`data.path`: one row per interaction, columns `user`, `item` (integer ids), `timestamp` (a number,
e.g. Unix seconds, or a date-time), and `rating` (a number, liked when > data.like_threshold) or
`label` (1 liked, 0 not). `data.items`: `item`, `title` (the text the prompt shows), optionally
`year` (used by data.item_text: title_year); other columns are ignored.

Every problem is an `InteractionsError` (a ConfigError: one line from the CLI) naming the file, the
column and a row (CSV: the line number, counting the header as line 1; Parquet: the row, from 1).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedsim.schema import ConfigError


class InteractionsError(ConfigError):
    """A schema problem in the user's data; the message names the file, the column and a row."""


def _read(path: Path, key: str) -> pd.DataFrame:
    if not path.exists():
        raise InteractionsError(f"{key}: {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except Exception as e:  # pandas and pyarrow raise many unrelated types for a damaged file
        raise InteractionsError(f"{key}: cannot read {path} ({str(e).splitlines()[0]})") from None
    raise InteractionsError(f"{key}: {path} is neither .csv nor .parquet")


def _row(path: Path, i: int) -> str:
    return f"line {i + 2}" if path.suffix.lower() == ".csv" else f"row {i + 1}"


def _require(df: pd.DataFrame, path: Path, needed: list[str]) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise InteractionsError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, df.columns))}); "
                                f"it needs {', '.join(needed)}")


def _integers(df: pd.DataFrame, path: Path, col: str) -> pd.Series:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise InteractionsError(f"{path}: column {col!r}, {_row(path, i)}: {df[col].iloc[i]!r} is not an integer id")
    return values.astype("int64")


def _numbers(df: pd.DataFrame, path: Path, col: str) -> pd.Series:
    values = pd.to_numeric(df[col], errors="coerce")
    if values.isna().any():
        i = int(values.isna().to_numpy().argmax())
        raise InteractionsError(f"{path}: column {col!r}, {_row(path, i)}: {df[col].iloc[i]!r} is not a number")
    return values


def _timestamps(df: pd.DataFrame, path: Path) -> pd.Series:
    values = pd.to_numeric(df["timestamp"], errors="coerce")
    if values.notna().any():  # numbers (e.g. Unix seconds): every row must be one
        bad = values.isna()
    else:  # date-times, as Unix seconds
        dates = pd.to_datetime(df["timestamp"], errors="coerce", utc=True, format="mixed")
        bad = dates.isna()
        values = (dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise InteractionsError(f"{path}: column 'timestamp', {_row(path, i)}: {df['timestamp'].iloc[i]!r} is "
                                f"neither a number nor a date-time")
    return values.astype("int64")


def read_items(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    df = _read(path, "data.items")
    _require(df, path, ["item", "title"])
    item = _integers(df, path, "item")
    title = df["title"].astype("string").str.strip()
    empty = title.isna() | (title == "")
    if empty.any():
        i = int(empty.to_numpy().argmax())
        raise InteractionsError(f"{path}: column 'title', {_row(path, i)}: item {item.iloc[i]} has no title")
    dup = item.duplicated()
    if dup.any():
        i = int(dup.to_numpy().argmax())
        raise InteractionsError(f"{path}: column 'item', {_row(path, i)}: item {item.iloc[i]} appears twice")
    out = pd.DataFrame({"item": item, "title": title.astype(str)})
    if "year" in df.columns:
        out["year"] = pd.to_numeric(df["year"], errors="coerce").astype("Int64")
    return out.sort_values("item").reset_index(drop=True)


def read_interactions(path: str | Path, items: pd.DataFrame, items_path: str | Path) -> pd.DataFrame:
    """The interactions as fedsim's ratings table (user, item, rating, timestamp); a `label`
    column becomes a rating of 0 or 1 (`binary` in the frame's attrs: liked when > 0.5)."""
    path = Path(path)
    df = _read(path, "data.path")
    if "rating" not in df.columns and "label" not in df.columns:
        raise InteractionsError(f"{path}: no column 'rating' or 'label' (columns: {', '.join(map(str, df.columns))}); "
                                f"it needs user, item, rating or label, timestamp")
    score = "rating" if "rating" in df.columns else "label"
    _require(df, path, ["user", "item", score, "timestamp"])
    user, item = _integers(df, path, "user"), _integers(df, path, "item")
    rating = _numbers(df, path, score)
    if score == "label":
        bad = ~rating.isin([0, 1])
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise InteractionsError(f"{path}: column 'label', {_row(path, i)}: {df['label'].iloc[i]!r} is not 0 or 1")
    ratings = pd.DataFrame({"user": user, "item": item, "rating": rating.astype("float32"),
                            "timestamp": _timestamps(df, path)})
    unknown = ~ratings["item"].isin(items["item"])
    if unknown.any():
        i = int(unknown.to_numpy().argmax())
        raise InteractionsError(f"{path}: column 'item', {_row(path, i)}: item {ratings['item'].iloc[i]} is not in "
                                f"data.items {items_path}")
    dup = ratings.duplicated(["user", "item", "timestamp"], keep=False)
    if dup.any():
        first = ratings.iloc[int(dup.to_numpy().argmax())][["user", "item", "timestamp"]].astype("int64")
        same = ((ratings["user"] == first["user"]) & (ratings["item"] == first["item"])
                & (ratings["timestamp"] == first["timestamp"])).to_numpy().nonzero()[0]
        raise InteractionsError(f"{path}: columns 'user', 'item', 'timestamp': {_row(path, same[0])} and "
                                f"{_row(path, same[1])} are the same interaction (user {first['user']}, item "
                                f"{first['item']}, timestamp {first['timestamp']}); keep one")
    counts = ratings["user"].map(ratings["user"].value_counts())
    if (counts < 2).any():
        i = int((counts < 2).to_numpy().argmax())
        raise InteractionsError(f"{path}: column 'user', {_row(path, i)}: user {ratings['user'].iloc[i]} has one "
                                f"interaction, and a sample needs an earlier one; drop such users or add their history")
    ratings = ratings.sort_values(["user", "item"], kind="stable").reset_index(drop=True)
    ratings.attrs["binary"] = score == "label"
    return ratings


def load_interactions(path: str | Path, items_path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    items = read_items(items_path)
    return read_interactions(path, items, items_path), items
