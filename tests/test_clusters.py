"""Cluster recipes: the runtime env parses, and a fedsim run submitted as a Ray job to a real local
head (token authentication on) succeeds and lands in MLflow."""
import os
import shutil
import subprocess
from pathlib import Path

import yaml


def test_runtime_env_has_what_a_job_needs():
    env = yaml.safe_load(Path("clusters/runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    pkgs = " ".join(env["pip"]["packages"])
    for dep in ("transformers", "peft", "pyarrow", "mlflow", "gguf"):
        assert dep in pkgs, dep
    assert "/runs/" in env["excludes"] and "/.venv/" in env["excludes"]


def test_a_run_submitted_as_a_job_to_a_local_head_succeeds(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(".", repo, ignore=shutil.ignore_patterns(".venv", "venv", "runs", "mlflow.db", ".git", "*.pyc"))
    env = {**os.environ, "FEDSIM_HEAD_CPUS": "2", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    done = subprocess.run(["bash", "clusters/local_job.sh", "configs/tiny.yaml", "--set", "train.rounds=1"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "succeeded" in out and "job ok: MLflow run" in out and "FINISHED" in out
    assert "Missing authentication token" not in out
    assert (repo / "mlflow.db").exists()
