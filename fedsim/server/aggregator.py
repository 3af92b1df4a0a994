"""The aggregator actor: owns the strategy's state and counts the bytes that cross the wire."""
from __future__ import annotations

import ray
import torch

from fedsim.server.strategy import Update, make_strategy


class Aggregator:
    def __init__(self, cfg, initial_params: torch.Tensor):
        self.strategy = make_strategy(cfg)
        self.strategy.initialize(initial_params, cfg.clients.num)
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

    def aggregate(self, round: int, metas: list[dict], *deltas: torch.Tensor) -> dict[str, float]:
        updates = [Update(m["client"], d, m["num_samples"], m) for m, d in zip(metas, deltas)]
        metrics = self.strategy.aggregate(round, updates) if updates else {}
        metrics["bytes_up"] = float(sum(d.numel() * d.element_size() for d in deltas))
        metrics["bytes_down"] = float(self.bytes_down)
        self.bytes_down = 0
        return metrics

    def global_params(self) -> torch.Tensor:
        return self.strategy.global_params()

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)
