"""`fedsim unlearn RUN --users ... | --rows FILE`: forget rows of a sharded run exactly.

The deleted rows leave the run's data (every split: a deleted user's evaluation rows go too); the
shards that held any of them as train rows are retrained from their initial adapter on what is left
(their run directories are started afresh), the other shards' adapters, client stores and
checkpoints are not touched; then the adapters are merged again. With the same seeds the retrained
adapters equal those of a sharded run that never had the rows (the hash partitions put every other
row in the same shard; client sampling and batch order are functions of the seed, the client, the
round and the client's rows). The deletion report (rows, shards retrained, data hashes before and
after, time against the original training, AUC before and after) goes to
`<run>/unlearning/deletion_<time>.json` and to an MLflow run tagged with the original run's id.
"""
from __future__ import annotations

import json
import shutil
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from fedsim.compare import PREDICTIONS
from fedsim.config import ConfigError, flatten, to_dict
from fedsim.core.files import save_parquet
from fedsim.core.threads import executor_threads, threads
from fedsim.data.partition import shard_stats, write_shard_files
from fedsim.simulation import init_ray, load_run_config
from fedsim.tracking import Tracker, resolve_uri
from fedsim.unlearning.merge import prompts
from fedsim.unlearning.sharded import (KEY, assignment_path, data_hash, merge_and_report, read_rows, score_caches,
                                       shard_dir, train_shard, with_baselines, with_shard, write_shard_data)


def rows_to_delete(rows: pd.DataFrame, users: list[int] | None, rows_file: str | None) -> pd.Series:
    """A boolean mask over `rows`: every row of `users`, or the rows (user, item, timestamp) listed
    in `rows_file` (CSV or Parquet); a listed row the run does not have is an error."""
    if bool(users) == bool(rows_file):
        raise ConfigError("give exactly one of --users and --rows")
    if users:
        missing = sorted(set(users) - set(rows["user"].unique().tolist()))
        if missing:
            raise ConfigError(f"--users: the run has no rows of users {missing[:10]}")
        return rows["user"].isin(users)
    path = Path(rows_file)
    if not path.exists():
        raise FileNotFoundError(f"--rows {rows_file}: no such file")
    wanted = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    absent = [c for c in KEY if c not in wanted.columns]
    if absent:
        raise ConfigError(f"--rows {rows_file}: no column(s) {absent}; the rows are named by user, item, timestamp")
    wanted = wanted[KEY].astype("int64").drop_duplicates()
    hit = rows[KEY].merge(wanted.assign(_hit=True), on=KEY, how="left")["_hit"].fillna(False).astype(bool).to_numpy()
    if hit.sum() < len(wanted):
        raise ConfigError(f"--rows {rows_file}: {len(wanted) - int(hit.sum())} of its {len(wanted)} rows are not in the run")
    return pd.Series(hit, index=rows.index)


def history_mentions(kept: pd.DataFrame, deleted: pd.DataFrame) -> pd.DataFrame:
    """The kept rows whose prompt names a deleted rating: a later row of the same user whose history
    (its liked or disliked titles, built at prepare from the user's earlier ratings) holds the
    deleted row's title. Deleting a user leaves none; deleting single ratings can."""
    gone = deleted[["user", "timestamp", "title"]].rename(columns={"timestamp": "gone_at", "title": "gone_title"})
    pairs = kept.reset_index().merge(gone, on="user")
    pairs = pairs[pairs["timestamp"] > pairs["gone_at"]]
    hit = [t in set(a) or t in set(b) for t, a, b in zip(pairs["gone_title"], pairs["liked"], pairs["disliked"])]
    return kept.loc[sorted(set(pairs.loc[hit, "index"].tolist()))]


def _drop_keys(path: Path, deleted: pd.DataFrame) -> None:
    """Rewrite the Parquet file at `path` (if any) without the rows whose key is in `deleted`."""
    if not path.exists():
        return
    df = pd.read_parquet(path)
    hit = df[KEY].merge(deleted[KEY].assign(_gone=True), on=KEY, how="left")["_gone"].fillna(False)
    save_parquet(df[~hit.astype(bool).to_numpy()], path)


def shard_files(run_dir: Path, k: int) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of each file of shard k's adapter, client store and checkpoint."""
    sub = shard_dir(run_dir, k)
    paths = [p for part in ("adapter", "client_state") for p in (sub / part).rglob("*") if p.is_file()]
    paths += [sub / "checkpoint.pt"]
    return {str(p.relative_to(sub)): (p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.exists()}


def unlearn(run_dir: str | Path, users: list[int] | None = None, rows_file: str | None = None,
            tracking_uri: str | None = None, log=print) -> dict:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    K = cfg.unlearning.shards
    if not K:
        raise ConfigError(f"{run_dir}: not a sharded run (unlearning.shards is 0); it can only be retrained")
    path = run_dir / "summary.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    if not before.get("complete") or "unlearning" not in before:
        raise ConfigError(f"{run_dir}: the sharded run has not finished; finish it first (fedsim run --resume {run_dir})")
    t0 = time.perf_counter()
    info = json.loads((run_dir / "prepared.json").read_text())
    rows = with_shard(read_rows(run_dir), pd.read_parquet(assignment_path(run_dir)))
    gone = rows_to_delete(rows, users, rows_file).to_numpy()
    deleted = rows[gone]
    affected = sorted(int(k) for k in deleted.loc[deleted["shard"] >= 0, "shard"].unique())
    train = rows["split"] == "train"
    hashes_before = {k: data_hash(rows[train & (rows["shard"] == k)]) for k in range(K)}
    untouched = {k: shard_files(run_dir, k) for k in range(K) if k not in affected}
    log(f"unlearn: {int(gone.sum())} rows ({int((deleted['split'] == 'train').sum())} train) in shards {affected}")
    # Exactness covers the rows as prepared; a later row's history may still name a deleted rating.
    mentions = history_mentions(rows[~gone], deleted)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    mentions_file = None
    if len(mentions):
        mentions_file = run_dir / "unlearning" / f"history_mentions_{stamp}.csv"
        mentions[KEY].to_csv(mentions_file, index=False)
        log(f"unlearn: {len(mentions)} kept rows name a deleted rating in their prompt's history "
            f"(shards {sorted(set(mentions['shard'].tolist()) - {-1})}); to remove that trace too: "
            f"fedsim unlearn {run_dir} --rows {mentions_file}")

    # The rows leave the run's data: the clients' files, the partition, every shard's data files.
    kept = rows[~gone].reset_index(drop=True)
    n = cfg.clients.num
    write_shard_files(kept.drop(columns="shard"), run_dir / "shards", n)
    assignment = pd.read_parquet(assignment_path(run_dir))
    drop = assignment[KEY].merge(deleted[KEY].assign(_gone=True), on=KEY, how="left")["_gone"].fillna(False).astype(bool)
    save_parquet(assignment[~drop.to_numpy()].reset_index(drop=True), assignment_path(run_dir))
    info["partition"] = shard_stats(kept.drop(columns="shard"), n).to_dict(orient="records")
    (run_dir / "prepared.json").write_text(json.dumps(info, indent=1, default=float))
    _drop_keys(run_dir / "baseline_scores.parquet", deleted)
    # No score of a deleted row is kept: the untouched shards' and the hidden states' entries go.
    caches, hidden = score_caches(cfg, run_dir, info["model_path"])
    texts = prompts(cfg, deleted)
    for cache in [hidden] + [c for k, c in enumerate(caches) if k not in affected]:
        cache.drop(texts)
    for k in range(K):
        sub = shard_dir(run_dir, k)
        if k in affected:
            shutil.rmtree(sub, ignore_errors=True)  # retrained from its initial state
        elif sub.exists():
            write_shard_data(cfg, sub, kept, k, info)  # evaluation rows of deleted users go too
            _drop_keys(sub / PREDICTIONS, deleted)

    init_ray(log)
    t_train = time.perf_counter()
    retrained = {k: train_shard(cfg, run_dir, kept, k, info, log) for k in affected}
    train_seconds = time.perf_counter() - t_train
    t_merge = time.perf_counter()  # the untouched shards' kept scores are reused: only retrained ones score
    with threads(executor_threads(cfg)):  # the shards have retrained: the executors' cores are idle
        metrics, preds = merge_and_report(cfg, run_dir, kept, info["model_path"], log)
    merge_seconds = time.perf_counter() - t_merge
    save_parquet(with_baselines(run_dir, preds), run_dir / PREDICTIONS)
    kept_train = kept["split"] == "train"
    hashes_after = {k: data_hash(kept[kept_train & (kept["shard"] == k)]) for k in range(K)}
    original = float(before.get("train_seconds", 0.0))
    report = {
        "run_dir": str(run_dir), "original_mlflow_run_id": before.get("mlflow_run_id"),
        "request": {"users": users} if users else {"rows_file": str(rows_file)},
        "rows_deleted": int(gone.sum()),
        "rows_deleted_by_split": {s: int((deleted["split"] == s).sum()) for s in ("train", "valid", "test")},
        "rows_naming_deleted_in_history": len(mentions),
        "history_mentions_file": str(mentions_file) if mentions_file else None,
        "shards_retrained": affected, "shards_untouched": [k for k in range(K) if k not in affected],
        "untouched_files_unchanged": all(shard_files(run_dir, k) == files for k, files in untouched.items()),
        "data_sha256_before": hashes_before, "data_sha256_after": hashes_after,
        "retrain_seconds": train_seconds, "merge_seconds": merge_seconds, "unlearn_seconds": time.perf_counter() - t0,
        "original_train_seconds": original,
        "speedup_vs_full_training": original / train_seconds if train_seconds > 0 else float("inf"),
        "auc_before": {k: before["final"].get(k) for k in ("auc", "auc_ci_low", "auc_ci_high", "rows")},
        "auc_after": {k: metrics.get(k) for k in ("auc", "auc_ci_low", "auc_ci_high", "rows")},
        "final_after": metrics,
        "retrained": {k: {"train_seconds": s.get("train_seconds", 0.0), "empty": bool(s.get("empty"))}
                      for k, s in retrained.items()},
    }
    out = run_dir / "unlearning" / f"deletion_{stamp}.json"
    out.write_text(json.dumps(report, indent=1, default=float))
    report["report_path"] = str(out)
    _track(cfg, report, out, tracking_uri)
    # The run's summary now describes the model after the deletion.
    before.update(final=metrics, deletions=before.get("deletions", []) + [str(out)])
    path.write_text(json.dumps(before, indent=1, default=float))
    log(f"unlearn: retrained shards {affected} in {train_seconds:.1f} s (original training {original:.1f} s), "
        f"merged again in {merge_seconds:.1f} s; "
        f"AUC {report['auc_before']['auc']:.4f} -> {metrics['auc']:.4f}; report {out}")
    return report


def _track(cfg, report: dict, path: Path, tracking_uri: str | None) -> None:
    t = cfg.tracking
    tracker = Tracker(t.enabled, resolve_uri(tracking_uri, t.uri), t.experiment)
    tags = {"fedsim.unlearning.original_run": report["original_mlflow_run_id"] or ""}
    if report["original_mlflow_run_id"]:
        tags["mlflow.parentRunId"] = report["original_mlflow_run_id"]
    tracker.start(f"{cfg.name}-unlearn", {"rows_deleted": report["rows_deleted"],
                                          "shards_retrained": report["shards_retrained"],
                                          **{f"config.{k}": v for k, v in flatten(to_dict(cfg)).items()
                                             if k.startswith("unlearning.")}}, tags=tags)
    numbers = {"rows_deleted": report["rows_deleted"], "shards_retrained": len(report["shards_retrained"]),
               "retrain_seconds": report["retrain_seconds"], "merge_seconds": report["merge_seconds"],
               "original_train_seconds": report["original_train_seconds"],
               "speedup_vs_full_training": report["speedup_vs_full_training"],
               **{f"before/{k}": v for k, v in report["auc_before"].items() if v is not None},
               **{f"after/{k}": v for k, v in report["auc_after"].items() if v is not None}}
    tracker.log_metrics({k: v for k, v in numbers.items() if np.isfinite(v)}, step=0)
    tracker.log_artifact(path)
    tracker.end("FINISHED")
