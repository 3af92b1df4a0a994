"""fedsim bench: training throughput of the three ways fedsim runs clients, on one workload.

    fedsim bench [--model tiny-random] [--seq 128] [--batch 8] [--clients 8] [--steps 4] [--rounds 3]
                 [--modes actors,pool,fused] [--pool K] [--fused-rows N] [--compile] [--flower] [--out bench.json] [--plot bench.png]

    # the issue-6 GPU workload (SmolLM2-135M shape, seq 256, client batch 8, 64 clients per round):
    fedsim bench --model smollm2-135m-shape --seq 256 --batch 8 --clients 64 --steps 4 --rounds 3 \
                 --fused-rows 256 --flower --out bench_gpu.json

Modes (all clients are sampled every round):
- `actors`: one executor actor per client (executors.num 0), each on 1/clients of the CPUs and GPUs;
- `pool`:   K executors serving the clients as virtual clients one after another (executors.num K);
- `fused`:  one executor per GPU training all of its clients at once (executors.fused,
            fedsim.models.fused); on a CPU machine as many as the pool (one per CPU, one thread each:
            torch's threads scale badly on shared cores), each fusing its share of the clients.

Each mode runs the real `fedsim.simulation.Simulation` (Ray actors, aggregator actor, client stores
on disk, FedAvg) with tracking off and evaluation only after the last round, and reads the figures
the run records per round (`train_tokens`, `train_samples`, `train_phase_seconds`,
`train_step_seconds`, `executors_peak_bytes`). Round 1 is warm-up (first calls, allocator growth,
compilation) and not counted when there is more than one round.

- tokens/s, samples/s: non-padding tokens and rows trained on / wall time of the training phase
  (sampling, dispatch, local training, transfers, aggregation; evaluation excluded);
- FLOP/s and MFU: model FLOPs of those tokens (`flops_per_token`) per second, MFU against the
  GPU's dense bf16 peak (`PEAK_TFLOPS`, or --peak-tflops); n/a on a CPU;
- peak memory: the executors' peaks added up (GPU: max allocated by torch; CPU: peak RSS);
- overhead: 1 - (the busiest executor's time in local-training loops) / (training-phase wall).

The workload's prompts are real TALLRec prompts over synthetic users with a history long enough
that most fill `--seq` tokens (they are cut from the left); tokens/row is reported.
`--flower` also runs benchmarks/flower_bench.py (random tokens of exactly `--seq`) in
benchmarks/.flower-venv (Flower 1.41 pins Ray 2.55.1; build it with `bash benchmarks/flower_env.sh`)
after fedsim's Ray instance is shut down, and prints the ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOWER_PYTHON = HERE / ".flower-venv" / "bin" / "python"
FLOWER_SCRIPT = HERE / "flower_bench.py"
MODES = ("actors", "pool", "fused")
# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts), TFLOP/s.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-random",
                   help="tiny-random (CPU), smollm2-135m-shape (random weights, SmolLM2-135M's size; GPU), or a model.name")
    p.add_argument("--seq", type=int, default=128, help="tokens per prompt (model.max_length)")
    p.add_argument("--batch", type=int, default=8, help="rows per client per local step")
    p.add_argument("--clients", type=int, default=8, help="clients, all sampled every round")
    p.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the first is warm-up when there are more")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--pool", type=int, default=0, help="executors of the pool mode (default: 8 per GPU, else one per CPU)")
    p.add_argument("--fused-executors", type=int, default=0,
                   help="executors of the fused mode (default: one per GPU, else as many as the pool)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--dtype", default="auto", help="model.dtype: auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--fused-rows", type=int, default=None,
                   help="fused mode: most rows per forward/backward pass (executors.fused_rows; bounds GPU memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the executors' decoders (executors.compile)")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: by GPU name)")
    p.add_argument("--flower", action="store_true", help="also run the workload under Flower's simulation engine")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", metavar="PNG", help="draw tokens/s (as a ratio to the pool) and peak memory per mode here")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed)")


# ---------------------------------------------------------------------------------------------
# The workload


def workload_config(a, mode: str, output_dir: Path, model: str, cpus: float, gpus: float) -> dict:
    """The fedsim config of one mode; everything but the executors is the same in every mode."""
    history = max(5, a.seq // 4)  # ~8 tokens per history title: most prompts reach --seq
    ratings = 3 * history
    pool = min(a.pool or (8 * int(gpus) if gpus else max(1, int(cpus))), a.clients)
    fused = min(a.fused_executors or (int(gpus) if gpus else pool), a.clients)
    executors = {"actors": a.clients, "pool": pool, "fused": fused}[mode]
    return {
        "name": f"bench-{mode}", "output_dir": str(output_dir),
        "data": {"dataset": "synthetic", "history_len": history, "max_train_per_client": a.batch * a.steps,
                 "max_valid_per_client": 2, "max_test_per_client": a.batch,
                 "synthetic": {"num_users": 2 * a.clients, "num_items": 2 * ratings, "ratings_per_user": ratings,
                               "num_clusters": 4}},
        "partition": {"method": "iid"},
        "model": {"name": model, "dtype": a.dtype, "max_length": a.seq,
                  "lora": {"r": a.lora_r, "alpha": 2 * a.lora_r, "dropout": 0.0,
                           "target_modules": a.target_modules.split(",")}},
        "clients": {"num": a.clients, "per_round": a.clients},
        # the machine's CPUs shared evenly (Ray counts them in 1e-4 units); GPUs: 1/(executors per GPU)
        "executors": {"num": 0 if mode == "actors" else executors, "num_cpus": math.floor(cpus / executors * 1e4) / 1e4,
                      "num_gpus": "auto", "fused": mode == "fused", "fused_rows": a.fused_rows, "compile": a.compile},
        "train": {"rounds": a.rounds, "local_steps": a.steps, "batch_size": a.batch, "lr": 1e-4},
        "eval": {"every": a.rounds, "batch_size": 64},
        "tracking": {"enabled": False},
    }


def model_config(model: str) -> dict:
    """The model's config.json (a local directory, or a Hugging Face name through transformers)."""
    path = Path(model) / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).to_dict()


def flops_per_token(c: dict, lora_r: int, targets: list[str], seq: float) -> float:
    """Training FLOPs per token of a Llama-shaped decoder with a frozen base and LoRA: forward 2N and
    backward input gradients 2N for the N body weights (no weight gradients), LoRA 6 per parameter,
    causal attention 2 T d forward per layer and twice that backward (T the mean tokens per row).
    Embedding lookup and the two LM-head rows scored are left out."""
    h, L, i = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    dq, dkv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"q_proj": (h, dq), "k_proj": (h, dkv), "v_proj": (h, dkv), "o_proj": (dq, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    body = L * sum(a * b for a, b in shapes.values())
    lora = L * sum(lora_r * sum(shapes[t]) for t in targets if t in shapes)
    return 4 * body + 6 * lora + 6 * seq * dq * L


def device_info() -> dict:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        return {"device": name, "gpus": torch.cuda.device_count(), "peak_tflops": peak}
    return {"device": f"cpu ({os.cpu_count()} cores)", "gpus": 0, "peak_tflops": None}


# ---------------------------------------------------------------------------------------------
# Running


def run_mode(a, mode: str, output_dir: Path, model: str, cpus: float, gpus: float) -> tuple[dict, Path]:
    from fedsim.config import config_from_dict
    from fedsim.simulation import Simulation, load_checkpoint

    cfg = config_from_dict(workload_config(a, mode, output_dir, model, cpus, gpus))
    t0 = time.perf_counter()
    summary = Simulation(cfg, log=lambda *x: None).run()
    wall = time.perf_counter() - t0
    run_dir = Path(summary["run_dir"])
    history = load_checkpoint(run_dir)["history"]
    timed = history[1:] if len(history) > 1 else history
    phase = sum(h["train_phase_seconds"] for h in timed)
    tokens = sum(h["train_tokens"] for h in timed)
    samples = sum(h["train_samples"] for h in timed)
    return {
        "mode": mode, "executors": cfg.executors.num or cfg.clients.num,
        "tokens_per_s": tokens / phase, "samples_per_s": samples / phase,
        "tokens_per_row": tokens / samples,
        "overhead": max(0.0, 1 - sum(h["train_step_seconds"] for h in timed) / phase),
        "peak_bytes": max(h["executors_peak_bytes"] for h in history),
        "round_seconds": phase / len(timed), "timed_rounds": len(timed),
        "first_round_seconds": history[0]["train_phase_seconds"], "run_seconds": wall,
        "final_auc": summary["final"].get("auc"), "run_dir": str(run_dir),
    }, run_dir


def run_flower(a, dev: dict, cpus: float) -> dict | str:
    """Flower's figures (a dict), or why there are none (a string)."""
    if not FLOWER_SCRIPT.exists():
        return f"{FLOWER_SCRIPT} is missing"
    if not FLOWER_PYTHON.exists():
        return f"{FLOWER_PYTHON} is missing; build it with: bash {HERE / 'flower_env.sh'}"
    pool = a.pool or (8 * dev["gpus"] if dev["gpus"] else max(1, int(cpus)))
    cmd = [str(FLOWER_PYTHON), str(FLOWER_SCRIPT), "--clients", str(a.clients), "--batch", str(a.batch),
           "--seq", str(a.seq), "--steps", str(a.steps), "--rounds", str(a.rounds),
           "--model", {"tiny-random": "tiny", "smollm2-135m-shape": "smollm2-135m"}.get(a.model, a.model),
           "--lora-r", str(a.lora_r), "--target-modules", a.target_modules,
           # the pool mode's resources: Flower runs as many clients at once as fedsim's pool
           "--num-cpus-per-client", f"{cpus / pool:g}",
           "--num-gpus-per-client", f"{dev['gpus'] / pool:g}" if dev["gpus"] else "0"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        return f"flower_bench.py exited {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}"
    return json.loads(lines[-1])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def rate(x: float) -> str:
    """Three significant digits at least: a tiny model on a loaded CPU runs at well under 0.01 GFLOP/s,
    which a fixed two decimals would print as 0.00."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(rows: list[dict], dev: dict) -> str:
    gpu = dev["peak_tflops"] is not None or dev["gpus"] > 0
    head = ["mode", "executors", "tokens/s", "samples/s", "TFLOP/s" if gpu else "GFLOP/s", "MFU",
            "peak GPU mem" if gpu else "peak RSS", "overhead", "tokens/row"]
    out = []
    for r in rows:
        flops = r.get("flops_per_s")
        out.append([r["mode"], str(r.get("executors", "")), rate(r["tokens_per_s"]), rate(r["samples_per_s"]),
                    "n/a" if flops is None else rate(flops / (1e12 if gpu else 1e9)),
                    f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a",
                    fmt_bytes(r["peak_bytes"]) if r.get("peak_bytes") else "n/a",
                    f"{100 * r['overhead']:.1f} %", f"{r.get('tokens_per_row', float('nan')):.0f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *out)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in out])


def plot(rows: list[dict], dev: dict, workload: dict, path: str) -> None:
    """Two panels, one bar per mode: tokens/s with its ratio to the pool mode written on the bar (ratios
    measured in one run are what a CPU can say), and the executors' peak memory added up."""
    from fedsim.report import pyplot

    plt = pyplot()

    names = [r["mode"] for r in rows]
    pool = next((r["tokens_per_s"] for r in rows if r["mode"] == "pool"), rows[0]["tokens_per_s"])
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(9, 3.8))
    bars = ax.bar(names, [r["tokens_per_s"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    for b, r in zip(bars, rows):
        ax.annotate(f"{r['tokens_per_s'] / pool:.2f}×", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set(ylabel="trained tokens / s", title="throughput (× the pool mode)")
    shown = [r for r in rows if r.get("peak_bytes")]
    mem.bar([r["mode"] for r in shown], [r["peak_bytes"] / 2**30 for r in shown],
            color=[f"C{names.index(r['mode'])}" for r in shown])
    mem.set(ylabel="GiB", title="executors' peak memory, summed")
    fig.suptitle(f"{dev['device']}: {workload['model']}, {workload['clients']} clients × {workload['steps']} steps × "
                 f"batch {workload['batch']}, seq {workload['seq']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(a) -> int:
    import ray

    from fedsim.simulation import init_ray

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        print(f"fedsim bench: error: --modes {a.modes!r}: choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    for k in ("seq", "batch", "clients", "steps", "rounds"):
        if getattr(a, k) < 1:
            print(f"fedsim bench: error: --{k} must be >= 1", file=sys.stderr)
            return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dev = device_info()
    if a.peak_tflops:
        dev["peak_tflops"] = a.peak_tflops
    work = Path(tempfile.mkdtemp(prefix="fedsim-bench-"))
    ours = not ray.is_initialized()  # a Ray instance this call starts, it also stops
    init_ray(lambda *x: None)
    cpus, gpus = ray.cluster_resources().get("CPU", 1), ray.cluster_resources().get("GPU", 0)
    rows, model = [], a.model
    try:
        for mode in modes:
            print(f"bench: {mode} ...", flush=True)
            row, run_dir = run_mode(a, mode, work, model, cpus, gpus)
            # Later modes load the first mode's model (same data, same tokenizer) instead of rebuilding it.
            if (run_dir / "model" / "config.json").exists():
                model = str(run_dir / "model")
            rows.append(row)
    finally:
        if ours:
            ray.shutdown()
    # Flower's own Ray instance must not meet ours (one local instance per machine).
    flower = run_flower(a, dev, cpus) if a.flower and not ray.is_initialized() else (
        "fedsim bench was called inside a running Ray instance; run it on its own for --flower" if a.flower else None)
    shown = rows + ([{**flower, "mode": "flower", "executors": flower.get("workers"), "tokens_per_row": a.seq,
                      "peak_bytes": None}] if isinstance(flower, dict) else [])
    arch = model_config(model)
    for row in shown:
        fpt = flops_per_token(arch, a.lora_r, a.target_modules.split(","), row["tokens_per_row"])
        row["flops_per_s"] = row["tokens_per_s"] * fpt
        row["mfu"] = row["flops_per_s"] / (dev["peak_tflops"] * 1e12 * max(1, gpus)) if dev["peak_tflops"] and gpus else None
    workload = {k: getattr(a, k) for k in ("model", "seq", "batch", "clients", "steps", "rounds", "lora_r",
                                           "target_modules", "dtype", "fused_rows", "compile")}
    print(f"\nworkload: {workload}\ndevice: {dev['device']}; timed rounds: {rows[0]['timed_rounds']} "
          f"of {a.rounds} (round 1 is warm-up)\n")
    print(table(shown, dev))
    if isinstance(flower, dict):
        for r in rows:
            print(f"{r['mode']} / flower: {r['tokens_per_s'] / flower['tokens_per_s']:.2f}x tokens/s, "
                  f"{r['samples_per_s'] / flower['samples_per_s']:.2f}x samples/s")
    elif flower:
        print(f"flower: not run ({flower})")
    if not dev["peak_tflops"]:
        print("MFU: n/a (no GPU peak known; FLOP/s are model FLOPs of the trained tokens)")
    if a.out:
        Path(a.out).write_text(json.dumps({"workload": workload, "device": dev, "modes": rows,
                                           "flower": flower}, indent=1, default=float))
    if a.plot:
        plot(shown, dev, workload, a.plot)
        print(f"plot: {a.plot}")
    if a.keep:
        print(f"run directories under {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fedsim bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
