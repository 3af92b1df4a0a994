"""Whole federated runs on a real local Ray with a tiny random Llama and synthetic users."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fedsim.cli import main
from fedsim.simulation import QuorumError, Simulation, load_checkpoint, run


def mlflow_client(cfg):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)


def test_two_rounds_three_clients_end_to_end(ray_local, tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    summary_path = tmp_path / "summary.json"
    assert main(["run", "configs/tiny.yaml", "--set", f"output_dir={cfg.output_dir}",
                 "--tracking-uri", cfg.tracking.uri, "--summary-json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    run_dir = Path(summary["run_dir"])
    assert summary["complete"] and summary["rounds_done"] == 2 and summary["clients"] == 3
    assert 0 <= summary["final"]["auc"] <= 1 and summary["dropped"] == []
    assert set(summary["baselines"]) == {"popularity", "history_share", "history_popularity", "logistic_mf"}
    f = summary["final"]
    assert f["auc_ci_low"] <= f["auc"] <= f["auc_ci_high"]
    assert all(m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"] for m in summary["baselines"].values())

    # Per-row predictions of the final model, with every baseline scored on the same rows.
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    assert list(preds.columns[:6]) == ["user", "item", "timestamp", "client", "label", "prob"]
    assert {f"baseline/{b}" for b in summary["baselines"]} == set(preds.columns[6:])
    assert len(preds) == f["rows"] and not preds.isna().any().any()
    assert not preds.duplicated(["user", "item", "timestamp"]).any()
    paired = summary["paired_vs_baselines"]
    assert set(paired) == set(summary["baselines"]) and all(d["rows"] == len(preds) for d in paired.values())
    assert all(d["low"] <= d["diff"] <= d["high"] for d in paired.values())
    assert (run_dir / "learning_curve.png").exists()  # two evaluations
    assert main(["compare", str(run_dir), "baseline:logistic_mf", "--boot", "200"]) == 0

    # Each client's shard holds only its own users.
    users = [set(pd.read_parquet(p)["user"]) for p in sorted((run_dir / "shards").glob("client_*.parquet"))]
    assert len(users) == 3 and not (users[0] & users[1]) and not (users[1] & users[2])

    # The adapters changed: peft starts LoRA B at zero, training must move it.
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert b and max(v.abs().max().item() for v in b) > 0

    # MLflow holds the run, its config, per-round and per-client metrics, and the artifacts.
    client = mlflow_client(cfg)
    r = client.get_run(summary["mlflow_run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["train.rounds"] == "2" and r.data.params["model.name"] == "tiny-random"
    for key in ("auc", "auc_ci_low", "auc_ci_high", "logloss", "auc_std", "auc_min", "auc_gap", "bytes_up", "bytes_down", "round_seconds",
                "client/0/auc", "client/2/auc"):
        hist = client.get_metric_history(r.info.run_id, key)
        assert [m.step for m in hist] == [0, 1], key
    up = client.get_metric_history(r.info.run_id, "bytes_up")[0].value
    assert up == 3 * summary["lora_params"] * 4  # three float32 deltas
    gap = client.get_metric_history(r.info.run_id, "auc_gap")[-1].value
    per_client = [summary["clients_final"][str(c)]["auc"] for c in range(3)]
    assert gap == pytest.approx(max(per_client) - min(per_client))
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "client_auc.png", "learning_curve.png", "predictions.parquet", "adapter",
            "summary.json"} <= artifacts
    assert client.get_metric_history(r.info.run_id, "baseline/logistic_mf/auc_ci_low")[0].step == 0


def test_resume_gives_the_same_result_as_an_uninterrupted_run(ray_local, tiny_cfg):
    cfg = tiny_cfg("train.rounds=3", "clients.per_round=2")
    full = run(cfg, log=lambda *a: None)

    sim = Simulation(cfg, log=lambda *a: None)
    partial = sim.run(stop_after=2)  # as if the driver died after round 2's checkpoint
    assert not partial["complete"] and load_checkpoint(sim.run_dir)["round"] == 1
    resumed = run(run_dir=sim.run_dir, log=lambda *a: None)
    assert resumed["complete"] and resumed["rounds_done"] == 3
    for key in ("auc", "auc_ci_low", "auc_ci_high", "logloss", "accuracy"):
        assert resumed["final"][key] == pytest.approx(full["final"][key], abs=1e-6), key
    a = load_file(Path(full["run_dir"]) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(resumed["run_dir"]) / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # The resumed run wrote the same per-row predictions.
    pa, pb = (pd.read_parquet(Path(s["run_dir"]) / "predictions.parquet") for s in (full, resumed))
    assert pa[["user", "item", "timestamp"]].equals(pb[["user", "item", "timestamp"]])
    assert pa["prob"].to_numpy() == pytest.approx(pb["prob"].to_numpy(), abs=1e-6)
    # Resuming continued the same MLflow run.
    assert resumed["mlflow_run_id"] == partial["mlflow_run_id"]


def test_a_client_actor_killed_mid_round_is_dropped_and_restarted(crash_round0_run):
    # faults.crash=[{round: 0, client: 1}], client 1 alone on the second of two executors (the run
    # is shared with tests/test_stragglers.py, which compares a straggler run with it).
    summary = crash_round0_run
    assert summary["complete"]
    assert summary["dropped"] == [{"round": 0, "client": 1}]
    history = load_checkpoint(Path(summary["run_dir"]))["history"]
    assert [h["clients_reported"] for h in history] == [2, 3]  # back in round 2 on a restarted actor
    assert "client/1/train_loss" not in history[0] and "client/1/train_loss" in history[1]
    assert len(summary["clients_final"]) == 3


def test_too_few_clients_stops_with_a_clear_message_and_can_resume(ray_local, tiny_cfg):
    cfg = tiny_cfg("executors.num=0", "faults.quorum=1.0", "faults.crash=[{round: 1, client: 0}]")
    sim = Simulation(cfg, log=lambda *a: None)
    with pytest.raises(QuorumError, match=r"round 2: only 2 of 3 sampled clients reported, faults.quorum=1.0 needs 3"):
        sim.run()
    assert load_checkpoint(sim.run_dir)["round"] == 0  # round 1's work is safe
    resumed = run(run_dir=sim.run_dir, log=lambda *a: None)
    assert resumed["complete"] and resumed["rounds_done"] == 2


def test_pool_of_executors_serves_virtual_clients(ray_local, tiny_cfg):
    cfg = tiny_cfg("clients.num=5", "executors.num=2", "clients.per_round=3", "tracking.enabled=false")
    summary = run(cfg, log=lambda *a: None)
    history = load_checkpoint(Path(summary["run_dir"]))["history"]
    assert [h["clients_sampled"] for h in history] == [3, 3]
    assert len(summary["clients_final"]) == 5  # every client evaluated on its own test split
    states = list((Path(summary["run_dir"]) / "client_state").glob("client_*/r*.pt"))
    assert len({p.parent.name for p in states}) >= 3  # optimizer state kept per client


def test_impossible_resources_fail_before_any_actor_starts(ray_local, tiny_cfg):
    cfg = tiny_cfg("executors.num=0", "executors.num_cpus=3")
    with pytest.raises(ValueError, match=r"executors need 3 x executors.num_cpus=3.0 = 9 CPUs but the Ray cluster has 4"):
        run(cfg, log=lambda *a: None)


def test_comparison_notebook_runs_on_a_real_store(ray_local, tiny_cfg, notebook, tmp_path):
    """notebooks/compare_runs.ipynb: its code cells, run in order against a store made by two runs
    (tests/test_tune.py runs it on a sweep's store)."""
    cfg = tiny_cfg("train.rounds=1")
    run(cfg, log=lambda *a: None)
    run(tiny_cfg("train.rounds=1", "strategy.name=pplr", "name=second"), log=lambda *a: None)
    ns = notebook(cfg.tracking.uri, tmp_path)
    assert ns["sweep_tables"] == {}
    table = ns["table"]
    assert len(table) == 2 and set(table["run"]) == {"tiny", "second"}
    assert table["auc"].between(0, 1).all() and (table["MiB_up"] > 0).all()
    assert all(len(x) == 3 for x in table["per_client_auc"])
    # The fairness section pairs the PPLR run with the FedAvg one on the same clients.
    ((title, res),) = ns["fairness"]
    assert title == "second vs tiny" and [c["client"] for c in res["clients"]] == [0, 1, 2]
    assert res["clients"][0]["a_low"] <= res["clients"][0]["a"] <= res["clients"][0]["a_high"]
    assert (tmp_path / "fairness.png").read_bytes()[:4] == b"\x89PNG"
