"""The client side's seams: the parameter layout, per-row weights over stacked adapters, the
registries and capabilities, the one step loop, `Simulation.train_round` on any set of clients,
and forgetting clients in the client store and PPLR's tables."""
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.client.trainers import ADAPTERS, TRAINERS, Trainer, adapter_class, local_loop, trainer_class
from fedsim.config import load_config
from fedsim.core.capabilities import Capable, conflicts
from fedsim.core.store import ClientStore
from fedsim.models.layout import Layout
from fedsim.models.lora import MODE_ROLES, attach_lora, trainable
from fedsim.models.routing import Route, StackedLoRALinear
from fedsim.server.table import DiskTable, MemoryTable


def tiny(*overrides):
    return load_config("configs/tiny.yaml", ["tracking.enabled=false", *overrides])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fedsim.models.loader import build_tiny_random, load_base

    path = str(build_tiny_random(tmp_path_factory.mktemp("tiny") / "model", ["Yes No a b c"]))

    def make():
        base, _ = load_base(path, "float32")
        return attach_lora(base, tiny().model.lora, 0)
    return make


# ---------------------------------------------------------------------------------------------
# The parameter layout


@pytest.mark.parametrize("mode", ["separate", "ffa", "fedsa", "stack"])
def test_the_layout_says_what_trains_and_keeps_the_flat_vector_order(tiny_model, mode):
    model = tiny_model()
    layout = Layout.of(model, MODE_ROLES[mode])
    # The trained parameters are exactly the model's trainable ones, in parameter order.
    assert [id(p) for p in layout.trainable] == [id(p) for p in trainable(model)]
    roles = {part: {b.role for b in layout.blocks if b.part == part} for part in ("A", "B")}
    assert roles == {part: {MODE_ROLES[mode][part]} for part in ("A", "B")}
    for site in layout.sites:  # the groups come from the module structure: A is r x d_in, B d_out x r
        a, b = [blk for blk in layout.blocks if blk.module == site.name]
        assert (a.part, b.part) == ("A", "B") and a.param.shape[0] == b.param.shape[1] == 4
    shared = layout.flat_parts("shared")
    assert sum(k for _, k, _ in shared) == sum(p.numel() for p in layout.params("shared"))


def test_a_layout_with_roles_by_layer(tiny_model):
    model = tiny_model()
    layout = Layout.of(model, MODE_ROLES["separate"])
    first = layout.sites[0].name
    split = layout.with_roles(lambda b: "local" if b.module == first else b.role)
    assert len(split.params("local")) == 2 and len(split.params("shared")) == len(layout.blocks) - 2
    offsets = split.offsets("shared")
    assert sorted(offsets.values())[0] == 0


# ---------------------------------------------------------------------------------------------
# Per-row weights over stacked adapters


def _stacked(C=3, d_in=6, d_out=5, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g))
    A, B = torch.randn(C, r, d_in, generator=g), torch.randn(C, d_out, r, generator=g)
    route = Route(C, torch.device("cpu"))
    return StackedLoRALinear(base, A, B, 0.5, 0.0, route), route, torch.randn(7, 4, d_in, generator=g)


@pytest.mark.parametrize("counts", [[2, 2, 3], [0, 7, 0], [3, 0, 4], [7, 0, 0]])
def test_one_hot_weights_route_exactly_as_per_client_counts(counts):
    layer, route, x = _stacked()
    route.set(counts)
    want = layer(x)
    span, idx = route.span, route.idx.clone()
    w = torch.zeros(7, 3)
    w[torch.arange(7), torch.repeat_interleave(torch.arange(3), torch.tensor(counts))] = 1.0
    route.set_weights(w)
    assert route.span == span and torch.equal(route.idx, idx) and route.weights is None
    assert torch.equal(layer(x), want)


def test_one_hot_weights_in_any_row_order_use_each_rows_own_adapter():
    layer, route, x = _stacked()
    slots = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    route.set_weights(torch.nn.functional.one_hot(slots, 3).float())
    got = layer(x)
    for i, c in enumerate(slots.tolist()):
        want = layer.base(x[i]) + 0.5 * x[i] @ layer.A[c].T @ layer.B[c].T
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


def test_mixed_weights_mix_the_adapters_per_row_as_by_hand():
    layer, route, x = _stacked()
    w = torch.rand(7, 3, generator=torch.Generator().manual_seed(1))
    route.set_weights(w)
    got = layer(x)
    for i in range(7):
        delta_w = sum(w[i, c] * layer.B[c] @ layer.A[c] for c in range(3))  # d_out x d_in
        want = x[i] @ layer.base.weight.T + 0.5 * x[i] @ delta_w.T
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_route_rejects_weights_of_the_wrong_shape():
    _, route, _ = _stacked()
    with pytest.raises(ValueError, match="3 slots"):
        route.set_weights(torch.ones(7, 2))


# ---------------------------------------------------------------------------------------------
# Registries, capabilities, the step loop


def test_each_mode_is_an_implementation_chosen_from_the_config():
    assert {m: adapter_class(tiny(f"strategy.lora_mode={m}")).name for m in ADAPTERS} == \
           {"separate": "separate", "ffa": "ffa", "fedsa": "fedsa", "stack": "stack"}
    assert adapter_class(tiny("storage.mode=split", "storage.client_layers=1", "model.tiny_layers=3")).name == "split"
    assert trainer_class(tiny()).name == "plain"
    assert trainer_class(tiny("privacy.sample_dp.enabled=true", "privacy.sample_dp.noise_multiplier=1")).name == "sample_dp"
    assert set(TRAINERS) == {"plain", "sample_dp", "fused"}
    with pytest.raises(KeyError, match="strategy.lora_mode: 'sum' is not one of"):
        ADAPTERS["sum"]


def test_a_component_that_breaks_what_another_needs_is_a_conflict_that_names_a_key():
    class Needs(Capable):
        needs = {"x": "needs x, which {key} {value!r} breaks"}

    class Breaks(Capable):
        breaks = {"x": None}

    class BreaksAndSays(Capable):
        breaks = {"x": "cannot be combined with {key}"}

    assert conflicts([("a", 1, Needs)]) == []
    assert conflicts([("a", 1, Needs), ("b", "v", Breaks)]) == ["a: 1 needs x, which b 'v' breaks"]
    assert conflicts([("a", 1, Needs), ("c", True, BreaksAndSays)]) == ["c: True cannot be combined with a"]


def test_every_declared_conflict_is_between_real_tags():
    """A need nobody can break, or a break nobody needs, is a typo in a declaration."""
    from fedsim.client.compiled import Compiled
    from fedsim.config import PRIVACY
    from fedsim.client.trainers import STORAGE
    from fedsim.server.strategy import STRATEGIES

    from fedsim.client.trainers.personal import Personal, SharedRouter

    classes = [*ADAPTERS.classes.values(), *STORAGE.classes.values(), *TRAINERS.classes.values(),
               *STRATEGIES.classes.values(), Compiled, *(cls for _, cls in PRIVACY), Personal, SharedRouter]
    needed = {t for c in classes for t in c.needs}
    broken = {t for c in classes for t in c.breaks}
    assert needed == broken


class Counting(Trainer):
    """A trainer that records what the loop asks of it."""

    def __init__(self):
        self.calls = []

    def set_lr(self, run, slot, step):
        self.calls.append(("lr", slot, step))

    def next_batch(self, run):
        return np.arange(run.extra["rows"])

    def step(self, runs, batches):
        self.calls.append(("step", sorted(batches)))
        return {slot: torch.tensor(float(slot)) for slot in batches}


def test_the_step_loop_runs_each_client_its_own_number_of_steps():
    from fedsim.client.trainers import LocalRun

    runs = [LocalRun(c, 0, 1e-3, 0.0, None, None, None, None, None, steps, {}, extra={"rows": rows})
            for c, (steps, rows) in enumerate([(3, 2), (1, 5)])]
    t = Counting()
    losses = local_loop(t, runs)
    assert losses == [[0.0, 0.0, 0.0], [1.0]]
    assert [run.seen for run in runs] == [6, 5]
    assert [c for c in t.calls if c[0] == "step"] == [("step", [0, 1]), ("step", [0]), ("step", [0])]


# ---------------------------------------------------------------------------------------------
# Forgetting clients


def test_the_client_store_forgets_a_client_and_everyone(tmp_path):
    store = ClientStore(tmp_path / "s")
    for c in (0, 1, 2):
        store.save(c, 0, {"x": torch.ones(2) * c})
    store.delete(1)
    assert store.clients() == [0, 2] and store.load(1, 5) is None
    store.reset()
    assert store.clients() == [] and store.load(0, 5) is None


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_pplr_tables_forget_a_client_and_everyone(tmp_path, kind):
    table = MemoryTable() if kind == "memory" else DiskTable(tmp_path / "t")
    table.put(0, {0: torch.zeros(3), 1: torch.ones(3)})
    table.delete(0)
    assert table.clients() == [1] and table.get(0) is None and torch.equal(table.get(1), torch.ones(3))
    table.reset()
    assert table.clients() == [] and table.get(1) is None


# ---------------------------------------------------------------------------------------------
# Training a chosen set of clients


def test_train_round_trains_exactly_the_clients_it_is_given(ray_local, tmp_path):
    from fedsim.prepare import prepare
    from fedsim.simulation import Simulation

    cfg = tiny(f"output_dir={tmp_path / 'runs'}")
    sim = Simulation(cfg, log=lambda *a: None)
    info = prepare(sim.cfg, sim.run_dir, lambda *a: None)
    sim._start_actors(info["model_path"])
    try:
        metrics, dropped = sim.train_round(0, [2, 0])
    finally:
        sim._stop_actors()
    assert dropped == [] and metrics["clients_sampled"] == metrics["clients_reported"] == 2.0
    assert {k.split("/")[1] for k in metrics if k.startswith("client/")} == {"0", "2"}
    assert ClientStore(Path(sim.run_dir) / "client_state").clients() == [0, 2]
