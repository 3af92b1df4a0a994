"""Training K shard adapters that never mix, and the run that merges them (`fedsim run` with
`unlearning.shards` >= 1).

Layout of a sharded run directory: what `fedsim.prepare` writes (the clients' data files under
`shards/`, the model, the baselines), then `unlearning/assignment.parquet` (the shard of every train
row, by its key user, item, timestamp) and one ordinary fedsim run directory per shard,
`unlearning/shard_KK/`: its `shards/client_*.parquet` hold each client's train rows of shard k only
(and its evaluation rows), its client store, checkpoint and exported adapter are its own. Shard k
is a federation of its own over the clients holding shard-k rows (`ShardSimulation`): the round loop
of `fedsim.simulation` unchanged, each round's sample (a function of (seed, round)) cut to those
clients, DP and secure aggregation inside it as in any run. Centralized training is one client.
A sharded run resumes shard by shard: finished shards are kept, an interrupted one resumes.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedsim.compare import PREDICTIONS, paired_vs_baselines
from fedsim.config import Config, flatten, save_config, to_dict
from fedsim.core.files import save_parquet
from fedsim.core.threads import executor_threads, threads
from fedsim.data.partition import shard_stats, write_shard_files
from fedsim.postprocessors import describe
from fedsim.prepare import prepare
from fedsim.simulation import Simulation, init_ray, load_run_config, new_run_dir, sample_clients
from fedsim.tracking import Tracker, resolve_uri
from fedsim.unlearning.merge import ScoreCache, evaluate_merge, hidden_states, prompts
from fedsim.unlearning.partition import assign

KEY = ["user", "item", "timestamp"]


def shard_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / "unlearning" / f"shard_{k:02d}"


def assignment_path(run_dir: Path) -> Path:
    return Path(run_dir) / "unlearning" / "assignment.parquet"


def read_rows(run_dir: Path) -> pd.DataFrame:
    """Every client's rows from `<run_dir>/shards/`, in client order."""
    files = sorted((Path(run_dir) / "shards").glob("client_*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def data_hash(rows: pd.DataFrame) -> str:
    """sha256 of the sorted row keys (user, item, timestamp): what a shard was trained on."""
    keys = rows[KEY].astype("int64").sort_values(KEY).to_numpy()
    return hashlib.sha256(np.ascontiguousarray(keys).tobytes()).hexdigest()


def with_shard(rows: pd.DataFrame, assignment: pd.DataFrame) -> pd.DataFrame:
    """`rows` with the column `shard` (-1 for rows that are not train rows), in their order."""
    shard = rows[KEY].merge(assignment[KEY + ["shard"]], on=KEY, how="left")["shard"]
    return rows.assign(shard=shard.fillna(-1).astype("int64").to_numpy())


def build_assignment(cfg: Config, rows: pd.DataFrame, model_path: str, log=print) -> pd.DataFrame:
    u = cfg.unlearning
    train = rows[rows["split"] == "train"].reset_index(drop=True)
    emb = None
    if u.partition == "semantic" and u.shards > 1:  # one shard needs no hidden states
        from fedsim.models.loader import load_base

        log(f"semantic partition: hidden states of {len(train)} train prompts")
        base, tok = load_base(model_path, cfg.model.dtype)
        emb = hidden_states(base, tok, prompts(cfg, train), cfg.model.max_length, cfg.eval.batch_size)
    shard = assign(train, u.partition, u.shards, cfg.train.seed, emb, u.shard_size)
    return train[KEY + ["client"]].assign(shard=shard)


def shard_config(cfg: Config, k: int) -> Config:
    """Shard k's run: the same settings as an ordinary run of its own (tracked by the parent)."""
    c = copy.deepcopy(cfg)
    c.name = f"{cfg.name}-shard{k}"
    c.unlearning = dataclasses.replace(cfg.unlearning, shards=0)
    c.tracking.enabled = False
    return c


def write_shard_data(cfg: Config, sub: Path, rows: pd.DataFrame, k: int, info: dict) -> list[int]:
    """Shard k's data files: each client's shard-k train rows and its evaluation rows; returns
    the clients holding shard-k train rows (shard k's federation)."""
    keep = (rows["split"] == cfg.eval.split) | ((rows["split"] == "train") & (rows["shard"] == k))
    df = rows[keep].drop(columns="shard").reset_index(drop=True)
    n = cfg.clients.num
    write_shard_files(df, sub / "shards", n)
    stats = shard_stats(df, n)
    prepared = {"model_path": info["model_path"], "baselines": info["baselines"],
                "samples": {s: int((df["split"] == s).sum()) for s in ("train", "valid", "test")},
                "partition": stats.to_dict(orient="records")}
    (sub / "prepared.json").write_text(json.dumps(prepared, indent=1, default=float))
    return members_of(rows, k)


def members_of(rows: pd.DataFrame, k: int) -> list[int]:
    return sorted(int(c) for c in rows.loc[(rows["split"] == "train") & (rows["shard"] == k), "client"].unique())


class ShardSimulation(Simulation):
    """One shard's federation: the round's sample cut to the clients holding the shard's rows. A
    member is then in a round with the probability the sampling gives it (what client-level DP
    accounts); with fixed sampling a cut that leaves no one trains all members instead, with
    Poisson sampling the round stays empty (as an ordinary Poisson round may be). It scores no
    rows: the merge scores every shard's adapter on the evaluation rows (`shard/<k>/auc`), so a
    shard's time is its training, what a deletion costs to redo."""
    evaluates = False

    def __init__(self, cfg: Config, run_dir: Path, members: list[int], log=print):
        super().__init__(cfg, run_dir, log=log)
        self.members = members

    def _train_round(self, round, progress):
        sampled = [c for c in sample_clients(self.cfg, round) if c in set(self.members)]
        if not sampled and self.cfg.clients.sampling == "fixed":
            sampled = self.members
        return self.train_round(round, sampled, progress)


def train_shard(cfg: Config, run_dir: Path, rows: pd.DataFrame, k: int, info: dict, log=print) -> dict:
    """Train shard k from its initial adapter (or resume it; a finished shard is left as it is).
    Returns its summary ({"empty": True} when no train row is in shard k)."""
    sub = shard_dir(run_dir, k)
    done = sub / "summary.json"
    if done.exists() and json.loads(done.read_text()).get("complete"):
        return json.loads(done.read_text())
    members = members_of(rows, k)
    if not members:
        log(f"shard {k}: no train rows; it has no adapter")
        return {"empty": True, "shard": k}
    sub.mkdir(parents=True, exist_ok=True)
    if not (sub / "prepared.json").exists():
        write_shard_data(cfg, sub, rows, k, info)
    log(f"shard {k}: {int(((rows['split'] == 'train') & (rows['shard'] == k)).sum())} train rows "
        f"on clients {members}")
    t0 = time.perf_counter()
    summary = ShardSimulation(shard_config(cfg, k), sub, members, log).run()
    summary["train_seconds"] = time.perf_counter() - t0
    summary["data_sha256"] = data_hash(rows[(rows["split"] == "train") & (rows["shard"] == k)])
    done.write_text(json.dumps(summary, indent=1, default=float))
    return summary


def load_adapters(run_dir: Path, shards: int) -> tuple[list[int], list[dict]]:
    """(the shards that have an adapter, their peft state dicts)."""
    from safetensors.torch import load_file

    ks, states = [], []
    for k in range(shards):
        path = shard_dir(run_dir, k) / "adapter" / "adapter_model.safetensors"
        if path.exists():
            ks.append(k)
            states.append(load_file(str(path)))
    return ks, states


def score_caches(cfg: Config, run_dir: Path, model_path: str) -> tuple[list[ScoreCache], ScoreCache]:
    """The merge's kept scores: each shard's in its directory (a retrained shard's directory is new),
    tagged with its adapter file and what else shapes a score (dtype, prompt length); and the base
    model's hidden states. A shard without an adapter gets a cache that holds nothing."""
    shape = f"{cfg.model.dtype}/{cfg.model.max_length}"
    caches = []
    for k in range(cfg.unlearning.shards):
        path = shard_dir(run_dir, k) / "adapter" / "adapter_model.safetensors"
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "none"
        caches.append(ScoreCache(shard_dir(run_dir, k) / "scores.npz", f"{digest}/{shape}"))
    return caches, ScoreCache(Path(run_dir) / "unlearning" / "hidden_states.npz", f"{model_path}/{shape}")


def merge_and_report(cfg: Config, run_dir: Path, rows: pd.DataFrame, model_path: str, log=print) -> tuple[dict, pd.DataFrame]:
    """Scores of the evaluation rows by the shard adapters (`fedsim.unlearning.merge`); the
    per-shard keys are renamed to the shard numbers (a shard without rows has no adapter)."""
    ks, states = load_adapters(run_dir, cfg.unlearning.shards)
    valid = rows[rows["split"] == "valid"].reset_index(drop=True)
    test = rows[rows["split"] == cfg.eval.split].reset_index(drop=True)
    caches, hidden = score_caches(cfg, run_dir, model_path)
    caches = [caches[k] for k in ks]
    metrics, preds = evaluate_merge(cfg, model_path, states, valid, test, log, caches, hidden)
    out = {}
    for key, v in metrics.items():
        parts = key.split("/")
        if parts[0] == "shard":
            key = f"shard/{ks[int(parts[1])]}/{parts[2]}"
        out[key] = v
    preds = preds.rename(columns={f"prob_shard_{i}": f"prob_shard_{k}" for i, k in enumerate(ks)})
    out["shards_with_adapter"] = float(len(ks))
    return out, preds


def with_baselines(run_dir: Path, preds: pd.DataFrame) -> pd.DataFrame:
    """The merged predictions with each conventional baseline's score of the same row
    (`baseline/<name>`), as an ordinary run's predictions.parquet has them."""
    path = Path(run_dir) / "baseline_scores.parquet"
    if not path.exists():
        return preds
    scores = pd.read_parquet(path).drop(columns="label").drop_duplicates(KEY)
    scores = scores.rename(columns={c: f"baseline/{c}" for c in scores.columns if c not in KEY})
    return preds.merge(scores, on=KEY, how="left")


class ShardedRun:
    """`fedsim run` with unlearning.shards >= 1: prepare, partition, train every shard, merge."""

    def __init__(self, cfg: Config | None, run_dir: Path | None = None, tracking_uri: str | None = None, log=print,
                 on_round=None, tags: dict | None = None):
        self.resuming = run_dir is not None and (Path(run_dir) / "config.yaml").exists()
        self.cfg = load_run_config(run_dir) if self.resuming else cfg
        self.run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resuming:
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.log, self.on_round, self.tags = log, on_round, tags
        t = self.cfg.tracking
        self.tracker = Tracker(t.enabled, resolve_uri(tracking_uri, t.uri), t.experiment)

    def run(self) -> dict:
        cfg, log = self.cfg, self.log
        t_start = time.perf_counter()
        describe(cfg)  # may raise (an unreachable privacy target): before any work
        info = prepare(cfg, self.run_dir, log)
        rows = read_rows(self.run_dir)
        apath = assignment_path(self.run_dir)
        if apath.exists():
            assignment = pd.read_parquet(apath)
        else:
            apath.parent.mkdir(parents=True, exist_ok=True)
            with threads(executor_threads(cfg)):  # the executors wait for the partition
                assignment = build_assignment(cfg, rows, info["model_path"], log)
            save_parquet(assignment, apath)
        rows = with_shard(rows, assignment)
        sizes = np.bincount(assignment["shard"], minlength=cfg.unlearning.shards).tolist()
        log(f"unlearning: {cfg.unlearning.shards} shard(s) ({cfg.unlearning.partition}), train rows per shard {sizes}")
        init_ray(log)
        status = "FAILED"
        self.tracker.start(cfg.name, {**flatten(to_dict(cfg)), "run_dir": str(self.run_dir)}, tags=self.tags)
        try:
            shards = [train_shard(cfg, self.run_dir, rows, k, info, log) for k in range(cfg.unlearning.shards)]
            with threads(executor_threads(cfg)):  # every shard has trained: the executors are idle
                metrics, preds = merge_and_report(cfg, self.run_dir, rows, info["model_path"], log)
            preds = with_baselines(self.run_dir, preds)
            save_parquet(preds, self.run_dir / PREDICTIONS)
            summary = self._summary(info, shards, metrics, sizes, time.perf_counter() - t_start)
            summary["paired_vs_baselines"] = paired_vs_baselines(preds, cfg.train.seed)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
            self.tracker.log_metrics({**metrics, "train_seconds": summary["train_seconds"]}, step=cfg.train.rounds - 1)
            self.tracker.log_artifact(self.run_dir / "summary.json")
            status = "FINISHED"
            if self.on_round:
                self.on_round(cfg.train.rounds - 1, {**metrics, "train_loss": summary["train_loss"]})
            return summary
        finally:
            self.tracker.end(status)

    def _summary(self, info: dict, shards: list[dict], metrics: dict, sizes: list[int], wall: float) -> dict:
        cfg = self.cfg
        trained = [s for s in shards if not s.get("empty")]
        losses = [s["final"].get("train_loss", float("nan")) for s in trained if s.get("final")]
        summary = {
            "name": cfg.name, "run_dir": str(self.run_dir), "complete": True, "clients": cfg.clients.num,
            "model": cfg.model.name, "dataset": cfg.data.dataset, "eval_split": cfg.eval.split,
            "unlearning": to_dict(cfg)["unlearning"], "shard_rows": sizes,
            "final": metrics, "baselines": info["baselines"],
            "shards": [{"shard": k, "empty": bool(s.get("empty")), "run_dir": s.get("run_dir"),
                        "train_seconds": s.get("train_seconds", 0.0), "data_sha256": s.get("data_sha256"),
                        "auc": metrics.get(f"shard/{k}/auc")} for k, s in enumerate(shards)],
            "train_seconds": float(sum(s.get("train_seconds", 0.0) for s in trained)),
            "train_loss": float(np.nanmean(losses)) if losses else float("nan"),
            "wall_seconds": wall, "mlflow_run_id": self.tracker.run_id,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        f = metrics
        self.log(f"\nshards {cfg.unlearning.shards}: AUC APA weights {f['apa_weights/auc']:.4f} "
                 f"[{f['apa_weights/auc_ci_low']:.4f}, {f['apa_weights/auc_ci_high']:.4f}], outputs "
                 f"{f['apa_outputs/auc']:.4f}, SISA {f['sisa/auc']:.4f}, mean single shard {f['shard_auc_mean']:.4f}")
        return summary

