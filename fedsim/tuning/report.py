"""The end of a sweep: one row per trial (read from its fedsim run directory), a rich table, a CSV,
and plots as artifacts of the MLflow parent run: privacy-utility (epsilon vs AUC with the
per-client spread), clients vs AUC and clients vs wall time."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from fedsim.report import fmt_seconds, fmt_value, pyplot, save_figure, series
from fedsim.simulation import load_checkpoint
from fedsim.tuning.sweep import EPSILON_KEYS, METRICS

NAN = float("nan")
CI = ("auc_ci_low", "auc_ci_high")  # the last evaluation's 95 % interval of the AUC (reported, not ranked on)
# The membership-inference audit (privacy.audit) with its 95 % interval, under short names.
MIA = {"mia_auc": "privacy/mia_auc", "mia_ci_low": "privacy/mia_auc_ci_low", "mia_ci_high": "privacy/mia_auc_ci_high"}


def epsilon_spent(history: list[dict], cfg: dict) -> float:
    """The run's privacy loss: client-level epsilon, else the largest client's record-level one;
    inf without DP."""
    if cfg["privacy"]["client_dp"]["enabled"]:
        # The aggregator logs it every round, also one where Poisson sampling drew no client (the
        # noise is still released, ClientDP.noise_every_round), and it only grows: the last round's.
        return float(history[-1].get("dp/epsilon", NAN)) if history else NAN
    if cfg["privacy"]["sample_dp"]["enabled"]:
        # A client logs its epsilon only in rounds it was sampled, and each client's only grows: the
        # max over every round, not the last round alone (which misses clients not sampled then).
        eps = [v for row in history for k, v in row.items() if k.endswith("/dp/sample_epsilon")]
        return float(max(eps)) if eps else NAN
    return math.inf


# A sharded run's comparisons (fedsim.unlearning.merge), in the results next to its merged AUC.
SHARDED = ("sisa/auc", "apa_weights/auc", "apa_outputs/auc", "shard_auc_mean",
           *(f"{m}/auc_ci_{end}" for m in ("sisa", "apa_weights", "apa_outputs") for end in ("low", "high")))


def nodes(placement: dict) -> dict:
    """Where a trial ran (its run's summary.json `placement`): its driver's node and its executors'
    (node ids, first 8 hex digits; several joined by +)."""
    if not placement:
        return {}
    return {"trial_node": placement["driver"]["node_id"][:8],
            "executor_nodes": "+".join(sorted({e["node_id"][:8] for e in placement["executors"]}))}


def trial_row(spec: dict, result, interrupted: bool) -> dict:
    """What one trial did, from its fedsim checkpoint (present once a round finished)."""
    cfg, run_dir = spec["config"], Path(spec["run_dir"])
    row = {"trial": spec["trial"], **{k: v for k, v in spec["params"].items() if k != "train.seed"},
           # Every metric a sweep may rank on (sweep.METRICS), so `finish` finds the sweep's metric.
           "seed": cfg["train"]["seed"], **dict.fromkeys(METRICS, NAN), **dict.fromkeys(CI, NAN),
           **dict.fromkeys(MIA, NAN), "epsilon": epsilon_spent([], cfg), "bytes_up": 0.0, "bytes_down": 0.0, "wall_seconds": NAN,
           "rounds": 0, "status": "", "run_dir": str(run_dir), "mlflow_run_id": None,
           "trial_node": "", "executor_nodes": ""}
    ckpt = load_checkpoint(run_dir) if run_dir.exists() else None
    if ckpt:
        history = ckpt["history"]
        evals = [h for h in history if "auc" in h]
        last = evals[-1] if evals else {}
        row.update({k: last.get(k, NAN) for k in (*METRICS, *CI)})
        audit = next((h for h in reversed(history) if MIA["mia_auc"] in h), {})
        row.update({k: audit.get(v, NAN) for k, v in MIA.items()})
        row.update(epsilon=epsilon_spent(history, cfg), rounds=len(history), wall_seconds=ckpt["wall_seconds"],
                   bytes_up=sum(h.get("bytes_up", 0) for h in history),
                   bytes_down=sum(h.get("bytes_down", 0) for h in history), mlflow_run_id=ckpt.get("mlflow_run_id"))
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        if summary.get("complete"):
            row["wall_seconds"] = summary["wall_seconds"]  # includes the final export
        row.update(nodes(summary.get("placement", {})))
        # The conventional baselines on the same rows: the lines a plot compares against.
        row.update({f"baseline/{k}": d["auc"] for k, d in summary.get("baselines", {}).items() if "auc" in d})
    elif (run_dir / "summary.json").exists():  # a sharded run (unlearning.shards): no checkpoint of its own
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("complete") and "unlearning" in summary:
            final = summary["final"]
            row.update({k: final.get(k, NAN) for k in (*METRICS, *CI, *SHARDED)})
            row.update(rounds=cfg["train"]["rounds"], wall_seconds=summary["wall_seconds"],
                       train_seconds=summary["train_seconds"],
                       mlflow_run_id=summary.get("mlflow_run_id"))
    if result is not None and result.error:
        row["status"] = "ERROR"
    elif row["rounds"] == cfg["train"]["rounds"]:
        row["status"] = "FINISHED"
    elif interrupted:
        row["status"] = "INTERRUPTED"
    else:
        row["status"] = "STOPPED" if result is not None else "NOT RUN"  # STOPPED: the scheduler ended it early
    return row


def _seeds(seeds: list) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def results_table(rows: list[dict], keys: list[str], title: str) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=160, file=open("/dev/null", "w"))
    t = Table(title=title)
    shown = [k for k in keys if k != "train.seed"]
    for col in ["trial", *shown, "seed", "rounds", "AUC", "AUC gap", "ε spent", "MiB up", "wall", "status"]:
        t.add_column(col, justify="left" if col == "status" else "right")
    for r in rows:
        t.add_row(str(r["trial"]), *[fmt_value(r.get(k)) for k in shown], str(r["seed"]), str(r["rounds"]),
                  fmt_value(r["auc"]), fmt_value(r["auc_gap"]), fmt_value(r["epsilon"]), f"{r['bytes_up'] / 2**20:.2f}",
                  fmt_seconds(r["wall_seconds"]) if r["wall_seconds"] == r["wall_seconds"] else "-", r["status"])
    console.print(t)
    return console.export_text()


def _series(rows: list[dict], keys: list[str], x_key: str) -> dict[str, list[dict]]:
    """Rows grouped into lines (`fedsim.report.series`); epsilon on x absorbs every epsilon key. A
    row's seed is its `seed` (in `train.seed` only where the grid varies it)."""
    get = lambda r, k: r.get("seed") if k == "train.seed" else r.get(k)  # noqa: E731
    return series(rows, [k for k in keys if not (x_key == "epsilon" and k in EPSILON_KEYS)], x_key, get)


DP_KINDS = {"privacy.client_dp.epsilon": "client-level", "privacy.sample_dp.epsilon": "record-level"}


def by_dp_kind(rows: list[dict], targets: list[str]) -> list[dict]:
    """Rows of a sweep that varies several kinds' epsilon targets (tied keys, e.g. client-level
    and record-level DP in one grid), once for each kind that is on, with `dp` (the kind) and
    `dp_epsilon` (its target). A row with no DP joins every kind at infinity: each kind's line ends
    on the same no-DP reference."""
    out = []
    for r in rows:
        on = [k for k in targets if r[k] != math.inf]
        out += [{**r, "dp": DP_KINDS.get(k, k), "dp_epsilon": r[k]} for k in on or targets]
    return out


def _mean_by_x(rows: list[dict], x_of, ys: tuple[str, ...]) -> tuple[list[float], dict[str, list[float]]]:
    """Mean over seeds of each y at each x."""
    xs = sorted({x_of(r) for r in rows})
    return xs, {y: [float(np.mean([r[y] for r in rows if x_of(r) == x])) for x in xs] for y in ys}


def _pooled_ci(rows: list[dict], audit: bool) -> tuple[float, float] | None:
    """The 95 % interval of the mean over these trials (an arm's seeds) of their AUC, or with `audit`
    of their attack's, from the rows they scored (`fedsim.compare.auc_over_seeds`); None when a trial
    has not kept them (a run from before predictions.parquet or audit.parquet, or rows made by hand)."""
    from fedsim.compare import auc_over_seeds

    try:
        return auc_over_seeds([r["run_dir"] for r in rows], audit=audit)[1:]
    except (KeyError, FileNotFoundError, ValueError):
        return None


def _plot_vs_epsilon(rows: list[dict], keys: list[str], path: Path, y: str, ci: tuple[str, str], ylabel: str,
                     title: str, band: tuple[str, str] | None = None, lines: dict | None = None,
                     audit: bool = False) -> Path | None:
    """`y` against epsilon, one line per setting of the other keys: the mean over seeds with bars for
    its 95 % interval over rows, each seed as a faint dot, `band` (low, high columns) shaded, `lines`
    ({label: value}) drawn across. With several seeds at a point the bars are the interval of their
    mean, from the rows the trials scored (their membership audits' rows with `audit`); where a trial
    has not kept its rows, the seeds' interval ends averaged (wider). The x is the epsilon target when
    the sweep varies one, else the epsilon spent; no DP (infinity) is drawn to the right of the
    largest finite value."""
    targets = [k for k in keys if k in EPSILON_KEYS]
    if len(targets) > 1:  # several kinds of DP: x is the target of the kind that is on, a line per kind
        rows, keys = by_dp_kind(rows, targets), [k for k in keys if k not in targets] + ["dp"]
        targets = ["dp_epsilon"]
    target = targets[0] if targets else None
    x_of = (lambda r: r[target]) if target else (lambda r: r["epsilon"])
    rows = [r for r in rows if r[y] == r[y] and x_of(r) == x_of(r)]
    if len({x_of(r) for r in rows}) < 2:
        return None
    finite = [x_of(r) for r in rows if x_of(r) != math.inf]
    inf_at = 4 * max(finite) if finite else 1.0
    at = lambda x: inf_at if x == math.inf else x  # noqa: E731
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = _series(rows, keys, target or "epsilon")
    for j, (label, grp) in enumerate(groups.items()):
        shift = 1 + 0.05 * (j - (len(groups) - 1) / 2)  # side by side, not on top of each other
        xs, m = _mean_by_x(grp, x_of, (y, *ci, *(band or ())))
        for i, x in enumerate(xs):
            seeds = [r for r in grp if x_of(r) == x]
            pooled = _pooled_ci(seeds, audit) if len(seeds) > 1 else None
            if pooled:
                m[ci[0]][i], m[ci[1]][i] = pooled
        pos = np.array([at(x) for x in xs]) * shift
        bars = np.nan_to_num([np.subtract(m[y], m[ci[0]]), np.subtract(m[ci[1]], m[y])])
        line = ax.errorbar(pos, m[y], yerr=bars, marker="o", capsize=3, label=label)[0]
        ax.scatter([at(x_of(r)) * shift for r in grp], [r[y] for r in grp], s=10, color=line.get_color(), alpha=0.35)
        if band:
            ax.fill_between(pos, m[band[0]], m[band[1]], color=line.get_color(), alpha=0.15)
    for k, (name, value) in enumerate((lines or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{len(groups) + k}", label=name)
    ax.set_xscale("log")
    no_dp = any(x_of(r) == math.inf for r in rows)
    ax.set_xticks(sorted(set(finite)) + [inf_at] * no_dp,
                  [fmt_value(x) for x in sorted(set(finite))] + ["∞ (no DP)"] * no_dp)
    ax.minorticks_off()
    seeds = sorted({r["seed"] for r in rows})
    x_name = "each kind's target" if target == "dp_epsilon" else target or "spent"
    ax.set(xlabel=f"ε ({x_name})", ylabel=ylabel, title=f"{title} ({_seeds(seeds)})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_privacy_utility(rows: list[dict], keys: list[str], path: Path) -> Path | None:
    """Epsilon vs pooled test AUC with its interval, the band of the middle half of the clients (the
    25th to 75th percentile of per-client AUC: with users as clients the worst and best are small
    clients scoring 0 or 1 by chance), and the conventional baselines on the same rows as dashed lines."""
    first = next((r for r in rows if any(k.startswith("baseline/") for k in r)), {})
    lines = {f"baseline: {k.split('/', 1)[1]}": v for k, v in first.items() if k.startswith("baseline/")}
    return _plot_vs_epsilon(rows, keys, path, "auc", CI, "test AUC (bars: 95 % CI; band: middle half of clients)",
                            "privacy–utility", band=("auc_q25", "auc_q75"), lines=lines)


def plot_mia(rows: list[dict], keys: list[str], path: Path) -> Path | None:
    """Epsilon vs the membership-inference attack's AUC (privacy.audit) with its interval; 0.5 = the
    attack cannot tell members from non-members."""
    return _plot_vs_epsilon(rows, keys, path, "mia_auc", ("mia_ci_low", "mia_ci_high"),
                            "membership-inference AUC (bars: 95 % CI)", "membership inference",
                            lines={"no leakage (0.5)": 0.5}, audit=True)


def plot_clients(rows: list[dict], keys: list[str], auc_path: Path, wall_path: Path) -> list[Path]:
    """Number of clients vs AUC (with the per-client spread) and vs wall time, mean over seeds."""
    rows = [r for r in rows if r["auc"] == r["auc"]]
    if "clients.num" not in keys or len({r["clients.num"] for r in rows}) < 2:
        return []
    plt = pyplot()
    out = []
    for path, y, ylabel in ((auc_path, "auc", "test AUC (band: worst to best client)"),
                            (wall_path, "wall_seconds", "wall time per trial (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, grp in _series(rows, keys, "clients.num").items():
            xs, m = _mean_by_x(grp, lambda r: r["clients.num"], ("auc", "auc_min", "auc_max", "wall_seconds"))
            line, = ax.plot(xs, m[y], marker="o", label=label)
            if y == "auc":
                ax.fill_between(xs, m["auc_min"], m["auc_max"], color=line.get_color(), alpha=0.15)
        ax.set_xticks(sorted({r["clients.num"] for r in rows}))
        ax.set(xlabel="clients", ylabel=ylabel, title=f"clients vs {'AUC' if y == 'auc' else 'wall time'}")
        ax.legend(fontsize=8)
        save_figure(fig, path)
        out.append(path)
    return out


def plot_unlearning(rows: list[dict], keys: list[str], path: Path) -> Path | None:
    """Shards K vs test AUC (a sweep over unlearning.shards): APA's two merges and SISA's average with
    their 95 % intervals, the mean single shard, and K = 1 (plain retraining) as a line; mean over
    seeds, each seed a faint dot."""
    rows = [r for r in rows if r.get("apa_weights/auc", NAN) == r.get("apa_weights/auc", NAN)]
    if "unlearning.shards" not in keys or len({r["unlearning.shards"] for r in rows}) < 2:
        return None
    k_of = lambda r: r["unlearning.shards"]  # noqa: E731
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = (("apa_weights", "APA merge: weights"), ("apa_outputs", "APA merge: outputs"), ("sisa", "SISA average"))
    for j, (name, label) in enumerate(series):
        y, lo, hi = f"{name}/auc", f"{name}/auc_ci_low", f"{name}/auc_ci_high"
        grp = [r for r in rows if k_of(r) > 1]
        xs, m = _mean_by_x(grp, k_of, (y, lo, hi))
        pos = np.array(xs) * (1 + 0.04 * (j - 1))  # side by side, not on top of each other
        bars = np.nan_to_num([np.subtract(m[y], m[lo]), np.subtract(m[hi], m[y])])
        line = ax.errorbar(pos, m[y], yerr=bars, marker="o", capsize=3, label=label)[0]
        ax.scatter([k_of(r) * (1 + 0.04 * (j - 1)) for r in grp], [r[y] for r in grp], s=10,
                   color=line.get_color(), alpha=0.35)
    xs, m = _mean_by_x(rows, k_of, ("shard_auc_mean",))
    ax.plot(xs, m["shard_auc_mean"], ls=":", marker="x", color="gray", label="one shard alone (mean)")
    single = [r for r in rows if k_of(r) == 1]
    if single:
        auc1 = float(np.mean([r["auc"] for r in single]))
        ax.axhline(auc1, ls="--", lw=1, color="black", label=f"K = 1: retraining ({auc1:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({k_of(r) for r in rows}), [str(k) for k in sorted({k_of(r) for r in rows})])
    ax.minorticks_off()
    seeds = sorted({r["seed"] for r in rows})
    ax.set(xlabel="shards K (each trained on 1/K of the rows)", ylabel="test AUC (bars: 95 % CI)",
           title=f"APA unlearning: merged shard adapters vs retraining ({_seeds(seeds)})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def compared(sweep_dir: Path, against: str, parent, log=print) -> None:
    """`fedsim compare SWEEP --against` at the sweep's end: the table on the console, beside the
    sweep and on the parent run (folder `compare`), and `--audit`'s where the trials ran the
    membership audit; a sweep without a finished pair says why."""
    from fedsim.compare import AUDIT, compare_sweep, format_sweep_comparison, write_sweep_comparison

    # test AUC; then, where the trials ran the membership audit, the attacks' AUCs the same way
    for audit in (False, True):
        if audit and not any((Path(t["run_dir"]) / AUDIT).exists()
                             for t in json.loads((sweep_dir / "sweep.json").read_text())["trials"]):
            return
        try:
            r = compare_sweep(sweep_dir, against, audit=audit)
        except ValueError as e:
            log(f"compare --against {against}: {e}")
            return
        text = format_sweep_comparison(r)
        log("\n" + text)
        for path in write_sweep_comparison(r, text):
            parent.log_artifact(path, "compare")


def finish(state: dict, rows: list[dict], sweep_dir: Path, parent, log=print) -> dict:
    """Table on the console; results.csv and plots in the sweep directory and on the parent run."""
    keys = state["keys"]
    done = [r for r in rows if r["status"] == "FINISHED"]
    title = (f"sweep {state['name']}: {len(done)}/{len(rows)} trials finished "
             f"(metric {state['metric']}, {state['mode']})")
    log("\n" + results_table(rows, keys, title))
    csv = sweep_dir / "results.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    plots = [p for p in (plot_privacy_utility(rows, keys, sweep_dir / "privacy_utility.png"),
                         plot_mia(rows, keys, sweep_dir / "privacy_mia.png"),
                         plot_unlearning(rows, keys, sweep_dir / "unlearning_k.png"),
                         *plot_clients(rows, keys, sweep_dir / "clients_auc.png", sweep_dir / "clients_wall.png")) if p]
    scored = [r[state["metric"]] for r in done if r[state["metric"]] == r[state["metric"]]]
    metrics = {"trials": len(rows), "trials_finished": len(done),
               "trials_failed": sum(r["status"] == "ERROR" for r in rows)}
    if scored:
        metrics[f"best_{state['metric']}"] = max(scored) if state["mode"] == "max" else min(scored)
    parent.log_metrics(metrics, step=0)
    for path in (csv, sweep_dir / "sweep.json", *plots):
        parent.log_artifact(path)
    if state.get("against"):  # the sweep file's reference: every trial paired with it
        compared(sweep_dir, state["against"], parent, log)
    log(f"results: {csv}" + (f"; plots: {', '.join(p.name for p in plots)}" if plots else ""))
    return {"name": state["name"], "sweep_dir": str(sweep_dir), "parent_run_id": parent.run_id,
            "tracking_uri": state["tracking"]["uri"], "trials": rows, "completed": len(done),
            "csv": str(csv), "plots": [str(p) for p in plots]}
