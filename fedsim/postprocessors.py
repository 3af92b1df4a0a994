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

import torch

# The interface and the contexts live in fedsim.core (the mechanisms implement it without importing
# this chain); re-exported here, where callers have always found them.
from fedsim.core.hooks import Postprocessor
from fedsim.core.update import ClientContext, RoundContext, Update
from fedsim.privacy.client_dp import ClientDP
from fedsim.privacy.dp_lora import DPLoRA
from fedsim.privacy.he import HEAggregation
from fedsim.privacy.secagg import SecAgg

__all__ = ["ClientContext", "Postprocessor", "RoundContext", "build_postprocessors", "describe", "run_client_hooks",
           "run_server_hooks", "run_update_hooks"]


def build_postprocessors(cfg, layout: list[tuple] | None = None, key_holder=None) -> list[Postprocessor]:
    """The ordered chain for a config; each feature that lands adds its entry here.

    `layout` ((name, numel, part) per block of the flat adapter vector,
    `fedsim.models.layout.Layout.flat_parts`) is given by the client executor, which knows the model; the aggregator builds the same chain
    without it (its server hooks, params and state do not need it). `key_holder`: the name of the
    run's CKKS key-holder actor when privacy.he is on (`fedsim.privacy.he.start_key_holder`).
    """
    chain: list[Postprocessor] = []
    privacy = getattr(cfg, "privacy", None)
    # Record-level DP-SGD (privacy.sample_dp) is in the client's optimizer, not in this chain.
    if privacy is not None and privacy.dp_lora.enabled:
        chain.append(DPLoRA(cfg, layout))
    if privacy is not None and privacy.client_dp.enabled:
        chain.append(ClientDP(cfg))
    # Secure aggregation (masks or CKKS) last: every other client hook changes the plaintext before it is masked,
    # and the masked sum is opened before every other server hook (e.g. central DP noise) runs.
    if privacy is not None and privacy.secagg.enabled:
        chain.append(SecAgg(cfg))
    if privacy is not None and privacy.he.enabled:  # the same place as SecAgg (the config allows one)
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
