"""Cross-device scale: many virtual clients on a pool of executors, a few sampled per round.

Runs fedsim on the tiny random model and synthetic users (3 per client, a split that leaves each
client train and test rows) and measures what scale costs:

- prepare seconds (samples, partition, one Parquet shard per client, baselines, model);
- seconds per round (training the sampled clients, aggregation, evaluation of `--eval-clients`);
- peak resident memory (VmHWM) of the driver, each executor and the aggregator;
- disk per client (shards), and bytes per idle client in the client store (both kept versions).

    flock /tmp/ray.lock python benchmarks/many_clients.py --clients 10000 --per-round 16 --executors 2

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import ray

from fedsim.client.state import ClientStore
from fedsim.config import load_config
from fedsim.prepare import prepare
from fedsim.simulation import Simulation, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def peak_rss(pid: int) -> int:
    """Peak resident set size of a process, bytes (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def config(a, out: Path):
    n = a.clients
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"name=many-{n}", f"output_dir={out}", "tracking.enabled=false",
        f"clients.num={n}", f"clients.per_round={a.per_round}", f"executors.num={a.executors}",
        f"executors.num_cpus={a.num_cpus}", f"eval.clients={a.eval_clients}", f"eval.every={a.eval_every}",
        f"data.synthetic.num_users={3 * n}", "data.synthetic.ratings_per_user=30", "data.split=[0.4,0.2,0.4]",
        f"data.max_train_per_client={a.train_rows}", "data.max_test_per_client=4",
        f"train.rounds={a.rounds}", f"train.local_steps={a.steps}", f"strategy.name={a.strategy}",
        f"model.lora.r={a.lora_r}"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--per-round", type=int, default=16)
    p.add_argument("--executors", type=int, default=2)
    p.add_argument("--num-cpus", type=float, default=1.0, help="executors.num_cpus")
    p.add_argument("--eval-clients", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--train-rows", type=int, default=32, help="data.max_train_per_client")
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    a = p.parse_args(argv)
    out = Path(a.out or tempfile.mkdtemp(prefix="fedsim-many-"))
    cfg = config(a, out)
    run_dir = out / f"many-{a.clients}"
    run_dir.mkdir(parents=True, exist_ok=True)
    quiet = lambda *x: None  # noqa: E731

    t0 = time.perf_counter()
    prepare(cfg, run_dir, quiet)
    prepare_s = time.perf_counter() - t0

    sim = Simulation(cfg, run_dir, log=quiet)
    actors: dict[str, int] = {}

    def on_round(r, metrics):  # the actors are gone once run() returns: read their peaks now
        if not actors:
            for i, e in enumerate(sim.executors):
                actors[f"executor_{i}"] = ray.get(e.ready.remote())["pid"]
            actors["aggregator"] = ray.get(sim.aggregator.__ray_call__.remote(lambda self: os.getpid()))
        for name, pid in actors.items():
            peaks[name] = max(peaks.get(name, 0), peak_rss(pid))

    peaks: dict[str, int] = {}
    sim.on_round = on_round
    t0 = time.perf_counter()
    summary = sim.run()
    run_s = time.perf_counter() - t0
    history = load_checkpoint(run_dir)["history"]

    store = ClientStore(run_dir / "client_state")
    trained = store.clients()
    idle = [store.disk_bytes(c) for c in trained]
    versions = sum(len(list(store.client_dir(c).glob("r*.pt"))) for c in trained)
    result = {
        "clients": a.clients, "per_round": a.per_round, "executors": a.executors, "eval_clients": a.eval_clients,
        "rounds": a.rounds, "strategy": a.strategy, "lora_params": summary["lora_params"],
        "prepare_seconds": round(prepare_s, 2), "run_seconds": round(run_s, 2),
        "round_seconds": [round(h["round_seconds"], 2) for h in history],
        "client_train_seconds": [round(h["client_train_seconds"], 2) for h in history],
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "actor_peak_rss_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
        "shard_bytes_per_client": round(dir_bytes(run_dir / "shards") / a.clients),
        "clients_with_state": len(trained),
        "idle_client_bytes": round(sum(idle) / max(1, len(idle))),  # all kept versions (up to two)
        "store_bytes_per_version": round(sum(idle) / max(1, versions)),
        "checkpoint_bytes": (run_dir / "checkpoint.pt").stat().st_size,
        "final_auc": summary["final"].get("auc"),
        "run_dir": str(run_dir),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
