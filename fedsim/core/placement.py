"""Where actors go: GPU shares and placement-group bundles. Here rather than in the driver
(`fedsim.simulation`) because the split server, started by the driver, needs them too."""
from __future__ import annotations

import math
import os

import ray
from ray.util.placement_group import get_current_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

SERVER_NODE_SHARE = 0.001  # of storage.server_node_resource: any node that has it can host the split server


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


def executor_group(cfg, n: int, cpus: float, gpus: float, log=print):
    """Outside a `fedsim tune` trial (whose own placement group places the executors): a placement
    group of one bundle per executor with the `executors.placement` strategy, PACK (as few nodes as
    possible) or SPREAD (across the nodes). Ray's default scheduling does neither reliably (on a
    head and two workers it put two 0.5-CPU executors on both workers, one fitting both). None when
    there is nothing to reserve (no CPU or GPU asked for) or in a trial."""
    bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}
    if get_current_placement_group() is not None or not bundle:
        return None
    strategy = "SPREAD" if cfg.executors.placement == "spread" else "PACK"
    group = placement_group([bundle] * n, strategy=strategy)
    if not ray.wait([group.ready()], timeout=10)[0]:  # a cluster still scaling up: say what it waits for
        log(f"waiting for the Ray cluster to place {n} executor bundle(s) of {bundle} ({strategy}, executors.placement)")
        ray.get(group.ready())
    return group


def executor_placement(group, executor: int) -> dict:
    """Actor options for an executor: its bundle of `group` (executor_group), or in a `fedsim tune`
    trial its bundle of the trial's placement group (bundle 0 the trial, executor i in i + 1)."""
    if group is None:
        return bundle_placement(executor + 1)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=executor)}


def where(_instance=None) -> dict:
    """The node (and process) this runs on; `actor.__ray_call__.remote(where)` asks an actor."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid()}


def placement_of(executors: list, extra: dict, num_clients: int) -> dict:
    """Where the run's actors are: each executor's node and the clients it trains (client c trains
    on executor c % n), and the `extra` actors' (aggregator, split server) by name."""
    spots = ray.get([a.__ray_call__.remote(where) for a in executors])
    named = {k: a for k, a in extra.items() if a is not None}
    out = {"driver": where(), **dict(zip(named, ray.get([a.__ray_call__.remote(where) for a in named.values()])))}
    out["executors"] = [{"executor": i, **s, "clients": list(range(i, num_clients, len(executors)))}
                        for i, s in enumerate(spots)]
    return out
