"""What PPLR's per-client adapter table costs the aggregator: RAM in memory vs on disk.

Runs the PPLR rule alone (no Ray, no model) on vectors the size of SmolLM2-135M's q/v LoRA
(460,800 floats), `--clients` clients of which `--per-round` report each round, every client
reporting at least once, and reports the process's peak RSS, seconds per round and the checkpoint
size (`strategy.pplr.table: memory` vs `disk`). Each mode runs in its own process so peaks do not mix.

    python benchmarks/pplr_table.py [--clients 1000] [--per-round 100] [--rounds 10]
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # run as a script (python benchmarks/pplr_table.py) or as a module
    from _table import Table
    from secagg_overhead import lora_size
except ImportError:
    from benchmarks._table import Table
    from benchmarks.secagg_overhead import lora_size

TABLE = Table([("table", 6, "")], [("reported", 8, "d")], [("peak RSS MiB", 12, ".0f")], [("s/round", 7, ".2f")],
              [("checkpoint MiB", 14, ".1f")], [("files MiB", 9, ".0f")])


def one(table: str, clients: int, per_round: int, rounds: int) -> dict:
    from fedsim.server.pplr import PPLR
    from fedsim.server.strategy import Update

    n = lora_size()
    with tempfile.TemporaryDirectory() as d:
        s = PPLR(similarity_on="update", table=table, table_dir=Path(d) / "t" if table == "disk" else None)
        s.initialize(torch.zeros(n), clients)
        gen = torch.Generator().manual_seed(0)
        seconds = []
        for r in range(rounds):
            ids = [(r * per_round + k) % clients for k in range(per_round)]
            ups = [Update(c, torch.randn(n, generator=gen) * 1e-3, 10, 10.0, {"loss": 0.6 + 1e-3 * k})
                   for k, c in enumerate(ids)]
            t0 = time.perf_counter()
            s.aggregate(r, ups)
            s.after_checkpoint(r)
            seconds.append(time.perf_counter() - t0)
            del ups
        buf = io.BytesIO()
        torch.save(s.state_dict(), buf)
        disk = sum(p.stat().st_size for p in Path(d).rglob("*.pt"))
    return {"table": table, "reported": len(s.theta.clients()), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds_per_round": sum(seconds[1:]) / max(1, len(seconds) - 1), "checkpoint_mib": buf.tell() / 2**20,
            "table_disk_mib": disk / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--one", choices=["memory", "disk"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.clients, a.per_round, a.rounds)))
        return
    print(f"PPLR, {lora_size():,}-float adapters, {a.clients} clients, {a.per_round} per round, {a.rounds} rounds")
    print(TABLE.header())
    for table in ("memory", "disk"):
        out = subprocess.run([sys.executable, __file__, "--one", table, "--clients", str(a.clients),
                              "--per-round", str(a.per_round), "--rounds", str(a.rounds)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(TABLE.row(r["table"], r["reported"], r["peak_rss_mib"], r["seconds_per_round"], r["checkpoint_mib"],
                        r["table_disk_mib"]))


if __name__ == "__main__":
    main()
