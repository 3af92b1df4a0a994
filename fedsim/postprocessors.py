"""Postprocessors (Apple pfl-research's idea): everything that touches an update on its way out of a
client or after aggregation, composed as an ordered list so features stack without the loop
changing.

- `on_client_update` runs in the client's executor, on the client's delta, before upload
  (clipping, local noise, secure-aggregation masks, compression, re-weighting).
- `on_server_aggregate` runs in the aggregator on the aggregated step, after the strategy combined
  the updates (central DP noise, unmasking checks).

Client hooks run in list order; server hooks in reverse order, so a pair of hooks wraps what lies
inside it (as clip-then-noise, mask-then-unmask need).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClientContext:
    client: int
    round: int
    num_samples: int
    num_sampled: int  # m: clients sampled this round
    num_clients: int  # N: clients in the population


@dataclass
class RoundContext:
    round: int
    num_sampled: int
    num_reported: int
    num_clients: int


class Postprocessor:
    name = "identity"

    def on_client_update(self, delta: torch.Tensor, weight: float, ctx: ClientContext) -> tuple[torch.Tensor, float, dict]:
        """Returns the (possibly changed) delta, its aggregation weight, and metrics to report."""
        return delta, weight, {}

    def on_server_aggregate(self, step: torch.Tensor, ctx: RoundContext) -> tuple[torch.Tensor, dict]:
        return step, {}

    def params(self) -> dict:
        """Derived settings to record as MLflow params (e.g. a calibrated noise multiplier)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_postprocessors(cfg) -> list[Postprocessor]:
    """The ordered chain for a config; each feature that lands adds its entry here."""
    return []


def run_client_hooks(chain: list[Postprocessor], delta: torch.Tensor, weight: float,
                     ctx: ClientContext) -> tuple[torch.Tensor, float, dict]:
    metrics = {}
    for p in chain:
        delta, weight, m = p.on_client_update(delta, weight, ctx)
        metrics.update(m)
    return delta, weight, metrics


def run_server_hooks(chain: list[Postprocessor], step: torch.Tensor, ctx: RoundContext) -> tuple[torch.Tensor, dict]:
    metrics = {}
    for p in reversed(chain):
        step, m = p.on_server_aggregate(step, ctx)
        metrics.update(m)
    return step, metrics
