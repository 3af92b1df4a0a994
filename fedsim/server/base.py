"""The strategy interface and FedAvg; the registry of rules is `fedsim.server.strategy`.

Aggregation rules behind one small interface (Flower's `Strategy` idea).

The simulation loop only calls `params_for` (what a client trains from / is evaluated with) and
`aggregate` (fold one round's client updates in); it never knows which rule it runs. Updates are
deltas (trained adapter minus the adapter the client received), as flat float32 vectors.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fedsim.core.capabilities import Capable
from fedsim.core.update import Finish, Update, no_finish  # noqa: F401 (re-exported: strategies take them from here)


class Strategy(Capable):
    name = "base"

    @classmethod
    def from_config(cls, cfg, workdir: Path | None = None) -> "Strategy":
        """Build the rule from the run's config (rules with settings read their `strategy.*` section);
        `workdir`: a directory the rule may keep state in (the run directory's), or None."""
        return cls()

    def initialize(self, params: torch.Tensor, num_clients: int) -> None:
        raise NotImplementedError

    def params_for(self, client: int) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, round: int, updates: list[Update], finish: Finish = no_finish) -> dict[str, float]:
        """Fold the round's updates in; pass each aggregated step through `finish` before applying it."""
        raise NotImplementedError

    def write_artifacts(self, out_dir) -> list:
        """Files worth keeping at the end of a run (plots, matrices); returns their paths."""
        return []

    def client_lr(self, client: int, base_lr: float) -> float:
        """The learning rate this client trains with next round (rules that control learning speed
        override this)."""
        return base_lr

    def global_params(self) -> torch.Tensor:
        """The model a user takes away at the end (for personalised rules, a consensus)."""
        raise NotImplementedError

    def after_checkpoint(self, round: int) -> None:
        """Called once a checkpoint covers `round` (rules keeping versioned state on disk prune it)."""

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def weighted_mean(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return (torch.stack([v.double() for v in vectors]) * w[:, None]).sum(0).float()


class FedAvg(Strategy):
    """McMahan et al.: the global adapter moves by the sample-weighted mean of client deltas."""

    name = "fedavg"

    def initialize(self, params, num_clients):
        self.params = params.clone()

    def params_for(self, client):
        return self.params

    def aggregate(self, round, updates, finish=no_finish):
        step = weighted_mean([u.delta for u in updates], [u.weight for u in updates])
        step, metrics = finish(step)
        self.params = self.params + step
        return {"update_norm": float(step.norm()), **metrics}

    def global_params(self):
        return self.params

    def state_dict(self):
        return {"params": self.params.clone()}

    def load_state_dict(self, state):
        self.params = state["params"].clone()
