"""The postprocessor interface (Apple pfl-research's idea). The mechanisms (`fedsim.privacy`)
implement it; the chain that orders them is `fedsim.postprocessors`, one layer up, so a mechanism
never imports the chain that holds it.

- `on_client_update` runs in the client's executor, on the client's delta, before upload.
- `on_server_updates` runs in the aggregator on the round's list of updates, before the strategy.
- `on_server_aggregate` runs in the aggregator on the aggregated step, after the strategy.
"""
from __future__ import annotations

import torch

from fedsim.core.capabilities import Capable
from fedsim.core.update import ClientContext, RoundContext, Update


class Postprocessor(Capable):
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
