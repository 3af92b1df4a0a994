"""Where actors go: GPU shares and placement-group bundles. Here rather than in the driver
(`fedsim.simulation`) because the split server, started by the driver, needs them too."""
from __future__ import annotations

import math

from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def executor_gpus(cfg, gpus: float) -> float:
    """GPUs per executor: `auto` shares the `gpus` available evenly among the executors (and the
    split server, `storage.mode: split`, as one more actor)."""
    n = (cfg.executors.num or cfg.clients.num) + (cfg.storage.mode == "split")
    if cfg.executors.num_gpus == "auto":
        return 1.0 / math.ceil(n / gpus) if gpus else 0.0
    return float(cfg.executors.num_gpus)


def bundle_placement(bundle: int) -> dict:
    """Actor options that put it in `bundle` of the placement group this process runs in (a `fedsim
    tune` trial: bundle 0 the trial, bundle i+1 executor i); none outside a placement group."""
    pg = get_current_placement_group()
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)} if pg else {}
