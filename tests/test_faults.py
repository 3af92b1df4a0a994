"""faults.crash at every actor, through real local Ray: a pool executor dying mid-round while it serves
several virtual clients, an executor dying during evaluation, one dying more often than
executors.max_restarts, the aggregator dying mid-round. What is lost in each: nothing of any client
that reported. Two runs, shared by the tests: FAULTY (completes on its own) and STOPPED (stopped
twice, resumed twice through the CLI), each with the same training (5 clients on 2 executors:
executor 0 serves clients 0, 2 and 4; client 0's death in round 1 kills it with all three to do).

Each death is at the first client an executor runs in that phase: a client that finished just
before its executor died can lose its result with the process (Ray: "the task may or may not have
been executed"), so a later one would make what is dropped depend on timing."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fedsim.cli import main
from fedsim.config import ConfigError, load_config
from fedsim.core.store import ClientStore
from fedsim.simulation import balance_rows, load_checkpoint, run

# faults.quorum 0.4: 2 of 5 clients report in round 1. One evaluation, of the final model (time).
POOL = ["tracking.enabled=false", "clients.num=5", "executors.num=2", "faults.quorum=0.4", "eval.every=2"]
ROUND1_POOL_CRASH = "{round: 0, client: 0}"  # executor 0, as it starts client 0, with 2 and 4 queued


def errors(stderr: str) -> list[str]:
    """The CLI's error lines (progress lines go to stderr too)."""
    return [line for line in stderr.splitlines() if line.startswith("fedsim:")]


def test_crash_entries_are_checked():
    for entry, message in [("{round: 0, client: 1, phase: score}", r"faults\.crash\[0\]\.phase: 'score' must be one of train, eval"),
                           ("{round: 0, actor: driver}", r"faults\.crash\[0\]\.actor: .driver. must be one of aggregator, split_server, key_holder"),
                           ("{round: 0, actor: key_holder}", r"faults\.crash\[0\]\.actor: .key_holder. needs privacy\.he\.enabled: true"),
                           ("{round: 0, client: 1, actor: aggregator}", r"faults\.crash\[0\]: .* needs the keys round and client")]:
        with pytest.raises(ConfigError, match=message):
            load_config("configs/tiny.yaml", [f"faults.crash=[{entry}]"])


def test_a_dropped_client_keeps_nothing_it_saved_of_the_round(tmp_path):
    # Its executor can die after the client saved its round but before its result reached the
    # driver; the driver then discards the entry, and the next round loads the previous one.
    store = ClientStore(tmp_path)
    for r in (0, 1, 2):
        store.save(1, r, {"opt": torch.full((2,), float(r))})
    store.discard(1, 2)
    assert store.load(1, 3)["opt"].tolist() == [1.0, 1.0]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, ray_local):
    """Executor 0 dies in round 1's training (client 0), executor 1 in round 2's evaluation (client 0:
    evaluation balances test rows, and executor 1 scores clients 0, 1 and 2, in that order).
    Returns (summary, log lines)."""
    out = tmp_path_factory.mktemp("faulty")
    cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", *POOL,
                                            f"faults.crash=[{ROUND1_POOL_CRASH}, {{round: 1, client: 0, phase: eval}}]"])
    lines = []
    return run(cfg, log=lambda *a: lines.append(" ".join(map(str, a)))), lines


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, ray_local):
    """The same training, with executors.max_restarts=1: executor 0 dies again in round 2 (client 0),
    its second death, and the run stops; resumed, the aggregator dies in round 2 and the run stops;
    resumed again, it finishes. Returns (run_dir, [(exit code, stderr) of each of the 3 commands])."""
    out = tmp_path_factory.mktemp("stopped")
    crash = f"[{ROUND1_POOL_CRASH}, {{round: 1, client: 0}}, {{round: 1, actor: aggregator}}]"
    sets = [f"output_dir={out}", *POOL, "executors.max_restarts=1", f"faults.crash={crash}"]
    calls = []

    def cli(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["run", *argv])
        calls.append((code, err.getvalue()))

    cli("configs/tiny.yaml", *[a for s in sets for a in ("--set", s)])
    run_dir = next(out.iterdir())
    cli("--resume", str(run_dir))
    cli("--resume", str(run_dir))
    return run_dir, calls


def test_a_pool_executor_killed_mid_round_drops_only_its_unfinished_clients(faulty):
    summary, _ = faulty
    assert summary["complete"]
    # Client 0 (running) and clients 2 and 4 (queued on the same actor) are dropped for the round,
    # not rerun; the restarted actor serves all three in round 2.
    assert summary["dropped"] == [{"round": 0, "client": c} for c in (0, 2, 4)]
    history = load_checkpoint(Path(summary["run_dir"]))["history"]
    assert [h["clients_reported"] for h in history] == [2, 5]
    assert {c for c in range(5) if f"client/{c}/train_loss" in history[0]} == {1, 3}
    # Lost: nothing of a client that reported; both updates reached the aggregator.
    assert history[0]["bytes_up"] == 2 * summary["lora_params"] * 4
    assert history[1]["bytes_up"] == 5 * summary["lora_params"] * 4


def test_an_executor_killed_during_evaluation_has_its_clients_scored_again(faulty):
    summary, lines = faulty
    serve = balance_rows(pd.read_csv(Path(summary["run_dir"]) / "partition.csv").set_index("client")["test"].to_dict(),
                         list(range(5)), 2)
    assert [c for c in range(5) if serve[c] == serve[0]] == [0, 1, 2]
    # Client 0 (running), 1 and 2 (queued) are scored again, on the restarted actor.
    assert any("round 2: scoring client(s) [0, 1, 2] again on the restarted executor(s)" in line for line in lines)
    # Lost: nothing; every client's every test row is scored, once.
    preds = pd.read_parquet(Path(summary["run_dir"]) / "predictions.parquet")
    shards = pd.concat(pd.read_parquet(p) for p in (Path(summary["run_dir"]) / "shards").glob("client_*.parquet"))
    assert len(preds) == (shards["split"] == "test").sum() == summary["final"]["rows"]
    assert sorted(preds["client"].unique()) == [0, 1, 2, 3, 4] and summary["final"]["clients_evaluated"] == 5
    assert not preds.duplicated(["user", "item", "timestamp"]).any()


def test_an_executor_out_of_restarts_stops_the_run_with_the_resume_command(stopped):
    run_dir, calls = stopped
    code, err = calls[0]
    assert code == 2 and len(errors(err)) == 1, err
    assert errors(err)[0].startswith("fedsim: error: round 2: executor actor 0 died and its executors.max_restarts=1 restart(s) "
                          "are used up; the last checkpoint is intact. Resume with: "
                          f"fedsim run --resume {run_dir} ")
    # Resumed as it says (the injected fault is once per run), the run gets past that round and finishes.
    assert "executor actor 0" not in calls[1][1] and calls[2][0] == 0
    assert load_checkpoint(run_dir)["round"] == 1


def test_the_aggregator_killed_mid_round_stops_the_run_and_resume_ends_as_without_faults(stopped, faulty):
    run_dir, calls = stopped
    code, err = calls[1]
    assert code == 2 and errors(err) == ["fedsim: error: round 2: the aggregator actor died; the last checkpoint is intact "
                                 f"(the round is redone from it). Resume with: fedsim run --resume {run_dir}"]
    assert calls[2][0] == 0
    # Lost: nothing. Two stops and two resumes end on the faulty run's adapter, metrics and rows:
    # the same training (round 1 lost clients 0, 2 and 4 in both), round 2 uninterrupted in the end.
    done = load_checkpoint(run_dir)
    ref = load_checkpoint(Path(faulty[0]["run_dir"]))
    assert done["dropped"] == ref["dropped"] == [{"round": 0, "client": c} for c in (0, 2, 4)]
    for key in ("auc", "logloss", "accuracy", "rows", "train_loss"):
        assert done["history"][-1][key] == pytest.approx(ref["history"][-1][key], abs=1e-6), key
    a, b = (load_file(Path(d) / "adapter" / "adapter_model.safetensors") for d in (run_dir, faulty[0]["run_dir"]))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    pa, pb = (pd.read_parquet(Path(d) / "predictions.parquet") for d in (run_dir, faulty[0]["run_dir"]))
    assert pa[["user", "item", "timestamp"]].equals(pb[["user", "item", "timestamp"]])
    assert pa["prob"].to_numpy() == pytest.approx(pb["prob"].to_numpy(), abs=1e-6)


def test_the_split_server_and_the_key_holder_killed_mid_round_stop_the_run_and_resume_ends_as_without_faults(
        tmp_path, ray_local):
    """Split storage and CKKS in one run (LoRA dropout on): the split server dies at round 2's first
    training forward, the key holder when asked to decrypt round 3's sum. Each stops the run with one
    line naming the actor and the round (not every client dropped as if its executor had died);
    resumed twice, the run ends on the adapter and metrics of the same run without faults."""
    sets = ["tracking.enabled=false", "storage.mode=split", "model.tiny_layers=3", "privacy.he.enabled=true", "train.rounds=3",
            "executors.num=1", "model.lora.dropout=0.1", "eval.every=3"]
    crash = "faults.crash=[{round: 1, actor: split_server}, {round: 2, actor: key_holder}]"
    ref = run(load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'ref'}", *sets]), log=lambda *a: None)

    calls = []

    def cli(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            calls.append((main(["run", *argv]), err.getvalue()))

    cli("configs/tiny.yaml", *[a for s in [f"output_dir={tmp_path / 'faulty'}", *sets, crash] for a in ("--set", s)])
    run_dir = next((tmp_path / "faulty").iterdir())
    cli("--resume", str(run_dir))
    cli("--resume", str(run_dir))
    resume = f"the last checkpoint is intact (the round is redone from it). Resume with: fedsim run --resume {run_dir}"
    assert calls[0][0] == 2 and errors(calls[0][1]) == [f"fedsim: error: round 2: the split server actor died; {resume}"]
    assert "dropped" not in calls[0][1]
    assert calls[1][0] == 2 and errors(calls[1][1]) == [f"fedsim: error: round 3: the CKKS key holder actor died; {resume}"]
    assert calls[2][0] == 0, calls[2][1]
    # Lost: nothing; no client was ever dropped, and the end is the uninterrupted run's.
    done, full = load_checkpoint(run_dir), load_checkpoint(Path(ref["run_dir"]))
    assert done["dropped"] == full["dropped"] == []
    assert [h["clients_reported"] for h in done["history"]] == [3, 3, 3]
    for key in ("auc", "logloss", "train_loss"):
        assert done["history"][-1][key] == pytest.approx(full["history"][-1][key], abs=1e-6), key
    a, b = (load_file(Path(d) / "adapter" / "adapter_model.safetensors") for d in (run_dir, ref["run_dir"]))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
