"""The aggregator actor: owns the strategy's state and counts the bytes that cross the wire."""
from __future__ import annotations

from pathlib import Path

import ray
import torch

from fedsim.core.faults import maybe_crash
from fedsim.core.store import state_nbytes
from fedsim.postprocessors import RoundContext, build_postprocessors, run_server_hooks, run_update_hooks
from fedsim.core.update import Update
from fedsim.server.strategy import make_strategy


# Bytes of the tensors in what is sent (a tensor, or a dict / list of them, e.g. the stack mode's
# {"version", "delta_w"}); scalars are not counted. The same count as an idle client's stored state.
wire_bytes = state_nbytes


class Aggregator:
    def __init__(self, cfg, initial_params: torch.Tensor, key_holder=None, run_dir: str | None = None):
        self.num_clients = cfg.clients.num
        self.strategy = make_strategy(cfg, Path(run_dir) / "strategy" if run_dir else None)
        self.strategy.initialize(initial_params, cfg.clients.num)
        self.postprocessors = build_postprocessors(cfg, key_holder=key_holder)
        self.bytes_down = 0
        self.crashes, self.run_dir = cfg.faults.crash, run_dir  # faults.crash with actor: aggregator

    def params_for(self, clients: list[int], count: bool = True) -> dict[int, ray.ObjectRef]:
        """One object-store ref per distinct tensor, so a broadcast is stored once, not per client.

        `count=False` for evaluation: only the training broadcast is reported as traffic.
        """
        refs, out = {}, {}
        for c in clients:
            t = self.strategy.params_for(c)
            # The tensor is kept with its ref: an id() is unique only while its object lives, and a
            # row read anew (PPLR's disk table) would otherwise free it and hand its id to the next.
            if id(t) not in refs:
                refs[id(t)] = (t, ray.put(t))
            out[c] = refs[id(t)][1]
            self.bytes_down += wire_bytes(t) if count else 0
        return out

    def write_artifacts(self, out_dir: str) -> list:
        return [str(p) for p in self.strategy.write_artifacts(out_dir)]

    def client_lrs(self, clients: list[int], base_lr: float) -> dict[int, float]:
        return {c: self.strategy.client_lr(c, base_lr) for c in clients}

    def aggregate(self, round: int, sampled: list[int], metas: list[dict], *deltas: torch.Tensor) -> dict[str, float]:
        """Fold in the updates of the reporting clients among `sampled` (the round's sampled ids)."""
        if self.run_dir:
            maybe_crash(self.crashes, self.run_dir, round, actor="aggregator")
        updates = [Update(m["client"], d, m["num_samples"], m["weight"], m) for m, d in zip(metas, deltas)]
        ctx = RoundContext(round, len(sampled), len(updates), self.num_clients, list(sampled))
        # Hooks on the list of updates first (secure aggregation opens the masked sum here), then
        # the strategy, whose aggregated step passes through the step hooks (`finish`).
        updates, update_metrics = run_update_hooks(self.postprocessors, updates, ctx) if updates else (updates, {})
        if not updates and any(p.noise_every_round for p in self.postprocessors):
            # No one reported (e.g. Poisson sampling drew no client): the noise is still released.
            updates = [Update(-1, torch.zeros_like(self.strategy.global_params()), 0, 1.0, {})]
        finish = lambda step: run_server_hooks(self.postprocessors, step, ctx)  # noqa: E731
        metrics = self.strategy.aggregate(round, updates, finish) if updates else {}
        metrics.update(update_metrics)
        metrics["bytes_up"] = float(sum(wire_bytes(d) for d in deltas))
        # Entries one client uploads (strategy.lora_mode: all A and B, only B, only A).
        metrics["lora/upload_params"] = float(max((d.numel() for d in deltas), default=0))
        metrics["bytes_down"] = float(self.bytes_down)
        self.bytes_down = 0
        return metrics

    def global_params(self) -> torch.Tensor:
        return self.strategy.global_params()

    def after_checkpoint(self, round: int) -> None:
        """The checkpoint covers `round`: state kept on disk for an interrupted round can go."""
        self.strategy.after_checkpoint(round)

    def state_dict(self) -> dict:
        return {"strategy": self.strategy.state_dict(), "postprocessors": [p.state_dict() for p in self.postprocessors]}

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state["strategy"])
        for p, s in zip(self.postprocessors, state["postprocessors"]):
            p.load_state_dict(s)
