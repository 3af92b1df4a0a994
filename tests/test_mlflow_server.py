"""What a user sees in MLflow: the experiment's kind, the run's dataset and source, the per-round,
per-client and headline metrics and the artifacts, read back over HTTP from a real `mlflow server`."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedsim.tracking import Tracker, git_commit

ROOT = Path(__file__).resolve().parents[1]


def head_commit():
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_mlflow(db: Path, artifacts: Path, log_path: Path):
    """`mlflow server` on a free local port over the sqlite store `db`, serving `artifacts`: (url, process)."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{db}", "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free local port, sqlite store and served artifacts in tmp_path."""
    with serve_mlflow(tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log") as served:
        yield served


def wait_healthy(url: str, proc=None, timeout: float = 120) -> None:
    """Until the server at `url` answers its health check (`proc`: its process, when this one started it)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc is None or proc.poll() is None, "mlflow server exited; see its log"
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server at {url} not healthy after {timeout} s; see its log")


def rest(url: str, path: str, **query) -> dict:
    from urllib.parse import urlencode

    return json.loads(urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}?{urlencode(query)}", timeout=30).read())


def fedsim_cli(ray_local, cwd: Path, *args) -> subprocess.Popen:
    """A `fedsim` command in a process of its own, a driver on the test session's Ray instance."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "fedsim.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_tiny_run_against_mlflow_server_read_back_over_rest(ray_local, tiny_cfg, mlflow_server, tmp_path):
    """Also concurrency: a second `fedsim run` and a `fedsim tune` sweep write to the same server
    at the same time; every metric of every run is there exactly once."""
    from mlflow import MlflowClient

    from fedsim.simulation import run

    url, proc = mlflow_server
    cfg = tiny_cfg("tracking.experiment=fedsim")
    wait_healthy(url, proc)
    others = [fedsim_cli(ray_local, tmp_path, "run", str(ROOT / "configs" / "tiny.yaml"), "--tracking-uri", url,
                         "--set", f"output_dir={tmp_path / 'other'}", "--set", "name=other"),
              fedsim_cli(ray_local, ROOT, "tune", "tuning/ci_small.yaml", "--tracking-uri", url,
                         "--set", f"output_dir={tmp_path / 'sweep'}")]
    summary = run(cfg, tracking_uri=url, log=lambda *a: None)
    run_id = summary["mlflow_run_id"]
    for p in others:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("fedsim").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert len(runs) == 5 and {"tiny", "other", "sweep ci_small"} <= set(names), names
    for r in runs:
        assert r.info.status == "FINISHED", r.info.run_name
        for key in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), (r.info.run_name, key, steps)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(trials) == 2 and all(sorted(m.step for m in client.get_metric_history(t.info.run_id, "auc")) == [0]
                                    for t in trials)

    exp = rest(url, "experiments/get-by-name", experiment_name="fedsim")["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]
    r = rest(url, "runs/get", run_id=run_id)["run"]
    assert r["info"]["status"] == "FINISHED" and r["info"]["experiment_id"] == exp["experiment_id"]
    params = {p["key"]: p["value"] for p in r["data"]["params"]}
    assert params["train.rounds"] == "2" and params["model.name"] == "tiny-random"
    tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
    assert tags["mlflow.source.name"] == "fedsim"
    assert tags.get("mlflow.source.git.commit") == head_commit() == git_commit()  # None outside a git checkout
    assert "federated" in tags["mlflow.note.content"]  # the summary table on the run's overview page
    (ds,) = r["inputs"]["dataset_inputs"]
    prepared = json.loads((Path(summary["run_dir"]) / "prepared.json").read_text())["data"]
    assert ds["dataset"]["name"] == "synthetic" and ds["dataset"]["digest"] == prepared["sha256"][:32]

    def history(key):
        return [(m["step"], m["value"]) for m in rest(url, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]]

    for key in ("auc", "auc_gap", "bytes_up", "client/0/auc", "client/2/auc", "client/1/train_loss"):
        assert [s for s, _ in history(key)] == [0, 1], key
    assert history("summary/auc") == [(1, pytest.approx(summary["final"]["auc"]))]
    assert history("client/2/auc")[-1][1] == pytest.approx(summary["clients_final"]["2"]["auc"])
    assert history("summary/auc_minus_logistic_mf")[0][1] == pytest.approx(
        summary["paired_vs_baselines"]["logistic_mf"]["diff"])

    files = {f["path"] for f in rest(url, "artifacts/list", run_id=run_id)["files"]}
    assert {"config.yaml", "summary.json", "predictions.parquet", "client_auc.png", "adapter"} <= files
    got = MlflowClient(tracking_uri=url).download_artifacts(run_id, "summary.json", str(tmp_path / "dl"))
    assert json.loads(Path(got).read_text())["final"]["auc"] == pytest.approx(summary["final"]["auc"])

    # An experiment made before fedsim set kinds (an older fedsim, or by hand) gets its kind on first use.
    client = MlflowClient(tracking_uri=url)
    old = client.create_experiment("made-before")
    t = Tracker(True, url, "made-before")
    t.start("r", {"train.lr": 0.001})
    t.log_dataset({"name": "synthetic", "sha256": "ab" * 32, "source_type": "code",
                   "source": {"tags": {"seed": 0}}, "profile": {"samples": {"train": 10}}})
    t.set_note("x" * 20000)  # a summary table of many clients: cut to MLflow's 8,000-character tag limit
    t.end()
    assert len(client.get_run(t.run_id).data.tags["mlflow.note.content"]) <= 8000
    exp = client.get_experiment_by_name("made-before")
    assert exp.experiment_id == old and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (ds,) = client.get_run(t.run_id).inputs.dataset_inputs
    assert (ds.dataset.digest, json.loads(ds.dataset.profile)) == ("ab" * 16, {"samples": {"train": 10}})
    assert [(tag.key, tag.value) for tag in ds.tags] == [("mlflow.data.context", "training")]


def test_dataset_identity_and_headline_metrics(tiny_cfg):
    from fedsim.data.movielens import RATINGS_SHA256, ratings_sha256
    from fedsim.prepare import build_all_samples, data_identity, load_ratings
    from fedsim.report import headline_metrics

    cfg = tiny_cfg()
    samples, _ = build_all_samples(cfg, log=lambda *a: None)
    data = data_identity(cfg, samples, log=lambda *a: None)
    assert data["name"] == "synthetic" and data["sha256"] == ratings_sha256(load_ratings(cfg)[0])
    assert data["profile"]["samples"]["train"] == int((samples["split"] == "train").sum())
    assert data["source"]["tags"]["num_users"] == 60
    # MovieLens: the pinned hash its loader checks, known without loading the data.
    ml = data_identity(tiny_cfg("data.dataset=movielens-100k"), samples.iloc[:0])
    assert ml["sha256"] == RATINGS_SHA256 and ml["source"]["url"].startswith("https://files.grouplens.org/")

    summary = {"final": {"auc": 0.7, "auc_ci_low": 0.6, "auc_ci_high": 0.8, "logloss": 0.6, "accuracy": 0.65,
                         "auc_min": 0.5, "auc_gap": 0.3, "train_loss": 0.6},
               "paired_vs_baselines": {"popularity": {"diff": 0.1, "low": 0.0, "high": 0.2}},
               "bytes_up": 10, "bytes_down": 20, "wall_seconds": 3.5}
    assert headline_metrics(summary) == {
        "summary/auc": 0.7, "summary/auc_ci_low": 0.6, "summary/auc_ci_high": 0.8, "summary/logloss": 0.6,
        "summary/accuracy": 0.65, "summary/auc_min": 0.5, "summary/auc_gap": 0.3,
        "summary/auc_minus_popularity": 0.1, "summary/bytes_up": 10, "summary/bytes_down": 20,
        "summary/wall_seconds": 3.5}
