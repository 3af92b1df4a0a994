"""`fedsim tune SWEEP.yaml`: a sweep of full simulations under Ray Tune.

Each trial is a whole `Simulation` inside a Tune function trainable and reserves its actors through
one placement group: bundle 0 for the trial's driver loop, bundle i+1 for executor actor i with its
CPU and GPU fraction, so concurrent trials never starve each other. Every trial's config is built
and validated (fedsim.tuning.sweep), and every trial's bundles compared with the cluster, before Tune starts.

MLflow: the driver creates the experiment and one parent run per sweep; each trial logs its
per-round metrics into a nested run (tag `mlflow.parentRunId`). At the end the parent run gets the
results CSV and plots (fedsim.tuning.report).

Layout: `<output_dir>/<sweep name>-<timestamp>/` is the Tune experiment directory; it also holds
`sweep.json` (the expanded trials, so `--resume` runs exactly them), `runs/trial_NNN/` (each trial's
fedsim run directory: a resumed trial continues from its checkpoint there), `results.csv` and the
plots. On a multi-node cluster `output_dir` must be storage every node sees (as Tune requires of
its storage path), and MLflow a server rather than a sqlite file.
"""
from __future__ import annotations

import json
import math
import re
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

import ray
from ray import tune

from fedsim.config import ConfigError, config_from_dict, to_dict
from fedsim.core.placement import SERVER_NODE_SHARE
from fedsim.runs import make_run
from fedsim.simulation import executor_gpus, init_ray
from fedsim.tracking import Tracker, resolve_uri, retry_locked
from fedsim.tuning import report as sweep_report  # not fedsim.report, the single run's report
from fedsim.tuning.sweep import METRICS, Sweep, Trial, describe_point, expand, load_base, parse_sweep

# What each trial reports to Tune once per round (the scheduler compares trials on `metric`).
REPORTED = (*METRICS, "bytes_up", "round_seconds")


# ---------------------------------------------------------------------------------------------
# Resources


def trial_bundles(cfg, trial_cpus: float, cluster_gpus: float) -> list[dict]:
    """Bundle 0 the trial's driver loop; one bundle per executor actor with its CPU/GPU fraction
    (and, with `storage.mode: split`, one more for the split server)."""
    n = cfg.executors.num or cfg.clients.num
    gpus = executor_gpus(cfg, cluster_gpus)
    bundles = [{"CPU": trial_cpus}] + [{"CPU": cfg.executors.num_cpus, "GPU": gpus} for _ in range(n)]
    if cfg.storage.mode == "split":
        s = cfg.storage
        bundles.append({"CPU": s.server_num_cpus, "GPU": gpus if s.server_num_gpus == "auto" else s.server_num_gpus,
                        # the resource that chooses its node (storage.server_node_resource)
                        **({s.server_node_resource: SERVER_NODE_SHARE} if s.server_node_resource else {})})
    return [{k: v for k, v in b.items() if v} for b in bundles]


def trial_strategy(config: dict) -> str:
    """The trial placement group's strategy, from its executors.placement (a sweep saved by an
    older fedsim has none: pack)."""
    return "SPREAD" if config["executors"].get("placement") == "spread" else "PACK"


def check_fit(trials: list[dict], cluster: dict, nodes: list[dict]) -> None:
    """A trial that can never be placed would wait forever: fail before Tune starts."""
    largest = {r: max((n.get(r, 0) for n in nodes), default=0) for r in ("CPU", "GPU")}
    for t in trials:
        bundles = t["bundles"]
        why = (f"bundle 0 (the trial, trial_cpus) {bundles[0]} + {len(bundles) - 1} executor bundle(s) of "
               f"{bundles[1] if len(bundles) > 1 else {}} (executors.num_cpus / executors.num_gpus, one per "
               f"executor: executors.num or clients.num)")
        for r in ("CPU", "GPU"):
            need = sum(b.get(r, 0) for b in bundles)
            biggest = max(b.get(r, 0) for b in bundles)
            if need > cluster.get(r, 0) + 1e-9 or biggest > largest[r] + 1e-9:
                raise ConfigError(
                    f"trial {t['trial']} ({describe_point(t['params'])}) cannot fit the Ray cluster: it needs "
                    f"{need:g} {r} in all, {why}, but the cluster has {cluster.get(r, 0):g} {r} (largest node "
                    f"{largest[r]:g}); lower executors.num_cpus or trial_cpus, use a pool (executors.num), "
                    f"or add nodes")
        missing = sorted({r for b in bundles for r in b if r not in ("CPU", "GPU") and r not in cluster})
        if missing:  # storage.server_node_resource naming a resource no node has
            raise ConfigError(f"trial {t['trial']} ({describe_point(t['params'])}): storage.server_node_resource: "
                              f"no node of the Ray cluster has the resource {missing[0]!r}")


class _Bundles:
    """Tune asks for each trial's resources with its config; a class, so a restored sweep can pickle it."""

    def __init__(self, bundles: list[list[dict]], strategies: list[str]):
        self.bundles, self.strategies = bundles, strategies

    def __call__(self, config: dict) -> tune.PlacementGroupFactory:
        # executors.placement: PACK (as few nodes as possible) or SPREAD (the trial's bundles across nodes)
        return tune.PlacementGroupFactory(self.bundles[config["trial"]], strategy=self.strategies[config["trial"]])


# ---------------------------------------------------------------------------------------------
# The trainable


def run_trial(config: dict, trials: list[dict], parent_run_id: str | None, sweep_name: str, metric: str) -> None:
    """One trial: a fedsim Simulation in the trial's placement group, reporting to Tune every round.
    Its run directory is fixed, so a restarted or resumed trial continues from its checkpoint."""
    spec = trials[config["trial"]]
    cfg = config_from_dict(spec["config"])
    last: dict = {}
    final: list = []

    def report(round: int, row: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            # Tune's checkpoint only points at the fedsim checkpoint, which holds the state.
            Path(d, "fedsim.json").write_text(json.dumps({"run_dir": spec["run_dir"], "round": round}))
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(d))

    def on_round(round: int, metrics: dict) -> None:
        row = {k: float(metrics[k]) for k in REPORTED if k in metrics}
        if "dp/epsilon" in metrics:
            row["dp_epsilon"] = float(metrics["dp/epsilon"])
        last.update(row)  # rounds without evaluation carry the last value of the metric forward
        # Tune refuses a result without the sweep's metric: NaN until the first evaluation (eval.every
        # > 1; a scheduler that compares trials, asha, needs eval.every 1, checked in sweep.expand).
        row = {metric: last.get(metric, math.nan), **row, "round": round + 1}
        # A scheduler stops a trial inside tune.report (SystemExit), also at its last round: report
        # that one after the run has written its summary and adapter.
        if round == cfg.train.rounds - 1:
            final.append((round, row))
        else:
            report(round, row)

    tags = {"fedsim.sweep": sweep_name, "fedsim.trial": str(spec["trial"])}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    make_run(cfg, Path(spec["run_dir"]), on_round=on_round, tags=tags).run()
    if final:
        report(*final[0])


class _StopAfter(tune.Callback):
    """Interrupt the sweep as Ctrl+C would, once `n` trials have finished (to rehearse --resume)."""

    def __init__(self, n: int):
        self.n, self.done = n, 0

    def __getstate__(self):  # Tune saves callbacks with the sweep: the resumed sweep is not interrupted again
        return {"n": None, "done": 0}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done == self.n:
            signal.raise_signal(signal.SIGINT)


def _trial_name(trial) -> str:
    return f"trial_{trial.config['trial']:03d}"


# ---------------------------------------------------------------------------------------------
# The sweep


def sweep_dir_name(name: str) -> str:
    """`<name>-<timestamp>`, the shape sweep_dirs looks for."""
    return f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def sweep_dirs(output_dir: Path, name: str) -> list[Path]:
    """The directories of sweep `name`, oldest first. Only `<name>-<timestamp>` (as sweep_dir_name
    makes them): a glob on `<name>-*` would take sweep "privacy-clients" for sweep "privacy"."""
    pattern = re.escape(name) + r"-\d{8}-\d{6}"
    return sorted(p for p in output_dir.glob("*") if re.fullmatch(pattern, p.name) and (p / "sweep.json").exists())


def _find_resume_dir(sweep_path: str, resume) -> Path:
    if resume is not True:
        path = Path(resume).resolve()
        if not (path / "sweep.json").exists():
            raise FileNotFoundError(f"--resume {resume}: no sweep.json there; is it a fedsim sweep directory?")
        return path
    sweep = parse_sweep(sweep_path)
    output_dir = Path(load_base(sweep, sweep_path, []).get("output_dir", "runs")).resolve()
    found = sweep_dirs(output_dir, sweep.name)
    if not found:
        raise FileNotFoundError(f"--resume: no sweep '{sweep.name}' to continue under {output_dir}")
    return found[-1]


def _new_state(sweep: Sweep, trials: list[Trial], sweep_path: str, overrides: list[str] | None,
               tracking_uri: str | None) -> dict:
    """Everything a run or a resume of the sweep needs, with each trial's config, run dir and bundles."""
    first = trials[0].cfg
    uri = resolve_uri(tracking_uri, first.tracking.uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"  # trials run in other directories
    sweep_dir = Path(first.output_dir).resolve() / sweep_dir_name(sweep.name)
    gpus = ray.cluster_resources().get("GPU", 0)
    rows = []
    for t in trials:
        t.cfg.tracking.uri = uri
        rows.append({"trial": t.index, "params": t.params, "config": to_dict(t.cfg),
                     "run_dir": str(sweep_dir / "runs" / f"trial_{t.index:03d}"),
                     "bundles": trial_bundles(t.cfg, sweep.trial_cpus, gpus)})
    return {"name": sweep.name, "sweep_file": str(sweep_path), "overrides": overrides or [],
            "sweep_dir": str(sweep_dir), "metric": sweep.metric, "mode": sweep.mode,
            "scheduler": to_dict(sweep)["scheduler"], "max_concurrent": sweep.max_concurrent,
            "max_failures": sweep.max_failures, "against": sweep.against, "tracking": {**to_dict(first)["tracking"], "uri": uri},
            "keys": sorted({k for t in trials for k in t.params}), "parent_run_id": None, "trials": rows}


def _scheduler(state: dict):
    s = state["scheduler"]
    if s["name"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    rounds = max(t["config"]["train"]["rounds"] for t in state["trials"])
    return ASHAScheduler(time_attr="training_iteration", max_t=rounds, grace_period=s["grace_period"],
                         reduction_factor=s["reduction_factor"])


def run_sweep(sweep_path: str, overrides: list[str] | None = None, tracking_uri: str | None = None,
              resume=None, log=print, stop_after_trials: int | None = None) -> dict:
    """Run a sweep (or, with `resume` True or a sweep directory, continue one) and report on it."""
    t0 = time.perf_counter()
    if resume:
        sweep_dir = _find_resume_dir(sweep_path, resume)
        state = json.loads((sweep_dir / "sweep.json").read_text())
        log(f"resuming sweep {sweep_dir}")
        init_ray(log)
    else:
        sweep = parse_sweep(sweep_path)
        expanded = expand(sweep, sweep_path, overrides)  # every trial's config is valid before Ray starts
        init_ray(log)
        state = _new_state(sweep, expanded, sweep_path, overrides, tracking_uri)
        sweep_dir = Path(state["sweep_dir"])
    trials = state["trials"]
    check_fit(trials, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    sweep_dir.mkdir(parents=True, exist_ok=True)

    tr = state["tracking"]
    parent = Tracker(tr["enabled"], tr["uri"], tr["experiment"])  # creates the experiment, once, here
    parent.start(f"sweep {state['name']}", {
        "sweep.file": state["sweep_file"], "sweep.trials": len(trials), "sweep.keys": ",".join(state["keys"]),
        "sweep.metric": state["metric"], "sweep.mode": state["mode"], "sweep.scheduler": state["scheduler"]["name"],
        "sweep.max_concurrent": state["max_concurrent"], "sweep.dir": str(sweep_dir),
        "sweep.overrides": " ".join(state["overrides"])},
        run_id=state["parent_run_id"], tags={"fedsim.sweep": state["name"], "fedsim.kind": "sweep"})
    state["parent_run_id"] = parent.run_id
    (sweep_dir / "sweep.json").write_text(json.dumps(state, indent=1))
    log(f"sweep {state['name']}: {len(trials)} trials in {sweep_dir}"
        + (f"; MLflow parent run {parent.run_id} ({tr['uri']})" if parent.run_id else ""))

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, trials=trials, parent_run_id=parent.run_id, sweep_name=state["name"],
                             metric=state["metric"]),
        resources=_Bundles([t["bundles"] for t in trials], [trial_strategy(t["config"]) for t in trials]))
    status = "FAILED"
    try:
        if resume and tune.Tuner.can_restore(str(sweep_dir)):
            tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:  # a new sweep, or one interrupted before Tune saved any state
            tuner = tune.Tuner(
                trainable, param_space={"trial": tune.grid_search(list(range(len(trials))))},
                tune_config=tune.TuneConfig(
                    metric=state["metric"], mode=state["mode"], scheduler=_scheduler(state),
                    max_concurrent_trials=state["max_concurrent"], trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(
                    name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=1,
                    failure_config=tune.FailureConfig(max_failures=state["max_failures"]),
                    callbacks=[_StopAfter(stop_after_trials)] if stop_after_trials else None))
        grid = tuner.fit()
        outcome = {r.config["trial"]: r for r in grid if r.config}
        interrupted = grid.num_terminated + grid.num_errors < len(trials)
        rows = [sweep_report.trial_row(t, outcome.get(t["trial"]), interrupted) for t in trials]
        _tidy_mlflow(parent, rows)
        summary = sweep_report.finish(state, rows, sweep_dir, parent, log)
        summary.update(interrupted=interrupted, wall_seconds=time.perf_counter() - t0)
        status = "KILLED" if interrupted else "FINISHED"
        if interrupted:
            log(f"sweep interrupted; continue with: fedsim tune {state['sweep_file']} --resume {sweep_dir}")
        return summary
    finally:
        parent.end(status)


def _tidy_mlflow(parent: Tracker, rows: list[dict]) -> None:
    """One nested run per trial: delete runs of attempts a trial restarted from scratch, and mark the
    runs of trials Tune stopped (a scheduler's early stop, an interruption) KILLED, not FAILED."""
    if not parent.run_id:
        return
    client = parent.client
    # The parent run's own experiment; a read like the calls below, retried while sqlite is locked.
    exp = retry_locked(client.get_run, parent.run_id).info.experiment_id
    nested = retry_locked(client.search_runs, [exp], f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=10000)
    keep = {r["mlflow_run_id"] for r in rows if r.get("mlflow_run_id")}
    stopped = {r["mlflow_run_id"] for r in rows if r["status"] in ("STOPPED", "INTERRUPTED")}
    for run in nested:
        if run.info.run_id not in keep:
            retry_locked(client.delete_run, run.info.run_id)
        elif run.info.run_id in stopped:
            retry_locked(client.set_terminated, run.info.run_id, status="KILLED")

