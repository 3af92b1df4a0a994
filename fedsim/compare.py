"""Is run A better than run B? Paired AUC differences on the rows both evaluated.

A run's final evaluation leaves `predictions.parquet` in its directory: one row per evaluated
(user, item, timestamp) with the label, the federated model's probability (`prob`) and each
conventional baseline's score (`baseline/<name>`). Two runs on the same data split share those
rows; scoring both on the same rows and resampling the same rows for both cancels the noise they
share, which two separate intervals cannot.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedsim.metrics import auc, auc_ci, paired_auc_diff
from fedsim.report import fmt_diff, fmt_interval, verdict

KEY = ["user", "item", "timestamp"]
BASELINE = "baseline:"


def baseline_columns(preds: pd.DataFrame) -> list[str]:
    return [c for c in preds.columns if c.startswith("baseline/")]


def paired_vs_baselines(preds: pd.DataFrame, seed: int = 0, n_boot: int = 1000) -> dict[str, dict]:
    """Federated minus each baseline: {name: {diff, low, high, p_value, rows}} over the rows both scored."""
    out = {}
    for col in baseline_columns(preds):
        rows = preds[["label", "prob", col]].dropna()
        d = paired_auc_diff(rows["label"], rows["prob"], rows[col], seed=seed, n_boot=n_boot)
        out[col.split("/", 1)[1]] = {k: d[k] for k in ("diff", "low", "high", "p_value", "rows")}
    return out


def _finished(run: Path) -> bool:
    path = run / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("complete", False)


def load_predictions(run: str | Path) -> pd.DataFrame:
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run {run} does not exist (give a run directory, runs/<name>-<timestamp>)")
    path = run / "predictions.parquet"
    if not path.exists():
        if _finished(run):
            raise FileNotFoundError(f"run {run} has no predictions.parquet: it finished before fedsim saved "
                                    f"per-row predictions; run it again to compare it")
        raise FileNotFoundError(f"run {run} has no predictions.parquet: it did not finish "
                                f"(resume it with fedsim run --resume {run})")
    return pd.read_parquet(path)


def _shared_rows(a: str, b: str) -> tuple[pd.DataFrame, int, int]:
    """(label, a, b) on the rows both sides scored, and how many rows each side has."""
    pa = load_predictions(a)
    if b.startswith(BASELINE):
        col = "baseline/" + b[len(BASELINE):]
        if col not in pa.columns:
            have = ", ".join(BASELINE + c.split("/", 1)[1] for c in baseline_columns(pa)) or "none"
            raise ValueError(f"run {a} has no scores for {b} (baselines in its predictions.parquet: {have})")
        rows = pa[["label", "prob", col]].dropna().set_axis(["label", "a", "b"], axis=1)
        return rows, len(pa), int(pa[col].notna().sum())
    pb = load_predictions(b)
    joined = pa[KEY + ["label", "prob"]].merge(pb[KEY + ["label", "prob"]], on=KEY, suffixes=("_a", "_b"))
    if not len(joined):
        raise ValueError(f"runs {a} and {b} share no evaluated rows (user, item, timestamp): compare runs made "
                         f"on the same data, split and eval.split")
    differ = int((joined["label_a"] != joined["label_b"]).sum())
    if differ:
        raise ValueError(f"runs {a} and {b} label {differ} of their {len(joined)} shared rows differently "
                         f"(a different data.like_threshold?); their AUCs are not comparable")
    rows = joined[["label_a", "prob_a", "prob_b"]].set_axis(["label", "a", "b"], axis=1)
    return rows, len(pa), len(pb)


def compare_runs(a: str | Path, b: str | Path, seed: int = 0, n_boot: int = 1000) -> dict:
    """AUC of run A and of run B (or `baseline:<name>`: that baseline's scores in A's predictions)
    with 95 % intervals on their shared rows, and the paired difference A - B with its interval,
    DeLong p-value and verdict: "A better" / "B better" when the interval excludes 0, else
    "within noise"."""
    a, b = str(a), str(b)
    rows, rows_a, rows_b = _shared_rows(a, b)
    y, sa, sb = rows["label"].to_numpy(), rows["a"].to_numpy(), rows["b"].to_numpy()
    d = paired_auc_diff(y, sa, sb, seed=seed, n_boot=n_boot)

    def side(run, scores):
        low, high = auc_ci(y, scores, seed=seed, n_boot=n_boot)
        return {"run": run, "auc": auc(y, scores), "low": low, "high": high}

    return {"a": side(a, sa), "b": side(b, sb), "rows": len(rows), "rows_a": rows_a, "rows_b": rows_b,
            "positives": int(np.sum(y)), **{k: d[k] for k in ("diff", "low", "high", "se", "p_value")},
            "verdict": verdict(d, "A", "B"), "seed": seed, "n_boot": n_boot}


def format_comparison(r: dict) -> str:
    lines = [f"{side}: {r[k]['run']}\n   AUC {fmt_interval(r[k]['auc'], r[k]['low'], r[k]['high'])}"
             for side, k in (("A", "a"), ("B", "b"))]
    lines.append(f"A − B: {fmt_diff(r)} ({r['positives']} positives; "
                 f"A has {r['rows_a']} rows, B {r['rows_b']}); DeLong p = {r['p_value']:.3g}")
    why = ("the interval excludes 0" if r["verdict"].endswith("better") else
           "the interval includes 0" if r["verdict"] == "within noise" else "no interval")
    lines.append(f"verdict: {r['verdict']} ({why}; 95 %, {r['n_boot']} paired bootstrap resamples, seed {r['seed']})")
    return "\n".join(lines)
