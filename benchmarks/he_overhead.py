"""What homomorphic aggregation (TenSEAL CKKS, `fedsim.privacy.he`) costs per round, next to pairwise
masking (`fedsim.privacy.secagg`) and plain FedAvg, on a vector the size of SmolLM2-135M's LoRA
(r=8 on q_proj and v_proj). One process, one thread, no Ray.

    pip install tenseal
    python benchmarks/he_overhead.py [--clients 16] [--poly 8192] [--repeats 1]

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
    from secagg_overhead import bench as secagg_bench, lora_size
except ImportError:
    from benchmarks.secagg_overhead import bench as secagg_bench, lora_size


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
    print(f"{'clients':>7} {'scheme':>7} | {'client s':>8} | {'server s':>8} | {'decrypt s':>9} | "
          f"{'MB/client':>9} {'x plain':>7} | {'max |err|':>9}")
    for m in args.clients:
        r = bench(m, n, args.poly)
        s = secagg_bench(m, 48, n, 1)[0]
        print(f"{m:>7} {'ckks':>7} | {r['client_mean']:>8.3f} | {r['server']:>8.3f} | {r['decrypt']:>9.3f} | "
              f"{r['bytes_client'] / 1e6:>9.2f} {r['bytes_client'] / r['bytes_plain']:>7.1f} | {r['max_err']:>9.2e}")
        print(f"{m:>7} {'secagg':>7} | {s['client_mean']:>8.3f} | {s['server']:>8.3f} | {'-':>9} | "
              f"{s['bytes_client'] / 1e6:>9.2f} {s['bytes_client'] / s['bytes_plain']:>7.1f} | {s['max_err']:>9.2e}")
        print(f"{m:>7} {'plain':>7} | {'-':>8} | {s['plain_server']:>8.3f} | {'-':>9} | "
              f"{s['bytes_plain'] / 1e6:>9.2f} {1.0:>7.1f} | {0.0:>9.2e}")


if __name__ == "__main__":
    main()
