"""Before the first round: build the samples, split users into clients, write one shard per client,
resolve the model, and score the conventional baselines on exactly the rows the run evaluates."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from fedsim.data.interactions import InteractionsError, load_interactions
from fedsim.data.movielens import GROUPLENS_URL, RATINGS_SHA256, load_movielens_100k, ratings_sha256
from fedsim.data.partition import assign_shards, partition_users, shard_stats, write_shard_files
from fedsim.data.prompt import EXTRA_WORDS, prompt_template
from fedsim.data.samples import add_target_rate, build_samples, item_texts, user_embeddings
from fedsim.data.synthetic import make_synthetic
from fedsim.models.loader import resolve_model
from fedsim.schema import ConfigError


def load_ratings(cfg, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    d = cfg.data
    if d.dataset == "movielens-100k":
        return load_movielens_100k(log=log)
    if d.dataset == "interactions":
        return load_interactions(Path(d.path).expanduser(), Path(d.items).expanduser())
    s = d.synthetic
    return make_synthetic(num_users=s.num_users, num_items=s.num_items, ratings_per_user=s.ratings_per_user,
                          num_clusters=s.num_clusters, taste_strength=s.taste_strength, seed=cfg.train.seed,
                          generosity=s.generosity)


def data_identity(cfg, samples: pd.DataFrame, log=print) -> dict:
    """What the run's data is, for MLflow's dataset input: the ratings' sha256 (MovieLens: the pinned
    hash its loader checks; synthetic: of the generated ratings), their source, the sample counts."""
    d = cfg.data
    if d.dataset == "movielens-100k":
        sha, source_type, source = RATINGS_SHA256, "http", {"url": GROUPLENS_URL}
    elif d.dataset == "interactions":  # your own log: the hash of the ratings as read
        sha, source_type, source = ratings_sha256(load_ratings(cfg, log)[0]), "local", {"path": str(d.path)}
    else:  # regenerating the synthetic ratings is cheap and keeps build_all_samples' shape
        sha, source_type = ratings_sha256(load_ratings(cfg, log)[0]), "code"
        source = {"tags": {"generator": "fedsim.data.synthetic.make_synthetic", "seed": cfg.train.seed,
                           **asdict(d.synthetic)}}
    counts = {s: int((samples["split"] == s).sum()) for s in ("train", "valid", "test")}
    return {"name": d.dataset, "sha256": sha, "source_type": source_type, "source": source,
            "profile": {"ratings_sha256": sha, "protocol": d.protocol, "samples": counts}}


def build_all_samples(cfg, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    ratings, items = load_ratings(cfg, log)
    d = cfg.data
    threshold = 0.5 if ratings.attrs.get("binary") else d.like_threshold  # a label column: 1 liked, 0 not
    samples = build_samples(ratings, items, history_len=d.history_len, like_threshold=threshold,
                            split=tuple(d.split), protocol=d.protocol, keep_last=d.keep_last,
                            with_year=d.item_text == "title_year")
    samples = add_target_rate(samples)
    if d.dataset == "interactions":
        counts = samples["split"].value_counts()
        empty = [s for s in ("train", "valid", "test") if not counts.get(s, 0)]
        if empty:
            raise InteractionsError(f"{d.path}: column 'timestamp': the {empty[0]} split is empty ({len(samples)} "
                                    f"samples split {d.split} by time); add interactions or change data.split")
    return samples, items


def subsample_eval(samples: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    if max_rows is None:
        return samples
    keep = []
    for split in ("valid", "test"):
        rows = samples.index[samples["split"] == split]
        if len(rows) > max_rows:
            rows = np.random.default_rng([seed, 11]).choice(rows, size=max_rows, replace=False)
        keep.append(rows)
    train = samples.index[samples["split"] == "train"]
    return samples.loc[np.sort(np.concatenate([train, *keep]))]


def assign_clients(cfg, samples: pd.DataFrame) -> dict[int, int]:
    users = np.sort(samples["user"].unique())
    emb = None
    if cfg.partition.method != "iid":
        # Users are grouped by their whole rating history, as a deployment would group them (by
        # taste, region, app). Train-period ratings alone would not do: under the global time
        # split most test users have none and would all fall into one cluster. The grouping only
        # decides who sits in which client; no model is fitted on it.
        ids, mat = user_embeddings(samples[["user", "item", "rating"]], seed=cfg.train.seed)
        pos = {u: i for i, u in enumerate(ids)}
        emb = np.stack([mat[pos[u]] if u in pos else np.zeros(mat.shape[1]) for u in users])
        # Unit length: cluster by the direction of taste, not by how much a user rated (raw SVD
        # rows put heavy raters apart; on MovieLens that left a 1-user client with no test rows).
        emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    clients = partition_users(users, cfg.clients.num, cfg.partition.method, seed=cfg.train.seed,
                              alpha=cfg.partition.alpha, embeddings=emb)
    return dict(zip(users.tolist(), clients.tolist()))


def describe_partition(stats: pd.DataFrame, max_rows: int = 40) -> str:
    """The per-client table, or for many clients its distribution (10,000 lines help nobody)."""
    if len(stats) <= max_rows:
        return stats.to_string(index=False, float_format="%.3f")
    cols = ["users", "train", "valid", "test", "like_rate"]
    summary = stats[cols].describe(percentiles=[0.5]).loc[["min", "50%", "mean", "max"]]
    return (f"{len(stats)} clients; per client (full table in partition.csv):\n"
            + summary.to_string(float_format="%.3f"))


def _few(ids: list[int]) -> str:
    return f"{ids[:10]} and {len(ids) - 10} more" if len(ids) > 10 else str(ids)


def prepare(cfg, run_dir: Path, log=print) -> dict:
    """Idempotent: a resumed run finds the shards, model and baselines it had."""
    run_dir = Path(run_dir)
    shard_dir = run_dir / "shards"
    info_path = run_dir / "prepared.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    from fedsim.baselines import baseline_scores, score_metrics, write_baseline_scores

    log(f"building samples from {cfg.data.dataset}")
    samples, items = build_all_samples(cfg, log)
    samples = subsample_eval(samples, cfg.data.max_eval_rows, cfg.train.seed)
    # The model first: checks against its layers fail in seconds, before partitioning and baselines.
    texts = [prompt_template(cfg), EXTRA_WORDS, *item_texts(items, cfg.data.item_text == "title_year")]
    model_path = resolve_model(cfg.model.name, run_dir, texts, seed=cfg.train.seed, log=log,
                               tiny_layers=cfg.model.tiny_layers)
    if cfg.storage.mode == "split":  # the layer range needs the model's depth: checked before any actor starts
        from fedsim.models.split import check_split

        check_split(cfg, model_path)
    from fedsim.models.lora import check_lora_targets

    check_lora_targets(cfg, model_path)  # peft would refuse a bad target inside every executor
    owner = assign_clients(cfg, samples)
    d = cfg.data
    caps = {"train": d.max_train_per_client, "valid": d.max_valid_per_client, "test": d.max_test_per_client}
    shards = assign_shards(samples, owner, cfg.clients.num, max_rows=caps, seed=cfg.train.seed)
    write_shard_files(shards, shard_dir, cfg.clients.num)
    stats = shard_stats(shards, cfg.clients.num)
    stats.to_csv(run_dir / "partition.csv", index=False)
    log(f"partition ({cfg.partition.method}):\n" + describe_partition(stats))
    empty = stats[stats["train"] == 0]
    if len(empty) or not (stats[cfg.eval.split] > 0).any():
        ids = empty["client"].tolist()
        shown = f"clients {_few(ids)} have no train rows" if ids else f"no client has {cfg.eval.split} rows"
        raise ConfigError(f"{shown}: lower clients.num ({cfg.clients.num}) or use more data")
    unscored = stats.loc[stats[cfg.eval.split] == 0, "client"].tolist()
    if unscored:
        # Users as clients under a split by time: most users have no later rows. They train; every
        # evaluation scores the clients that have rows (the same rows whatever the client count).
        log(f"{len(unscored)} of {cfg.clients.num} clients have no {cfg.eval.split} rows: they train, "
            f"and evaluations score the other {cfg.clients.num - len(unscored)}")

    log("scoring conventional baselines on the rows this run evaluates")
    evaluated = shards[shards["split"] == cfg.eval.split]
    scores = baseline_scores(samples[samples["split"] == "train"], evaluated, seed=cfg.train.seed)
    # Per-row scores too: the end of the run pairs each baseline with the federated model row by row.
    write_baseline_scores(run_dir / "baseline_scores.parquet", evaluated, scores)
    baselines = score_metrics(evaluated["label"].to_numpy(), scores, seed=cfg.train.seed)

    info = {
        "model_path": model_path,
        "baselines": baselines,
        "samples": {s: int((samples["split"] == s).sum()) for s in ("train", "valid", "test")},
        "data": data_identity(cfg, samples, log),
        "partition": stats.to_dict(orient="records"),
    }
    info_path.write_text(json.dumps(info, indent=1, default=float))
    return info
