"""Several Ray nodes on this machine (a head and two workers with different logical resources, on
ports of their own, token auth on), started once for this module:

- `executors.placement: spread`: the executors of a `fedsim run` land on different nodes, as Ray's
  state API and the run's summary.json both say, and its split server on the node
  `storage.server_node_resource` names; `pack` puts them on one node.
- a `fedsim tune` sweep (tuning/ci_nodes.yaml) submitted as a Ray job, every trial writing to one
  shared output_dir and one `mlflow server` over HTTP; trials and their executors on different nodes;
  a worker node killed mid-sweep, its trials retried by Tune from their checkpoints, and every
  trial's nested MLflow run and per-round metrics read back over REST exactly once.

The cluster lives in a process of its own (this file run as a script): Ray reads RAY_AUTH_MODE once
per process, and the test session's own Ray instance has auth off."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_a_cluster(out: Path, mlflow_url: str, kill: bool = True) -> None:
    """Start the cluster, run fedsim on it, then a sweep as a job; write what Ray and the runs say to
    `out`/result.json. (`kill` False: no node killed, for the wall time in docs/clusters.md.)"""
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    t0 = time.monotonic()
    dash = free_port()
    # The head takes no CPU: the executors (0.5 CPU each) must go to the workers, and both would fit
    # on the second worker alone, so only the spread strategy puts them on two nodes for sure.
    # Quick health checks: the GCS declares a killed node dead in ~2 s instead of ~30 s.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": True, "dashboard_port": dash,
        "dashboard_agent_listen_port": free_port(), "resources": {"head": 1},
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 3}})
    result = {}
    try:
        workers = {"silo_a": cluster.add_node(num_cpus=1, resources={"silo_a": 1}),
                   "silo_b": cluster.add_node(num_cpus=2, resources={"silo_b": 1})}
        nodes = {"head": cluster.head_node.node_id, **{k: n.node_id for k, n in workers.items()}}
        result.update(nodes=nodes, cluster_seconds=time.monotonic() - t0)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": cluster.address}
        sets = [f"output_dir={out / 'runs'}", "tracking.enabled=false", "train.rounds=1", "executors.num=2",
                "executors.num_cpus=0.5", "executors.placement=spread",
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
        result.update(returncode=done.returncode, output=(done.stdout + done.stderr)[-4000:],
                      actors=[{"pid": a.pid, "node_id": a.node_id, "actor_id": a.actor_id} for a in actors], packed=packed,
                      resource_error=resource_error, run_seconds=time.monotonic() - t0)
        result["sweep"] = sweep_as_a_job(cluster, workers if kill else {}, f"http://127.0.0.1:{dash}", out, mlflow_url)
    finally:
        cluster.shutdown()
        result["seconds"] = time.monotonic() - t0
        (out / "result.json").write_text(json.dumps(result))


def sweep_as_a_job(cluster, workers: dict, dashboard: str, out: Path, mlflow_url: str) -> dict:
    """tuning/ci_nodes.yaml as a Ray job, its driver on the head; once a trial has checkpointed a
    round, the worker of `workers` that holds the most trial drivers is killed (a lost executor alone
    fedsim may replace within the trial; a lost trial driver is Tune's to retry). What the job, Ray's
    state API and the sweep say."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    t0 = time.monotonic()
    client = JobSubmissionClient(dashboard)
    shared = out / "shared"  # every node's output_dir: one directory, as an NFS mount would be
    # this Python (the `fedsim` of an image with fedsim installed), in the checkout (--working-dir . elsewhere)
    entrypoint = (f"{sys.executable} -m fedsim.cli tune tuning/ci_nodes.yaml --tracking-uri {mlflow_url} "
                  f"--set output_dir={shared} --summary-json {out / 'sweep.json'}")
    from test_mlflow_server import wait_healthy  # this file's own directory: pytest's and the script's path

    wait_healthy(mlflow_url)  # started by the test, alongside the cluster
    for _ in range(60):  # "No available agent" until the head's agent registers: retry the submission
        try:
            job = client.submit_job(entrypoint=f"cd {ROOT} && {entrypoint}", entrypoint_resources={"head": 1},
                                    runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
            break
        except RuntimeError:
            time.sleep(1)
    at_kill, killed_after = [], None
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() - t0 > 400:  # a hung sweep: end it, the test then shows its log
            client.stop_job(job)
        if workers and killed_after is None and list(shared.glob("*/runs/trial_*/checkpoint.pt")):
            # Where every live actor is as the node dies (Ray's state API), and which trials had a
            # checkpoint then: those must resume from it, not start again.
            at_kill = [{"class_name": a.class_name, "node_id": a.node_id, "pid": a.pid,
                        "group": a.placement_group_id, "actor_id": a.actor_id} for a in list_actors(
                address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)]
            checkpointed = sorted(p.parent.name for p in shared.glob("*/runs/trial_*/checkpoint.pt"))
            drivers = [a["node_id"] for a in at_kill if a["class_name"].endswith("ImplicitFunc")]
            victim = max(workers, key=lambda k: (drivers.count(workers[k].node_id), k))
            cluster.remove_node(workers[victim], allow_graceful=False)  # SIGKILL its raylet and workers
            killed_after = time.monotonic() - t0
        time.sleep(0.2)
    executors = list_actors(address=dashboard, filters=[("class_name", "=", "ClientExecutor")], detail=True,
                            raise_on_missing_output=False, limit=1000)
    return {"status": str(client.get_job_status(job)), "logs": client.get_job_logs(job),
            "seconds": time.monotonic() - t0, "killed_after": killed_after, "at_kill": at_kill,
            "killed": victim if killed_after else None,
            "checkpointed_at_kill": checkpointed if killed_after else [],
            "executors": [{"actor_id": a.actor_id, "pid": a.pid, "node_id": a.node_id, "state": a.state}
                          for a in executors],
            "nodes": {n.node_id: n.state for n in list_nodes(address=dashboard, raise_on_missing_output=False)}}


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


@pytest.fixture(scope="module")
def on_cluster(tmp_path_factory, mlflow_store):
    """The cluster session, run once for this module: (its directory, result.json); the MLflow
    server the sweep logs to is up for the tests that read it."""
    out = tmp_path_factory.mktemp("cluster")
    mlflow_store(out / "mlflow.db")  # tables made: the server starts in seconds
    with mlflow_server(out) as url:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        subprocess.run([sys.executable, __file__, str(out), url], env=env, check=True, timeout=600)
        result = json.loads((out / "result.json").read_text())
        print(f"cluster of 3 nodes up in {result['cluster_seconds']:.1f} s; run done at {result['run_seconds']:.1f} s;"
              f" sweep job {result['sweep']['seconds']:.1f} s; all in {result['seconds']:.1f} s")
        yield out, result, url


@contextmanager
def mlflow_server(out: Path):
    """`mlflow server` on a free local port (its store and artifacts in `out`); the cluster script
    waits for it to be healthy, so both start at once."""
    from test_mlflow_server import serve_mlflow

    with serve_mlflow(out / "mlflow.db", out / "artifacts", out / "mlflow-server.log") as (url, _):
        yield url


def test_spread_puts_the_executors_on_different_nodes(on_cluster):
    from fedsim.tuning.report import nodes as nodes_of

    tmp_path, result, _ = on_cluster
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


def test_a_sweep_job_across_nodes_survives_a_killed_worker_and_lands_in_mlflow_once(on_cluster):
    """tuning/ci_nodes.yaml submitted as a Ray job: 2 trials of 3 rounds, each trial's driver and its
    executor on different nodes; the worker holding the trial drivers killed once a trial has
    checkpointed a round; Tune retries the trials it took down (max_failures: 2), a checkpointed one
    from its checkpoint; every trial finishes and is one nested run with each round's metrics once
    on the MLflow server."""
    from test_mlflow_server import rest

    out, result, url = on_cluster
    job, nodes = result["sweep"], result["nodes"]
    print(f"sweep job: {job['seconds']:.1f} s, {job['killed']} killed at {job['killed_after']} s")
    assert job["status"] == "SUCCEEDED", job["logs"][-6000:]
    assert job["killed"] in ("silo_a", "silo_b") and job["checkpointed_at_kill"]
    dead, survivor = nodes[job["killed"]], nodes[({"silo_a", "silo_b"} - {job["killed"]}).pop()]
    # Ray's state API: the dead worker, and where the trials and their executors were as it died
    assert job["nodes"][dead] == "DEAD" and job["nodes"][survivor] == "ALIVE"
    alive = job["at_kill"]
    trials = [a for a in alive if a["class_name"].endswith("ImplicitFunc")]  # a Tune trial's actor (also "wrap_function.<locals>.ImplicitFunc")
    executors = [a for a in alive if a["class_name"] == "ClientExecutor"]
    assert len(trials) == 2 and 1 <= len(executors) <= 2, alive  # a trial may still be preparing
    assert dead in {t["node_id"] for t in trials}
    for e in executors:  # spread: an executor and the driver of its trial (same placement group) apart
        (driver,) = [t for t in trials if t["group"] == e["group"]]
        assert e["node_id"] != driver["node_id"] and nodes["head"] not in (e["node_id"], driver["node_id"])
    summary = json.loads((out / "sweep.json").read_text())
    rows = {r["trial"]: r for r in summary["trials"]}
    assert sorted(rows) == [0, 1] and all(r["status"] == "FINISHED" and r["rounds"] == 3 for r in rows.values())
    for r in rows.values():  # after the failover: everything on the surviving worker
        assert r["trial_node"] == r["executor_nodes"] == survivor[:8], r
        assert str(out / "shared") in r["run_dir"]
    # Ray's record of the sweep's executors (not the `fedsim run`'s before it): every one that ran
    # after the kill is on the survivor
    first = {a["actor_id"] for a in executors}
    later = [e for e in job["executors"] if e["actor_id"] not in first | {a["actor_id"] for a in result["actors"]}]
    assert later and {e["node_id"] for e in later} == {survivor}
    # Tune retried the trials whose driver died; one with a checkpoint went on from it
    retried = sorted(set(re.findall(r"Trial (trial_\d+) errored", job["logs"])))
    assert len(retried) >= sum(t["node_id"] == dead for t in trials) >= 1, job["logs"][-6000:]
    for name in set(retried) & set(job["checkpointed_at_kill"]):
        assert re.search(rf"resuming \S*{name} after round [12] of 3", job["logs"]), job["logs"][-6000:]

    # the MLflow server, over REST: the parent run and one nested run per trial, each round once
    exp = rest(url, "experiments/get-by-name", experiment_name="fedsim")["experiment"]["experiment_id"]
    parent = rest(url, "runs/get", run_id=summary["parent_run_id"])["run"]
    assert parent["info"]["status"] == "FINISHED"
    files = {f["path"] for f in rest(url, "artifacts/list", run_id=summary["parent_run_id"])["files"]}
    assert {"results.csv", "sweep.json"} <= files  # uploaded to the server's artifact store
    assert {"key": "trials_finished", "value": 2.0} in [{k: m[k] for k in ("key", "value")} for m in parent["data"]["metrics"]]
    nested = rest_post(url, "runs/search", {"experiment_ids": [exp], "max_results": 100,
                                            "filter": f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'"})["runs"]
    by_trial = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "fedsim.trial"): r for r in nested}
    assert len(nested) == 2 and sorted(by_trial) == ["0", "1"]
    for t, run in by_trial.items():
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_id"] == rows[int(t)]["mlflow_run_id"]
        for key in ("auc", "train_loss", "bytes_up", "round_seconds"):
            history = rest(url, "metrics/get-history", run_id=run["info"]["run_id"], metric_key=key)["metrics"]
            assert sorted(m["step"] for m in history) == [0, 1, 2], (t, key, history)


def rest_post(url: str, path: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


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
    on_a_cluster(Path(sys.argv[1]), sys.argv[2], kill=sys.argv[3:] != ["--no-kill"])
