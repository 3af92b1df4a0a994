"""Does the recommender learn? Lever table and few-shot table on fedsim's own training path.

Runs fedsim's real client code (ClientExecutor: prompt, batches, LoRA, AdamW, lr schedule) and
its real FedAvg strategy in one process, without Ray, so a CPU is spent on training, not on
actors; a federated run is the same code with several clients per round.

    python benchmarks/learning.py levers --out levers.json           # each lever, same rows and budget
    python benchmarks/learning.py fewshot --clients 1 --out fs1.json  # 16 / 64 / 256 / 1024 samples

Every AUC is printed with its 95 % bootstrap interval over rows, and every model is compared
with the best baseline on the same rows as a paired difference.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.baselines import baseline_scores  # noqa: E402
from fedsim.client.executor import shard_path  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.inprocess import evaluate_in_process, train_in_process  # noqa: E402
from fedsim.metrics import auc, auc_ci, paired_auc_diff  # noqa: E402

QUICKSTART = "configs/quickstart.yaml"
# The shipped quickstart before this work: fedsim's own wording, bare titles, lr 5e-3, batch 4, r=8 on q/v.
BEFORE = ["data.prompt=" + json.dumps(
    'Given the user\'s liked and disliked movies, decide whether the user will like the target movie. '
    'Answer "Yes" or "No".\nLiked: {liked}\nDisliked: {disliked}\nTarget movie: "{target}"\nAnswer:'),
          "data.item_text=title", "train.lr=0.005", "train.batch_size=4", "train.schedule=constant",
          "train.warmup=0.0", "model.lora.r=8", "model.lora.alpha=16", "model.lora.target_modules=[q_proj,v_proj]"]
ALL_LINEAR = "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
# Each lever adds its overrides to the previous one's (cumulative), so the last row is the full fix.
LEVERS = [
    ("before (shipped quickstart settings)", []),
    ("+ TALLRec wording", ["data.prompt=null"]),
    ("+ titles with year", ["data.item_text=title_year"]),
    ("+ lr 1e-3 (batch 4)", ["train.lr=0.001"]),
    ("+ warm-up 10 % + cosine decay, peak 2e-3", ["train.lr=0.002", "train.schedule=cosine", "train.warmup=0.1"]),
    ("+ LoRA r=16 on all 7 linear layers", ["model.lora.r=16", "model.lora.alpha=32", ALL_LINEAR]),
]


def run_one(cfg_overrides: list[str], rows: int, split: str, eval_rows: int, clients: int, threads: int,
            log=print) -> dict:
    """Train `clients` clients by FedAvg for a budget of `rows` training rows in all; score `split`."""
    cfg = load_config(QUICKSTART, ["tracking.enabled=false", f"clients.num={clients}", f"data.max_eval_rows={eval_rows}",
                                   f"eval.split={split}", *cfg_overrides])
    per_step = cfg.train.batch_size * clients
    steps_total = max(1, rows // per_step)
    rounds = min(cfg.train.rounds, steps_total)
    local = max(1, steps_total // rounds)
    cfg = load_config(QUICKSTART, ["tracking.enabled=false", f"clients.num={clients}", f"data.max_eval_rows={eval_rows}",
                                   f"eval.split={split}", *cfg_overrides, f"train.rounds={rounds}",
                                   f"train.local_steps={local}"])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()

        def log_round(r, ex, strategy, metas):
            log(f"  round {r + 1}/{rounds}: loss {np.mean([m['loss'] for m in metas]):.4f}")

        ex, strategy, losses, seen = train_in_process(cfg, run_dir, threads, after_round=log_round)
        train_s = time.perf_counter() - t0  # with the preparation (samples, shards, baselines)
        t_eval = time.perf_counter()
        y, p = evaluate_in_process(ex, strategy, clients, split)
        eval_s = time.perf_counter() - t_eval
        import pandas as pd

        shards = [pd.read_parquet(shard_path(run_dir, c)) for c in range(clients)]
        evaluated = pd.concat([df[df["split"] == split] for df in shards])
    # Baselines are fitted on every train row (the whole split, not only the budget: they are cheap).
    from fedsim.prepare import build_all_samples

    samples, _ = build_all_samples(cfg, log=lambda *a: None)
    base_scores = baseline_scores(samples[samples["split"] == "train"], evaluated, seed=cfg.train.seed)
    assert (evaluated["label"].to_numpy() == y).all()
    out = {"rows_trained": seen, "rounds": rounds, "local_steps": local, "clients": clients,
           "train_seconds": train_s, "eval_seconds": eval_s,
           "eval_rows": int(len(y)), "first_loss": losses[0], "last_loss": losses[-1],
           "auc": auc(y, p), "ci": list(auc_ci(y, p, seed=0)), "baselines": {},
           # the scored rows and their scores, for paired comparisons between models afterwards
           "rows": {"user": evaluated["user"].tolist(), "item": evaluated["item"].tolist(),
                    "label": y.tolist(), "prob": p.tolist()}}
    for name, s in base_scores.items():
        out["baselines"][name] = {"auc": auc(y, s), "ci": list(auc_ci(y, s, seed=0)),
                                  "paired": paired_auc_diff(y, p, s, seed=0)}
    return out


def fmt(r: dict) -> str:
    return f"{r['auc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"


def cmd_levers(a) -> None:
    rows_out, overrides = [], []
    for i, (name, extra) in enumerate(LEVERS):
        overrides = overrides + extra
        if i < a.start or (a.stop is not None and i >= a.stop):
            continue
        print(f"lever {i}: {name}", flush=True)
        r = run_one(BEFORE + overrides + a.set, a.rows, a.split, a.eval_rows, a.clients, a.threads)
        r["lever"] = name
        rows_out.append(r)
        best = max(r["baselines"], key=lambda k: r["baselines"][k]["auc"])
        d = r["baselines"][best]["paired"]
        print(f"  {name}: AUC {fmt(r)} loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}; best baseline {best} "
              f"{fmt(r['baselines'][best])}; diff {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]; "
              f"train {r['train_seconds']:.0f}s eval {r['eval_seconds']:.0f}s", flush=True)
        Path(a.out).write_text(json.dumps(rows_out, indent=1, default=float))


def cmd_fewshot(a) -> None:
    rows_out = []
    for n in a.samples:
        # Small budgets are passed over several times (TALLRec trains its few-shot sets for many
        # epochs); at least a.min_rows rows are trained on, each of the n samples equally often.
        epochs = max(1, math.ceil(a.min_rows / n))
        print(f"{n} samples x {epochs} epoch(s), {a.clients} client(s)", flush=True)
        extra = [f"data.max_train_per_client={max(1, n // a.clients)}"]
        r = run_one(extra + a.set, n * epochs, a.split, a.eval_rows, a.clients, a.threads)
        r.update(samples=n, epochs=epochs)
        rows_out.append(r)
        print(f"  n={n}: AUC {fmt(r)}; " + "; ".join(f"{k} {fmt(v)}" for k, v in r["baselines"].items()), flush=True)
        Path(a.out).write_text(json.dumps(rows_out, indent=1, default=float))


def paired_between(a: dict, b: dict) -> dict:
    """AUC(a) - AUC(b) on the rows both scored (same data and seed: the same rows)."""
    import pandas as pd

    ra, rb = pd.DataFrame(a["rows"]), pd.DataFrame(b["rows"])
    j = ra.merge(rb, on=["user", "item", "label"], suffixes=("_a", "_b"))
    return paired_auc_diff(j["label"], j["prob_a"], j["prob_b"], seed=0)


def cmd_plot(a) -> None:
    """AUC with its interval against training samples, one line per file, the baselines as bands."""
    from fedsim.report import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    runs = [(Path(f).stem, json.loads(Path(f).read_text())) for f in a.files]
    for label, rows in runs:
        xs = [r["samples"] for r in rows]
        ys = [r["auc"] for r in rows]
        err = [[r["auc"] - r["ci"][0] for r in rows], [r["ci"][1] - r["auc"] for r in rows]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=label)
    first = runs[0][1][-1]
    for (name, b), color in zip(first["baselines"].items(), ("tab:gray", "tab:green", "tab:purple", "tab:red")):
        ax.axhline(b["auc"], ls="--", color=color, lw=1, label=f"{name} {b['auc']:.3f}")
        ax.axhspan(b["ci"][0], b["ci"][1], color=color, alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="training samples", ylabel=f"test AUC ({first['eval_rows']} rows, 95 % interval)",
           title=a.title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    if len(runs) == 2:
        for ra, rb in zip(*(r for _, r in runs)):
            d = paired_between(ra, rb)
            print(f"n={ra['samples']}: {runs[0][0]} - {runs[1][0]} = {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("levers", cmd_levers), ("fewshot", cmd_fewshot)):
        s = sub.add_parser(name)
        s.add_argument("--rows", type=int, default=512, help="training rows per model (levers)")
        s.add_argument("--split", default="valid" if name == "levers" else "test")
        s.add_argument("--eval-rows", type=int, default=500)
        s.add_argument("--clients", type=int, default=1)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--start", type=int, default=0, help="levers: skip the first ones (already measured)")
        s.add_argument("--stop", type=int, default=None, help="levers: stop before this one")
        s.add_argument("--samples", type=int, nargs="+", default=[16, 64, 256, 1024])
        s.add_argument("--min-rows", type=int, default=128, help="fewshot: train on at least this many rows")
        s.add_argument("--set", action="append", default=[], help="extra config override")
        s.add_argument("--out", required=True)
        s.set_defaults(fn=fn)
    s = sub.add_parser("plot", help="a few-shot / learning-curve plot from fewshot JSON files")
    s.add_argument("files", nargs="+")
    s.add_argument("--title", default="SmolLM2-135M on MovieLens-100K (TALLRec protocol)")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_plot)
    a = p.parse_args()
    torch.manual_seed(0)
    a.fn(a)


if __name__ == "__main__":
    main()
