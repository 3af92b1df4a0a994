"""A `fedsim run` driver interrupted for real, in a process of its own: Ctrl+C (SIGINT), then SIGKILL
mid-round, each time resumed with `fedsim run --resume RUN_DIR` through the CLI. It must end on the
uninterrupted run's adapter and metrics (LoRA dropout on), its MLflow run holding every round once,
also while another `fedsim run` writes to the same sqlite store at the same time."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fedsim.config import load_config
from fedsim.core.files import StateFileError
from fedsim.simulation import load_checkpoint, sample_clients

ROOT = Path(__file__).resolve().parents[1]
# One pooled executor serves the 3 clients: one actor to start per driver, not three.
OVERRIDES = ["train.rounds=3", "model.lora.dropout=0.1", "clients.per_round=2", "executors.num=1"]


def cli(ray_local, cwd, *args, command=("run",), log: Path | None = None) -> subprocess.Popen:
    """`fedsim run ...` in its own process, a driver joining the test session's Ray instance
    (one Ray instance per machine: a second local one would collide with it). `log`: its output
    goes to that file, not to pipes (a process left running for long would fill a pipe and stall)."""
    # Token auth as the session's instance has it: fedsim's init_ray sends the token when it finds one.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    # cwd: MLflow puts a sqlite store's artifacts under ./mlruns.
    # SIGINT back to its default in the child: a shell without job control starts background jobs
    # (e.g. `pytest &` in a script) with SIGINT ignored, and Python then keeps ignoring it (no Ctrl+C).
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "fedsim.cli", *command, *args], cwd=cwd, env=env,
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_round(run_root: Path, round: int, proc: subprocess.Popen, timeout: float = 240) -> Path:
    """The run directory, once its checkpoint covers `round` (0-based)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dirs = list(run_root.glob("tiny-*")) if run_root.exists() else []
        if dirs and (dirs[0] / "checkpoint.pt").exists():
            try:
                if load_checkpoint(dirs[0])["round"] >= round:
                    return dirs[0]
            except StateFileError:  # cannot happen with atomic writes: fail loudly if it does
                raise
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise TimeoutError(f"no checkpoint of round {round + 1} within {timeout:.0f} s")


def test_ctrl_c_then_sigkill_mid_round_then_resume_ends_like_an_uninterrupted_run(ray_local, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    # The uninterrupted reference is the second run started below (same config, another name): a
    # run of its own here would cost another 3 rounds on its own executor.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_store(tmp_path / "mlflow.db")  # its tables made (MLflow takes ~6 s to make them)
    runs = tmp_path / "runs"
    common = ["--tracking-uri", uri]

    # The driver is held mid-round deterministically, not by timing: one of the round's clients is a
    # straggler (faults.slow) that waits for a 600 s round timeout, so the round cannot end before
    # the signal. Faults change nothing else: the resumed run drops them with --force.
    cfg = load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES)
    hold = lambda r: ["faults.round_timeout=600", f"faults.slow=[{{round: {r}, client: {sample_clients(cfg, r)[0]}}}]"]  # noqa: E731
    sets = lambda *o: [x for v in o for x in ("--set", v)]  # noqa: E731

    # A second run of its own and a Tune sweep write to the one sqlite store all along, while the
    # interrupted run starts, stops and resumes.
    other = cli(ray_local, tmp_path, str(ROOT / "configs" / "tiny.yaml"), *common,
                *sets(f"output_dir={tmp_path / 'other'}", "name=other", *OVERRIDES), log=tmp_path / "other.log")
    sweep = cli(ray_local, ROOT, *common, *sets(f"output_dir={tmp_path / 'sweep'}"), command=("tune", "tuning/ci_small.yaml"),
                log=tmp_path / "sweep.log")

    # Ctrl+C in round 2 (round 1 checkpointed): exit 130, the checkpoint intact, one line saying how to resume.
    proc = cli(ray_local, tmp_path, str(ROOT / "configs" / "tiny.yaml"), *common,
               *sets(f"output_dir={runs}", *OVERRIDES, *hold(1)))
    run_dir = wait_for_round(runs, 0, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)  # a loaded 2-core machine: Ray's shutdown is slow
    assert proc.returncode == 130, err[-3000:]
    assert f"fedsim: interrupted; continue with: fedsim run --resume {run_dir}" in err.splitlines()
    assert "Traceback" not in err
    assert load_checkpoint(run_dir)["round"] == 0

    # Resume (held in round 3 now), and SIGKILL the driver mid-round: no chance to clean up.
    proc = cli(ray_local, tmp_path, "--resume", str(run_dir), *common, "--force", *sets(*hold(2)))
    wait_for_round(runs, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir)["round"] == 1

    # The last resume.
    proc = cli(ray_local, tmp_path, "--resume", str(run_dir), *common, "--force", *sets("faults.slow=[]"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"run directory: {run_dir}" in out
    for p, name in ((other, "other"), (sweep, "sweep")):
        p.wait(timeout=300)
        assert p.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

    # The interrupted run ends on the uninterrupted one's adapter and metrics, round by round.
    full_dir = next((tmp_path / "other").glob("other-*"))
    a = load_file(full_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "adapters differ"
    history, full = load_checkpoint(run_dir)["history"], load_checkpoint(full_dir)["history"]
    assert [h["round"] for h in history] == [h["round"] for h in full] == [0, 1, 2]
    for h, f in zip(history, full):
        for key in ("auc", "logloss", "accuracy", "train_loss"):
            assert h[key] == pytest.approx(f[key], abs=1e-6), (h["round"], key)
    # The interrupted run is one MLflow run, continued; it, the concurrent one and the sweep's runs
    # hold every metric of every round exactly once.
    client = MlflowClient(tracking_uri=uri)
    everything = client.search_runs([client.get_experiment_by_name("fedsim").experiment_id])
    assert len(everything) == 5 and all(r.info.status == "FINISHED" for r in everything)  # + parent, 2 trials
    for r in everything:
        for key in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), (r.info.run_name, key, steps)
    trials = [r for r in everything if r.data.tags.get("mlflow.parentRunId")]
    assert len(trials) == 2 and all([m.step for m in client.get_metric_history(t.info.run_id, "auc")] == [0] for t in trials)
    tracked = {r.info.run_name: r for r in everything if r.info.run_name in ("tiny", "other")}
    assert len(tracked) == 2
    for r in tracked.values():
        for key in ("train_loss", "auc", "round_seconds"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == [0, 1, 2], key
        assert len(r.data.metrics) > 30
    tiny = tracked["tiny"].info.run_id
    assert client.get_metric_history(tiny, "auc")[-1].value == pytest.approx(full[-1]["auc"], abs=1e-6)


# Server state that a SIGKILL must not tear: PPLR's per-client table on disk (written as rounds go,
# ahead of the checkpoint) and in memory, secure aggregation's masks, fused execution.
VARIANTS = {"pplr-disk-fused": ["strategy.name=pplr", "strategy.pplr.table=disk", "executors.fused=true"],
            "pplr-memory": ["strategy.name=pplr", "strategy.pplr.table=memory"],
            "secagg": ["privacy.secagg.enabled=true"]}


def test_sigkill_mid_round_then_cli_resume_for_pplr_tables_secagg_and_fused(ray_local, tmp_path, mlflow_store):
    """Each variant: a driver SIGKILLed mid-round 2 (held there by a straggler, as above), resumed
    through the CLI, against the same run uninterrupted; all six drivers run at once (the tiny model's
    work is small, their start-up overlaps)."""
    from mlflow import MlflowClient

    base = [*OVERRIDES[1:], "train.rounds=2"]  # LoRA dropout on; 2 rounds: the kill is in the last one
    cfg = load_config(ROOT / "configs" / "tiny.yaml", base)
    hold = ["faults.round_timeout=600", f"faults.slow=[{{round: 1, client: {sample_clients(cfg, 1)[0]}}}]"]
    sets = lambda *o: [x for v in o for x in ("--set", v)]  # noqa: E731
    killed, refs = {}, {}
    for name, extra in VARIANTS.items():
        d = tmp_path / name
        mlflow_store(d / "mlflow.db")
        uri = ["--tracking-uri", f"sqlite:///{d / 'mlflow.db'}"]
        killed[name] = cli(ray_local, d, str(ROOT / "configs" / "tiny.yaml"), *uri,
                           *sets(f"output_dir={d / 'runs'}", *base, *extra, *hold))
        refs[name] = cli(ray_local, d, str(ROOT / "configs" / "tiny.yaml"), *uri,
                         *sets(f"output_dir={d / 'ref'}", "name=ref", *base, *extra))
    resumed = {}
    for name, proc in killed.items():
        d = tmp_path / name
        run_dir = wait_for_round(d / "runs", 0, proc, timeout=400)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert load_checkpoint(run_dir)["round"] == 0
        resumed[name] = (run_dir, cli(ray_local, d, "--resume", str(run_dir), "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}",
                                      "--force", *sets("faults.slow=[]")))
    for name in VARIANTS:
        run_dir, proc = resumed[name]
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, (name, err[-3000:])
        _, ref_err = refs[name].communicate(timeout=400)
        assert refs[name].returncode == 0, (name, ref_err[-3000:])
        ref_dir = next((tmp_path / name / "ref").glob("ref-*"))
        # The end is the uninterrupted run's: the global adapter, every client's scores, the metrics.
        a = load_file(ref_dir / "adapter" / "adapter_model.safetensors")
        b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
        pa, pb = (pd.read_parquet(p / "predictions.parquet") for p in (ref_dir, run_dir))
        off = pa[~np.isclose(pa["prob"], pb["prob"], rtol=0, atol=1e-6)]
        # (what to look at if it fails: whose rows, and the resumed run's log)
        assert off.empty, (name, f"{len(off)} of {len(pa)} rows differ, clients {sorted(set(off['client']))}, "
                                 f"by up to {(off['prob'] - pb['prob'][off.index]).abs().max():.4f}", err[-3000:])
        history, full = load_checkpoint(run_dir)["history"], load_checkpoint(ref_dir)["history"]
        for key in ("auc", "logloss", "train_loss"):
            assert [h[key] for h in history] == pytest.approx([f[key] for f in full], abs=1e-6), (name, key)
        # One MLflow run, continued: every round's metrics once.
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        run = next(r for r in client.search_runs([client.get_experiment_by_name("fedsim").experiment_id])
                   if r.info.run_name == "tiny")
        assert run.info.status == "FINISHED"
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (name, key, steps)
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [0, 1], name
