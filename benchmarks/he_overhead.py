"""What homomorphic aggregation (TenSEAL CKKS, `fedsim.privacy.he`) costs per round, next to pairwise
masking (`fedsim.privacy.secagg`) and plain FedAvg, on a vector the size of SmolLM2-135M's LoRA
(r=8 on q_proj and v_proj). One process, one thread, no Ray.

    pip install tenseal
    python benchmarks/he_overhead.py [--clients 16 64] [--poly 8192]

The functions `privacy.he` runs in the loop (`fedsim.privacy.he.HEAggregation`), timed one by one.
Client: encrypt weight * delta (+ the weight). Server: deserialize and add every ciphertext.
Key holder: decrypt the sum. Error: max |HE mean - float64 weighted mean|.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from fedsim.privacy import he
from fedsim.server.strategy import weighted_mean

try:  # run as a script (python benchmarks/he_overhead.py) or as a module
    from _table import Table
    from secagg_overhead import bench as secagg_bench, lora_size
except ImportError:
    from benchmarks._table import Table
    from benchmarks.secagg_overhead import bench as secagg_bench, lora_size

TABLE = Table([("clients", 7, "d"), ("scheme", 7, "")], [("client s", 8, ".3f")], [("server s", 8, ".3f")],
              [("decrypt s", 9, ".3f")], [("MB/client", 9, ".2f"), ("x plain", 7, ".1f")], [("max |err|", 9, ".2e")])


def bench(m: int, n: int, poly: int) -> dict:
    t0 = time.perf_counter()
    secret, public = he.make_keys(poly)
    keygen = time.perf_counter() - t0
    S, P = he.load(secret), he.load(public)
    gen = torch.Generator().manual_seed(m)
    deltas = [torch.randn(n, generator=gen) * 1e-3 for _ in range(m)]
    weights = [float(32 + c) for c in range(m)]
    client_s, uploads = [], []
    for d, w in zip(deltas, weights):
        t0 = time.perf_counter()
        uploads.append(he.encrypt(S, np.r_[d.double().numpy() * w, w], poly // 2))
        client_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    total = he.encrypted_sum(P, uploads)
    server = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = he.decrypt(S, total, n + 1)
    dec = time.perf_counter() - t0
    mean = plain[:-1] / plain[-1]
    want = weighted_mean(deltas, weights).double().numpy()
    return {"clients": m, "keygen": keygen, "client_mean": float(np.mean(client_s)), "server": server,
            "decrypt": dec, "bytes_client": sum(len(c) for c in uploads[0]), "bytes_plain": n * 4,
            "max_err": float(np.abs(mean - want).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[16])
    ap.add_argument("--poly", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = lora_size()
    print(f"vector: {n:,} floats; CKKS N={args.poly}, {args.poly // 2} slots/ciphertext; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1 thread")
    print(TABLE.header())
    for m in args.clients:
        r = bench(m, n, args.poly)
        s = secagg_bench(m, 48, n, 1)[0]
        print(TABLE.row(m, "ckks", r["client_mean"], r["server"], r["decrypt"], r["bytes_client"] / 1e6,
                        r["bytes_client"] / r["bytes_plain"], r["max_err"]))
        print(TABLE.row(m, "secagg", s["client_mean"], s["server"], "-", s["bytes_client"] / 1e6,
                        s["bytes_client"] / s["bytes_plain"], s["max_err"]))
        print(TABLE.row(m, "plain", "-", s["plain_server"], "-", s["bytes_plain"] / 1e6, 1.0, 0.0))


if __name__ == "__main__":
    main()
