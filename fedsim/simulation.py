"""The driver loop: sample -> local training -> aggregate -> evaluate -> log -> checkpoint.

The loop talks to executor actors (clients) and one aggregator actor through object refs: client
deltas go from executors to the aggregator without passing through the driver.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from ray.util.placement_group import get_current_placement_group

from fedsim.client.executor import ClientExecutor
from fedsim.client.faults import claim, clear_claims, start_attempt
from fedsim.core import local_ray
from fedsim.core.placement import bundle_placement, executor_gpus  # noqa: F401 (tune, tests import them here)
from fedsim.core.placement import executor_group, executor_placement, placement_of
from fedsim.core.store import ClientStore
from fedsim.config import (Config, ConfigError, apply_overrides, clients_per_round, config_from_dict, count_of, flatten,
                           read_yaml_mapping, save_config, to_dict)
from fedsim.core.files import StateFileError, load_torch, save_parquet, save_torch
from fedsim.compare import AUDIT, KEY, PREDICTIONS, paired_vs_baselines
from fedsim.metrics import accuracy, auc, auc_ci, logloss
from fedsim.postprocessors import describe
from fedsim.prepare import prepare
from fedsim.report import (Progress, headline_metrics, plot_client_auc, plot_client_bars, plot_learning_curve,
                           summary_table)
from fedsim.server.aggregator import Aggregator
from fedsim.server.split_server import start_split_server
from fedsim.tracking import Tracker, resolve_uri


class RunStopped(RuntimeError):
    """The run cannot go on with this round; the last checkpoint is intact and the message, one
    line, says how to resume (the CLI prints it without a traceback)."""


class QuorumError(RunStopped):
    """Too few sampled clients reported in a round."""


class ActorLostError(RunStopped):
    """An actor died for good mid-round: an executor out of executors.max_restarts, or the
    aggregator (which holds the round's state and is rebuilt from the checkpoint on resume)."""


# ---------------------------------------------------------------------------------------------
# Ray


def init_ray(log=print) -> None:
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A head started with `ray start` has token auth on; clients must opt in to send the token.
        if (Path.home() / ".ray" / "auth_token").exists():
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        log(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True)
    else:
        # A fresh local instance of our own, recorded so that nothing of it outlives this run.
        local_ray.start(log)


def executor_resources(cfg: Config) -> tuple[int, float, float]:
    """(number of executors, CPUs each, GPUs each); an impossible request fails here, not in a hang.
    Inside a placement group (a `fedsim tune` trial: bundle 0 the trial, bundle i+1 executor i) the
    executors are checked against its bundles, not the whole cluster."""
    n = cfg.executors.num or cfg.clients.num
    pg = get_current_placement_group()
    if pg is not None:
        bundles = pg.bundle_specs[1:]
        # A bundle already holds one executor's share: `auto` takes it as it is (executor_gpus would
        # read it as a GPU count and split it again among the executors).
        if cfg.executors.num_gpus == "auto":
            num_gpus = bundles[0].get("GPU", 0) if bundles else 0
        else:
            num_gpus = float(cfg.executors.num_gpus)
        short = [i for i, b in enumerate(bundles[:n]) if b.get("CPU", 0) + 1e-9 < cfg.executors.num_cpus
                 or b.get("GPU", 0) + 1e-9 < num_gpus]
        if len(bundles) < n or short:
            raise ConfigError(f"the placement group has {len(bundles)} executor bundle(s) {bundles} but {n} executors "
                             f"need executors.num_cpus={cfg.executors.num_cpus:g} and {num_gpus:g} GPUs each")
        return n, cfg.executors.num_cpus, num_gpus
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0)
    num_gpus = executor_gpus(cfg, gpus)
    cpus = total.get("CPU", 0)
    if n * cfg.executors.num_cpus > cpus + 1e-9:
        raise ConfigError(f"executors need {n} x executors.num_cpus={cfg.executors.num_cpus} = "
                         f"{n * cfg.executors.num_cpus:g} CPUs but the Ray cluster has {cpus:g}: lower "
                         f"executors.num (0 = one per client) or executors.num_cpus")
    if n * num_gpus > gpus + 1e-9:
        raise ConfigError(f"executors need {n * num_gpus:g} GPUs (executors.num_gpus={num_gpus:g}) "
                         f"but the Ray cluster has {gpus:g}")
    return n, cfg.executors.num_cpus, num_gpus


def sample_clients(cfg: Config, round: int) -> list[int]:
    """The round's clients, a function of (seed, round) only, so a resumed run samples the same."""
    n, m = cfg.clients.num, clients_per_round(cfg)
    rng = np.random.default_rng([cfg.train.seed, round, 7])
    if cfg.clients.sampling == "poisson":
        return np.flatnonzero(rng.random(n) < m / n).tolist()
    return sorted(rng.choice(n, size=m, replace=False).tolist())


def eval_clients(cfg: Config) -> list[int]:
    """The clients every evaluation scores: all of them, or the fixed subset `eval.clients` asks for
    (at 10,000 clients, evaluating everyone every round would dwarf the training)."""
    n, k = cfg.clients.num, cfg.eval.clients
    if k is None:
        return list(range(n))
    m = count_of(k, n)
    rng = np.random.default_rng([cfg.train.seed, 13])
    return sorted(rng.choice(n, size=m, replace=False).tolist())


def balance_rows(rows: dict[int, int], clients: list[int], executors: int) -> dict[int, int]:
    """client -> executor for an evaluation: the clients with most rows first, each to the least
    loaded executor. Any executor can score any client (state is on disk); `client % executors`
    left one core scoring 475 of the quickstart's 500 test rows while the other idled."""
    load, out = [0] * executors, {}
    for c in sorted(clients, key=lambda c: (-rows.get(c, 0), c)):
        out[c] = load.index(min(load))
        load[out[c]] += rows.get(c, 0)
    return out


# ---------------------------------------------------------------------------------------------
# Metrics


def eval_metrics(results: list[dict], num_clients: int, seed: int = 0, min_rows: int = 1) -> dict[str, float]:
    """Per-client and pooled metrics; the pooled AUC with a 95 % bootstrap interval over rows. The
    per-client summaries (auc_mean ... auc_gap, auc_q25, auc_q75) cover clients with at least
    `min_rows` rows."""
    out: dict[str, float] = {}
    per_client, adapter = [], {}
    for r in results:
        c, y, p = r["client"], r["labels"], r["probs"]
        a = auc(y, p)
        out[f"client/{c}/auc"] = a
        out[f"client/{c}/logloss"] = logloss(y, p)
        out[f"client/{c}/accuracy"] = accuracy(y, p)
        out[f"client/{c}/rows"] = float(len(y))
        for k, v in r.get("metrics", {}).items():  # the adapter's, e.g. personal/eval_alpha_entropy
            out[f"client/{c}/{k}"] = v
            adapter.setdefault(k, []).append(v)
        if a == a and len(y) >= min_rows:
            per_client.append(a)
    y = np.concatenate([r["labels"] for r in results])
    p = np.concatenate([r["probs"] for r in results])
    low, high = auc_ci(y, p, seed=seed)
    out.update(auc=auc(y, p), auc_ci_low=low, auc_ci_high=high, logloss=logloss(y, p), accuracy=accuracy(y, p),
               rows=float(len(y)))
    if per_client:
        out.update(auc_mean=float(np.mean(per_client)), auc_std=float(np.std(per_client)),
                   auc_min=float(np.min(per_client)), auc_max=float(np.max(per_client)),
                   auc_gap=float(np.max(per_client) - np.min(per_client)),
                   # the middle half of the clients: a spread that a few noisy small clients do not set
                   auc_q25=float(np.percentile(per_client, 25)), auc_q75=float(np.percentile(per_client, 75)))
    out.update({k: float(np.mean(v)) for k, v in adapter.items()})  # the mean over clients
    for name in results[0].get("scores", {}):  # the adapter's comparison scores of the same rows (RecLoRA: CRM alone)
        s = cat_scores(results, name)
        low, high = auc_ci(y, s, seed=seed)
        out.update({f"{name}/auc": auc(y, s), f"{name}/auc_ci_low": low, f"{name}/auc_ci_high": high})
        for r in results:
            out[f"client/{r['client']}/{name}/auc"] = auc(r["labels"], r["scores"][name])
    out["clients_evaluated"] = float(len(results))
    return out


def train_throughput(metas: list[dict]) -> dict[str, float]:
    """Tokens trained on in a round, the busiest executor's time in local-training loops (executors
    run in parallel: the round's training critical path), and the reporting executors' peak memory
    added up (GPU: allocated by torch; CPU: resident set)."""
    busy, peak = {}, {}
    for m in metas:
        e = m["executor"]
        busy[e] = busy.get(e, 0.0) + m.get("step_seconds", 0.0)
        peak[e] = max(peak.get(e, 0), m.get("peak_bytes", 0))
    return {"train_tokens": float(sum(m.get("tokens", 0) for m in metas)),
            "train_step_seconds": float(max(busy.values(), default=0.0)),
            "executors_peak_bytes": float(sum(peak.values()))}


def cat_scores(results: list[dict], name: str) -> np.ndarray:
    """The adapter's score `name` (`Adapter.eval_scores`) of every evaluated row, in result order."""
    return np.concatenate([r["scores"][name] for r in results]).astype("float64")


def write_predictions(run_dir: Path, results: list[dict]) -> Path:
    """<run_dir>/predictions.parquet: the final model's probability for every evaluated row and each
    conventional baseline's score for the same row (`baseline/<name>`), keyed by (user, item,
    timestamp), so that runs and baselines can be compared row by row (a paired difference)."""
    def cat(key):
        return np.concatenate([r[key] for r in results])

    df = pd.DataFrame({"user": cat("user"), "item": cat("item"), "timestamp": cat("timestamp"),
                       "client": np.concatenate([np.full(len(r["labels"]), r["client"]) for r in results]),
                       "label": cat("labels").astype("int64"), "prob": cat("probs").astype("float64")})
    scores_path = run_dir / "baseline_scores.parquet"
    if scores_path.exists():  # absent in runs prepared before per-row baseline scores existed
        scores = pd.read_parquet(scores_path).drop(columns="label").drop_duplicates(KEY)
        scores = scores.rename(columns={c: f"baseline/{c}" for c in scores.columns if c not in KEY})
        df = df.merge(scores, on=KEY, how="left")
    for name in results[0].get("scores", {}) if results else ():  # the adapter's own (RecLoRA: each client's CRM)
        df[f"baseline/{name}"] = cat_scores(results, name)
    return save_parquet(df, run_dir / PREDICTIONS)


def write_audit(run_dir: Path, done: list) -> Path:
    """<run_dir>/audit.parquet: the membership audit's rows, keyed by (user, item, timestamp), with
    the client, member (1: trained on, 0: held out) and the final model's loss (the attack scores
    -loss), so two runs' attacks compare as a paired difference (`fedsim compare --audit`)."""
    df = pd.DataFrame([{**dict(zip(KEY, key)), "client": c, "member": member, "loss": float(loss)}
                       for c, r, _ in done for name, member in (("member", 1), ("nonmember", 0))
                       for *key, loss in zip(*(r[f"{name}_rows"][k] for k in KEY), r[name])],
                      columns=[*KEY, "client", "member", "loss"])
    return save_parquet(df, run_dir / AUDIT)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(run_dir: Path, state: dict) -> None:
    # Atomic (temporary file, fsync, rename): a failed write leaves the previous checkpoint loadable.
    save_torch(state, run_dir / "checkpoint.pt")


def load_checkpoint(run_dir: Path) -> dict | None:
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return None
    return load_torch(path, "checkpoint", f"restore it from a copy of the run directory, or delete it to start "
                                          f"this run again from round 1: fedsim run --resume {run_dir}")


def new_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    path.mkdir(parents=True)
    return path


def load_run_config(run_dir: Path) -> Config:
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--resume {run_dir}: no such directory (give a run directory, runs/<name>-<timestamp>)")
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a fedsim run directory?")
    return config_from_dict(read_yaml_mapping(path, "run config"))


def resume_config(run_dir: Path, overrides: list[str], force: bool = False) -> Config:
    """The config a `--resume` continues with: the run's config.yaml plus `overrides`. One that
    differs from what the run's checkpoint was trained with (config.yaml edited, or --set) is
    refused, naming the keys, unless `force`; then it is saved as the run's config."""
    cfg = load_run_config(run_dir)
    if overrides:
        cfg = config_from_dict(apply_overrides(to_dict(cfg), overrides))
    ckpt = load_checkpoint(Path(run_dir))
    before = flatten(ckpt["config"]) if ckpt and "config" in ckpt else flatten(to_dict(load_run_config(run_dir)))
    now = flatten(to_dict(cfg))
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if differ and not force:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in differ[:8])
        more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
        raise ConfigError(f"--resume {run_dir}: the config differs from the one the run was trained with: "
                          f"{shown}{more}; undo the change, or add --force to continue with it")
    if differ:
        save_config(cfg, Path(run_dir) / "config.yaml")
    return cfg


# ---------------------------------------------------------------------------------------------
# The run


class Simulation:
    evaluates = True  # score the eval split every eval.every rounds and at the end (an APA shard does not)

    def __init__(self, cfg: Config, run_dir: Path | None = None, tracking_uri: str | None = None, log=print,
                 on_round=None, tags: dict | None = None):
        # on_round(round, metrics) after each round's checkpoint (Tune reports from it); tags go on the MLflow run.
        self.on_round, self.tags = on_round, tags
        self.resuming = run_dir is not None and (Path(run_dir) / "config.yaml").exists()
        if cfg is None and not self.resuming:
            if run_dir is None:
                raise ConfigError("give a config, or the run directory of a run to resume")
            load_run_config(run_dir)  # raises, naming what is missing
        self.cfg = load_run_config(run_dir) if self.resuming else cfg
        self.run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Before any executor starts: this driver's claims, apart from a killed driver's (fedsim.client.faults)
        self.claims = start_attempt(self.run_dir)
        self.log = log
        if not self.resuming:
            save_config(self.cfg, self.run_dir / "config.yaml")
        t = self.cfg.tracking
        self.tracker = Tracker(t.enabled, resolve_uri(tracking_uri, t.uri), t.experiment)

    # -- actors ---------------------------------------------------------------------------------

    def _start_actors(self, model_path: str) -> None:
        n, cpus, gpus = executor_resources(self.cfg)
        self.log(f"starting {n} executor actor(s) (num_cpus={cpus:g}, num_gpus={gpus:g}) for "
                 f"{self.cfg.clients.num} client(s)")
        # No task retries: a client whose actor dies mid-round is dropped from that round, not rerun.
        options = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=self.cfg.executors.max_restarts, max_task_retries=0)
        args = (to_dict(self.cfg), str(self.run_dir.resolve()), model_path)
        self.split_server, split_name = None, None
        if self.cfg.storage.mode == "split":  # PPLR flexible storage: the actor holding the middle layers
            self.split_server, split_name, server_gpus = start_split_server(self.cfg, model_path, n, gpus,
                                                                            str(self.run_dir.resolve()))
            self.log(f"starting the split server actor (num_cpus={self.cfg.storage.server_num_cpus:g}, "
                     f"num_gpus={server_gpus:g}) for decoder layers [{self.cfg.storage.client_layers}, L-1)")
        self.key_holder, key_name = None, None
        if self.cfg.privacy.he.enabled:  # CKKS: the clients' joint key, outside the aggregator
            from fedsim.privacy.he import start_key_holder

            self.key_holder, key_name = start_key_holder(self.cfg, str(self.run_dir.resolve()))
        self.group = executor_group(self.cfg, n, cpus, gpus, self.log)  # executors.placement: pack or spread
        self._new_executor = lambda i: ray.remote(ClientExecutor).options(
            **options, **executor_placement(self.group, i)).remote(
            *args, i, max(1, int(cpus)), split_server=split_name, key_holder=key_name)
        self.executors = [self._new_executor(i) for i in range(n)]
        infos = ray.get([e.ready.remote() for e in self.executors])
        self.lora_params = infos[0]["lora_params"]
        self.split_params = infos[0].get("split", {})  # memory held on the client vs the split server
        initial = ray.get(self.executors[0].initial_params.remote())
        # The aggregator is light bookkeeping; it takes no CPU slot so it never starves the clients.
        self.aggregator = ray.remote(Aggregator).options(num_cpus=0).remote(self.cfg, initial, key_name,
                                                                             str(self.run_dir.resolve()))
        local_ray.record()  # the workers now running, if fedsim started the local instance
        self.placement = placement_of(self.executors, {"aggregator": self.aggregator, "split_server": self.split_server},
                                      self.cfg.clients.num)
        nodes = sorted({e["node_id"] for e in self.placement["executors"]})
        if len(nodes) > 1:
            self.log(f"executors on {len(nodes)} nodes ({self.cfg.executors.placement}): " + ", ".join(
                f"{e['executor']}->{e['node_ip']}/{e['node_id'][:8]}" for e in self.placement["executors"]))

    def _stop_actors(self) -> None:
        for a in getattr(self, "executors", []) + [getattr(self, n, None) for n in ("aggregator", "split_server", "key_holder")]:
            if a is not None:
                ray.kill(a)
        if getattr(self, "group", None) is not None:
            ray.util.remove_placement_group(self.group)

    def _await_executors(self, round: int, timeout: float = 600.0) -> None:
        """Wait for restarting executors (calls to one fail at once). One out of restarts stops the
        run: executors.max_restarts is the budget a user set for a process that keeps dying (a bad
        node, memory), and a fresh actor would hide that."""
        for i in range(len(self.executors)):
            deadline = time.monotonic() + timeout
            while True:
                try:
                    ray.get(self.executors[i].ready.remote(), timeout=60)
                    break
                except ray.exceptions.ActorDiedError:
                    n = self.cfg.executors.max_restarts
                    raise ActorLostError(
                        f"round {round + 1}: executor actor {i} died and its executors.max_restarts={n} restart(s) "
                        f"are used up; the last checkpoint is intact. Resume with: fedsim run --resume {self.run_dir} "
                        f"(if it keeps dying, look for why in its log, or add --set executors.max_restarts=N --force)"
                    ) from None
                except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"executor {i} did not come back within {timeout:.0f} s")
                    time.sleep(0.5)

    def _vital(self) -> dict[str, str]:
        """{actor id: name} of the actors a round cannot go on without (the aggregator, the split
        server, the CKKS key holder). An executor's call into one that died fails with that actor's
        id (RayTaskError(ActorDiedError)), so a client's failure can be told from its executor's death."""
        named = {"aggregator actor": self.aggregator, "split server actor": self.split_server,
                 "CKKS key holder actor": self.key_holder}
        # ActorHandle has no public id; _actor_id has been there since Ray 1.0.
        return {a._actor_id.hex(): n for n, a in named.items() if a is not None}

    def _actor_lost(self, e: ray.exceptions.RayActorError, round: int) -> ActorLostError:
        """A one-line stop naming the actor that died in `round`."""
        actors = {**{a._actor_id.hex(): f"executor actor {i}" for i, a in enumerate(self.executors)}, **self._vital()}
        name = actors.get(e.actor_id, "an actor")
        return ActorLostError(f"round {round + 1}: the {name} died; the last checkpoint is intact (the round is "
                              f"redone from it). Resume with: fedsim run --resume {self.run_dir}")

    def executor_for(self, client: int):
        return self.executors[client % len(self.executors)]

    # -- one round ------------------------------------------------------------------------------

    def _collect(self, pending: dict, round: int, phase: str, progress: Progress, deadline: float | None = None):
        """Wait for every pending task; a failed one drops its client, and so does one not back by
        `deadline` (time.monotonic(); faults.round_timeout). Returns (done, failures)."""
        done, failures, total = [], {}, len(pending)
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:
                self._drop_late(pending, failures, round, phase)
                progress.clients(round, phase, len(done) + len(failures), total)
                deadline = None  # the rest finished in time (claimed "done"): their results are on the way
                continue
            client, extra = pending.pop(ready[0])
            try:
                done.append((client, ray.get(ready[0]), extra))
            except ray.exceptions.RayError as e:
                if isinstance(e, StateFileError):  # a damaged store entry: stop and say which, not drop it every round
                    raise StateFileError(str(e.cause) if hasattr(e, "cause") else str(e)) from None
                if isinstance(e, ray.exceptions.RayActorError) and e.actor_id in self._vital():
                    raise self._actor_lost(e, round) from e  # every client would fail the same way
                failures[client] = e
                reason = "its executor died" if isinstance(e, ray.exceptions.RayActorError) else str(e).splitlines()[0]
                self.log(f"\nround {round + 1}: client {client} dropped from {phase} ({reason})")
            progress.clients(round, phase, len(done) + len(failures), total)
        return done, failures

    def _drop_late(self, pending: dict, failures: dict, round: int, phase: str) -> None:
        """faults.round_timeout passed: drop every pending client that the driver can still claim
        late (fedsim.client.faults); its executor then discards the update and keeps nothing of it."""
        for ref, (client, _) in list(pending.items()):
            if claim(self.claims, client, round, "late"):
                pending.pop(ref)
                failures[client] = TimeoutError(f"not back within faults.round_timeout={self.cfg.faults.round_timeout:g} s")
                self.log(f"\nround {round + 1}: client {client} dropped from {phase} (not back within "
                         f"faults.round_timeout={self.cfg.faults.round_timeout:g} s; its late update is discarded)")

    def _dispatch_train(self, round: int, sampled: list[int], refs: dict, lrs: dict) -> dict:
        """One train task per client, or with executors.fused one per executor for all of its
        sampled clients; either way a (meta, delta) pair of refs per client, keyed by the meta."""
        pending = {}
        if not self.cfg.executors.fused:
            for c in sampled:
                meta, delta = self.executor_for(c).train.options(num_returns=2).remote(c, round, refs[c], lrs[c], sampled)
                pending[meta] = (c, delta)
            return pending
        groups: dict = {}
        for c in sampled:
            groups.setdefault(self.executor_for(c), []).append(c)
        for executor, clients in groups.items():
            out = executor.train_many.options(num_returns=2 * len(clients)).remote(
                clients, round, [lrs[c] for c in clients], sampled, *[refs[c] for c in clients])
            for j, c in enumerate(clients):
                pending[out[2 * j]] = (c, out[2 * j + 1])
        return pending

    def _train_round(self, round: int, progress: Progress) -> tuple[dict, list[int]]:
        """The loop's round: the round's sampled clients (a function of (seed, round)) train."""
        return self.train_round(round, sample_clients(self.cfg, round), progress)

    def train_round(self, round: int, clients: list[int], progress: Progress | None = None) -> tuple[dict, list[int]]:
        """Local training of `clients` (any set: the round's sample, a deletion's affected shard,
        ...) from what the aggregator holds for them, then one aggregation of their updates.
        Returns (metrics, the clients that dropped out)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        sampled = sorted(int(c) for c in clients)
        progress = progress or Progress(cfg.train.rounds, round)
        self._await_executors(round)
        refs = ray.get(self.aggregator.params_for.remote(sampled))
        lrs = ray.get(self.aggregator.client_lrs.remote(sampled, cfg.train.lr))
        timeout = cfg.faults.round_timeout
        if timeout is not None:
            clear_claims(self.claims, sampled, round)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.split_server is not None:
            ray.get(self.split_server.start_round.remote(round))
        pending = self._dispatch_train(round, sampled, refs, lrs)
        self.trained = sampled  # whose older store entries the round's checkpoint lets go
        done, failures = self._collect(pending, round, "train", progress, deadline)
        # In client order, not finishing order: the aggregate's float sum is then the same whichever
        # executor was quicker (an unlearned shard equals, bit for bit, a run that never saw the rows).
        done.sort(key=lambda d: d[0])
        died = [c for c, e in failures.items() if isinstance(e, ray.exceptions.RayActorError)]
        for c in died:
            # A client can finish and save its round just before its executor dies, its result lost
            # with the process: a dropped client keeps nothing of the round (as a straggler).
            ClientStore(self.run_dir / "client_state").discard(c, round)
        if died:
            self._await_executors(round)  # one out of restarts stops the run here, before the quorum
        need = math.ceil(cfg.faults.quorum * len(sampled))
        if len(done) < need:
            first = next(iter(failures.values()), None)
            raise QuorumError(f"round {round + 1}: only {len(done)} of {len(sampled)} sampled clients reported, "
                              f"faults.quorum={cfg.faults.quorum} needs {need}; first failure: {first}. "
                              f"Resume from the last checkpoint with: fedsim run --resume {self.run_dir}")
        metas = [m for _, m, _ in done]
        deltas = [d for _, _, d in done]
        agg = ray.get(self.aggregator.aggregate.remote(round, sampled, metas, *deltas))
        n = sum(m["num_samples"] for m in metas)
        metrics = {
            # Poisson batches (DP-SGD) can leave a client with no rows; weigh losses by clients then.
            "train_loss": float(sum(m["loss"] * m["num_samples"] for m in metas) / n) if n else
            float(np.mean([m["loss"] for m in metas])) if metas else float("nan"),  # nan: no one sampled
            "clients_sampled": float(len(sampled)),
            "clients_reported": float(len(done)),
            "clients_dropped": float(len(failures)),
            "train_samples": float(n),
            "client_train_seconds": float(sum(m["seconds"] for m in metas)),
            **train_throughput(metas),
            "train_phase_seconds": time.perf_counter() - t0,  # sampling to aggregated, without evaluation
            **agg,
        }
        for m in metas:
            metrics[f"client/{m['client']}/train_loss"] = m["loss"]
            metrics[f"client/{m['client']}/lr"] = m["lr"]
            for k, v in m["metrics"].items():  # what the client-side postprocessors reported
                metrics[f"client/{m['client']}/{k}"] = v
        return metrics, sorted(failures)

    def _audit(self, round: int, progress: Progress) -> dict:
        """privacy/mia_auc: AUC of -loss separating members from non-members (pooled and per client)."""
        clients = list(range(self.cfg.clients.num))
        self._await_executors(round)
        refs = ray.get(self.aggregator.params_for.remote(clients, False))
        n = self.cfg.privacy.audit.rows_per_client
        pending = {self.executor_for(c).membership.remote(c, refs[c], n): (c, None) for c in clients}
        done, _ = self._collect(pending, round, "audit", progress)
        out, member, other = {}, [], []
        write_audit(self.run_dir, done)
        for c, r, _ in done:
            if len(r["member"]) and len(r["nonmember"]):
                out[f"client/{c}/mia_auc"] = auc(np.r_[np.ones(len(r["member"])), np.zeros(len(r["nonmember"]))],
                                                 -np.r_[r["member"], r["nonmember"]])
            member.append(r["member"])
            other.append(r["nonmember"])
        m, o = np.concatenate(member), np.concatenate(other)
        if len(m) and len(o):
            labels, scores = np.r_[np.ones(len(m)), np.zeros(len(o))], -np.r_[m, o]
            out["privacy/mia_auc"] = auc(labels, scores)
            out["privacy/mia_auc_ci_low"], out["privacy/mia_auc_ci_high"] = auc_ci(labels, scores, seed=self.cfg.train.seed)
            out["privacy/member_loss"], out["privacy/nonmember_loss"] = float(m.mean()), float(o.mean())
        return out

    def _evaluate(self, round: int, progress: Progress) -> dict:
        clients = [c for c in eval_clients(self.cfg) if self.eval_rows[c]]  # a client without rows has nothing to score
        self._await_executors(round)
        refs = ray.get(self.aggregator.params_for.remote(clients, False))
        final = round == self.cfg.train.rounds - 1
        rows = None if final else self.cfg.eval.interim_rows  # interim evaluations may score a subset
        serve = balance_rows(self.eval_rows, clients, len(self.executors))

        def score(clients):
            return {self.executors[serve[c]].evaluate.remote(c, refs[c], self.cfg.eval.split, rows, round): (c, None)
                    for c in clients}
        done, failures = self._collect(score(clients), round, "eval", progress)
        again = sorted(c for c, e in failures.items() if isinstance(e, ray.exceptions.RayActorError))
        if again:
            # An executor died mid-evaluation: scoring changes no state, so its clients are scored
            # again on the restarted actor, and the metrics cover the same rows as without the fault.
            self.log(f"round {round + 1}: scoring client(s) {again} again on the restarted executor(s)")
            self._await_executors(round)
            more, retry_failures = self._collect(score(again), round, "eval", progress)
            done += more
            failures = {**{c: e for c, e in failures.items() if c not in again}, **retry_failures}
        if failures:
            self.log(f"round {round + 1}: client(s) {sorted(failures)} not evaluated (see above); this round's "
                     f"metrics cover {len(done)} of {len(clients)} clients (the metric clients_evaluated)")
        # In client order, not finishing order: the bootstrap interval and predictions.parquet then
        # do not depend on which actor was quicker (a resumed run reproduces them).
        results = sorted((r for _, r, _ in done), key=lambda r: r["client"])
        if final:  # the final model: keep its per-row predictions
            write_predictions(self.run_dir, results)
        return eval_metrics(results, self.cfg.clients.num, self.cfg.train.seed, self.cfg.eval.client_min_rows)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> dict:
        """Run (or resume) to the configured number of rounds; `stop_after` ends early after that
        many rounds in total, as an interruption would, leaving a resumable checkpoint."""
        cfg = self.cfg
        t_start = time.perf_counter()
        try:
            derived = describe(cfg)  # may raise (e.g. an unreachable privacy target): before any work
            info = prepare(cfg, self.run_dir, self.log)
        except ConfigError:
            # A bad config found while preparing (the model's layers, too many clients for the data):
            # a fresh run leaves no half-made run directory behind.
            if not self.resuming:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.eval_rows = {p["client"]: p[cfg.eval.split] for p in info["partition"]}
        ckpt = load_checkpoint(self.run_dir) if self.resuming else None
        start = ckpt["round"] + 1 if ckpt else 0
        history = ckpt["history"] if ckpt else []
        dropped = ckpt.get("dropped", []) if ckpt else []
        wall_before = ckpt.get("wall_seconds", 0.0) if ckpt else 0.0
        if ckpt:
            self.log(f"resuming {self.run_dir} after round {start} of {cfg.train.rounds}")
        init_ray(self.log)
        self._start_actors(info["model_path"])
        status = "FAILED"
        try:
            if ckpt:
                ray.get(self.aggregator.load_state_dict.remote(ckpt["strategy"]))
            params = {**flatten(to_dict(cfg)), "run_dir": str(self.run_dir), "lora_params": self.lora_params,
                      **derived, **self.split_params}
            self.tracker.start(cfg.name, params, run_id=ckpt.get("mlflow_run_id") if ckpt else None, tags=self.tags)
            if not ckpt:
                self.tracker.log_dataset(info.get("data"))  # absent in runs prepared by an older fedsim
                self.tracker.log_metrics({f"baseline/{k}/{m}": v for k, d in info["baselines"].items()
                                          for m, v in d.items()}, step=0)
            elif history and self.tracker.last_step("round_seconds") < ckpt["round"]:
                # The driver died between the checkpoint and logging its round: log that round now.
                self.tracker.log_metrics({k: v for k, v in history[-1].items() if k != "round"}, step=ckpt["round"])
            progress = Progress(cfg.train.rounds, start)
            last = cfg.train.rounds if stop_after is None else min(cfg.train.rounds, stop_after)
            r = start
            try:
                for r in range(start, last):
                    self._round(r, progress, history, dropped, lambda: wall_before + time.perf_counter() - t_start)
            except ray.exceptions.RayActorError as e:  # executors' deaths are handled in _collect
                raise self._actor_lost(e, r) from e
            done = bool(history) and history[-1]["round"] == cfg.train.rounds - 1
            summary = self._finish(info, history, dropped, wall_before + time.perf_counter() - t_start, done)
            # An early stop is an interruption: KILLED until `--resume` sets it running again.
            status = "FINISHED" if done else "KILLED"
            return summary
        except KeyboardInterrupt:
            status = "KILLED"  # the caller says how to resume (the CLI: one line)
            raise
        finally:
            self.tracker.end(status)
            self._stop_actors()

    def _round(self, r: int, progress: Progress, history: list[dict], dropped: list, wall) -> None:
        """Round r: train, evaluate, checkpoint (appending to `history` and `dropped`), then log."""
        cfg = self.cfg
        t0 = time.perf_counter()
        metrics, lost = self._train_round(r, progress)
        dropped += [{"round": r, "client": c} for c in lost]
        if self.evaluates and ((r + 1) % cfg.eval.every == 0 or r == cfg.train.rounds - 1):
            metrics.update(self._evaluate(r, progress))
        if r == cfg.train.rounds - 1 and cfg.privacy.audit.enabled:
            metrics.update(self._audit(r, progress))
        metrics["round_seconds"] = time.perf_counter() - t0
        history.append({"round": r, **metrics})
        progress.round_done(r, metrics["round_seconds"], metrics)
        save_checkpoint(self.run_dir, {
            "round": r, "config": to_dict(cfg), "strategy": ray.get(self.aggregator.state_dict.remote()),
            "history": history, "dropped": dropped, "mlflow_run_id": self.tracker.run_id, "wall_seconds": wall()})
        # After the checkpoint: a driver killed in between leaves the round to log on resume
        # (in run), never a step logged twice.
        self.tracker.log_metrics(metrics, step=r)
        # The checkpoint covers round r now: the trained clients' older store entries can go.
        ClientStore(self.run_dir / "client_state").prune(self.trained, r)
        ray.get(self.aggregator.after_checkpoint.remote(r))
        if self.on_round:
            self.on_round(r, metrics)

    def _finish(self, info: dict, history: list[dict], dropped: list, wall: float, done: bool) -> dict:
        cfg = self.cfg
        evals = [h for h in history if "auc" in h]
        final = {k: v for k, v in evals[-1].items() if not k.startswith("client/")} if evals else {}
        clients_final = {}
        if evals:
            for c in range(cfg.clients.num):
                if f"client/{c}/auc" in evals[-1]:
                    clients_final[str(c)] = {m: evals[-1][f"client/{c}/{m}"] for m in ("auc", "logloss", "accuracy", "rows")}
        preds = self.run_dir / PREDICTIONS
        paired = paired_vs_baselines(pd.read_parquet(preds), cfg.train.seed) if done and preds.exists() else {}
        summary = {
            "name": cfg.name, "run_dir": str(self.run_dir), "complete": done,
            "rounds_done": len(history), "clients": cfg.clients.num, "strategy": cfg.strategy.name,
            "model": cfg.model.name, "dataset": cfg.data.dataset, "eval_split": cfg.eval.split,
            "final": final, "clients_final": clients_final, "baselines": info["baselines"],
            "paired_vs_baselines": paired,
            "bytes_up": sum(h.get("bytes_up", 0) for h in history),
            "bytes_down": sum(h.get("bytes_down", 0) for h in history),
            "dropped": dropped, "wall_seconds": wall, "lora_params": self.lora_params,
            "split": getattr(self, "split_params", {}),  # storage.mode split: memory on the client vs the server
            "mlflow_run_id": self.tracker.run_id,
            "placement": getattr(self, "placement", {}),  # the node of the driver and of each actor
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        if done:
            self._export_adapter()
            plot = plot_client_auc(history, cfg.clients.num, self.run_dir / "client_auc.png")
            curve = plot_learning_curve(history, info["baselines"], self.run_dir / "learning_curve.png")
            # RecLoRA: how concentrated each client's routing is where it is scored (log N_m = uniform).
            entropy = plot_client_bars(history, cfg.clients.num, "personal/eval_alpha_entropy",
                                       self.run_dir / "routing_entropy.png", "routing entropy (nats)",
                                       ("uniform mix", float(np.log(max(cfg.model.personal.bank, 1)))))
            extra = ray.get(self.aggregator.write_artifacts.remote(str(self.run_dir)))
            audit = self.run_dir / AUDIT
            for path in (self.run_dir / "config.yaml", self.run_dir / "partition.csv",
                         self.run_dir / "summary.json", plot, curve, entropy, preds if preds.exists() else None,
                         audit if audit.exists() else None, *map(Path, extra)):
                if path:
                    self.tracker.log_artifact(path)
            self.tracker.log_artifact(self.run_dir / "adapter", "adapter")
        table = summary_table(summary)
        if done:
            self.tracker.log_metrics(headline_metrics(summary), step=history[-1]["round"])
            self.tracker.set_note(f"```\n{table}\n```")
        self.log("\n" + table)
        return summary

    def _export_adapter(self) -> None:
        from safetensors.torch import save_file

        params = ray.get(self.aggregator.global_params.remote())
        state, peft_cfg = ray.get(self.executors[0].export.remote(params))
        out = self.run_dir / "adapter"
        out.mkdir(exist_ok=True)
        save_file(state, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=1, default=str))


def run(cfg: Config | None = None, run_dir: str | Path | None = None, tracking_uri: str | None = None,
        log=print, stop_after: int | None = None) -> dict:
    return Simulation(cfg, Path(run_dir) if run_dir else None, tracking_uri, log).run(stop_after)
