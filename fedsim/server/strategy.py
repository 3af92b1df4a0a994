"""The registry of aggregation rules (the interface and FedAvg: `fedsim.server.base`).

Every rule is listed here, once; a rule's module imports only `base`, so there is no cycle and
nothing registers itself by being imported. Names re-exported from `base` keep older imports working.
"""
from __future__ import annotations

from pathlib import Path

from fedsim.core.registry import Registry
from fedsim.server.base import FedAvg, Finish, Strategy, Update, no_finish, weighted_mean  # noqa: F401
from fedsim.server.flora import StackedLoRA
from fedsim.server.pplr import PPLR

STRATEGIES = Registry("strategy.name", [FedAvg, PPLR])


def make_strategy(cfg, workdir: Path | None = None) -> Strategy:
    if getattr(cfg.strategy, "lora_mode", "separate") == "stack":
        # Stacking replaces the averaging rule (the config allows it only with strategy.name fedavg).
        return StackedLoRA.from_config(cfg)
    return STRATEGIES[cfg.strategy.name].from_config(cfg, workdir)
