"""What a person sees: progress lines while a run goes, a summary table and a plot at the end."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


HEADLINE = ("auc", "auc_ci_low", "auc_ci_high", "logloss", "accuracy", "auc_min", "auc_gap")


def headline_metrics(summary: dict) -> dict[str, float]:
    """The numbers a reader looks for first, as MLflow metrics under `summary/` (one chart section
    and runs-table columns): the final model's pooled scores and fairness spread, the paired AUC
    difference against each baseline, the traffic and the wall time."""
    out = {f"summary/{k}": summary["final"][k] for k in HEADLINE if k in summary["final"]}
    out.update({f"summary/auc_minus_{name}": d["diff"] for name, d in summary.get("paired_vs_baselines", {}).items()})
    out.update({f"summary/{k}": summary[k] for k in ("bytes_up", "bytes_down", "wall_seconds")})
    return out


class Progress:
    """Round, clients finished, ETA. Rewrites one line on a terminal, prints plain lines in logs."""

    def __init__(self, rounds: int, start_round: int = 0, stream=None):
        # sys.stderr as it is now, not as it was at import (pytest's capture swaps and closes it)
        stream = stream or sys.stderr
        self.rounds, self.start_round, self.stream = rounds, start_round, stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()
        self.round_times: list[float] = []

    def eta(self, round: int) -> str:
        if not self.round_times:
            return "?"
        return fmt_seconds(np.mean(self.round_times) * (self.rounds - round))

    def clients(self, round: int, phase: str, done: int, total: int, extra: str = "") -> None:
        line = (f"round {round + 1}/{self.rounds} {phase}: {done}/{total} clients{extra} | "
                f"elapsed {fmt_seconds(time.perf_counter() - self.t0)} | ETA {self.eta(round)}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif done == total or total <= 20 or done % max(1, total // 10) == 0:
            print(line, file=self.stream, flush=True)

    def round_done(self, round: int, seconds: float, metrics: dict) -> None:
        self.round_times.append(seconds)
        shown = " ".join(f"{k}={metrics[k]:.4f}" for k in ("train_loss", "auc", "logloss", "auc_gap") if k in metrics)
        if self.tty:
            self.stream.write("\r\033[K")
        print(f"round {round + 1}/{self.rounds} done in {seconds:.1f}s: {shown} | ETA {self.eta(round + 1)}",
              file=self.stream, flush=True)


MAX_CLIENT_ROWS = 50  # per-client rows in the summary table; the rest are in summary.json
NAN = float("nan")


def fmt_interval(value: float, low: float = NAN, high: float = NAN) -> str:
    """`0.7812 [0.752, 0.809]`; the bare value where there is no interval (older runs, one class)."""
    return f"{value:.4f}" if low != low or high != high else f"{value:.4f} [{low:.3f}, {high:.3f}]"


def fmt_auc(m: dict) -> str:
    """A metrics dict's AUC with its interval (`auc`, `auc_ci_low`, `auc_ci_high`)."""
    return fmt_interval(m.get("auc", NAN), m.get("auc_ci_low", NAN), m.get("auc_ci_high", NAN))


def fmt_signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def fmt_diff(d: dict) -> str:
    """A paired difference: `+0.012 [−0.015, +0.040] paired over 400 rows`."""
    return f"{fmt_signed(d['diff'])} [{fmt_signed(d['low'])}, {fmt_signed(d['high'])}] paired over {d['rows']} rows"


def verdict(d: dict, a: str, b: str) -> str:
    """Which side a paired difference a - b favours: one only when its interval excludes 0."""
    if d["low"] != d["low"]:
        return "no verdict (the rows hold one class)"
    return f"{a} better" if d["low"] > 0 else f"{b} better" if d["high"] < 0 else "within noise"


def summary_table(summary: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=100, file=open("/dev/null", "w"))
    t = Table(title=f"fedsim run {summary['name']}: {summary['rounds_done']} rounds, "
                    f"{summary['clients']} clients, {fmt_seconds(summary['wall_seconds'])}")
    t.add_column("model / client")
    for col in ("AUC", "LogLoss", "Accuracy", "rows"):
        t.add_column(col, justify="right")
    f = summary["final"]
    t.add_row(f"federated ({summary['strategy']})", fmt_auc(f),
              f"{f.get('logloss', float('nan')):.4f}", f"{f.get('accuracy', float('nan')):.4f}", str(f.get("rows", "")))
    for name, m in summary.get("baselines", {}).items():
        t.add_row(f"baseline: {name}", fmt_auc(m), f"{m['logloss']:.4f}", f"{m['accuracy']:.4f}", "")
    if "crm/auc" in f:  # RecLoRA: each client's own CRM alone, on the rows the run scored
        t.add_row("baseline: crm (each client's own)", fmt_auc({k: f.get(f"crm/{k}", NAN) for k in ("auc", "auc_ci_low", "auc_ci_high")}),
                  "", "", str(f.get("rows", "")))
    per_client = sorted(summary.get("clients_final", {}).items(), key=lambda kv: int(kv[0]))
    for c, m in per_client[:MAX_CLIENT_ROWS]:
        t.add_row(f"client {c}", f"{m['auc']:.4f}", f"{m['logloss']:.4f}", f"{m['accuracy']:.4f}", str(m["rows"]))
    if len(per_client) > MAX_CLIENT_ROWS:
        t.add_row(f"... {len(per_client) - MAX_CLIENT_ROWS} more clients (summary.json)", "", "", "", "")
    console.print(t)
    paired = "".join(f"federated − {name}: {fmt_diff(d)} ({verdict(d, 'federated', 'baseline')})\n"
                     for name, d in summary.get("paired_vs_baselines", {}).items())
    balance = (f"per-client AUC: std {f.get('auc_std', float('nan')):.4f}, min {f.get('auc_min', float('nan')):.4f}, "
               f"max {f.get('auc_max', float('nan')):.4f}, gap {f.get('auc_gap', float('nan')):.4f}")
    traffic = (f"traffic: {summary['bytes_up'] / 2**20:.1f} MiB up, {summary['bytes_down'] / 2**20:.1f} MiB down; "
               f"clients dropped: {summary['dropped']}")
    audit = ""
    if "privacy/mia_auc" in f:
        ci = (f" [{f['privacy/mia_auc_ci_low']:.3f}, {f['privacy/mia_auc_ci_high']:.3f}]"
              if "privacy/mia_auc_ci_low" in f else "")
        audit = (f"privacy audit: membership-inference AUC {f['privacy/mia_auc']:.4f}{ci} (0.5 = members "
                 f"indistinguishable); loss members {f['privacy/member_loss']:.4f} vs held-out "
                 f"{f['privacy/nonmember_loss']:.4f}\n")
    return console.export_text() + paired + balance + "\n" + traffic + "\n" + audit


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend: runs, sweeps and benchmarks draw PNGs, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(rows: list, keys: list[str], x_key: str, get=lambda r, k: r.get(k)) -> dict[str, list]:
    """Rows grouped into a plot's lines: by the varied keys other than the x axis and the seed, in
    sweep order. A key tied to x in the grid (one value at each x, e.g. local steps that shrink as
    clients grow) does not split a line into single points."""
    def tied(k):
        seen = {}
        return all(seen.setdefault(get(r, x_key), get(r, k)) == get(r, k) for r in rows)

    other = [k for k in keys if k not in (x_key, "train.seed") and not tied(k)]
    # a lone line is named for what every caller draws of it: the mean over the seeds, or the one seed
    seeds = {get(r, "train.seed") for r in rows}
    lone = "mean over seeds" if len(seeds) > 1 else "one run a point" if seeds == {None} else f"seed {seeds.pop()}"
    groups: dict[str, list] = {}
    for r in rows:
        label = ", ".join(f"{'.'.join(k.split('.')[-2:])}={fmt_value(get(r, k))}" for k in other) or lone
        groups.setdefault(label, []).append(r)
    return groups


def fmt_value(v) -> str:
    """A grid value in a table or legend: infinity as ∞, a float in 4 significant digits."""
    if isinstance(v, float):
        return "∞" if v == math.inf else "-" if v != v else f"{v:.4g}"
    return str(v)


def save_figure(fig, path: Path) -> Path:
    """Every plot's end: laid out, written as a 110-dpi PNG, closed (a sweep draws many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_client_auc(history: list[dict], clients: int, path: Path) -> Path | None:
    """Per-client AUC over rounds (left) and at the end (right)."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    evals = [h for h in history if "auc" in h]
    if not evals:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rounds = [h["round"] + 1 for h in evals]
    last = evals[-1]
    # The clients evaluated (all, or the `eval.clients` sample): at 10,000 clients, drawing a line
    # for every client would take minutes and show nothing.
    ids = [c for c in range(clients) if f"client/{c}/auc" in last]
    for c in ids:
        ax1.plot(rounds, [h.get(f"client/{c}/auc", np.nan) for h in evals], alpha=0.5, lw=1)
    ax1.plot(rounds, [h["auc"] for h in evals], color="black", lw=2.5, label="pooled")
    ax1.set(xlabel="round", ylabel="test AUC", title="AUC per client over rounds")
    ax1.legend()
    ax2.bar(range(len(ids)), [last[f"client/{c}/auc"] for c in ids], color="tab:blue")
    if len(ids) <= 40:
        ax2.set_xticks(range(len(ids)), [str(c) for c in ids])
    ax2.axhline(last["auc"], color="black", ls="--", label=f"pooled {last['auc']:.3f}")
    ax2.set(xlabel="client", ylabel="AUC", title=f"final AUC per client (gap {last.get('auc_gap', np.nan):.3f})")
    ax2.legend()
    return save_figure(fig, path)


def plot_client_bars(history: list[dict], clients: int, metric: str, path: Path, label: str,
                     reference: tuple[str, float] | None = None) -> Path | None:
    """A bar per evaluated client of `client/<c>/<metric>` at the last evaluation, their mean
    (dashed) and an optional `reference` (name, value) line; None where no client has the metric."""
    evals = [h for h in history if "auc" in h]
    ids = [c for c in range(clients) if evals and f"client/{c}/{metric}" in evals[-1]]
    if not ids:
        return None
    try:
        plt = pyplot()
    except ImportError:
        return None
    last = evals[-1]
    values = [last[f"client/{c}/{metric}"] for c in ids]
    fig, ax = plt.subplots(figsize=(max(5, min(12, 0.4 * len(ids) + 3)), 4))
    ax.bar(range(len(ids)), values, color="tab:purple")
    if len(ids) <= 40:
        ax.set_xticks(range(len(ids)), [str(c) for c in ids])
    ax.axhline(float(np.mean(values)), color="black", ls="--", label=f"mean {np.mean(values):.3f}")
    if reference is not None:
        ax.axhline(reference[1], color="tab:red", ls=":", label=f"{reference[0]} {reference[1]:.3f}")
    top = max(values + ([reference[1]] if reference else []))
    ax.set_ylim(0, 1.35 * top if top > 0 else 1)  # room for the legend above the lines
    ax.set(xlabel="client", ylabel=label, title=f"{label} per client (round {last['round'] + 1})")
    ax.legend(loc="upper right")
    return save_figure(fig, path)


def plot_learning_curve(history: list[dict], baselines: dict, path: Path) -> Path | None:
    """Pooled AUC (with its 95 % interval) against the training rows seen so far, the baselines as
    dashed lines with their interval bands. None with fewer than two evaluations."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    seen = np.cumsum([h.get("train_samples", 0.0) for h in history])
    points = [(x, h) for x, h in zip(seen, history) if "auc" in h]
    if len(points) < 2:
        return None
    x = np.array([p[0] for p in points])
    y = np.array([h["auc"] for _, h in points])
    low = np.array([h.get("auc_ci_low", np.nan) for _, h in points])
    high = np.array([h.get("auc_ci_high", np.nan) for _, h in points])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.fill_between(x, low, high, color="black", alpha=0.1, lw=0)
    ax.errorbar(x, y, yerr=[y - low, high - y], color="black", marker="o", lw=2, capsize=4,
                label="federated (pooled), 95 % interval")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, m) in enumerate(baselines.items()):
        c = colors[i % len(colors)]
        ax.axhline(m["auc"], color=c, ls="--", lw=1.3, label=f"{name} {fmt_auc(m)}")
        if m.get("auc_ci_low", NAN) == m.get("auc_ci_low", NAN):  # older runs' baselines have no interval
            ax.axhspan(m["auc_ci_low"], m["auc_ci_high"], color=c, alpha=0.07, lw=0)
    ax.set(xlabel="training rows seen (all clients, cumulative)", ylabel="test AUC",
           title="learning curve: pooled AUC vs training rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)
