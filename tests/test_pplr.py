"""PPLR dynamic-balance aggregation and its learning-speed rule: the formula by hand, order
independence, numerics, checkpoints, config errors, and a whole run on Ray."""
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedsim.config import ConfigError, load_config
from fedsim.server.pplr import PPLR
from fedsim.server.strategy import STRATEGIES, Update, make_strategy


def updates_for(deltas, losses, clients=None):
    clients = range(len(deltas)) if clients is None else clients
    return [Update(c, d, 10, 10.0, {"client": c, "loss": l}) for c, d, l in zip(clients, deltas, losses)]


def expected_pplr(thetas, losses, t, alpha, beta, temperature):
    """The formula with plain loops, straight from the design."""
    n = len(thetas)
    th = [np.asarray(x, dtype=np.float64) for x in thetas]
    s = np.ones((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                cos = th[i] @ th[j] / (np.linalg.norm(th[i]) * np.linalg.norm(th[j]))
                s[i, j] = (cos + 1) / 2
    e = [math.exp(l / temperature) for l in losses]
    p = [x / sum(e) for x in e]
    w = [math.tanh(alpha / p[i] ** (t + 1 / beta)) for i in range(n)]
    out = []
    for i in range(n):
        num, den = th[i].copy(), 1.0
        for j in range(n):
            if j != i:
                num += w[i] * s[i, j] * th[j]
                den += w[i] * s[i, j]
        out.append(num / den)
    return out, w, s


def test_pplr_is_registered_and_built_from_config():
    assert STRATEGIES["pplr"] is PPLR
    s = make_strategy(load_config("configs/tiny.yaml", ["strategy.name=pplr", "strategy.pplr.alpha=0.3",
                                                        "strategy.pplr.lr_rule=none"]))
    assert isinstance(s, PPLR) and s.alpha == 0.3 and s.lr_rule == "none" and s.temperature == 0.05
    assert load_config("configs/tiny.yaml").strategy.name == "fedavg"  # still the default


def test_three_clients_match_the_hand_computed_formula():
    torch.manual_seed(0)
    g = torch.randn(6)
    deltas = [torch.randn(6) * 0.5 for _ in range(3)]
    losses = [0.70, 0.62, 0.66]
    s = PPLR(alpha=0.7, beta=2.0, temperature=0.05)
    s.initialize(g, 4)
    t = 1
    m = s.aggregate(t, updates_for(deltas, losses))
    want, w, sim = expected_pplr([(g.double() + d.double()).numpy() for d in deltas], losses, t, 0.7, 2.0, 0.05)
    for i in range(3):
        assert np.allclose(s.params_for(i).numpy(), want[i], atol=1e-6)
        assert m[f"client/{i}/w"] == pytest.approx(w[i], rel=1e-12)
    off = [sim[i, j] for i in range(3) for j in range(3) if i != j]
    assert m["pplr/sim_mean"] == pytest.approx(np.mean(off), rel=1e-12)
    assert np.allclose(s.last_sim, sim, atol=1e-12) and s.last_sim_clients == [0, 1, 2]
    # Client 3 did not report: it still has the shared initial adapter; the export is the mean.
    assert torch.equal(s.params_for(3), g)
    assert torch.allclose(s.global_params(), (g + sum(torch.from_numpy(x).float() for x in want)) / 4, atol=1e-6)
    # The personalised adapters differ from each other.
    assert not torch.allclose(s.params_for(0), s.params_for(1), atol=1e-4)


def test_similarity_on_update_tells_apart_clients_that_a_shared_init_makes_look_alike():
    # A large shared init and opposite updates: cos over adapters ~1, over updates exactly -1.
    g = torch.full((6,), 10.0)
    d = torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    on_adapter, on_update = PPLR(), PPLR(similarity_on="update")
    for s in (on_adapter, on_update):
        s.initialize(g, 2)
        s.aggregate(0, updates_for([d, -d], [0.6, 0.6]))
    assert on_adapter.last_sim[0, 1] > 0.99
    assert on_update.last_sim[0, 1] == pytest.approx(0.0, abs=1e-12)
    # s_01 = 0: nothing to pull towards, each client keeps its own adapter.
    assert torch.allclose(on_update.params_for(0), g + d) and torch.allclose(on_update.params_for(1), g - d)
    # The formula otherwise unchanged: the hand computation on the updates' similarity.
    want, _, _ = expected_pplr([(g + d).double().numpy(), (g - d).double().numpy()], [0.6, 0.6], 0, 0.7, 1.0, 0.05)
    assert not np.allclose(on_adapter.params_for(0).numpy(), (g + d).numpy())
    assert np.allclose(on_adapter.params_for(0).numpy(), want[0], atol=1e-5)
    assert make_strategy(load_config("configs/tiny.yaml", ["strategy.name=pplr",
                                                           "strategy.pplr.similarity_on=update"])).similarity_on == "update"


def test_similarity_on_round_compares_this_rounds_updates_where_the_cumulative_ones_agree():
    # Round 0 moves both clients far the same way; in round 1 they move apart. Since the init, their
    # updates still agree (cos ~1); this round's updates are opposite (s = 0).
    g = torch.zeros(4)
    common, d = torch.tensor([10.0, 10.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, -1.0])
    on_update, on_round = PPLR(similarity_on="update"), PPLR(similarity_on="round")
    for s in (on_update, on_round):
        s.initialize(g, 2)
        s.aggregate(0, updates_for([common, common], [0.6, 0.6]))
        before = [s.params_for(c).clone() for c in (0, 1)]
        s.aggregate(1, updates_for([d, -d], [0.6, 0.6]))
    assert on_update.last_sim[0, 1] > 0.99
    assert on_round.last_sim[0, 1] == pytest.approx(0.0, abs=1e-12)
    # Nothing to pull towards: each client keeps its own adapter after this round.
    assert torch.allclose(on_round.params_for(0), before[0] + d) and torch.allclose(on_round.params_for(1), before[1] - d)
    with pytest.raises(ValueError, match="similarity_on 'rounds' is not one of 'adapter', 'update', 'round'"):
        PPLR(similarity_on="rounds")
    assert make_strategy(load_config("configs/tiny.yaml", ["strategy.name=pplr",
                                                           "strategy.pplr.similarity_on=round"])).similarity_on == "round"


def test_non_reporting_clients_keep_their_last_adapter_and_deltas_are_from_their_own_params():
    torch.manual_seed(1)
    g = torch.randn(5)
    s = PPLR()
    s.initialize(g, 3)
    d0 = [torch.randn(5) for _ in range(3)]
    s.aggregate(0, updates_for(d0, [0.7, 0.6, 0.65]))
    before = {c: s.params_for(c).clone() for c in range(3)}
    d1 = [torch.randn(5) for _ in range(2)]
    s.aggregate(1, updates_for(d1, [0.5, 0.55], clients=[0, 2]))
    assert torch.equal(s.params_for(1), before[1])
    thetas = [(before[0].double() + d1[0].double()).numpy(), (before[2].double() + d1[1].double()).numpy()]
    want, _, _ = expected_pplr(thetas, [0.5, 0.55], 1, 0.7, 1.0, 0.05)
    assert np.allclose(s.params_for(0).numpy(), want[0], atol=1e-6)
    assert np.allclose(s.params_for(2).numpy(), want[1], atol=1e-6)


def test_finish_is_applied_to_each_clients_step():
    torch.manual_seed(2)
    g = torch.randn(8)
    deltas = [torch.randn(8) for _ in range(3)]
    plain, halved = PPLR(), PPLR()
    plain.initialize(g, 3)
    halved.initialize(g, 3)
    plain.aggregate(0, updates_for(deltas, [0.6, 0.7, 0.8]))
    calls = []

    def finish(step):
        calls.append(step.clone())
        return step * 0.5, {"noise_std": float(len(calls))}

    m = halved.aggregate(0, updates_for(deltas, [0.6, 0.7, 0.8]), finish)
    assert len(calls) == 3 and m["noise_std"] == 3.0  # the last call's metrics
    for c in range(3):
        assert torch.allclose(halved.params_for(c), g + 0.5 * (plain.params_for(c) - g), atol=1e-6)


def test_the_order_of_updates_changes_nothing():
    torch.manual_seed(3)
    g = torch.randn(200)
    deltas = [torch.randn(200) for _ in range(5)]
    losses = [0.71, 0.64, 0.69, 0.58, 0.66]
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 4, 1, 0, 2]):
        s = PPLR()
        s.initialize(g, 5)
        ups = updates_for(deltas, losses)
        metrics = [s.aggregate(r, [ups[i] for i in order]) for r in range(2)]
        results.append((s, metrics))
    ref, ref_metrics = results[0]
    for s, metrics in results[1:]:
        for c in range(5):
            assert torch.equal(s.params_for(c), ref.params_for(c))
        assert metrics == ref_metrics
        assert np.array_equal(s.last_sim, ref.last_sim) and s.last_sim_clients == ref.last_sim_clients


def test_balance_heats_up_over_rounds_and_more_slowly_for_the_lagging_client():
    torch.manual_seed(4)
    g = torch.randn(50)
    s = PPLR(alpha=0.7, beta=1.0, temperature=0.05)
    s.initialize(g, 3)
    losses = [0.60, 0.62, 0.64]  # client 2 lags
    ws = []
    for r in range(4):
        m = s.aggregate(r, updates_for([torch.randn(50) * 0.1 for _ in range(3)], losses))
        ws.append([m[f"client/{c}/w"] for c in range(3)])
    ws = np.array(ws)
    assert np.all(np.diff(ws, axis=0) >= 0) and np.all(np.diff(ws[:, 2]) > 0)  # heats up
    assert np.all(ws[:, 2] <= ws[:, 1]) and np.all(ws[:, 1] <= ws[:, 0])  # slower for higher loss
    assert ws[0, 2] < ws[0, 1] < ws[0, 0]
    assert np.all((ws > 0) & (ws <= 1))


def test_loss_gap_rule_speeds_up_lagging_clients_within_bounds():
    base = 0.01
    s = PPLR(lr_gamma=0.5, lr_min_scale=0.5, lr_max_scale=2.0)
    s.initialize(torch.ones(4), 4)
    assert all(s.client_lr(c, base) == base for c in range(4))  # no loss yet
    m = s.aggregate(0, updates_for([torch.zeros(4)] * 3, [0.9, 0.5, 0.6]))
    assert all(m[f"client/{c}/lr_scale"] == 1.0 for c in range(3))  # round 0 trained at the base lr
    lrs = [s.client_lr(c, base) for c in range(3)]
    assert lrs[0] == max(lrs) and lrs[0] > base > lrs[1] and lrs[1] < lrs[2]
    L = np.array([0.9, 0.5, 0.6])
    assert lrs == pytest.approx(list(base * np.clip(1 + 0.5 * (L - L.mean()) / (L.std() + 1e-8), 0.5, 2.0)))
    assert s.client_lr(3, base) == base  # never reported
    m = s.aggregate(1, updates_for([torch.zeros(4)] * 3, [0.9, 0.5, 0.6]))
    assert [m[f"client/{c}/lr_scale"] for c in range(3)] == pytest.approx([x / base for x in lrs])

    steep = PPLR(lr_gamma=10.0, lr_min_scale=0.5, lr_max_scale=2.0)
    steep.initialize(torch.ones(4), 4)
    steep.aggregate(0, updates_for([torch.zeros(4)] * 4, [0.9, 0.5, 0.6, 0.7]))
    scales = [steep.client_lr(c, 1.0) for c in range(4)]
    assert max(scales) == 2.0 and min(scales) == 0.5 and scales[0] == 2.0 and scales[1] == 0.5

    none = PPLR(lr_rule="none")
    none.initialize(torch.ones(4), 4)
    none.aggregate(0, updates_for([torch.zeros(4)] * 3, [0.9, 0.5, 0.6]))
    assert all(none.client_lr(c, base) == base for c in range(4))


def test_state_dict_round_trip_gives_the_same_next_round():
    torch.manual_seed(5)
    g = torch.randn(30)
    a = PPLR()
    a.initialize(g, 4)
    for r in range(2):
        a.aggregate(r, updates_for([torch.randn(30) for _ in range(3)], [0.7, 0.6, 0.65], clients=[0, 1, 3]))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as the checkpoint stores it
    buf.seek(0)
    b = PPLR()
    b.initialize(torch.zeros(30), 4)
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert [b.client_lr(c, 0.1) for c in range(4)] == [a.client_lr(c, 0.1) for c in range(4)]
    nxt = updates_for([torch.randn(30) for _ in range(4)], [0.66, 0.61, 0.7, 0.64])
    ma, mb = a.aggregate(2, nxt), b.aggregate(2, nxt)
    assert ma == mb
    for c in range(4):
        assert torch.equal(a.params_for(c), b.params_for(c))
    assert torch.equal(a.global_params(), b.global_params())
    assert np.array_equal(a.last_sim, b.last_sim)


def test_a_disk_table_gives_the_same_rounds_as_memory_and_resumes_from_its_checkpoint(tmp_path):
    torch.manual_seed(7)
    g = torch.randn(50)
    rounds = [updates_for([torch.randn(50) for _ in ids], [0.5 + 0.1 * c for c in ids], clients=ids)
              for ids in ([0, 1, 3], [1, 2, 3], [0, 4], [0, 1, 2, 3, 4])]
    mem, disk = PPLR(), PPLR(table="disk", table_dir=tmp_path / "t")
    for s in (mem, disk):
        s.initialize(g, 5)
    for r in range(2):
        assert mem.aggregate(r, rounds[r]) == disk.aggregate(r, rounds[r])
        disk.after_checkpoint(r)
    state = disk.state_dict()
    assert "theta" not in state and state["clients"] == [0, 1, 2, 3]  # no adapter in the checkpoint
    disk.aggregate(2, rounds[2])  # ... and the run dies before round 2's checkpoint
    resumed = PPLR(table="disk", table_dir=tmp_path / "t")
    resumed.initialize(g, 5)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.params_for(c), mem.params_for(c)) for c in range(5))  # round 1's, not 2's
    for r in (2, 3):
        assert mem.aggregate(r, rounds[r]) == resumed.aggregate(r, rounds[r])
        resumed.after_checkpoint(r)
    assert all(torch.equal(resumed.params_for(c), mem.params_for(c)) for c in range(5))
    assert torch.equal(resumed.global_params(), mem.global_params())
    assert torch.allclose(mem.global_params(), torch.stack([mem.params_for(c) for c in range(5)]).mean(0), atol=1e-6)
    # Once round 3's checkpoint is written, each client keeps one version on disk.
    assert [len(list((tmp_path / "t" / f"client_{c:05d}").glob("r*.pt"))) for c in range(5)] == [1] * 5


def test_table_auto_goes_to_disk_only_past_the_ram_limit(tmp_path, monkeypatch):
    import fedsim.server.pplr as pplr

    cfg = load_config("configs/tiny.yaml", ["strategy.name=pplr"])
    small = make_strategy(cfg, tmp_path)
    small.initialize(torch.zeros(100), 3)
    assert type(small.theta).__name__ == "MemoryTable"
    monkeypatch.setattr(pplr, "TABLE_RAM_LIMIT", 100 * 3 * 4 - 1)
    big = make_strategy(cfg, tmp_path)
    big.initialize(torch.zeros(100), 3)
    assert type(big.theta).__name__ == "DiskTable"
    with pytest.raises(ValueError, match="PPLR table 'disk' needs a directory"):
        PPLR(table="disk")


@pytest.mark.parametrize("losses, round, beta", [
    ([1e6, 0.0, -1e6], 0, 1.0),
    ([0.1, 100.0, 0.2], 50, 1.0),  # p of the low-loss clients underflows to 0 -> w = 1
    ([1e308, -1e308, 0.0], 3, 1e-300),  # 1/beta huge
    ([float("nan"), float("inf"), 0.5], 1, 1.0),
    ([float("-inf"), float("nan"), float("nan")], 0, 1.0),
    ([0.7, 0.7, 0.7], 10**6, 1.0),
])
def test_extreme_losses_give_finite_outputs(losses, round, beta):
    torch.manual_seed(6)
    g = torch.randn(20)
    s = PPLR(beta=beta, lr_gamma=0.5)
    s.initialize(g, 3)
    m = s.aggregate(round, updates_for([torch.randn(20) for _ in range(3)], losses))
    assert all(math.isfinite(v) for v in m.values()), m
    assert all(0 < m[f"client/{c}/w"] <= 1 for c in range(3))
    assert all(torch.isfinite(s.params_for(c)).all() for c in range(3))
    assert all(math.isfinite(s.client_lr(c, 1e-3)) and s.client_lr(c, 1e-3) > 0 for c in range(3))
    assert torch.isfinite(s.global_params()).all()


def test_artifacts_are_a_heatmap_and_a_csv(tmp_path):
    s = PPLR()
    s.initialize(torch.ones(10), 3)
    assert s.write_artifacts(tmp_path) == []  # nothing aggregated yet
    torch.manual_seed(7)
    s.aggregate(0, updates_for([torch.randn(10) for _ in range(2)], [0.6, 0.7], clients=[2, 0]))
    png, csv = s.write_artifacts(tmp_path)
    assert Path(png).name == "pplr_similarity.png" and Path(png).read_bytes()[:4] == b"\x89PNG"
    rows = Path(csv).read_text().splitlines()
    assert rows[0] == "client,0,2" and rows[1].startswith("0,1.000000,") and rows[2].endswith(",1.000000")


def test_compare_config_loads_for_both_rules():
    cfg = load_config("configs/pplr_compare.yaml")
    assert cfg.strategy.name == "fedavg" and cfg.partition.method == "kmeans" and cfg.clients.num == 5
    assert cfg.model.name == "smollm2-135m" and cfg.data.max_eval_rows == 1000 and cfg.train.rounds == 10
    pplr = load_config("configs/pplr_compare.yaml", ["strategy.name=pplr", "train.seed=2"])
    assert isinstance(make_strategy(pplr), PPLR) and pplr.train.seed == 2


@pytest.mark.parametrize("override, message", [
    ("strategy.name=fedprox", r"strategy\.name: 'fedprox' is not one of 'fedavg', 'pplr'"),
    ("strategy.pplr.alpha=0", r"strategy\.pplr\.alpha: 0\.0 must be > 0"),
    ("strategy.pplr.beta=-1", r"strategy\.pplr\.beta: -1\.0 must be > 0"),
    ("strategy.pplr.temperature=0", r"strategy\.pplr\.temperature: 0\.0 must be > 0"),
    ("strategy.pplr.lr_min_scale=0", r"strategy\.pplr\.lr_min_scale: 0\.0 must be in \(0, 1\]"),
    ("strategy.pplr.lr_min_scale=1.5", r"strategy\.pplr\.lr_min_scale: 1\.5 must be in \(0, 1\]"),
    ("strategy.pplr.lr_max_scale=0.9", r"strategy\.pplr\.lr_max_scale: 0\.9 must be >= 1"),
    ("strategy.pplr.lr_rule=fast", r"strategy\.pplr\.lr_rule: 'fast' is not one of 'none', 'loss_gap'"),
    ("strategy.pplr.alpa=1", r"unknown config key 'strategy\.pplr\.alpa' \(did you mean 'strategy\.pplr\.alpha'\?\)"),
])
def test_pplr_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_pplr_end_to_end_on_ray_with_its_table_on_disk(ray_local, tiny_cfg):
    """One run serves both: PPLR through Ray and MLflow, with its per-client table on disk (the
    memory table gives the same rounds: test_a_disk_table_gives_the_same_rounds_as_memory_...)."""
    import mlflow

    from fedsim.client.state import ClientStore
    from fedsim.simulation import load_checkpoint, run

    cfg = tiny_cfg("strategy.name=pplr", "strategy.pplr.table=disk")
    summary = run(cfg, log=lambda *a: None)
    assert summary["complete"] and summary["strategy"] == "pplr" and summary["rounds_done"] == 2
    assert set(summary["clients_final"]) == {"0", "1", "2"}
    assert all(0 <= m["auc"] <= 1 for m in summary["clients_final"].values())

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    run_id = summary["mlflow_run_id"]
    for key in ("client/0/w", "client/0/lr", "client/0/lr_scale", "client/2/w", "pplr/sim_mean"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1], key
    # Round 0 trains at the base lr; round 1 at the rate the loss-gap rule set from round 0's losses.
    lr = {c: [m.value for m in client.get_metric_history(run_id, f"client/{c}/lr")] for c in range(3)}
    scale = {c: [m.value for m in client.get_metric_history(run_id, f"client/{c}/lr_scale")] for c in range(3)}
    for c in range(3):
        assert lr[c][0] == cfg.train.lr
        assert lr[c][1] == pytest.approx(cfg.train.lr * scale[c][1])
    run_dir = Path(summary["run_dir"])
    losses = load_checkpoint(run_dir)["history"][0]
    lagging = max(range(3), key=lambda c: losses[f"client/{c}/train_loss"])
    assert lr[lagging][1] == max(lr[c][1] for c in range(3)) > cfg.train.lr
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"pplr_similarity.png", "pplr_similarity.csv", "adapter"} <= artifacts

    # The table is on disk, not in the checkpoint; each client keeps its last version only.
    state = load_checkpoint(run_dir)["strategy"]["strategy"]
    assert "theta" not in state and state["clients"] == [0, 1, 2] and state["round"] == 1
    store = ClientStore(run_dir / "strategy" / "pplr_table")
    thetas = [store.load(c, 2)["theta"] for c in range(3)]
    assert all(len(list(store.client_dir(c).glob("r*.pt"))) == 1 for c in range(3))  # pruned after the checkpoint
    # Each client ends with its own adapter; the exported one is their mean.
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.allclose(thetas[a], thetas[b]), (a, b)
    exported = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert torch.allclose(state["sum"].float() / 3, torch.stack(thetas).mean(0), atol=1e-6)
    assert sum(t.numel() for t in exported.values()) == thetas[0].numel()


def test_the_aggregator_sends_each_client_its_own_row_of_a_disk_table(ray_local, tmp_path):
    """A disk table reads each client's row anew: the broadcast's one-ref-per-tensor sharing must not
    take a freed row's reused id() for another client's (it sent client 2 client 0's adapter)."""
    from fedsim.server.aggregator import Aggregator

    cfg = load_config("configs/tiny.yaml", ["strategy.name=pplr", "strategy.pplr.table=disk", "clients.num=40"])
    agg = Aggregator(cfg, torch.zeros(16), run_dir=str(tmp_path))
    agg.strategy.theta.put(0, {c: torch.full((16,), float(c)) for c in range(30)})  # 30 rows, 10 at the start
    refs = agg.params_for(list(range(40)))
    got = {c: ray_local.get(r) for c, r in refs.items()}
    assert [float(got[c][0]) for c in range(40)] == [float(c) for c in range(30)] + [0.0] * 10
    assert len({refs[c].hex() for c in range(30, 40)}) == 1  # the untouched start: still one broadcast
