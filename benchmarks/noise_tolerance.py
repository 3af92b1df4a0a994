"""How much noise a trained adapter tolerates: the yardstick for sizing a client-level DP run or sweep
before spending a GPU on it (docs/privacy.md, docs/results.md).

Trains CONFIG in one process (fedsim's client and FedAvg code, no Ray: `fedsim.inprocess`), then
adds Gaussian noise to what the clients communicate (the strategy's global adapter entries: A and B
under `separate`, B only under `ffa`) with norm `ratio` x the whole run's update |final - initial|,
and scores the same rows at each ratio: AUC with its 95 % interval and the paired difference
against the noiseless adapter.

Why it sizes a DP run: DP-FedAvg adds N(0, (z C / m)^2) to every entry each round (`dp/noise_std`),
and FedAvg keeps it, so after R rounds an entry carries noise of std sqrt(R) z C / m (less in so far
as later training repairs it, which this does not model). The noise's norm is that times sqrt(d),
far above the update's even where it costs nothing (it mostly misses the few directions the output
depends on), so the table gives the per-entry std each ratio means, the number to set against
sqrt(R) z C / m.

    python benchmarks/noise_tolerance.py --config configs/quickstart.yaml --ratios 0,16,64,256,1024 --out noise.json
    python benchmarks/noise_tolerance.py --set strategy.lora_mode=ffa --ratios 0,64,1024 --out noise_ffa.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.config import load_config  # noqa: E402
from fedsim.inprocess import train_in_process  # noqa: E402
from fedsim.metrics import auc, auc_ci, paired_auc_diff  # noqa: E402


def noisy(final: torch.Tensor, initial: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """`final` plus Gaussian noise whose norm is `ratio` x |final - initial| (in expectation)."""
    update = float((final - initial).double().norm())
    std = ratio * update / final.numel() ** 0.5
    g = torch.Generator().manual_seed(seed)
    return final + torch.normal(0.0, std, size=final.shape, generator=g, dtype=final.dtype)


def score(ex, clients: int, params: torch.Tensor, split: str) -> tuple[np.ndarray, np.ndarray]:
    out = [ex.evaluate(c, params, split) for c in range(clients)]
    return np.concatenate([x["labels"] for x in out]), np.concatenate([x["probs"] for x in out])


def run(config: str, overrides: list[str], ratios: list[float], threads: int, log=print) -> dict:
    cfg = load_config(config, ["tracking.enabled=false", *overrides])
    split, clients = cfg.eval.split, cfg.clients.num
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()

        def log_round(r, ex, strategy, metas):
            log(f"  round {r + 1}/{cfg.train.rounds}: loss {np.mean([m['loss'] for m in metas]):.4f} "
                f"({time.perf_counter() - t0:.0f} s)", flush=True)

        ex, strategy, losses, seen = train_in_process(cfg, Path(tmp), threads, after_round=log_round)
        final, initial = strategy.params_for(0), ex.initial_params()
        out = {"config": config, "overrides": overrides, "lora_mode": cfg.strategy.lora_mode, "rounds": cfg.train.rounds,
               "entries": final.numel(), "update_norm": float((final - initial).double().norm()),
               "rows_trained": seen, "losses": losses, "train_seconds": time.perf_counter() - t0, "points": []}
        y, clean = score(ex, clients, final, split)
        for i, ratio in enumerate(ratios):
            p = clean if ratio == 0 else score(ex, clients, noisy(final, initial, ratio, seed=cfg.train.seed * 1000 + i), split)[1]
            d = paired_auc_diff(y, p, clean, seed=0)
            point = {"ratio": ratio, "auc": auc(y, p), "ci": list(auc_ci(y, p, seed=0)),
                     "diff_vs_clean": d["diff"], "diff_ci": [d["low"], d["high"]]}
            out["points"].append(point)
            log(f"ratio {ratio:g}: AUC {point['auc']:.3f} [{point['ci'][0]:.3f}, {point['ci'][1]:.3f}], "
                f"vs no noise {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]", flush=True)
    return out


def table(r: dict) -> str:
    lines = [f"{r['config']} {' '.join(r['overrides'])}: {r['lora_mode']}, {r['entries']:,} entries, "
             f"|update| {r['update_norm']:.3f}, {r['rounds']} rounds, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
             "| noise / update (norms) | noise std per entry | test AUC [95 % CI] | minus no noise [95 % CI] |",
             "|---|---|---|---|"]
    for p in r["points"]:
        std = p["ratio"] * r["update_norm"] / r["entries"] ** 0.5
        lines.append(f"| {p['ratio']:g} | {std:.4f} | {p['auc']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] | "
                     f"{p['diff_vs_clean']:+.3f} [{p['diff_ci'][0]:+.3f}, {p['diff_ci'][1]:+.3f}] |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--ratios", default="0,16,64,256,1024", help="noise norm / the run's update norm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="noise_tolerance.json")
    a = ap.parse_args(argv)
    r = run(a.config, a.set, [float(x) for x in a.ratios.split(",")], a.threads)
    Path(a.out).write_text(json.dumps(r, indent=1, default=float))
    print(table(r))


if __name__ == "__main__":
    main()
