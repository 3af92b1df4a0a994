"""Cross-device scale: 1,000 virtual clients served by a pool of two executors, a few sampled per
round, a fixed sample of them evaluated."""
from pathlib import Path

import pandas as pd
import pytest

from fedsim.client.state import ClientStore
from fedsim.config import ConfigError
from fedsim.simulation import eval_clients, load_checkpoint, run, sample_clients

N = 1000


def test_a_thousand_virtual_clients_only_sampled_ones_get_state(ray_local, tiny_cfg):
    cfg = tiny_cfg(f"clients.num={N}", "clients.per_round=4", "executors.num=2", "eval.clients=6",
                   # 3 users per client, and a split that leaves every client train and test rows
                   f"data.synthetic.num_users={3 * N}", "data.synthetic.ratings_per_user=30",
                   "data.split=[0.4,0.2,0.4]", "data.max_train_per_client=8", "data.max_test_per_client=2",
                   "train.local_steps=1", "train.rounds=2", "tracking.enabled=false")
    summary = run(cfg, log=lambda *a: None)
    run_dir = Path(summary["run_dir"])
    assert summary["complete"] and summary["rounds_done"] == 2

    assert len(list((run_dir / "shards").glob("client_*.parquet"))) == N
    stats = pd.read_csv(run_dir / "partition.csv")
    assert len(stats) == N and (stats["train"] > 0).all() and (stats["test"] > 0).all()

    sampled = [sample_clients(cfg, r) for r in range(2)]
    assert all(len(s) == 4 for s in sampled)
    # Idle clients cost nothing: only the clients that trained have a store entry.
    assert ClientStore(run_dir / "client_state").clients() == sorted(set(sampled[0]) | set(sampled[1]))

    history = load_checkpoint(run_dir)["history"]
    assert [h["clients_sampled"] for h in history] == [4, 4]
    assert [h["clients_evaluated"] for h in history] == [6, 6]
    evaluated = eval_clients(cfg)
    assert len(evaluated) == 6 and evaluated == sorted(int(c) for c in summary["clients_final"])
    assert all(f"client/{c}/auc" in history[0] for c in evaluated)
    assert 0.0 <= summary["final"]["auc"] <= 1.0 and summary["final"]["rows"] == 12  # 6 clients x 2 test rows


def test_eval_clients_is_checked_and_fixed_across_rounds(tiny_cfg):
    with pytest.raises(ConfigError, match=r"eval.clients: 4 as a count must be in \[1, clients.num=3\]"):
        tiny_cfg("eval.clients=4")
    with pytest.raises(ConfigError, match=r"eval.clients: 1.5 as a fraction must be in \(0, 1\]"):
        tiny_cfg("eval.clients=1.5")
    assert eval_clients(tiny_cfg()) == [0, 1, 2]  # default: every client
    cfg = tiny_cfg("clients.num=3", "eval.clients=0.5")
    picked = eval_clients(cfg)
    assert len(picked) == 2 and picked == eval_clients(cfg) and set(picked) <= {0, 1, 2}


def test_per_client_summaries_leave_out_clients_below_eval_client_min_rows(tiny_cfg):
    """Users as clients: a client with 2 test rows scores AUC 0 or 1 by chance; with
    eval.client_min_rows it no longer sets the worst client, and its rows still count in the pool."""
    import numpy as np

    from fedsim.simulation import eval_metrics

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    big = {"client": 0, "labels": y, "probs": np.clip(0.5 + 0.3 * (y - 0.5) + 0.2 * rng.standard_normal(20), 0, 1)}
    tiny = {"client": 1, "labels": np.array([0, 1]), "probs": np.array([0.9, 0.1])}  # AUC 0 by chance
    every = eval_metrics([big, tiny], 2, min_rows=1)
    big_only = eval_metrics([big, tiny], 2, min_rows=10)
    assert every["auc_min"] == 0.0 and every["auc_gap"] == every["client/0/auc"]
    assert big_only["auc_min"] == big_only["auc_max"] == big_only["client/0/auc"] > 0.7
    assert big_only["auc_q25"] == big_only["auc_q75"] == big_only["client/0/auc"] and every["auc_q25"] < 0.5
    assert big_only["auc_gap"] == 0.0 and big_only["client/1/auc"] == 0.0  # still logged
    assert big_only["auc"] == every["auc"] and big_only["rows"] == 22  # the pooled AUC keeps every row
    with pytest.raises(ConfigError, match=r"eval.client_min_rows: 0 must be >= 1"):
        tiny_cfg("eval.client_min_rows=0")


def test_clients_without_test_rows_train_and_only_clients_with_rows_are_scored(ray_local, tiny_cfg):
    # Users as clients under a split by time: most users have no later rows. 6 test rows over 12
    # clients of 5 users each: at least 6 clients have none. They train; evaluations skip them.
    cfg = tiny_cfg("clients.num=12", "executors.num=2", "data.max_eval_rows=6", "train.rounds=1",
                   "train.local_steps=1", "tracking.enabled=false")
    lines = []
    summary = run(cfg, log=lines.append)
    stats = pd.read_csv(Path(summary["run_dir"]) / "partition.csv")
    scored = stats.loc[stats["test"] > 0, "client"].tolist()
    assert summary["complete"] and 0 < len(scored) <= 6 and stats["test"].sum() == 6
    assert f"{12 - len(scored)} of 12 clients have no test rows: they train, and evaluations score the other {len(scored)}" in lines
    last = load_checkpoint(Path(summary["run_dir"]))["history"][-1]
    assert all(f"client/{c}/train_loss" in last for c in range(12))  # every client trained
    assert last["clients_evaluated"] == len(scored) and summary["final"]["rows"] == 6
    assert sorted(int(c) for c in summary["clients_final"]) == scored
