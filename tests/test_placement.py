"""`executors.placement: spread` on a Ray cluster of three nodes on this machine (a head and two
workers with different logical resources, on ports of their own, token auth on): the executors of
a `fedsim run` land on different nodes, as Ray's state API and the run's summary.json both say, and
its split server on the node `storage.server_node_resource` names; `pack` puts them on one node.

The cluster lives in a process of its own (this file run as a script): Ray reads RAY_AUTH_MODE once
per process, and the test session's own Ray instance has auth off."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_a_cluster(out: Path, placement: str = "spread") -> None:
    """Start the cluster, run fedsim on it, write what Ray and the run say to `out`/result.json."""
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    t0 = time.monotonic()
    dash = free_port()
    # The head takes no CPU: the executors (0.5 CPU each) must go to the workers, and both would fit
    # on the second worker alone, so only the spread strategy puts them on two nodes for sure.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": True, "dashboard_port": dash,
        "dashboard_agent_listen_port": free_port(), "resources": {"head": 1}})
    try:
        nodes = {"head": cluster.head_node.node_id,
                 "silo_a": cluster.add_node(num_cpus=1, resources={"silo_a": 1}).node_id,
                 "silo_b": cluster.add_node(num_cpus=2, resources={"silo_b": 1}).node_id}
        started = time.monotonic() - t0
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": cluster.address}
        sets = [f"output_dir={out / 'runs'}", "tracking.enabled=false", "train.rounds=1", "executors.num=2",
                "executors.num_cpus=0.5", f"executors.placement={placement}",
                # PPLR split storage, its server on the node with the resource silo_b
                "storage.mode=split", "model.tiny_layers=4", "storage.client_layers=1", "storage.server_num_cpus=0.5",
                "storage.server_node_resource=silo_b"]
        done = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(ROOT / "configs" / "tiny.yaml"),
                               "--summary-json", str(out / "summary.json"), *(a for s in sets for a in ("--set", s))],
                              cwd=out, env=env, capture_output=True, text=True, timeout=300)
        # Ray's own record of the (now ended) executor actors: the node each ran on.
        actors = list_actors(address=f"http://127.0.0.1:{dash}", filters=[("class_name", "=", "ClientExecutor")],
                             detail=True, raise_on_missing_output=False) if done.returncode == 0 else []
        packed, resource_error = packed_nodes(cluster.address)
    finally:
        cluster.shutdown()
    (out / "result.json").write_text(json.dumps({
        "returncode": done.returncode, "output": (done.stdout + done.stderr)[-4000:], "nodes": nodes,
        "actors": [{"pid": a.pid, "node_id": a.node_id} for a in actors],
        "packed": packed, "resource_error": resource_error, "cluster_seconds": started, "seconds": time.monotonic() - t0}))


def packed_nodes(address: str) -> tuple[list[str], str]:
    """The nodes of fedsim's placement group for two 0.5-CPU executors with `pack` (no run: a
    second one would double this test's time), from Ray's placement-group table; and the error
    for a split server asked onto a node resource no node has."""
    import ray

    from fedsim.config import ConfigError, load_config
    from fedsim.core.placement import executor_group
    from fedsim.server.split_server import start_split_server

    ray.init(address=address, log_to_driver=False)
    try:
        group = executor_group(load_config(ROOT / "configs" / "tiny.yaml", ["executors.placement=pack"]), 2, 0.5, 0.0)
        nodes = list(ray.util.placement_group_table(group)["bundles_to_node_id"].values())
        try:
            start_split_server(load_config(ROOT / "configs" / "tiny.yaml", [
                "storage.mode=split", "storage.server_num_cpus=0.5", "storage.server_node_resource=silo_c"]), "unused", 2, 0.0)
            error = None
        except ConfigError as e:
            error = str(e)
        return nodes, error
    finally:
        ray.shutdown()


def test_spread_puts_the_executors_on_different_nodes(tmp_path):
    from fedsim.tuning.report import nodes as nodes_of

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, check=True, timeout=400)
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"cluster of 3 nodes up in {result['cluster_seconds']:.1f} s; all in {result['seconds']:.1f} s")
    assert result["returncode"] == 0, result["output"]
    nodes = result["nodes"]
    by_ray = {a["pid"]: a["node_id"] for a in result["actors"]}
    summary = json.loads((tmp_path / "summary.json").read_text())
    placed = summary["placement"]["executors"]
    assert {e["pid"]: e["node_id"] for e in placed} == by_ray and len(by_ray) == 2
    assert set(by_ray.values()) == {nodes["silo_a"], nodes["silo_b"]}  # one executor on each worker
    assert summary["placement"]["driver"]["node_id"] == nodes["head"]
    # pack: both bundles on one worker (Ray's default scheduling, no group, put them on both)
    assert len(result["packed"]) == 2 and len(set(result["packed"])) == 1 and result["packed"][0] != nodes["head"]
    assert summary["placement"]["split_server"]["node_id"] == nodes["silo_b"]  # storage.server_node_resource
    assert result["resource_error"] == ("storage.server_node_resource: no node of the Ray cluster has the resource "
                                        "'silo_c' (it has head, node:__internal_head__, silo_a, silo_b)")
    # a sweep's results.csv says where each trial and its executors ran, from the same record
    assert nodes_of(summary["placement"]) == {"trial_node": nodes["head"][:8], "executor_nodes": "+".join(
        sorted(n[:8] for n in (nodes["silo_a"], nodes["silo_b"])))}
    assert sorted(c for e in placed for c in e["clients"]) == [0, 1, 2]


def test_a_sweep_trial_group_takes_its_strategy_from_executors_placement():
    from fedsim.config import load_config, to_dict
    from fedsim.tuning.tune import _Bundles, trial_strategy

    configs = [to_dict(load_config(ROOT / "configs" / "tiny.yaml", [f"executors.placement={p}"])) for p in ("pack", "spread")]
    bundles = [[{"CPU": 0.5}, {"CPU": 1.0}]] * 2
    groups = _Bundles(bundles, [trial_strategy(c) for c in configs])
    assert [groups({"trial": i}).strategy for i in (0, 1)] == ["PACK", "SPREAD"]
    del configs[0]["executors"]["placement"]  # a sweep saved before the key existed
    assert trial_strategy(configs[0]) == "PACK"


def test_a_trial_whose_split_server_names_a_missing_node_resource_is_an_error_before_tune_starts():
    import pytest

    from fedsim.config import ConfigError, load_config
    from fedsim.tuning.tune import check_fit, trial_bundles

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["storage.mode=split", "storage.server_num_cpus=0.5",
                                                       "storage.server_node_resource=split_host"])
    bundles = trial_bundles(cfg, 0.5, 0)
    assert bundles[-1] == {"CPU": 0.5, "split_host": 0.001}  # the split server's bundle asks for the resource
    trial = {"trial": 0, "params": {"seed": 0}, "bundles": bundles}
    check_fit([trial], {"CPU": 8, "split_host": 1}, [{"CPU": 8, "split_host": 1}])
    with pytest.raises(ConfigError, match="trial 0 .*storage.server_node_resource: no node of the Ray cluster has "
                                          "the resource 'split_host'"):
        check_fit([trial], {"CPU": 8}, [{"CPU": 8}])


if __name__ == "__main__":
    on_a_cluster(Path(sys.argv[1]), *sys.argv[2:])
