"""fedsim's client and server code in one process, without Ray.

Every round each client trains from what the strategy sends it and the strategy aggregates, exactly
as `fedsim.simulation` does across actors, but with one ClientExecutor and no postprocessors or
checkpoints. Benchmarks that measure learning (a CPU spent on training, not on actors) and the
tests that fail when training stops working use it; `fedsim run` does not.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.client.executor import ClientExecutor
from fedsim.config import to_dict
from fedsim.prepare import prepare
from fedsim.server.strategy import Update, make_strategy


def train_in_process(cfg, run_dir: Path, num_threads: int = 1, after_round=None):
    """Train cfg.train.rounds rounds of every client. `after_round(round, executor, strategy, metas)`
    runs after each aggregation (e.g. to evaluate). Returns (executor, strategy, mean train loss per
    round, training rows seen)."""
    info = prepare(cfg, run_dir, log=lambda *a: None)
    ex = ClientExecutor(to_dict(cfg), str(run_dir), info["model_path"], 0, num_threads=num_threads)
    strategy = make_strategy(cfg, Path(run_dir) / "strategy")
    strategy.initialize(ex.initial_params(), cfg.clients.num)
    clients = list(range(cfg.clients.num))
    losses, seen = [], 0
    for r in range(cfg.train.rounds):
        lrs = [strategy.client_lr(c, cfg.train.lr) for c in clients]
        if cfg.executors.fused:
            out = ex.train_many(clients, r, lrs, clients, *[strategy.params_for(c) for c in clients])
            done = list(zip(out[0::2], out[1::2]))
        else:
            done = [ex.train(c, r, strategy.params_for(c), lr, clients) for c, lr in zip(clients, lrs)]
        strategy.aggregate(r, [Update(m["client"], d, m["num_samples"], m["weight"], m) for m, d in done])
        losses.append(float(np.mean([m["loss"] for m, _ in done])))
        seen += sum(m["num_samples"] for m, _ in done)
        if after_round is not None:
            after_round(r, ex, strategy, [m for m, _ in done])
    return ex, strategy, losses, seen


def evaluate_in_process(ex: ClientExecutor, strategy, clients: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of every client's `split` rows, each scored with its own model."""
    results = [ex.evaluate(c, strategy.params_for(c), split) for c in range(clients)]
    return np.concatenate([x["labels"] for x in results]), np.concatenate([x["probs"] for x in results])
