"""Fused multi-client LoRA training (executors.fused, fedsim.models.fused).

The executor tests build two `ClientExecutor`s in this process (no Ray) on the tiny random Llama
(fp32, real peft LoRA layers) over copies of one prepared run: one trains 4 clients one by one with
`train`, the other all 4 at once with `train_many`, for two rounds (the second starts from each
client's saved AdamW state). Tolerance: deltas, optimizer moments and final adapters agree to
rtol 1e-4 / atol 2e-6 (measured: at most 8e-7 apart, 3e-5 of the largest delta entry), losses to
rel 1e-5 (float32; the two differ only in summation order: one batch padded to the longest prompt
of all clients vs per client, bmm vs linear, per-client vector scalars in AdamW).
"""
from pathlib import Path

import pytest
import torch

from fedsim.config import ConfigError, load_config
from fedsim.models.fused import FusedLoRA, StackedAdamW, chunks
from fedsim.models.scoring import preference_loss
from fedsim.simulation import load_checkpoint, run

QUIET = dict(log=lambda *a: None)
CLIENTS = [0, 1, 2, 3]
LRS = [5e-3, 1e-2, 2.5e-3, 7e-3]  # per-client rates, as PPLR's learning-speed rule gives them
TOL = dict(rtol=1e-4, atol=2e-6)


def tiny(*overrides):
    return load_config("configs/tiny.yaml", ["tracking.enabled=false", "clients.num=4", "train.weight_decay=0.01",
                                             "data.max_train_per_client=null", *overrides])


@pytest.fixture(scope="module")
def prepared(prepare_run):
    return prepare_run("fused", tiny())


@pytest.fixture
def executor(prepared, tmp_path):
    """An executor over its own copy of the prepared run (its own client store, one per name)."""
    return lambda name, *overrides: prepared.executor(tmp_path / name, tiny(*overrides))


def assert_close(a, b, what, loose=False):
    """Fused and one-by-one sum the same terms in another order, so float32 rounding differs; Adam's
    m / sqrt(v) scales an entry whose true gradient is ~0 up to ~lr whichever way its rounding goes.
    So a few entries may sit outside TOL, none far: measured, 1 entry in 1,792 off by 3.2e-6 (0.02 %
    of the largest) on an AVX-512 CPU where an older one had none. RecLoRA's bank (`loose`) has many
    such entries (A_k while B_k is still ~0, rows' terms cancelling): at most 2 % outside TOL (fedsa's
    local B), none further than 0.6 % of the largest. A row through another client's adapter, bank
    or router moves most entries, far more."""
    off = ~torch.isclose(a, b, **TOL)
    worst = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    most_off, furthest = (0.05, 0.02) if loose else (0.005, 0.002)
    assert float(off.float().mean()) <= most_off and worst <= furthest, \
        f"{what}: {int(off.sum())} of {off.numel()} entries off, the worst by {worst:.3%} of the largest"


def train_both(one, many, rounds=2):
    """Each round: `one` trains the clients one by one, `many` fused, from the same received adapters;
    the next round's adapters are the received ones plus a per-client multiple of the mean of the
    one-by-one deltas (a different adapter per client, as PPLR sends), for both."""
    params = {c: one.initial_params() for c in CLIENTS}
    out = []
    for r in range(rounds):
        seq = [one.train(c, r, params[c], lr, CLIENTS) for c, lr in zip(CLIENTS, LRS)]
        flat = many.train_many(CLIENTS, r, LRS, CLIENTS, *[params[c] for c in CLIENTS])
        assert len(flat) == 2 * len(CLIENTS)
        fused = list(zip(flat[0::2], flat[1::2]))
        out.append((seq, fused))
        step = torch.stack([d for _, d in seq]).mean(0)
        params = {c: params[c] + step * (1 + c / 4) for c in CLIENTS}
    return out


@pytest.mark.parametrize("mode, overrides", [
    ("separate", ()),
    ("ffa", ()),  # A frozen (stacked apart, not trained), only B trained and sent
    ("fedsa", ()),  # each client's own B comes from and goes back to its store
    # clients of unequal size take unequal numbers of steps: slots sit out the last steps
    # (the per-row gather path and the masked optimizer step)
    ("separate", ("train.local_steps=null", "train.local_epochs=0.1")),
    # each step as two forward/backward passes over two whole clients each, gradients accumulated
    ("separate", ("executors.fused_rows=16",)),
    # client-side privacy hooks on each client's delta: DP-LoRA's clipped, seeded local noise and
    # DP-FedAvg's clipping (its server noise is the aggregator's, the same either way)
    # RecLoRA's bank (model.personal): each client's rows through its own router's mix of its own
    # bank, the private router trained alongside; then the outputs merge with a shared router over
    # fedsa's local B
    ("separate", ("model.personal.bank=3",)),
    ("fedsa", ("model.personal.bank=2", "model.personal.merge=outputs", "model.personal.share_router=true")),
    ("separate", ("privacy.dp_lora.enabled=true", "privacy.dp_lora.noise_multiplier=0.5", "privacy.dp_lora.clip=0.01",
                  "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=0.5",
                  "privacy.client_dp.clip=0.005")),
])
def test_fused_training_equals_training_clients_one_by_one(executor, mode, overrides):
    one = executor("one", f"strategy.lora_mode={mode}", *overrides)
    many = executor("many", f"strategy.lora_mode={mode}", *overrides)
    steps, loose = set(), any(o.startswith("model.personal.bank") for o in overrides)
    for r, (seq, fused) in enumerate(train_both(one, many)):
        for c, (ms, ds), (mf, df) in zip(CLIENTS, seq, fused):
            assert mf["client"] == c and mf["num_samples"] == ms["num_samples"] and mf["steps"] == ms["steps"]
            assert mf["tokens"] == ms["tokens"] > 0 and mf["lr"] == ms["lr"]
            assert mf["loss"] == pytest.approx(ms["loss"], rel=1e-5)
            assert mf["metrics"] == pytest.approx(ms["metrics"], rel=1e-4)  # the client hooks' own figures
            assert ds.abs().max() > 0
            assert_close(df, ds, f"round {r} client {c} delta", loose)
            a, b = one.store.load(c, r + 1), many.store.load(c, r + 1)
            assert a["opt"]["step"].tolist() == b["opt"]["step"].tolist() == [float((r + 1) * ms["steps"])] * len(a["opt"]["step"])
            for kind in ("exp_avg", "exp_avg_sq"):
                assert_close(b["opt"][kind], a["opt"][kind], f"round {r} client {c} {kind}", loose)
            assert (a["members"] == b["members"]).all()
            if "local" in a:  # fedsa's B, a private router
                assert_close(b["local"], a["local"], f"round {r} client {c} local part", loose)
            steps.add(ms["steps"])
    if "privacy.dp_lora.enabled=true" in overrides:
        assert ms["metrics"]["dp/clipped"] == 1.0 and "dp_lora/epsilon" in ms["metrics"]
    if loose:
        assert 0 < ms["metrics"]["personal/alpha_entropy"] < 1.1  # log 3: uniform; what routing gives it
    if "train.local_epochs=0.1" in overrides:
        assert len(steps) > 1  # the case really had clients finishing at different steps


def test_fused_stack_mode_trains_on_the_merged_base_as_one_by_one(executor):
    """FLoRA stacking: each round's payload merges the stacked products into the base, then every
    client trains a fresh LoRA (and a fresh AdamW) on it."""
    from fedsim.server.strategy import Update, make_strategy

    one, many = executor("one", "strategy.lora_mode=stack"), executor("many", "strategy.lora_mode=stack")
    strategy = make_strategy(tiny("strategy.lora_mode=stack"))
    strategy.initialize(one.initial_params(), len(CLIENTS))
    for r in range(2):
        payload = strategy.params_for(0)
        seq = [one.train(c, r, payload, lr, CLIENTS) for c, lr in zip(CLIENTS, LRS)]
        flat = many.train_many(CLIENTS, r, LRS, CLIENTS, *[payload] * len(CLIENTS))
        assert many.merged_version == one.merged_version == r
        for c, (ms, ds), mf, df in zip(CLIENTS, seq, flat[0::2], flat[1::2]):
            assert mf["loss"] == pytest.approx(ms["loss"], rel=1e-5)
            # Round 2 trains on a base that already differs by float32 rounding; AdamW divides by
            # sqrt(v), which turns a rounding-sized gradient difference on a near-zero gradient into
            # a few 1e-6 of delta (measured: 1 entry of 1792 at 5.3e-6 with TALLRec's prompt).
            torch.testing.assert_close(df, ds, rtol=1e-4, atol=1e-5, msg=lambda m: f"round {r} client {c} delta: {m}")
        strategy.aggregate(r, [Update(m["client"], d, m["num_samples"], m["weight"], m) for m, d in seq])


def test_a_clients_adapter_gets_no_gradient_from_other_clients_rows(executor):
    ex = executor("grads")
    group = FusedLoRA(ex.model, 3, ex.params)
    with torch.no_grad():
        group.weight.normal_(0, 0.1)  # B != 0, so A's gradients are not trivially zero either
    rows = ex._rows(0, "train")
    for counts in ([4, 4, 4], [3, 5, 1]):  # grouped bmm path and per-row gather path
        with group.installed():
            group.route.set(counts)
            logits, labels, _ = ex._logits(rows.iloc[:sum(counts)])
            per_client = group.client_losses(preference_loss(logits, labels, reduction="none"))
            for k in range(3):
                group.zero_grad()
                group.backward(per_client[k], retain_graph=True)
                assert group.grad[k].abs().max() > 0
                others = [j for j in range(3) if j != k]
                assert group.grad[others].abs().max() == 0, (counts, k)


def test_grouped_and_gather_paths_give_the_same_outputs(executor):
    ex = executor("paths")
    group = FusedLoRA(ex.model, 2, ex.params)
    with torch.no_grad():
        group.weight.normal_(0, 0.1)
    rows = ex._rows(1, "train").iloc[:6]
    with group.installed(), torch.no_grad():
        group.route.set([3, 3])
        grouped = ex._logits(rows)[0]
        group.route.span = None  # force the per-row gather
        gathered = ex._logits(rows)[0]
    # No optimizer here to amplify rounding: every logit within TOL.
    torch.testing.assert_close(gathered, grouped, **TOL, msg=lambda m: f"logits: {m}")


def test_chunks_pack_whole_consecutive_clients():
    assert chunks([8, 8, 0, 8, 3], None) == [[0, 1, 3, 4]]
    assert chunks([8, 8, 0, 8, 3], 16) == [[0, 1], [3, 4]]
    assert chunks([20, 4, 4], 16) == [[0], [1, 2]]  # a client larger than the cap is a pass of its own


def test_stacked_adamw_is_torch_adamw_per_client():
    torch.manual_seed(0)
    C, shapes = 3, [(4, 5), (5, 2)]
    lrs, wds = [1e-2, 3e-3, 5e-2], [0.0, 0.1, 0.01]
    ref = [[torch.nn.Parameter(torch.randn(s)) for s in shapes] for _ in range(C)]
    opts = [torch.optim.AdamW(ref[c], lr=lrs[c], weight_decay=wds[c]) for c in range(C)]
    weight = torch.stack([torch.cat([p.detach().reshape(-1) for p in ref[c]]) for c in range(C)])
    grad = torch.zeros_like(weight)
    fused = StackedAdamW(weight, grad)
    for c in range(C):
        fused.load(c, opts[c])
    active = [[True, True, True], [True, False, True], [False, True, True], [True, True, True]]
    for act in active:
        g = torch.randn_like(weight)
        grad.copy_(g)
        fused.step(torch.tensor(act))
        for c in range(C):
            if act[c]:
                i = 0
                for p in ref[c]:
                    p.grad = g[c, i:i + p.numel()].view_as(p).clone()
                    i += p.numel()
                opts[c].step()
    for c in range(C):
        torch.testing.assert_close(weight[c], torch.cat([p.detach().reshape(-1) for p in ref[c]]), rtol=1e-6, atol=1e-7)
        fresh = torch.optim.AdamW(ref[c], lr=lrs[c], weight_decay=wds[c])
        fused.store(c, fresh)
        for p in ref[c]:
            assert float(fresh.state[p]["step"]) == float(opts[c].state[p]["step"]) == sum(a[c] for a in active)
            torch.testing.assert_close(fresh.state[p]["exp_avg_sq"], opts[c].state[p]["exp_avg_sq"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("overrides, message", [
    (["executors.fused=true", "privacy.sample_dp.enabled=true", "privacy.sample_dp.noise_multiplier=1.0"],
     r"executors.fused: True cannot be combined with privacy.sample_dp"),
    (["executors.fused=1"], r"executors.fused: expected true or false"),
    (["executors.fused=true", "executors.fused_rows=0"], r"executors.fused_rows: 0 must be >= 1 or null"),
])
def test_fused_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_fused_accepts_client_level_privacy_and_every_lora_mode():
    for extra in (["privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=0.5",
                   "privacy.secagg.enabled=true"],
                  ["privacy.dp_lora.enabled=true"], ["strategy.name=pplr"],
                  ["strategy.lora_mode=ffa"], ["strategy.lora_mode=fedsa"], ["strategy.lora_mode=stack"]):
        assert tiny("executors.fused=true", *extra).executors.fused


# -- whole runs on a real local Ray --------------------------------------------------------------


def final_state(summary):
    from safetensors.torch import load_file

    run_dir = Path(summary["run_dir"])
    return load_file(run_dir / "adapter" / "adapter_model.safetensors"), load_checkpoint(run_dir)["history"]


def test_a_fused_run_ends_where_the_unfused_run_does(ray_local, tiny_cfg):
    # Client-level DP-FedAvg under secure aggregation: clipped deltas, masked on the executors and
    # unmasked in sum on the aggregator, seeded server noise; 2 executors serve 4 clients, 3 a round.
    common = ["clients.num=4", "clients.per_round=3", "executors.num=2", "tracking.enabled=false",
              "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=0.3", "privacy.secagg.enabled=true"]
    plain = run(tiny_cfg(*common), **QUIET)
    fused = run(tiny_cfg(*common, "executors.fused=true"), **QUIET)
    (a, ha), (b, hb) = final_state(plain), final_state(fused)
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], k)
    for x, y in zip(ha, hb):
        assert x["clients_sampled"] == y["clients_sampled"] == 3 and y["clients_dropped"] == 0
        assert y["train_samples"] == x["train_samples"] and y["train_tokens"] == x["train_tokens"] > 0
        for key in ("train_loss", "auc", "logloss"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    assert plain["final"]["auc"] == pytest.approx(fused["final"]["auc"], abs=1e-6)
