"""What a person sees: progress lines while a run goes, a summary table and a plot at the end."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Round, clients finished, ETA. Rewrites one line on a terminal, prints plain lines in logs."""

    def __init__(self, rounds: int, start_round: int = 0, stream=sys.stderr):
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
    t.add_row(f"federated ({summary['strategy']})", f"{f.get('auc', float('nan')):.4f}",
              f"{f.get('logloss', float('nan')):.4f}", f"{f.get('accuracy', float('nan')):.4f}", str(f.get("rows", "")))
    for name, m in summary.get("baselines", {}).items():
        t.add_row(f"baseline: {name}", f"{m['auc']:.4f}", f"{m['logloss']:.4f}", f"{m['accuracy']:.4f}", "")
    per_client = sorted(summary.get("clients_final", {}).items(), key=lambda kv: int(kv[0]))
    for c, m in per_client[:MAX_CLIENT_ROWS]:
        t.add_row(f"client {c}", f"{m['auc']:.4f}", f"{m['logloss']:.4f}", f"{m['accuracy']:.4f}", str(m["rows"]))
    if len(per_client) > MAX_CLIENT_ROWS:
        t.add_row(f"... {len(per_client) - MAX_CLIENT_ROWS} more clients (summary.json)", "", "", "", "")
    console.print(t)
    balance = (f"per-client AUC: std {f.get('auc_std', float('nan')):.4f}, min {f.get('auc_min', float('nan')):.4f}, "
               f"max {f.get('auc_max', float('nan')):.4f}, gap {f.get('auc_gap', float('nan')):.4f}")
    traffic = (f"traffic: {summary['bytes_up'] / 2**20:.1f} MiB up, {summary['bytes_down'] / 2**20:.1f} MiB down; "
               f"clients dropped: {summary['dropped']}")
    audit = ""
    if "privacy/mia_auc" in f:
        audit = (f"privacy audit: membership-inference AUC {f['privacy/mia_auc']:.4f} (0.5 = members "
                 f"indistinguishable); loss members {f['privacy/member_loss']:.4f} vs held-out "
                 f"{f['privacy/nonmember_loss']:.4f}\n")
    return console.export_text() + balance + "\n" + traffic + "\n" + audit


def plot_client_auc(history: list[dict], clients: int, path: Path) -> Path | None:
    """Per-client AUC over rounds (left) and at the end (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
