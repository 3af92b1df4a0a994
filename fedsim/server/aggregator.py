"""The aggregator actor: owns the strategy's state and counts the bytes that cross the wire."""
from __future__ import annotations

import ray
import torch

from fedsim.postprocessors import RoundContext, build_postprocessors, run_server_hooks
from fedsim.server.strategy import Update, make_strategy


class Aggregator:
    def __init__(self, cfg, initial_params: torch.Tensor):
        self.num_clients = cfg.clients.num
        self.strategy = make_strategy(cfg)
        self.strategy.initialize(initial_params, cfg.clients.num)
        self.postprocessors = build_postprocessors(cfg)
        self.bytes_down = 0

    def params_for(self, clients: list[int], count: bool = True) -> dict[int, ray.ObjectRef]:
        """One object-store ref per distinct tensor, so a broadcast is stored once, not per client.

        `count=False` for evaluation: only the training broadcast is reported as traffic.
        """
        refs, out = {}, {}
        for c in clients:
            t = self.strategy.params_for(c)
            if id(t) not in refs:
                refs[id(t)] = ray.put(t)
            out[c] = refs[id(t)]
            self.bytes_down += t.numel() * t.element_size() if count else 0
        return out

    def write_artifacts(self, out_dir: str) -> list:
        return [str(p) for p in self.strategy.write_artifacts(out_dir)]

    def client_lrs(self, clients: list[int], base_lr: float) -> dict[int, float]:
        return {c: self.strategy.client_lr(c, base_lr) for c in clients}

    def aggregate(self, round: int, num_sampled: int, metas: list[dict], *deltas: torch.Tensor) -> dict[str, float]:
        updates = [Update(m["client"], d, m["num_samples"], m["weight"], m) for m, d in zip(metas, deltas)]
        ctx = RoundContext(round, num_sampled, len(updates), self.num_clients)
        finish = lambda step: run_server_hooks(self.postprocessors, step, ctx)  # noqa: E731
        metrics = self.strategy.aggregate(round, updates, finish) if updates else {}
        metrics["bytes_up"] = float(sum(d.numel() * d.element_size() for d in deltas))
        metrics["bytes_down"] = float(self.bytes_down)
        self.bytes_down = 0
        return metrics

    def global_params(self) -> torch.Tensor:
        return self.strategy.global_params()

    def state_dict(self) -> dict:
        return {"strategy": self.strategy.state_dict(), "postprocessors": [p.state_dict() for p in self.postprocessors]}

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state["strategy"])
        for p, s in zip(self.postprocessors, state["postprocessors"]):
            p.load_state_dict(s)
