"""strategy.lora_mode: how LoRA factors are shared. Exactness of ffa and stack against the weighted
mean of the clients' own products B_k A_k, the inexactness of averaging factors apart (separate),
fedsa's local B, config errors, and one whole run per mode on a real local Ray.

The executor tests build `ClientExecutor` in this process (no Ray) on the tiny random Llama with
real peft LoRA layers, and train real clients on a prepared tiny run directory.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsim.config import ConfigError, load_config
from fedsim.models.lora import (LoraModule, get_flat, lora_part, set_flat, split_dense, stack_factors,
                                stacked_delta_w)
from fedsim.server.aggregator import Aggregator, wire_bytes
from fedsim.server.flora import StackedLoRA
from fedsim.server.strategy import FedAvg, Update, make_strategy
from fedsim.simulation import load_checkpoint, run

QUIET = dict(log=lambda *a: None)
WEIGHTS = [1.0, 2.0, 5.0]  # uneven aggregation weights, so p_k matters


def tiny(*overrides):
    return load_config("configs/tiny.yaml", ["tracking.enabled=false", *overrides])


@pytest.fixture(scope="module")
def prepared(prepare_run):
    return prepare_run("lora_modes", tiny())


@pytest.fixture
def executor(prepared, tmp_path):
    """A fresh executor in `mode`; a test's executors share one client store (one copy of the prepared
    run), so one can read what another saved."""
    return lambda mode, executor_id=0: prepared.executor(tmp_path / "run", tiny(f"strategy.lora_mode={mode}"),
                                                         executor_id)


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]


@torch.no_grad()
def peft_delta_w(model) -> dict[str, torch.Tensor]:
    """delta_W = scaling * B @ A read off the peft modules themselves (float64)."""
    return {n: m.scaling["default"] * m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double()
            for n, m in lora_layers(model)}


def weighted(dws: list[dict], weights) -> dict[str, torch.Tensor]:
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return {k: sum(pk * dw[k] for pk, dw in zip(p, dws)) for k in dws[0]}


def train_round(ex, strategy, round, clients=(0, 1, 2), weights=WEIGHTS):
    updates = []
    for c, w in zip(clients, weights):
        meta, delta = ex.train(c, round, strategy.params_for(c), 5e-3, list(clients))
        updates.append(Update(c, delta, meta["num_samples"], w, meta))
    return updates


def max_gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------
# separate: averaging the factors apart is inexact


def test_averaging_factors_apart_is_not_the_mean_of_products_counterexample():
    # One rank-1 module, 1 x 1, flat vector [A, B]. Client 1: A = B = 1 (B A = 1); client 2:
    # A = B = -1 (B A = 1). The mean of the products is 1; FedAvg of the factors (separate) gives
    # A = B = 0, so B A = 0; stacking gives 1.
    m = LoraModule("m", "m.weight", a=0, b=1, r=1, d_in=1, d_out=1, scaling=1.0)
    clients = [torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0])]
    s = FedAvg()
    s.initialize(torch.zeros(2), 2)
    s.aggregate(0, [Update(c, v, 1, 1.0) for c, v in enumerate(clients)])
    A, B = m.factors(s.params_for(0))
    assert (B @ A).item() == 0.0
    mean_of_products = sum(B @ A for A, B in map(m.factors, clients)) / 2
    assert mean_of_products.item() == 1.0
    assert stacked_delta_w(clients, [1.0, 1.0], [m]).item() == 1.0


def aggregate_gap(ex, s, updates) -> float:
    """Largest difference between the aggregated adapter's ΔW and the weighted mean of the
    clients' own ΔW = B_k A_k."""
    own = []
    for u in updates:
        set_flat(ex.shared, s.params_for(u.client) + u.delta)
        own.append(peft_delta_w(ex.model))
    s.aggregate(0, updates)
    set_flat(ex.shared, s.params_for(0))
    return max_gap(peft_delta_w(ex.model), weighted(own, WEIGHTS))


def test_separate_fedavg_of_trained_factors_misses_the_mean_product(executor):
    ex = executor("separate")
    s = FedAvg()
    s.initialize(ex.initial_params(), 3)
    updates = train_round(ex, s, 0)
    gap = aggregate_gap(ex, s, updates)
    assert gap > 1e-5, gap  # well above float32 rounding: the cross terms of A and B are lost


# ---------------------------------------------------------------------------------------------
# ffa: A frozen at the shared init, B averaged, exact


def test_ffa_freezes_a_uploads_only_b_and_aggregates_exactly(executor):
    ex = executor("ffa")
    a_init = {n: m.lora_A["default"].weight.detach().clone() for n, m in lora_layers(ex.model)}
    # The shared seed gives every executor the same A: a separate-mode executor starts from it too.
    other = executor("separate", executor_id=1)
    assert all(torch.equal(a_init[n], m.lora_A["default"].weight) for n, m in lora_layers(other.model))

    n_b = sum(m.lora_B["default"].weight.numel() for _, m in lora_layers(ex.model))
    assert all(lora_part(n) == "lora_B" for n, p in ex.model.named_parameters() if p.requires_grad)
    assert ex.initial_params().numel() == n_b and ex.ready()["lora_params"] == n_b

    s = FedAvg()
    s.initialize(ex.initial_params(), 3)
    updates = train_round(ex, s, 0)
    assert all(u.delta.numel() == n_b and u.delta.abs().max() > 0 for u in updates)
    # Training moved B only.
    assert all(torch.equal(a_init[n], m.lora_A["default"].weight) for n, m in lora_layers(ex.model))

    assert aggregate_gap(ex, s, updates) < 1e-6


# ---------------------------------------------------------------------------------------------
# fedsa: A shared, each client's B local


def test_fedsa_uploads_only_a_and_keeps_each_clients_b(executor):
    ex = executor("fedsa")
    names = [n for n, p in ex.model.named_parameters() if p.requires_grad]
    n_a = sum(p.numel() for n, p in ex.model.named_parameters() if lora_part(n) == "lora_A")
    assert ex.initial_params().numel() == n_a and ex.ready()["lora_params"] == n_a
    assert {lora_part(n) for n in names} == {"lora_A", "lora_B"}  # both trained

    s = FedAvg()
    s.initialize(ex.initial_params(), 3)
    updates = train_round(ex, s, 0, clients=(0, 1), weights=(1.0, 1.0))
    assert all(u.delta.numel() == n_a for u in updates)
    b0, b1 = (ex.store.latest(c)["local"] for c in (0, 1))
    assert b0.abs().max() > 0 and b1.abs().max() > 0 and not torch.allclose(b0, b1)
    assert ex.store.latest(2) is None  # client 2 never trained
    s.aggregate(0, updates)

    # Round 2, client 0 only, with a negligible learning rate: it ends where its own round-1 B was,
    # so it started from its own B (not from B = 0, nor from client 1's).
    ex.train(0, 1, s.params_for(0), 1e-12, [0])
    b0_r2 = ex.store.latest(0)["local"]
    assert torch.equal(ex.store.load(0, 1)["local"], b0)  # what round 2 (index 1) started from
    assert torch.allclose(b0_r2, b0, atol=1e-8) and not torch.allclose(b0_r2, b1)

    # Evaluation: global A with the client's own B (B = 0 for a client that never trained).
    a = s.params_for(0)
    for c, want in ((0, b0_r2), (1, b1), (2, torch.zeros_like(b0))):
        out = ex.evaluate(c, a, "test")
        assert len(out["probs"]) > 0
        assert torch.equal(get_flat(ex.shared), a) and torch.allclose(get_flat(ex.local), want)


def test_fedsa_export_is_global_a_with_the_mean_of_the_clients_b(executor):
    ex = executor("fedsa")
    s = FedAvg()
    s.initialize(ex.initial_params(), 3)
    s.aggregate(0, train_round(ex, s, 0, clients=(0, 1), weights=(1.0, 1.0)))
    state, cfg = ex.export(s.global_params())
    bs = torch.stack([ex.store.latest(c)["local"] for c in (0, 1)]).mean(0)
    got_b = torch.cat([v.reshape(-1) for k, v in state.items() if "lora_B" in k])
    got_a = torch.cat([v.reshape(-1) for k, v in state.items() if "lora_A" in k])
    assert torch.allclose(got_b, bs) and torch.allclose(got_a, s.global_params())
    assert cfg["r"] == 4


# ---------------------------------------------------------------------------------------------
# stack: exact stacking, merged into the base


def test_stacked_factors_multiply_to_the_weighted_mean_of_products():
    torch.manual_seed(0)
    # Two modules in one flat vector: (r=3, d_in=5, d_out=4) and (r=3, d_in=5, d_out=2).
    m1 = LoraModule("m1", "m1.weight", a=0, b=15, r=3, d_in=5, d_out=4, scaling=2.0)
    m2 = LoraModule("m2", "m2.weight", a=27, b=42, r=3, d_in=5, d_out=2, scaling=2.0)
    flats = [torch.randn(48) for _ in range(3)]
    w = [1.0, 2.0, 5.0]
    want = []
    for m in (m1, m2):
        products = [B.double() @ A.double() for A, B in map(m.factors, flats)]
        want.append(m.scaling * sum(wk / sum(w) * P for wk, P in zip(w, products)))
    for m, (As, Bs), W in zip((m1, m2), stack_factors(flats, w, [m1, m2]), want):
        assert As.shape == (9, 5) and Bs.shape == (m.d_out, 9)  # rank K r
        assert torch.allclose(m.scaling * Bs @ As, W, atol=1e-12)
    dense = split_dense(stacked_delta_w(flats, w, [m1, m2]), [m1, m2])
    assert [d.shape for d in dense] == [(4, 5), (2, 5)]
    assert all(torch.allclose(d, W, atol=1e-12) for d, W in zip(dense, want))


def test_stack_merges_exactly_the_weighted_sum_of_client_products_into_the_base(executor):
    ex = executor("stack")
    init = ex.initial_params()
    assert set(init) == {"init", "modules"} and len(init["modules"]) == 4  # q, v in 2 layers
    s = make_strategy(tiny("strategy.lora_mode=stack"))
    assert isinstance(s, StackedLoRA)
    s.initialize(init, 3)
    w0 = {m.name: ex.model.get_submodule(m.name).base_layer.weight.detach().double().clone() for m in ex.modules}

    def merged_change():
        return {m.name: ex.model.get_submodule(m.name).base_layer.weight.detach().double() - w0[m.name]
                for m in ex.modules}

    total = None
    for round in range(2):
        updates = train_round(ex, s, round)
        assert all(u.delta.numel() == init["init"].numel() for u in updates)
        own = []
        for u in updates:  # each client trained a fresh LoRA: its factors are init + delta
            set_flat(ex.params, init["init"] + u.delta)
            own.append(peft_delta_w(ex.model))
        mean = weighted(own, WEIGHTS)
        total = mean if total is None else {k: total[k] + mean[k] for k in mean}
        metrics = s.aggregate(round, updates)
        assert metrics["lora/stack_rank"] == 3 * 4
        payload = s.params_for(0)
        assert payload["version"] == round + 1
        ex.evaluate(0, payload, "test")  # merges this version into the base
        assert max_gap(merged_change(), total) < 1e-6
        # The LoRA itself is back at the fresh init (B = 0) for evaluation.
        assert all(m.lora_B["default"].weight.abs().max() == 0 for _, m in lora_layers(ex.model))
        # Once per version: a second client on the same executor does not merge again.
        ex.evaluate(1, payload, "test")
        assert max_gap(merged_change(), total) < 1e-6

    # A new executor (version 0: restarted, or another in the pool) catches up in one merge and
    # scores the same.
    fresh = executor("stack", executor_id=1)
    a = ex.evaluate(2, s.params_for(2), "test")["probs"]
    b = fresh.evaluate(2, s.params_for(2), "test")["probs"]
    assert fresh.merged_version == 2 and torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)

    # The strategy's state round-trips (checkpoint / resume).
    again = StackedLoRA()
    again.load_state_dict(s.state_dict())
    assert again.version == 2 and torch.equal(again.params_for(0)["delta_w"], s.params_for(0)["delta_w"])

    # The export: the accumulated dense update per target module, keyed by the base weight's name.
    state, cfg = ex.export(s.global_params())
    assert cfg["fedsim_format"] == "dense_delta_weight" and cfg["merged_rounds"] == 2
    for m in ex.modules:
        assert state[m.weight].shape == (m.d_out, m.d_in)
        assert torch.allclose(state[m.weight].double(), total[m.name], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Traffic counting and config


def test_wire_bytes_and_upload_params_follow_what_is_sent():
    assert wire_bytes(torch.zeros(10)) == 40
    assert wire_bytes({"version": 3, "delta_w": torch.zeros(6)}) == 24
    agg = Aggregator(tiny(), torch.zeros(5))
    metas = [{"client": c, "num_samples": 1, "weight": 1.0} for c in (0, 1)]
    m = agg.aggregate(0, [0, 1], metas, torch.ones(5), torch.ones(5))
    assert m["bytes_up"] == 2 * 5 * 4 and m["lora/upload_params"] == 5


@pytest.mark.parametrize("overrides,message", [
    (["strategy.lora_mode=fedsa", "strategy.name=pplr"], r"strategy.lora_mode: 'fedsa' needs strategy.name 'fedavg'"),
    (["strategy.lora_mode=stack", "strategy.name=pplr"], r"strategy.lora_mode: 'stack' needs strategy.name 'fedavg'"),
    (["strategy.lora_mode=stack", "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1",
      "privacy.client_dp.delta=1e-3"], r"strategy.lora_mode: 'stack' cannot be combined with privacy.client_dp"),
    (["strategy.lora_mode=ffa", "privacy.dp_lora.enabled=true"],
     r"strategy.lora_mode: 'ffa' cannot be combined with privacy.dp_lora"),
    (["strategy.lora_mode=fedsa", "privacy.dp_lora.enabled=true"], r"strategy.lora_mode: 'fedsa' cannot be combined"),
    (["strategy.lora_mode=sum"], r"strategy.lora_mode: 'sum' is not one of 'separate', 'ffa', 'fedsa', 'stack'"),
])
def test_lora_mode_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_lora_mode_compatible_combinations_load():
    assert tiny().strategy.lora_mode == "separate"
    tiny("strategy.lora_mode=ffa", "strategy.name=pplr")
    tiny("strategy.lora_mode=ffa", "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1",
         "privacy.client_dp.delta=1e-3")
    tiny("strategy.lora_mode=fedsa", "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1",
         "privacy.client_dp.delta=1e-3")
    tiny("strategy.lora_mode=stack", "privacy.dp_lora.enabled=true")


# ---------------------------------------------------------------------------------------------
# Whole runs on a real local Ray


@pytest.fixture(scope="module")
def mode_runs(ray_local, tmp_path_factory):
    """One two-round, three-client tiny run per mode, run once and shared by the tests below."""
    out = tmp_path_factory.mktemp("mode_runs")
    done = {}

    def get(mode):
        if mode not in done:
            cfg = tiny(f"output_dir={out}", f"strategy.lora_mode={mode}", f"name={mode}")
            summary = run(cfg, **QUIET)
            done[mode] = (summary, load_checkpoint(Path(summary["run_dir"]))["history"])
        return done[mode]
    return get


# Per client on the tiny model (2 layers; q_proj 64 -> 64, v_proj 64 -> 32; r = 4):
# A: 4 x 64 per module; B: 64 x 4 (q) and 32 x 4 (v); dense: 64 x 64 (q) and 32 x 64 (v).
UPLOAD = {"separate": 1792, "ffa": 768, "fedsa": 1024, "stack": 1792}
DOWN = {"separate": 1792, "ffa": 768, "fedsa": 1024, "stack": 12288}


@pytest.mark.parametrize("mode", ["separate", "ffa", "fedsa", "stack"])
def test_each_mode_runs_end_to_end_and_logs_its_traffic(mode_runs, mode):
    summary, history = mode_runs(mode)
    assert summary["complete"] and summary["rounds_done"] == 2 and summary["lora_params"] == UPLOAD[mode]
    assert len(summary["clients_final"]) == 3 and 0 <= summary["final"]["auc"] <= 1
    for h in history:
        assert h["lora/upload_params"] == UPLOAD[mode]
        assert h["bytes_up"] == 3 * UPLOAD[mode] * 4
        assert h["bytes_down"] == 3 * DOWN[mode] * 4
    adapter = load_file(Path(summary["run_dir"]) / "adapter" / "adapter_model.safetensors")
    if mode == "stack":
        assert history[-1]["lora/stack_rank"] == 12
        assert set(adapter) == {f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")}
        assert adapter["model.layers.0.self_attn.v_proj.weight"].shape == (32, 64)
        assert max(v.abs().max().item() for v in adapter.values()) > 0
    else:
        assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0


def test_ffa_uploads_fewer_bytes_than_separate(mode_runs):
    sep = [h["bytes_up"] for h in mode_runs("separate")[1]]
    ffa = [h["bytes_up"] for h in mode_runs("ffa")[1]]
    assert len(ffa) == len(sep) == 2 and all(f < s for f, s in zip(ffa, sep))
    assert mode_runs("ffa")[0]["bytes_up"] < mode_runs("separate")[0]["bytes_up"]  # the run totals


@pytest.mark.parametrize("mode", ["fedsa", "stack"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(mode_runs, tmp_path, mode):
    """The state these modes add (fedsa: each client's B in its store; stack: the merged update and
    its version in the checkpoint, re-merged by fresh executors) survives an interruption. The
    uninterrupted run is the mode's shared one (mode_runs), stopped here after its first round."""
    from fedsim.simulation import Simulation

    full = mode_runs(mode)[0]
    cfg = tiny(f"output_dir={tmp_path}", f"strategy.lora_mode={mode}", f"name={mode}")
    sim = Simulation(cfg, **QUIET)
    assert not sim.run(stop_after=1)["complete"]
    resumed = run(run_dir=sim.run_dir, **QUIET)
    assert resumed["complete"]
    for key in ("auc", "logloss"):
        assert resumed["final"][key] == pytest.approx(full["final"][key], abs=1e-6), key
    a = load_file(Path(full["run_dir"]) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(resumed["run_dir"]) / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
