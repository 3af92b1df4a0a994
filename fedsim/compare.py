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

from fedsim.metrics import auc, auc_ci, auc_mean_ci, paired_auc_diff, paired_auc_diff_mean, paired_client_aucs
from fedsim.report import fmt_diff, fmt_interval, fmt_signed, pyplot, save_figure, series, verdict

KEY = ["user", "item", "timestamp"]
PREDICTIONS = "predictions.parquet"  # in a run directory: every scored row (simulation.write_predictions)
AUDIT = "audit.parquet"  # in a run directory: the membership audit's rows (simulation.write_audit)
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
    path = run / PREDICTIONS
    if not path.exists():
        if _finished(run):
            raise FileNotFoundError(f"run {run} has no predictions.parquet: it finished before fedsim saved "
                                    f"per-row predictions; run it again to compare it")
        raise FileNotFoundError(f"run {run} has no predictions.parquet: it did not finish "
                                f"(resume it with fedsim run --resume {run})")
    return pd.read_parquet(path)


def load_audit(run: str | Path) -> pd.DataFrame:
    """A run's membership audit (audit.parquet) as predictions: label 1 for a member, 0 for a held-out
    row, and the attack's score -loss as prob, so the attack's AUC compares as a model's does."""
    run = Path(run)
    path = run / AUDIT
    if not path.exists():
        raise FileNotFoundError(f"run {run} has no audit.parquet: privacy.audit was off, the run did not finish, "
                                f"or it ran before fedsim saved the audit's rows")
    df = pd.read_parquet(path)
    return df.assign(label=df["member"], prob=-df["loss"])


def _source(audit: bool):
    """What a comparison reads of a run, (file in the run directory, its loader): the attack's rows
    (`audit`) or the predictions."""
    return (AUDIT, load_audit) if audit else (PREDICTIONS, load_predictions)


def _shared_rows(a: str, b: str, audit: bool = False) -> tuple[pd.DataFrame, int, int]:
    """(label, a, b, client[, client_b]) on the rows both sides scored, and how many rows each side
    has; `audit`: the rows both runs' membership audits scored (label: member)."""
    if audit and b.startswith(BASELINE):
        raise ValueError("--audit compares two runs' membership attacks; a baseline has none")
    _, load = _source(audit)
    pa = load(a)
    if b.startswith(BASELINE):
        col = "baseline/" + b[len(BASELINE):]
        if col not in pa.columns:
            have = ", ".join(BASELINE + c.split("/", 1)[1] for c in baseline_columns(pa)) or "none"
            raise ValueError(f"run {a} has no scores for {b} (baselines in its predictions.parquet: {have})")
        rows = pa[["label", "prob", col, "client"]].dropna().set_axis(["label", "a", "b", "client"], axis=1)
        return rows, len(pa), int(pa[col].notna().sum())
    pb = load(b)
    cols = KEY + ["label", "prob", "client"]
    joined = pa[cols].merge(pb[cols], on=KEY, suffixes=("_a", "_b"))
    if not len(joined):
        raise ValueError(f"runs {a} and {b} share no evaluated rows (user, item, timestamp): compare runs made "
                         f"on the same data, split and eval.split")
    differ = int((joined["label_a"] != joined["label_b"]).sum())
    if differ and audit:
        raise ValueError(f"runs {a} and {b} audit {differ} of their {len(joined)} shared rows on different sides "
                         f"(member / held out: a different train.seed or privacy.audit.holdout?); their attacks "
                         f"are not comparable row by row")
    if differ:
        raise ValueError(f"runs {a} and {b} label {differ} of their {len(joined)} shared rows differently "
                         f"(a different data.like_threshold?); their AUCs are not comparable")
    rows = joined[KEY + ["label_a", "prob_a", "prob_b", "client_a", "client_b"]]
    return rows.set_axis(KEY + ["label", "a", "b", "client", "client_b"], axis=1), len(pa), len(pb)


def compare_runs(a: str | Path, b: str | Path, seed: int = 0, n_boot: int = 1000, audit: bool = False) -> dict:
    """AUC of run A and of run B (or `baseline:<name>`: that baseline's scores in A's predictions)
    with 95 % intervals on their shared rows, and the paired difference A - B with its interval,
    DeLong p-value and verdict: "A better" / "B better" when the interval excludes 0, else
    "within noise". `audit`: the membership attack's AUC instead (privacy.audit; members against
    held-out rows, scored by -loss), on the rows both runs audited; "better" is the run that leaks more."""
    a, b = str(a), str(b)
    rows, rows_a, rows_b = _shared_rows(a, b, audit)
    y, sa, sb = rows["label"].to_numpy(), rows["a"].to_numpy(), rows["b"].to_numpy()
    d = paired_auc_diff(y, sa, sb, seed=seed, n_boot=n_boot)

    def side(run, scores):
        low, high = auc_ci(y, scores, seed=seed, n_boot=n_boot)
        return {"run": run, "auc": auc(y, scores), "low": low, "high": high}

    return {"a": side(a, sa), "b": side(b, sb), "rows": len(rows), "rows_a": rows_a, "rows_b": rows_b,
            "positives": int(np.sum(y)), **{k: d[k] for k in ("diff", "low", "high", "se", "p_value")},
            "verdict": _verdict(d, "A", "B", audit), "seed": seed, "n_boot": n_boot, "audit": audit}


def _verdict(d: dict, a: str, b: str, audit: bool) -> str:
    """`verdict`; of two attacks (`audit`) the "better" side is the one that leaks more."""
    return verdict(d, a, b).replace("better", "leaks more") if audit else verdict(d, a, b)


def format_comparison(r: dict) -> str:
    what = "membership-attack AUC" if r.get("audit") else "AUC"
    lines = [f"{side}: {r[k]['run']}\n   {what} {fmt_interval(r[k]['auc'], r[k]['low'], r[k]['high'])}"
             for side, k in (("A", "a"), ("B", "b"))]
    lines.append(f"A − B: {fmt_diff(r)} ({r['positives']} {'members' if r.get('audit') else 'positives'}; "
                 f"A has {r['rows_a']} rows, B {r['rows_b']}); DeLong p = {r['p_value']:.3g}")
    why = ("the interval excludes 0" if r["verdict"].endswith(("better", "more")) else
           "the interval includes 0" if r["verdict"] == "within noise" else "no interval")
    lines.append(f"verdict: {r['verdict']} ({why}; 95 %, {r['n_boot']} paired bootstrap resamples, seed {r['seed']})")
    return "\n".join(lines)


def compare_by_client(a: str | Path, b: str | Path, seed: int = 0, n_boot: int = 1000) -> dict:
    """Fairness across clients, A against B: each client's AUC under both, and the mean, the worst
    client and the gap (max - min) with paired intervals (rows resampled within each client). Both
    runs must have put every shared row in the same client (the same partition, so the same seed)."""
    a, b = str(a), str(b)
    rows, rows_a, rows_b = _shared_rows(a, b)
    if "client_b" in rows:
        moved = int((rows["client"] != rows["client_b"]).sum())
        if moved:
            raise ValueError(f"runs {a} and {b} put {moved} of their {len(rows)} shared rows in different clients "
                             f"(a different partition, clients.num or train.seed?): a per-client comparison "
                             f"needs the same clients; compare their pooled AUC without --by-client")
    r = paired_client_aucs(rows["label"], rows["a"], rows["b"], rows["client"], seed=seed, n_boot=n_boot)
    r["verdicts"] = {"mean": verdict(r["mean"], "A", "B"), "min": verdict(r["min"], "A", "B"),
                     # a smaller gap is the fairer side
                     "gap": verdict(r["gap"], "B", "A").replace("better", "fairer")}
    return {**r, "a_run": a, "b_run": b, "rows_a": rows_a, "rows_b": rows_b, "seed": seed, "n_boot": n_boot}


def format_client_comparison(r: dict) -> str:
    def cell(v, lo, hi):
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    def dcell(d):
        return f"{fmt_signed(d['diff'])} [{fmt_signed(d['low'])}, {fmt_signed(d['high'])}]"

    lines = [f"A: {r['a_run']}", f"B: {r['b_run']}",
             f"{'client':>15}  {'rows':>5}  {'A AUC':22}  {'B AUC':22}  A − B (paired)"]
    for c in r["clients"]:
        lines.append(f"{c['client']:>15}  {c['rows']:>5}  {cell(c['a'], c['a_low'], c['a_high']):22}  "
                     f"{cell(c['b'], c['b_low'], c['b_high']):22}  {dcell(c)}")
    for name, label in (("mean", "mean"), ("min", "worst client"), ("gap", "gap (max − min)")):
        s = r[name]
        lines.append(f"{label:>15}  {'':>5}  {cell(s['a'], s['a_low'], s['a_high']):22}  "
                     f"{cell(s['b'], s['b_low'], s['b_high']):22}  {dcell(s)}  {r['verdicts'][name]}")
    if r["skipped"]:
        lines.append(f"left out (their rows hold one class): clients {', '.join(map(str, r['skipped']))}")
    lines.append(f"95 % intervals, {r['n_boot']} bootstrap resamples within each client, seed {r['seed']}; "
                 f"{r['rows']} shared rows (A has {r['rows_a']}, B {r['rows_b']})")
    return "\n".join(lines)


def plot_client_comparisons(results: list[dict], path: str | Path, a_label: str = "A", b_label: str = "B",
                            titles: list[str] | None = None) -> Path:
    """One panel per `compare_by_client` result (e.g. one per seed): each client's AUC under A and B
    with its 95 % interval, then the mean and the worst client; the panel's title gives the gap of
    each side and the paired difference of the gaps."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results) + 0.8, 4.2), sharey=True, squeeze=False)
    for k, (ax, r) in enumerate(zip(axes[0], results)):
        cells = [(f"{c['client']}\n{c['rows']}", c["a"], c["a_low"], c["a_high"], c["b"], c["b_low"], c["b_high"])
                 for c in r["clients"]]
        cells += [(name, r[key]["a"], r[key]["a_low"], r[key]["a_high"], r[key]["b"], r[key]["b_low"], r[key]["b_high"])
                  for key, name in (("mean", "mean"), ("min", "worst"))]
        x = np.arange(len(cells))
        for j, (label, off) in enumerate(((a_label, -0.15), (b_label, 0.15))):
            v, lo, hi = (np.array([c[1 + 3 * j + i] for c in cells]) for i in range(3))
            ax.errorbar(x + off, v, yerr=np.nan_to_num([v - lo, hi - v]), fmt="o", capsize=3, color=f"C{j}",
                        label=label if k == 0 else None)
        ax.axvline(len(r["clients"]) - 0.5, color="grey", lw=0.8)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(x, [c[0] for c in cells])
        g = r["gap"]
        head = f"{titles[k]}\n" if titles else ""
        ax.set_title(f"{head}gap {a_label} {g['a']:.3f}, {b_label} {g['b']:.3f}; "
                     f"diff {fmt_signed(g['diff'])} [{fmt_signed(g['low'])}, {fmt_signed(g['high'])}]", fontsize=9)
        ax.set_xlabel("client (test rows)")
    axes[0][0].set_ylabel("test AUC (95 % interval)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    save_figure(fig, path)
    return Path(path)


# -- every trial of a sweep against its reference ----------------------------------------------------

def _same(a, b) -> bool:
    """Grid values as a sweep file and a command line give them: 1 == 1.0 == "1", inf == "inf"."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _load_sweep(sweep_dir: Path) -> dict:
    path = sweep_dir / "sweep.json"
    if not path.exists():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory (no sweep.json; give the directory "
                                f"`fedsim tune` printed, <output_dir>/<name>-<timestamp>)")
    return json.loads(path.read_text())


def _sweep_trials(sweep_dir: Path, slices) -> tuple[dict, list[dict]]:
    """The sweep's description and its trials, with those of `slices`: more directories of the same
    sweep file run apart (a seed a slice, on a small machine), which must vary the same keys. Each
    trial is tagged with its slice's index; with slices its name is `<slice directory>/<trial>`."""
    dirs = [sweep_dir, *(Path(d) for d in slices)]
    sweeps = [_load_sweep(d) for d in dirs]
    for d, s in zip(dirs[1:], sweeps[1:]):
        if sorted(s["keys"]) != sorted(sweeps[0]["keys"]):
            raise ValueError(f"--slice {d} varies {s['keys']}, {sweep_dir} varies {sweeps[0]['keys']}: the slices of "
                             f"one sweep vary the same keys")
    trials = [{**t, "slice": i, **({"trial": f"{d.name}/{t['trial']}"} if slices else {})}
              for i, (d, s) in enumerate(zip(dirs, sweeps)) for t in s["trials"]]
    return sweeps[0], trials


def compare_sweep(sweep_dir: str | Path, against: str, seed: int = 0, n_boot: int = 1000, audit: bool = False,
                  slices=()) -> dict:
    """Each trial of a sweep against its reference: the trial with the same settings (the seed
    included, so the pair shares its data, partition and rows) but `against` ("KEY=VALUE"), as
    `compare_runs` does for two runs. Then, per arm (the settings but the seed), the paired
    differences of its seeds and how many exclude 0 either way. `audit`: the membership attacks'
    AUCs (audit.parquet) instead of test AUC. `slices`: more directories of the same sweep file,
    run apart; their trials join the sweep's, each paired with a reference of its own slice where
    that has one, else of the first slice that has (a trial run in two slices counts once a seed)."""
    sweep_dir = Path(sweep_dir)
    sweep, trials = _sweep_trials(sweep_dir, slices)
    wanted = {}
    for pair in against.split(","):
        key, sep, value = pair.strip().partition("=")
        if not sep or key not in sweep["keys"]:
            raise ValueError(f"--against {against!r}: give KEY=VALUE[,KEY=VALUE] with each KEY one of the "
                             f"sweep's keys {sweep['keys']}")
        wanted[key] = value
    scores, load = _source(audit)
    is_ref = lambda t: all(_same(t["params"].get(k), v) for k, v in wanted.items())  # noqa: E731
    for key, value in wanted.items():
        if not any(_same(t["params"].get(key), value) for t in trials):
            raise ValueError(f"--against {against}: no trial has {key} = {value} (its values: "
                             f"{sorted({str(t['params'].get(key)) for t in trials})})")
    others = [k for k in sweep["keys"] if k not in wanted]
    label = ", ".join(f"{k} = {v}" for k, v in wanted.items())
    rows = []
    for t in trials:
        p = t["params"]
        refs = [r for r in trials if is_ref(r) and all(_same(r["params"].get(k), p.get(k)) for k in others)]
        ref = next((r for r in refs if r["slice"] == t["slice"]), refs[0] if refs else None)
        trial_seed = p.get("train.seed", t.get("config", {}).get("train", {}).get("seed"))  # varied, or the one
        row = {"trial": t["trial"], "params": p, "seed": trial_seed, "run_dir": t["run_dir"],
               "reference": ref and ref["trial"]}
        rows.append(row)
        if not (Path(t["run_dir"]) / scores).exists():
            row["status"] = "not finished"
            continue
        preds = load(t["run_dir"])
        y, s = preds["label"].to_numpy(), preds["prob"].to_numpy()
        low, high = auc_ci(y, s, seed=seed, n_boot=n_boot)
        row["a"] = {"auc": auc(y, s), "low": low, "high": high}
        if ref is None:
            row["status"] = f"no trial with {label} and the same other settings"
        elif ref["trial"] == t["trial"]:
            row["status"] = "reference"
        elif not (Path(ref["run_dir"]) / scores).exists():
            row["status"] = f"its reference (trial {ref['trial']}) has not finished"
        else:
            try:
                r = compare_runs(t["run_dir"], ref["run_dir"], seed=seed, n_boot=n_boot, audit=audit)
            except ValueError as e:  # no shared rows, or labelled differently: say so in its row
                row["status"] = str(e)
                continue
            d = {k: r[k] for k in ("diff", "low", "high", "p_value")}
            row.update(status="compared", rows=r["rows"], diff=d, verdict=_verdict(d, "trial", "reference", audit),
                       reference_dir=ref["run_dir"])
    arms = {}  # an arm: a trial's settings but the seed
    for row in rows:
        if row["status"] == "compared":
            arm = arms.setdefault(_arm_of(row, sweep["keys"]), [])
            if row["seed"] not in [r["seed"] for r in arm]:  # the same trial rerun in another slice: once
                arm.append(row)
    summary = [{"arm": dict(arm), "seeds": [r["seed"] for r in rs],
                "diffs": [r["diff"]["diff"] for r in rs],
                "better": sum(r["diff"]["low"] > 0 for r in rs), "worse": sum(r["diff"]["high"] < 0 for r in rs),
                **({"mean": _mean_over_seeds(rs, seed, n_boot, audit)} if len(rs) > 1 else {})}
               for arm, rs in arms.items()]
    return {"sweep": str(sweep_dir), "slices": [str(d) for d in slices], "name": sweep["name"], "keys": sweep["keys"],
            "against": wanted, "trials": rows, "arms": summary, "seed": seed, "n_boot": n_boot, "audit": audit}


def _arm_of(row: dict, keys: list[str]) -> tuple:
    """A trial's arm: its settings but the seed."""
    return tuple((k, row["params"].get(k)) for k in keys if k != "train.seed")


def _mean_over_seeds(rows: list[dict], seed: int, n_boot: int, audit: bool = False) -> dict:
    """An arm's paired difference averaged over its seeds, with `paired_auc_diff_mean`'s interval
    (a row is named by its (user, item, timestamp): seeds that scored the same row draw it together)."""
    pairs = []
    for row in rows:
        both = _shared_rows(row["run_dir"], row["reference_dir"], audit)[0]
        pairs.append((_row_ids(both), both["label"].to_numpy(), both["a"].to_numpy(), both["b"].to_numpy()))
    return paired_auc_diff_mean(pairs, seed=seed, n_boot=n_boot)


def auc_over_seeds(runs: list, audit: bool = False, seed: int = 0, n_boot: int = 1000) -> tuple[float, float, float]:
    """The mean over several runs (an arm's seeds) of their AUC, or with `audit` of their attack's,
    with `auc_mean_ci`'s interval of that mean (a row is named by its (user, item, timestamp))."""
    _, load = _source(audit)
    seeds = []
    for run in runs:
        df = load(run)
        seeds.append((_row_ids(df), df["label"].to_numpy(), df["prob"].to_numpy()))
    return auc_mean_ci(seeds, seed=seed, n_boot=n_boot)


def _row_ids(df: pd.DataFrame) -> np.ndarray:
    """Each row's name across runs, its (user, item, timestamp): seeds that scored a row draw it together."""
    return df[KEY].astype(str).agg("|".join, axis=1).to_numpy()


def format_sweep_comparison(r: dict) -> str:
    """Markdown: a row per trial (its settings, AUC with interval, the paired difference against its
    reference with interval and verdict), then a line per arm over its seeds."""
    label = ", ".join(f"{k} = {v}" for k, v in r["against"].items())
    keys = r["keys"]
    audit = r.get("audit")
    head = f"every trial's membership attack against that of its {label} trial" if audit else f"every trial against its {label} trial"
    slices = r.get("slices") or []
    within = f" (with its slices {', '.join(Path(d).name for d in slices)})" if slices else ""
    trial = ["trial"] if slices else []  # with slices, which slice each row comes from
    lines = [f"sweep {r['name']}{within}: {head} of the same settings and seed (paired over the rows both "
             f"{'audited' if audit else 'scored'}; 95 % intervals, {r['n_boot']} bootstrap resamples)", "",
             "| " + " | ".join(trial + keys) + f" | {'attack AUC' if audit else 'AUC'} | − ({label}) | verdict |",
             "|" + "---|" * (len(trial + keys) + 3)]
    for row in r["trials"]:
        a = row.get("a")
        cell = fmt_interval(a["auc"], a["low"], a["high"]) if a else "—"
        d = row.get("diff")
        diff = fmt_diff({**d, "rows": row["rows"]}) if d else row["status"]
        named = [str(row["trial"])] if slices else []
        lines.append("| " + " | ".join(named + [str(row["params"].get(k)) for k in keys]) + f" | {cell} | {diff} | "
                     f"{row.get('verdict', '')} |")
    for arm in r["arms"]:
        name = ", ".join(f"{k} = {v}" for k, v in arm["arm"].items()) or "all"
        n = len(arm["seeds"])
        up, down = ("leaks more", "less") if audit else ("better", "worse")
        lines.append(f"\n{name}: − ({label}) in seeds {arm['seeds']}: "
                     + ", ".join(fmt_signed(d) for d in arm["diffs"])
                     + f" (mean {_fmt_mean(arm, float(np.mean(arm['diffs'])), audit)}); {up} in {arm['better']} of {n}, "
                       f"{down} in {arm['worse']}, within noise in {n - arm['better'] - arm['worse']}")
    return "\n".join(lines)


def _fmt_mean(arm: dict, plain: float, audit: bool = False) -> str:
    m = arm.get("mean")
    if not m or m["diff"] != m["diff"]:
        return fmt_signed(plain)
    return (f"{fmt_signed(m['diff'])} [{fmt_signed(m['low'])}, {fmt_signed(m['high'])}] over the {m['rows']} rows "
            f"the seeds {'audited' if audit else 'scored'}, {_verdict(m, 'trial', 'reference', audit)}")


def _number(v) -> float | None:
    try:
        return None if isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        return None


def comparison_lines(r: dict) -> dict:
    """What the comparison's plot draws: x is the first numeric key that varies (e.g. clients.num),
    a line per setting of the other keys (`fedsim.report.series`), at each x the paired difference
    averaged over seeds with its interval (`_mean_over_seeds`; one seed: its own), each seed's
    difference kept; a reference trial is 0.
    {} when no numeric key varies (nothing to draw a line along)."""
    done = [t for t in r["trials"] if t["status"] in ("compared", "reference")]
    # a trial's seed from its row: a sweep of one seed does not vary train.seed, so its params lack it
    get = lambda t, k: t["seed"] if k == "train.seed" else t["params"].get(k)  # noqa: E731
    keys = [k for k in r["keys"] if k != "train.seed"]
    numeric = [k for k in keys if all(_number(get(t, k)) is not None for t in done)
               and len({_number(get(t, k)) for t in done}) > 1]
    if not numeric:
        return {}
    x = numeric[0]
    zero = {"diff": 0.0, "low": 0.0, "high": 0.0}
    pooled = {tuple(a["arm"].items()): a["mean"] for a in r["arms"] if "mean" in a}
    lines = {}
    for label, group in series(done, keys, x, get).items():
        if all(t["status"] == "reference" for t in group):
            continue  # the reference's own line: the zero line draws it
        points = []
        for at in sorted({_number(get(t, x)) for t in group}):
            ts = [t for t in group if _number(get(t, x)) == at]
            ds = [t.get("diff", zero) for t in ts]
            point = {k: float(np.mean([d[k] for d in ds])) for k in ("diff", "low", "high")}
            mean = pooled.get(_arm_of(ts[0], r["keys"]))  # the seeds' mean with its own interval
            if mean and mean["diff"] == mean["diff"]:
                point = {k: mean[k] for k in ("diff", "low", "high")}
            points.append({"x": at, "seeds": [d["diff"] for d in ds], **point})
        lines[label] = points
    return {"x": x, "lines": lines}


def plot_sweep_comparison(r: dict, path: Path) -> Path | None:
    """Each trial's paired AUC difference to its reference along the first numeric key, a line per
    setting of the others, bars the seeds' mean with its 95 % interval, each seed a faint dot."""
    drawn = comparison_lines(r)
    if not drawn:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = sorted({p["x"] for pts in drawn["lines"].values() for p in pts})
    log = xs[0] > 0 and xs[-1] / xs[0] >= 4
    n = len(drawn["lines"])
    for j, (label, pts) in enumerate(drawn["lines"].items()):
        shift = (lambda x: x * (1 + 0.04 * (j - (n - 1) / 2))) if log else (lambda x: x + 0.04 * (j - (n - 1) / 2))
        pos = [shift(p["x"]) for p in pts]
        bars = [[p["diff"] - p["low"] for p in pts], [p["high"] - p["diff"] for p in pts]]
        line = ax.errorbar(pos, [p["diff"] for p in pts], yerr=bars, marker="o", capsize=3, label=label)[0]
        dots = [(shift(p["x"]), d) for p in pts for d in p["seeds"]]
        ax.scatter(*zip(*dots), s=10, color=line.get_color(), alpha=0.35)
    label = ", ".join(f"{k} = {v}" for k, v in r["against"].items())
    ax.axhline(0, ls="--", lw=1, color="black", label=f"reference: {label}")
    if log:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    seeds = sorted({t["seed"] for t in r["trials"]} - {None})
    ax.set(xlabel=drawn["x"], ylabel=f"{'attack AUC' if r.get('audit') else 'AUC'} − reference, paired (bars: 95 % CI)",
           title=f"{r['name']}: each trial against its reference (seed{'s' * (len(seeds) > 1)} "
                 f"{', '.join(map(str, seeds))})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_sweep_comparison(r: dict, text: str) -> list[Path]:
    """The comparison in the sweep directory: `compare_<KEY>=<VALUE>.md` (the table), `.json`, and
    `.png` where a numeric key varies (the differences along it); `..._slices.*` with slices."""
    sweep_dir = Path(r["sweep"])
    # with slices, a name of its own: the sweep's own comparison (made as it ended) stays
    stem = ("compare_" + ",".join(f"{k}={v}" for k, v in r["against"].items()) + ("_slices" if r.get("slices") else "")
            + ("_audit" if r.get("audit") else ""))
    md, js = sweep_dir / f"{stem}.md", sweep_dir / f"{stem}.json"
    md.write_text(text + "\n")
    js.write_text(json.dumps(r, indent=1, default=float))
    png = plot_sweep_comparison(r, sweep_dir / f"{stem}.png")
    return [md, js, *([png] if png else [])]


def save_sweep_comparison(r: dict, text: str) -> list[Path]:
    """`write_sweep_comparison`, and where the sweep tracked to MLflow, the files as artifacts of its
    parent run (folder `compare`)."""
    paths = write_sweep_comparison(r, text)
    sweep = json.loads((Path(r["sweep"]) / "sweep.json").read_text())
    tracking, parent = sweep.get("tracking") or {}, sweep.get("parent_run_id")
    if tracking.get("enabled") and parent:
        from mlflow import MlflowClient

        from fedsim.tracking import retry_locked

        client = MlflowClient(tracking["uri"])
        for path in paths:
            retry_locked(client.log_artifact, parent, str(path), artifact_path="compare")
    return paths
