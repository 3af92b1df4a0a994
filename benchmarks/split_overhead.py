"""What split execution (PPLR flexible storage, `storage.mode: split`) costs and saves: the same
config run twice on a local Ray, whole model vs split at `storage.client_layers`, same seed.

    python benchmarks/split_overhead.py configs/tiny.yaml --set executors.num=0 --set model.tiny_layers=8 --set storage.server_num_cpus=0.5
    python benchmarks/split_overhead.py configs/pplr_split.yaml --set train.rounds=1 ...

Prints the wall time per round and per local step (full vs split), the parameters and bytes held
by each client and by the server, the clients' share of the training FLOPs, the activation and
LoRA bytes exchanged per client per round, and the time clients spent waiting on the server.
Tracking is off (MLflow would add the same cost to both).
"""
from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

from fedsim.config import load_config
from fedsim.simulation import load_checkpoint, run


def one(config: str, overrides: list[str], mode: str) -> tuple[dict, list[dict], int]:
    cfg = load_config(config, [*overrides, f"storage.mode={mode}", "tracking.enabled=false", f"name=bench-{mode}"])
    summary = run(cfg, log=lambda *a: None)
    history = load_checkpoint(Path(summary["run_dir"]))["history"]
    return summary, history, cfg.train.batch_size


def per_client(history: list[dict], key: str) -> float:
    """Mean over rounds and clients of client/<c>/<key>."""
    vals = [v for h in history for k, v in h.items() if k.startswith("client/") and k.endswith("/" + key)]
    return statistics.mean(vals) if vals else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, config {args.config} {args.overrides}")
    rows = {}
    for mode in ("full", "split"):
        summary, history, batch = one(args.config, args.overrides, mode)
        steps = sum(h["train_samples"] for h in history) / batch  # local steps, all clients and rounds
        rows[mode] = dict(
            round_s=statistics.mean(h["round_seconds"] for h in history),
            train_s=statistics.mean(h["client_train_seconds"] for h in history),
            step_s=sum(h["client_train_seconds"] for h in history) / steps, split=summary["split"],
            auc=summary["final"].get("auc", float("nan")), history=history)
        print(f"{mode:>5}: {len(history)} rounds, mean round {rows[mode]['round_s']:.2f} s, client training "
              f"{rows[mode]['train_s']:.2f} s per round (all clients), {rows[mode]['step_s'] * 1000:.1f} ms per "
              f"local step, final AUC {rows[mode]['auc']:.4f}")
    h = rows["split"]["history"]
    wait = per_client(h, "split/server_seconds")
    print(f"split/full: round time x{rows['split']['round_s'] / rows['full']['round_s']:.2f}, "
          f"local step x{rows['split']['step_s'] / rows['full']['step_s']:.2f}; a client waits "
          f"{wait:.2f} s per round on the server")
    for key in ("act_bytes_to_server", "act_bytes_to_client", "lora_bytes_to_server", "lora_bytes_to_client"):
        print(f"  per client per round {key}: {per_client(h, 'split/' + key) / 2**20:.3f} MiB")
    print(f"  client share of training FLOPs: {per_client(h, 'split/client_flop_share'):.3f}")
    sp = rows["split"]["split"]
    full = sp["split/client_param_bytes"] + sp["split/server_param_bytes"]
    print(f"  held: client {sp['split/client_params'] / 1e6:.2f} M params / {sp['split/client_param_bytes'] / 2**20:.1f} MiB, "
          f"server {sp['split/server_params'] / 1e6:.2f} M / {sp['split/server_param_bytes'] / 2**20:.1f} MiB "
          f"(client share {sp['split/client_layers']:.0f} of {sp['split/client_layers'] + sp['split/server_layers']:.0f} "
          f"layers, {sp['split/client_param_bytes'] / full:.3f} of the bytes)")


if __name__ == "__main__":
    main()
