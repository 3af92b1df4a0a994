"""The fedsim benchmark workload under Flower's simulation engine (Ray backend), for comparison.

Runs in its own virtual environment (Flower 1.41 pins Ray 2.55.1; fedsim runs on Ray 2.60):

    bash benchmarks/flower_env.sh
    flock /tmp/ray.lock benchmarks/.flower-venv/bin/python benchmarks/flower_bench.py \
        --clients 8 --batch 8 --seq 128 --steps 4 --rounds 3 --model tiny

Workload, per round: every one of `--clients` virtual clients (Flower SuperNodes, all sampled by
Flower's own FedAvg strategy) receives the global LoRA adapter, trains it with AdamW for `--steps`
steps on batches of `--batch` rows of `--seq` random tokens (the loss: cross-entropy of the last
position's logits against a random binary answer token, as in TALLRec-style scoring), and returns
the adapter; FedAvg averages them, weighted by rows. No evaluation. The model is a random-weight
Llama: `tiny` (fedsim's `tiny-random` shape, `fedsim.models.loader.TINY`, vocabulary 1000) or
`smollm2-135m` (SmolLM2-135M's shape); LoRA via peft with `--lora-r` on `--target-modules`;
bf16 base on CUDA, fp32 on CPU, as fedsim's `model.dtype: auto`.

Flower is given its best case: each Ray actor builds the base model once and keeps it across
messages (as a fedsim executor does), so a round costs training, the adapter's trip through
Flower's messages and Ray, and Flower's scheduling. Flower clients are stateless here (a fresh
AdamW each round), while fedsim keeps each client's optimizer state; that favours Flower.

Prints one JSON line: framework, tokens_per_s and samples_per_s (tokens and rows trained on in
the timed rounds / their wall time), round_seconds (mean over the timed rounds: from the strategy
sending the adapter to the aggregated one), overhead (as fedsim's bench defines it: 1 - the busiest
actor's seconds in local training steps / the round's wall time, over the timed rounds),
first_round_seconds (includes each actor's model build; not timed), workers (clients Flower runs
at once), and the workload. Flower 1.41 marks `run_simulation` deprecated in favour of `flwr run`;
both drive the same simulation engine.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    # SmolLM2-135M(-Instruct): Llama architecture.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048),
}
TINY_VOCAB = 1000
ANSWER_TOKENS = (3, 4)  # stand-ins for the "Yes" / "No" token ids

_MODELS: dict = {}  # per actor process: the base model with its LoRA, built once


def model_shape(name: str) -> dict:
    if name == "tiny":
        sys.path.insert(0, str(REPO))  # fedsim's deps are not in this venv; loader.TINY needs only torch
        from fedsim.models.loader import TINY

        return dict(TINY, vocab_size=TINY_VOCAB)
    if name not in SHAPES:
        raise SystemExit(f"--model {name!r}: one of tiny, {', '.join(SHAPES)}")
    return SHAPES[name]


def build_model(name: str, r: int, targets: list[str], device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)  # every process builds the same base and the same LoRA init
    cfg = LlamaConfig(**model_shape(name), tie_word_embeddings=True, pad_token_id=0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)).eval()


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def cached_model(cfg) -> tuple[object, float]:
    key = (cfg["model"], cfg["lora-r"], cfg["targets"], cfg["device"])
    if key not in _MODELS:
        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(cfg["threads"])))
        _MODELS[key] = build_model(cfg["model"], int(cfg["lora-r"]), cfg["targets"].split(","), cfg["device"])
        return _MODELS[key], time.perf_counter() - t0
    return _MODELS[key], 0.0


def local_train(cfg, partition: int, round: int, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """One client's local training; returns (trained LoRA tensors, metrics)."""
    model, build_s = cached_model(cfg)
    device, steps, batch, seq = cfg["device"], int(cfg["steps"]), int(cfg["batch"]), int(cfg["seq"])
    params = lora_params(model)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
    opt = torch.optim.AdamW(list(params.values()), lr=float(cfg["lr"]))
    gen = torch.Generator(device=device).manual_seed(1_000_003 * partition + round)
    answers = torch.tensor(ANSWER_TOKENS, device=device)
    vocab = model.config.vocab_size
    model.train()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        x = torch.randint(len(ANSWER_TOKENS) + 2, vocab, (batch, seq), device=device, generator=gen)
        y = answers[torch.randint(0, 2, (batch,), device=device, generator=gen)]
        logits = model(input_ids=x, logits_to_keep=1).logits[:, -1, :].float()
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    train_s = time.perf_counter() - t0
    model.eval()
    out = {n: p.detach().float().cpu().clone() for n, p in params.items()}
    return out, {"num-examples": steps * batch, "train-seconds": train_s, "build-seconds": build_s,
                 "loss": float(torch.stack(losses).mean()), "pid": os.getpid()}


def make_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = dict(msg.content["config"])
        state = msg.content["arrays"].to_torch_state_dict()
        trained, metrics = local_train(cfg, int(context.node_config["partition-id"]), int(cfg["server-round"]), state)
        content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


TIMINGS: list[dict] = []  # filled by the ServerApp, which runs in this process


def make_server_app(args, initial: dict[str, torch.Tensor]):
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        """Flower's FedAvg, timing each round from sending the adapter to the aggregated one."""

        def configure_train(self, server_round, arrays, config, grid):
            self._t0 = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            out = super().aggregate_train(server_round, replies)
            metrics = [m.content["metrics"] for m in replies if m.has_content()]
            busy: dict = {}  # local-training seconds per actor process
            for m in metrics:
                busy[m["pid"]] = busy.get(m["pid"], 0.0) + m["train-seconds"]
            TIMINGS.append({"round": server_round, "seconds": time.perf_counter() - self._t0,
                            "clients": len(metrics), "train_seconds": sum(m["train-seconds"] for m in metrics),
                            "busiest_seconds": max(busy.values(), default=0.0), "actors": len(busy),
                            "build_seconds": sum(m["build-seconds"] for m in metrics),
                            "loss": sum(m["loss"] for m in metrics) / max(1, len(metrics)),
                            "errors": sum(1 for m in replies if m.has_error())})
            return out

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=args.clients,
                               min_available_nodes=args.clients)
        config = ConfigRecord({"model": args.model, "lora-r": args.lora_r, "targets": args.target_modules,
                               "device": args.device, "steps": args.steps, "batch": args.batch, "seq": args.seq,
                               "lr": args.lr, "threads": max(1, int(args.num_cpus_per_client))})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=args.rounds, train_config=config)

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="virtual clients, all trained every round")
    p.add_argument("--batch", type=int, default=8, help="rows per local step")
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the first is warm-up and not timed")
    p.add_argument("--model", default="tiny", help="tiny or smollm2-135m (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-cpus-per-client", type=float, default=1.0)
    p.add_argument("--num-gpus-per-client", type=float, default=0.0)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs Flower's Ray instance gets")
    return p.parse_args(argv)


def workers(args) -> int:
    """How many clients Flower's actor pool trains at once (its pool size, capped by the clients)."""
    n = int(args.num_cpus / args.num_cpus_per_client)
    if args.num_gpus_per_client > 0:
        n = min(n, int(torch.cuda.device_count() / args.num_gpus_per_client))
    return max(1, min(n, args.clients))


def summarize(args, timings: list[dict]) -> dict:
    timed = timings[1:] if len(timings) > 1 else timings
    wall = sum(t["seconds"] for t in timed)
    tokens = sum(t["clients"] for t in timed) * args.steps * args.batch * args.seq
    busy = sum(t["busiest_seconds"] for t in timed)
    return {
        "framework": "flower", "flwr": __import__("flwr").__version__, "ray": __import__("ray").__version__,
        "tokens_per_s": tokens / wall, "samples_per_s": tokens / args.seq / wall,
        "round_seconds": wall / len(timed), "overhead": max(0.0, 1 - busy / wall),
        "first_round_seconds": timings[0]["seconds"], "timed_rounds": len(timed), "workers": workers(args),
        "actors_used": max(t["actors"] for t in timings),
        "errors": sum(t["errors"] for t in timings), "final_loss": timings[-1]["loss"],
        "workload": {"model": args.model, "device": args.device, "clients": args.clients, "batch": args.batch,
                     "seq": args.seq, "steps": args.steps, "rounds": args.rounds, "lora_r": args.lora_r,
                     "target_modules": args.target_modules, "num_cpus_per_client": args.num_cpus_per_client,
                     "num_gpus_per_client": args.num_gpus_per_client},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Import this file as a module: the ClientApp's functions are then pickled by reference, so each
    # Ray actor imports them once and keeps its model in `_MODELS` across messages.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_bench as mod

    from flwr.simulation import run_simulation

    initial = {n: p.detach().float().cpu().clone() for n, p in
               lora_params(build_model(args.model, args.lora_r, args.target_modules.split(","), "cpu")).items()}
    resources = {"num_cpus": args.num_cpus_per_client, "num_gpus": args.num_gpus_per_client}
    init_args = {"address": "local", "num_cpus": args.num_cpus, "log_to_driver": False,
                 "num_gpus": torch.cuda.device_count()}
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app=mod.make_server_app(args, initial), client_app=mod.make_client_app(),
                   num_supernodes=args.clients,
                   backend_config={"client_resources": resources, "init_args": init_args})
    if len(mod.TIMINGS) != args.rounds:
        print(f"flower_bench: {len(mod.TIMINGS)} of {args.rounds} rounds finished", file=sys.stderr)
        return 1
    out = summarize(args, mod.TIMINGS)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}))
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
