"""Postprocessors (Apple pfl-research's idea): everything that touches an update on its way out of a
client or after aggregation, composed as an ordered list so features stack without the loop
changing.

- `on_client_update` runs in the client's executor, on the client's delta, before upload
  (clipping, local noise, secure-aggregation masks, compression, re-weighting).
- `on_server_updates` runs in the aggregator on the round's list of updates, before the strategy
  sees them (secure aggregation replaces the masked per-client updates by their unmasked sum).
- `on_server_aggregate` runs in the aggregator on the aggregated step, after the strategy combined
  the updates (central DP noise).

Client hooks run in list order; both kinds of server hook in reverse order, so a pair of hooks wraps
what lies inside it (as clip-then-noise, mask-then-unmask need).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedsim.server.strategy import Update


@dataclass
class ClientContext:
    client: int
    round: int
    num_samples: int
    num_sampled: int  # m: clients sampled this round
    num_clients: int  # N: clients in the population
    # This client's persistent state for client hooks (e.g. a privacy accountant), kept in the
    # client's store between rounds; hooks read and update it in place under their own key.
    state: dict = field(default_factory=dict)
    sampled: list[int] = field(default_factory=list)  # the ids of the clients sampled this round


@dataclass
class RoundContext:
    round: int
    num_sampled: int
    num_reported: int
    num_clients: int
    sampled: list[int] = field(default_factory=list)  # the ids of the clients sampled this round


class Postprocessor:
    name = "identity"
    # True: the server hooks must run even in a round where no client reported (central DP noise);
    # the aggregator then gives the strategy one zero update.
    noise_every_round = False

    def on_client_update(self, delta: torch.Tensor, weight: float, ctx: ClientContext) -> tuple[torch.Tensor, float, dict]:
        """Returns the (possibly changed) delta, its aggregation weight, and metrics to report."""
        return delta, weight, {}

    def on_server_updates(self, updates: list[Update], ctx: RoundContext) -> tuple[list[Update], dict]:
        """The round's updates as the strategy will receive them (e.g. masked ones replaced by
        their unmasked aggregate), and metrics to report."""
        return updates, {}

    def on_server_aggregate(self, step: torch.Tensor, ctx: RoundContext) -> tuple[torch.Tensor, dict]:
        return step, {}

    def params(self) -> dict:
        """Derived settings to record as MLflow params (e.g. a calibrated noise multiplier)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_postprocessors(cfg, layout: list[tuple[str, int]] | None = None, key_holder=None) -> list[Postprocessor]:
    """The ordered chain for a config; each feature that lands adds its entry here.

    `layout` ((name, numel) per block of the flat adapter vector, `fedsim.models.lora.flat_layout`)
    is given by the client executor, which knows the model; the aggregator builds the same chain
    without it (its server hooks, params and state do not need it). `key_holder`: the name of the
    run's CKKS key-holder actor when privacy.he is on (`fedsim.privacy.he.start_key_holder`).
    """
    chain: list[Postprocessor] = []
    privacy = getattr(cfg, "privacy", None)
    # Record-level DP-SGD (privacy.sample_dp) is in the client's optimizer, not in this chain.
    if privacy is not None and privacy.dp_lora.enabled:
        from fedsim.privacy.dp_lora import DPLoRA

        chain.append(DPLoRA(cfg, layout))
    if privacy is not None and privacy.client_dp.enabled:
        from fedsim.privacy.client_dp import ClientDP

        chain.append(ClientDP(cfg))
    # Secure aggregation (masks or CKKS) last: every other client hook changes the plaintext before it is masked,
    # and the masked sum is opened before every other server hook (e.g. central DP noise) runs.
    if privacy is not None and privacy.secagg.enabled:
        from fedsim.privacy.secagg import SecAgg

        chain.append(SecAgg(cfg))
    if privacy is not None and privacy.he.enabled:  # the same place as SecAgg (the config allows one)
        from fedsim.privacy.he import HEAggregation

        chain.append(HEAggregation(cfg, key_holder))
    return chain


def run_client_hooks(chain: list[Postprocessor], delta: torch.Tensor, weight: float,
                     ctx: ClientContext) -> tuple[torch.Tensor, float, dict]:
    metrics = {}
    for p in chain:
        delta, weight, m = p.on_client_update(delta, weight, ctx)
        metrics.update(m)
    return delta, weight, metrics


def run_update_hooks(chain: list[Postprocessor], updates: list[Update], ctx: RoundContext) -> tuple[list[Update], dict]:
    metrics = {}
    for p in reversed(chain):
        updates, m = p.on_server_updates(updates, ctx)
        metrics.update(m)
    return updates, metrics


def run_server_hooks(chain: list[Postprocessor], step: torch.Tensor, ctx: RoundContext) -> tuple[torch.Tensor, dict]:
    metrics = {}
    for p in reversed(chain):
        step, m = p.on_server_aggregate(step, ctx)
        metrics.update(m)
    return step, metrics


def describe(cfg) -> dict:
    """Derived settings of the chain, computed in the driver before any actor starts, so that an
    impossible setting (an unreachable privacy target) fails fast with a plain message."""
    out = {}
    for p in build_postprocessors(cfg):
        out.update(p.params())
    return out
