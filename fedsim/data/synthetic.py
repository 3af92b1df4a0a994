"""Small synthetic rating data with planted taste clusters, for fast tests and demos."""

import itertools

import numpy as np
import pandas as pd

_ADJECTIVES = ["Silent", "Red", "Broken", "Golden", "Hidden", "Last", "Wild", "Frozen", "Midnight",
               "Lost", "Crimson", "Distant", "Electric", "Savage", "Quiet", "Burning", "Iron",
               "Velvet", "Hollow", "Bright"]
_NOUNS = ["River", "Falcon", "Empire", "Garden", "Horizon", "Mirror", "Storm", "Harbor", "Kingdom",
          "Echo", "Frontier", "Lantern", "Valley", "Shadow", "Voyage", "Orchard", "Signal", "Tide",
          "Citadel", "Canyon"]
_SUFFIXES = ["", " Returns", " II", " Rising", " Forever", " Reborn"]
_LATENT_DIM = 8


def _titles(num_items: int, rng: np.random.Generator) -> list[str]:
    combos = [f"{a} {n}{s}" for a, n, s in itertools.product(_ADJECTIVES, _NOUNS, _SUFFIXES)]
    order = rng.permutation(len(combos))
    # Past the vocabulary size, numbered sequels keep titles unique.
    return [combos[order[i % len(combos)]] + ("" if i < len(combos) else f" {i // len(combos) + 1}")
            for i in range(num_items)]


def make_synthetic(num_users=200, num_items=300, ratings_per_user=40, num_clusters=4,
                   taste_strength=2.0, seed=0, generosity=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`generosity` g: the clusters' like-tendency spans [-g, g] (None: [-0.25, 0.75]). A large g
    makes a user's label follow their own history (generous users like most targets), the signal
    a model reading the history must pick up: fedsim's "does training work" tests use it."""
    if ratings_per_user > num_items:
        raise ValueError(f"ratings_per_user={ratings_per_user} exceeds num_items={num_items}")
    rng = np.random.default_rng(seed)
    cluster = rng.permutation(num_users) % num_clusters
    # Coordinate 0 meets a constant 1 in every item vector, so it acts as the cluster's
    # generosity: clusters then differ in like-rate, not only in which items they like.
    centres = rng.normal(0.0, 1.0, (num_clusters, _LATENT_DIM))
    low, high = (-0.25, 0.75) if generosity is None else (-generosity, generosity)
    centres[:, 0] = np.linspace(low, high, num_clusters) if num_clusters > 1 else (low + high) / 2
    users = centres[cluster] + rng.normal(0.0, 0.3, (num_users, _LATENT_DIM))
    items = rng.normal(0.0, 1.0 / np.sqrt(_LATENT_DIM), (num_items, _LATENT_DIM))
    items[:, 0] = 1.0

    chosen = np.stack([rng.choice(num_items, ratings_per_user, replace=False) for _ in range(num_users)])
    affinity = np.einsum("ud,ukd->uk", users, items[chosen])
    noise = rng.normal(0.0, 0.5, affinity.shape)
    rating = np.round(np.clip(3.0 + taste_strength * affinity + noise, 1.0, 5.0))
    # Users start at different times and rate at irregular gaps, so the global time split mixes users.
    start = 1_000_000_000 + rng.integers(0, 30 * 86_400, num_users)
    gaps = rng.integers(60, 3 * 86_400, (num_users, ratings_per_user))
    timestamp = start[:, None] + np.cumsum(gaps, axis=1)

    ratings = pd.DataFrame({
        "user": np.repeat(np.arange(1, num_users + 1), ratings_per_user).astype("int64"),
        "item": (chosen.ravel() + 1).astype("int64"),
        "rating": rating.ravel().astype("float32"),
        "timestamp": timestamp.ravel().astype("int64"),
        "cluster": np.repeat(cluster, ratings_per_user).astype("int64"),
    })
    items_df = pd.DataFrame({"item": np.arange(1, num_items + 1, dtype="int64"),
                             "title": pd.Series(_titles(num_items, rng), dtype="str")})
    return ratings, items_df
