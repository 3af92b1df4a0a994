"""What secure aggregation costs per round (no Ray, one process, one thread): each client's
encode + key agreement + pairwise masks, and the server's masked sum + dropout recovery + decode,
on a vector the size of SmolLM2-135M's LoRA (r=8 on q_proj and v_proj).

    python benchmarks/secagg_overhead.py [--clients 16 64] [--bits 48 32] [--repeats 3]

Client time grows with the number of sampled clients m (m - 1 pairwise masks per client); server
time without dropout is one pass over the m uploads, and each dropped client adds m - 1 masks to
regenerate. "plain" is FedAvg's weighted mean of the float32 deltas, the server's work without
SecAgg.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from fedsim.config import Config
from fedsim.postprocessors import ClientContext, RoundContext
from fedsim.privacy.secagg import SecAgg
from fedsim.server.strategy import Update, weighted_mean

try:  # run as a script (python benchmarks/secagg_overhead.py) or as a module
    from _table import Table
except ImportError:
    from benchmarks._table import Table

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct config.json): hidden 576, 30 layers,
# 9 attention heads and 3 key/value heads of head_dim 64.
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, RANK = 576, 30, 9, 3, 64, 8
# "client s (mean/max)" is one cell: "mean / max", formatted in main().
TABLE = Table([("clients", 7, "d"), ("bits", 4, "d"), ("dropped", 7, "d")], [("client s (mean/max)", 19, "")],
              [("server s", 8, ".4f"), ("plain s", 8, ".4f")], [("MB/client", 9, ".3f"), ("plain MB", 8, ".3f")],
              [("max |err|", 9, ".2e")])


def lora_size(r: int = RANK) -> int:
    """LoRA entries for q_proj (hidden -> heads * head_dim) and v_proj (hidden -> kv_heads * head_dim):
    A is r x in, B is out x r, per layer."""
    q_out, v_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return LAYERS * (r * HIDDEN + q_out * r + r * HIDDEN + v_out * r)


def secagg_for(m: int, bits: int) -> SecAgg:
    cfg = Config()
    cfg.clients.num, cfg.clients.per_round = m, m
    cfg.privacy.secagg.enabled, cfg.privacy.secagg.bits = True, bits
    cfg.privacy.secagg.scale_bits = 24 if bits > 32 else 16
    return SecAgg(cfg)


def bench(m: int, bits: int, n: int, repeats: int) -> list[dict]:
    sa = secagg_for(m, bits)
    sampled = list(range(m))
    gen = torch.Generator().manual_seed(m)
    deltas = [torch.randn(n, generator=gen) * 1e-3 for _ in sampled]
    weights = [float(32 + c) for c in sampled]
    client_s, uploads = [], []
    # Untimed warm-up (first use of OpenSSL's ChaCha20 and X25519 in the process).
    sa.on_client_update(deltas[0], weights[0], ClientContext(0, 1, 1, m, m, {}, sampled))
    for c, d in zip(sampled, deltas):
        t0 = time.perf_counter()
        y, w, _ = sa.on_client_update(d, weights[c], ClientContext(c, 0, int(weights[c]), m, m, {}, sampled))
        client_s.append(time.perf_counter() - t0)
        uploads.append(Update(c, y, int(weights[c]), w))
    plain_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        expected = weighted_mean(deltas, weights)
        plain_s.append(time.perf_counter() - t0)
    rows = []
    for dropped in (0, 1):
        gone = sampled[m // 2] if dropped else None  # a middle id: masks of both signs to remove
        ups = [u for u in uploads if u.client != gone]
        if dropped:
            keep = [c for c in sampled if c != gone]
            expected = weighted_mean([deltas[c] for c in keep], [weights[c] for c in keep])
        server_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            [agg], _ = sa.on_server_updates(ups, RoundContext(0, m, len(ups), m, sampled))
            server_s.append(time.perf_counter() - t0)
        err = float((agg.delta - expected).abs().max())
        rows.append({"clients": m, "bits": bits, "dropped": dropped, "client_mean": statistics.mean(client_s),
                     "client_max": max(client_s), "server": statistics.median(server_s),
                     "plain_server": statistics.median(plain_s), "bytes_client": y.numel() * y.element_size(),
                     "bytes_plain": n * 4, "max_err": err})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--bits", type=int, nargs="+", default=[48, 32])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = lora_size()
    print(f"vector: SmolLM2-135M LoRA r={RANK} on q_proj, v_proj = {n:,} floats "
          f"(+1 masked weight); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1 thread")
    print(TABLE.header())
    for m in args.clients:
        for bits in args.bits:
            for r in bench(m, bits, n, args.repeats):
                client = f"{r['client_mean']:>9.4f} / {r['client_max']:<7.4f}"
                print(TABLE.row(r["clients"], r["bits"], r["dropped"], client, r["server"], r["plain_server"],
                                r["bytes_client"] / 1e6, r["bytes_plain"] / 1e6, r["max_err"]))


if __name__ == "__main__":
    main()
