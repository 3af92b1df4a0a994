"""TALLRec-style samples: predict like/dislike of a target item from the user's recent history."""

import numpy as np
import pandas as pd

SPLITS = ("train", "valid", "test")


def _check_split(split) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in split)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"data.split must be three positive fractions (train, valid, test) "
                         f"summing to 1, got {split!r}")
    return fractions


def _history_lists(titles: np.ndarray, source: np.ndarray, target: np.ndarray, keep: np.ndarray,
                   num_samples: int) -> list[list[str]]:
    # (source, target) pairs arrive grouped by target and in time order, so slicing the flat
    # title list by per-target counts yields each sample's history oldest first.
    source, target = source[keep], target[keep]
    counts = np.bincount(target, minlength=num_samples)
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    flat = titles[source].tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


SMOOTHING = 5.0  # pseudo-counts pulling sparse users/items toward the global like-rate
PROTOCOLS = ("global", "tallrec")
TALLREC_ROWS = 10_000


def build_samples(ratings: pd.DataFrame, items: pd.DataFrame, history_len=10, like_threshold=3.0,
                  split=(0.8, 0.1, 0.1), protocol="global", keep_last=None, with_year=False) -> pd.DataFrame:
    """One sample per rating: the user's previous `history_len` ratings (split into liked and
    disliked titles, oldest first) and the rated item as the target.

    protocol `global`: every rating with at least one earlier rating of its user; all samples
    split by the target's time. `tallrec` (TALLRec, Bao et al. 2023): only targets with exactly
    `history_len` earlier ratings, and the `keep_last` (default 10,000) most recent of those.
    Either way the kept samples are sorted by the target's timestamp and split in that order.
    `with_year`: items are written "Title (Year)" where the items table has a year.
    """
    fractions = _check_split(split)
    if history_len < 1:
        raise ValueError(f"data.history_len must be >= 1, got {history_len}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"data.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "tallrec" and keep_last is None:
        keep_last = TALLREC_ROWS
    r = ratings.sort_values(["user", "timestamp", "item"], kind="stable").reset_index(drop=True)
    title_of = item_texts(items, with_year)
    titles = r["item"].map(title_of)
    if titles.isna().any():
        missing = r.loc[titles.isna(), "item"].unique()[:5].tolist()
        raise ValueError(f"items table has no title for rated items such as {missing}")
    titles = titles.to_numpy(dtype=object)
    user = r["user"].to_numpy()
    liked_flag = r["rating"].to_numpy() > like_threshold

    # Position of each rating within its user's time-ordered sequence.
    first = np.r_[True, user[1:] != user[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(r)), 0))
    pos = np.arange(len(r)) - group_start
    # A sample needs at least one earlier rating; TALLRec's a full window.
    rows = np.flatnonzero(pos >= (history_len if protocol == "tallrec" else 1))

    # All (history row, sample) pairs: offsets -history_len..-1, kept when inside the same user.
    offsets = np.arange(-history_len, 0)
    source = (rows[:, None] + offsets[None, :]).ravel()
    target = np.repeat(np.arange(len(rows)), history_len)
    inside = source >= group_start[rows].repeat(history_len)
    source, target = source[inside], target[inside]
    liked = _history_lists(titles, source, target, liked_flag[source], len(rows))
    disliked = _history_lists(titles, source, target, ~liked_flag[source], len(rows))

    samples = pd.DataFrame({
        "user": user[rows].astype("int64"),
        "item": r["item"].to_numpy()[rows].astype("int64"),
        "timestamp": r["timestamp"].to_numpy()[rows].astype("int64"),
        "rating": r["rating"].to_numpy()[rows].astype("float32"),
        "label": liked_flag[rows].astype("int64"),
        "title": pd.Series(titles[rows], dtype="str"),
        "liked": liked,
        "disliked": disliked,
    })
    samples = samples.sort_values(["timestamp", "user", "item"], kind="stable").reset_index(drop=True)
    if keep_last is not None:
        samples = samples.iloc[-keep_last:].reset_index(drop=True)
    n = len(samples)
    cut_train = int(round(n * fractions[0]))
    cut_valid = int(round(n * (fractions[0] + fractions[1])))
    split_of = np.full(n, SPLITS[2], dtype=object)
    split_of[:cut_train] = SPLITS[0]
    split_of[cut_train:cut_valid] = SPLITS[1]
    samples["split"] = pd.Series(split_of, dtype="str")
    return samples


def like_rate(train: pd.DataFrame, key: str, evaluate: pd.DataFrame) -> np.ndarray:
    """Smoothed share of `train` rows with label 1 per value of `key` (an item's like-rate over
    the training split), for each row of `evaluate`; unseen values get the overall rate."""
    overall = train["label"].mean()
    grouped = train.groupby(key)["label"].agg(["sum", "count"])
    rate = (grouped["sum"] + SMOOTHING * overall) / (grouped["count"] + SMOOTHING)
    return evaluate[key].map(rate).fillna(overall).to_numpy(dtype=np.float64)


def add_target_rate(samples: pd.DataFrame) -> pd.DataFrame:
    """Column `target_rate`: the target item's like-rate over the train split, the number the
    popularity baseline scores with, for templates that show it ({target_rate}). It is computed
    on pooled training rows, as a public catalogue rating would be known to every client."""
    train = samples[samples["split"] == SPLITS[0]]
    return samples.assign(target_rate=like_rate(train, "item", samples))


def item_texts(items: pd.DataFrame, with_year: bool = False) -> pd.Series:
    """item -> the text a prompt shows: the title, or "Title (Year)" (TALLRec's item text) where
    the items table has a year."""
    items = items.drop_duplicates("item").set_index("item")
    title = items["title"].astype(str)
    if with_year and "year" in items:
        year = items["year"]
        title = title.where(year.isna(), title + " (" + year.astype("string") + ")")
    return title


def _truncated_svd(a: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors and values by randomized range finding (Halko et al.).

    A full LAPACK SVD of MovieLens' 943 x 1682 matrix took 20-40 s on a busy 2-core machine
    (OpenBLAS threads fighting Ray workers); this needs a few tall-skinny products instead.
    """
    width = min(k + 10, *a.shape)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(a @ rng.standard_normal((a.shape[1], width)))
    for _ in range(6):  # power iterations sharpen the spectrum so the top-k are accurate
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    u, s, _ = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u)[:, :k], s[:k]


def user_embeddings(ratings: pd.DataFrame, dim=16, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of U*S from a truncated SVD of the globally centred user x item matrix.

    Centring by the global mean (not per user) keeps each user's generosity in the embedding,
    which is what makes clusters of these vectors differ in like-rate.
    """
    user_ids, user_idx = np.unique(ratings["user"].to_numpy(), return_inverse=True)
    _, item_idx = np.unique(ratings["item"].to_numpy(), return_inverse=True)
    values = ratings["rating"].to_numpy(dtype=np.float64)
    shape = (len(user_ids), item_idx.max() + 1)
    # Repeated (user, item) ratings are averaged; unrated cells stay at the mean (0 after centring).
    sums, counts = np.zeros(shape), np.zeros(shape)
    np.add.at(sums, (user_idx, item_idx), values - values.mean())
    np.add.at(counts, (user_idx, item_idx), 1.0)
    matrix = np.divide(sums, counts, out=np.zeros(shape), where=counts > 0)
    u, s = _truncated_svd(matrix, min(dim, *shape), seed)
    emb = u * s
    # Singular vectors have arbitrary signs; fixing them makes embeddings reproducible.
    signs = np.sign(emb[np.abs(emb).argmax(axis=0), np.arange(emb.shape[1])])
    out = np.zeros((len(user_ids), dim))
    out[:, :emb.shape[1]] = emb * np.where(signs == 0, 1.0, signs)
    return user_ids.astype("int64"), out
