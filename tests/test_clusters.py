"""Cluster recipes: the runtime env, cluster-launcher and KubeRay files parse and hold what a sweep
needs, and a sweep submitted as a Ray job to a real local head (token authentication on) succeeds
and lands in MLflow as a parent run with one nested run per trial."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from fedsim.tuning.sweep import parse_sweep


def test_runtime_env_has_what_a_job_needs():
    env = yaml.safe_load(Path("clusters/runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    pkgs = " ".join(env["pip"]["packages"])
    for dep in ("transformers", "peft", "pyarrow", "mlflow", "gguf"):
        assert dep in pkgs, dep
    assert "/runs/" in env["excludes"] and "/.venv/" in env["excludes"]


def ray_schema():
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_launcher_config_is_valid_and_has_a_gpu_worker_type():
    import jsonschema

    cfg = yaml.safe_load(Path("clusters/cluster.yaml").read_text())
    jsonschema.validate(cfg, ray_schema())  # Ray's own schema for `ray up`
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and cfg["provider"]["type"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1]
    assert gpu and gpu[0]["min_workers"] >= 1  # fedsim tune checks trials against the running cluster
    assert cfg["file_mounts"] and "." in cfg["file_mounts"].values()
    setup = " ".join(cfg["setup_commands"])
    assert "pip install -e" in setup and "fedsim" in setup and "ray[default,tune]==" + ray.__version__ in setup
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])
    broken = {**cfg, "available_node_types": {**types, "gpu_worker": {**types["gpu_worker"], "gpus": 1}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def test_rayjob_manifest_runs_a_sweep_on_gpu_workers():
    job = yaml.safe_load(Path("clusters/rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    sweep = re.search(r"fedsim(?:\.cli)? tune (\S+)", spec["entrypoint"])
    assert sweep and parse_sweep(sweep.group(1)).name  # the sweep it runs exists and is valid
    assert "--tracking-uri http" in spec["entrypoint"] and "output_dir=/mnt/" in spec["entrypoint"]
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    groups = cluster["workerGroupSpecs"]
    # the images clusters/Dockerfile builds (fedsim installed): CPU on the head, -gpu on the workers
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert head["image"] == "ghcr.io/your-org/fedsim:0.1.0" and set(workers) == {"ghcr.io/your-org/fedsim:0.1.0-gpu"}
    assert "docker build -f clusters/Dockerfile --build-arg VARIANT=-gpu -t ghcr.io/your-org/fedsim:0.1.0-gpu ." in \
        Path("clusters/Dockerfile").read_text()
    limits = [c["resources"]["limits"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert groups[0]["minReplicas"] >= 1 and any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits)
    mounts = [m["mountPath"] for g in groups for c in g["template"]["spec"]["containers"] for m in c["volumeMounts"]]
    assert "/mnt/shared" in mounts  # the sweep directory must be shared between nodes


def test_dockerfile_installs_fedsim_with_the_constraints_on_the_pinned_ray_image():
    from test_constraints import pins

    text = Path("clusters/Dockerfile").read_text()
    p = pins()
    assert re.findall(r"^FROM (\S+)", text, re.M) == [f"rayproject/ray:{p['ray']}-py311${{VARIANT}}"]
    assert re.search(r'pip install .*"torch==' + re.escape(p["torch"]) + r'" "\.\[all\]" -c constraints.txt', text)
    copied = re.findall(r"^COPY --chown=ray:users (.+) \S+$", text, re.M)
    for path in " ".join(copied).split():
        assert Path(path).exists(), path
    kept = [line[1:].rstrip("/") for line in Path("clusters/Dockerfile.dockerignore").read_text().splitlines()
            if line.startswith("!")]
    assert sorted(kept) == sorted(" ".join(copied).split())  # the build context holds what it copies


def test_readme_recipe_names_files_that_exist():
    text = Path("clusters/README.md").read_text()
    assert "ray job submit --working-dir . --runtime-env clusters/runtime_env.yaml -- \\\n    fedsim tune tuning/" in text
    for path in set(re.findall(r"(?:tuning|configs|clusters)/[\w.]+\.(?:yaml|sh)", text)):
        assert Path(path).exists(), path


def test_a_sweep_submitted_as_a_job_to_a_local_head_succeeds(tmp_path):
    """clusters/local_job.sh tune: a real `ray start --head` (token auth on), `ray job submit`, a
    2-trial sweep of the tiny model under Tune inside the job, checked in MLflow."""
    from mlflow import MlflowClient

    repo = tmp_path / "repo"
    # The checkout as git sees it (tracked and not ignored): no virtual environments, runs or caches.
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, listed):
        if Path(f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, repo / f)
    env = {**os.environ, "FEDSIM_HEAD_CPUS": "4"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(["bash", "clusters/local_job.sh", "tune", "tuning/ci_small.yaml"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "succeeded" in out and "Missing authentication token" not in out
    assert "auth ok: the head refuses a request without the token (401) and with a wrong one (403)" in out, out[-3000:]
    assert re.search(r"job ok: MLflow parent run \w+ FINISHED with 2 nested trial runs, 2/2 trials finished", out), out[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedsim").experiment_id
    parent = client.search_runs([exp], "tags.`fedsim.kind` = 'sweep'")[0]
    assert {"results.csv", "privacy_utility.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, "auc")] == [0]
