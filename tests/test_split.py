"""PPLR flexible storage (`storage.mode: split`): the model split between the client and a server
actor on a real local Ray, the same loss and gradients as the whole model, private client-side
adapters, and bad input caught before any actor starts."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedsim.client.state import ClientStore
from fedsim.config import ConfigError, load_config, to_dict
from fedsim.data.prompt import DEFAULT_TEMPLATE, render_prompt
from fedsim.models.loader import build_tiny_random, load_base
from fedsim.models.lora import attach_lora, freeze_lora_A, set_flat
from fedsim.models.scoring import answer_token_ids, encode, preference_loss, yes_no_logits
from fedsim.models.split import SplitClient, layer_flops, plumbing
from fedsim.simulation import run

TITLES = [f"Movie {i}" for i in range(30)]


@pytest.fixture(scope="module")
def tiny5(tmp_path_factory):
    """A 5-layer tiny random Llama: client front [0, 2), server [2, 4), client back 4."""
    texts = [DEFAULT_TEMPLATE, 'Liked: Disliked: Target movie: "none" Answer: Yes No', *TITLES]
    return str(build_tiny_random(tmp_path_factory.mktemp("tiny5") / "model", texts, seed=0, num_layers=5))


def _cfg(*overrides):
    return load_config("configs/tiny.yaml", ["model.dtype=float32", "storage.mode=split", "storage.client_layers=2",
                                             *overrides])


def _model(path, cfg, values):
    base, tok = load_base(path, "float32")
    model = attach_lora(base, cfg.model.lora, 0)
    set_flat([p for n, p in model.named_parameters() if "lora_" in n], values)  # B != 0: every gradient is live
    if cfg.strategy.lora_mode == "ffa":
        freeze_lora_A(model)
    return model.train(), tok


def _batch(tok, n=6, seed=0):
    rng = np.random.default_rng(seed)
    # Histories of different lengths, so rows are padded and the attention mask matters.
    prompts = [render_prompt(list(rng.choice(TITLES, rng.integers(0, 6))), list(rng.choice(TITLES, 2)),
                             rng.choice(TITLES)) for _ in range(n)]
    return encode(tok, prompts, 128, "cpu"), torch.tensor(rng.integers(0, 2, n))


@pytest.fixture(scope="module")
def server(ray_local, tiny5):
    from fedsim.server.split_server import SplitServer

    return ray_local.remote(SplitServer).options(num_cpus=0.5).remote(to_dict(_cfg()), tiny5)


@pytest.mark.parametrize("mode", ["separate", "ffa"])
def test_a_split_step_gives_the_loss_and_gradients_of_the_whole_model(tiny5, server, mode):
    cfg = _cfg(f"strategy.lora_mode={mode}")
    whole, tok = _model(tiny5, cfg, _lora_values(tiny5, cfg))
    part, _ = _model(tiny5, cfg, _lora_values(tiny5, cfg))
    client = SplitClient(part, cfg, server, key=0)
    yes, no = answer_token_ids(tok)
    batch, labels = _batch(tok)

    loss = preference_loss(yes_no_logits(whole, batch, yes, no), labels)
    loss.backward()
    split_loss = preference_loss(client.logits(batch, yes, no), labels)
    split_loss.backward()

    # fp32, the same kernels on both sides of the actor boundary: equal to float rounding.
    tol = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(split_loss, loss, **tol)
    expected = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in client.local}
    got.update({f"base_model.model.model.{n}": p.grad for n, p in client.shared})
    assert set(got) == set(expected) and len(got) == len(client.local) + len(client.shared)
    for name, g in expected.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got[name], g, **tol, msg=name)
    # Layers [2, 4) are on the server only: their LoRA is the shared part, the rest is private.
    assert {n.split(".")[1] for n, _ in client.shared} == {"2", "3"}
    assert all(f".layers.{i}." not in n for n, _ in client.local for i in (2, 3))

    # The client no longer holds the middle layers' frozen weights.
    size = lambda m: sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n)  # noqa: E731
    layer = sum(p.numel() for n, p in whole.get_base_model().model.layers[2].named_parameters() if "lora_" not in n)
    assert size(part) == size(whole) - 2 * layer

    # Evaluation (no graph kept on the server) gives the same logits too.
    with torch.no_grad():
        torch.testing.assert_close(client.logits(batch, yes, no), yes_no_logits(whole, batch, yes, no), **tol)
    m = client.take_metrics()
    assert m["split/lora_bytes_to_server"] == 2 * sum(p.numel() * 4 for _, p in client.middle_lora)
    assert m["split/lora_bytes_to_client"] == sum(p.numel() * 4 for _, p in client.shared)
    assert 0 < m["split/client_flop_share"] < 1


def test_the_servers_dropout_masks_follow_the_clients_seed_not_the_order_of_requests(ray_local, tiny5):
    from fedsim.server.split_server import SplitServer

    cfg = _cfg("model.lora.dropout=0.5")
    server = ray_local.remote(SplitServer).options(num_cpus=0.5).remote(to_dict(cfg), tiny5)
    model, tok = _model(tiny5, cfg, _lora_values(tiny5, cfg))
    client = SplitClient(model, cfg, server, key=0)
    batch, _ = _batch(tok)
    h = torch.randn(batch["input_ids"].shape[0], batch["input_ids"].shape[1], 64)
    weights = [p.detach() for _, p in client.middle_lora]

    def forward(seed):
        return ray_local.get(server.forward.remote(0, h, batch["attention_mask"], weights, True, False,
                                                   [False] * len(weights), seed))
    first = forward(1)
    forward(2)  # another executor's request in between
    assert torch.equal(forward(1), first)
    assert not torch.equal(forward(2), first)
    ray_local.kill(server)


def _lora_values(path, cfg):
    base, _ = load_base(path, "float32")
    n = sum(p.numel() for n, p in attach_lora(base, cfg.model.lora, 0).named_parameters() if "lora_" in n)
    return torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.2


def test_layer_flops_are_the_matmul_flops_torch_counts(tiny5):
    """The FLOP share reported per client comes from layer shapes; torch's counter agrees exactly
    (eager attention, so QK^T and AV are matmuls it sees)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _cfg()
    model, _ = _model(tiny5, cfg, _lora_values(tiny5, cfg))
    inner = model.get_base_model().model
    inner.config._attn_implementation = "eager"
    h = torch.randn(3, 11, inner.config.hidden_size, requires_grad=True)
    extra = plumbing(inner.config, inner.rotary_emb, h, torch.ones(3, 11, dtype=torch.long))
    with FlopCounterMode(display=False) as forward:
        out = inner.layers[1](h, **extra)
    with FlopCounterMode(display=False) as both:
        inner.layers[1](h, **extra).sum().backward()
    assert forward.get_total_flops() == layer_flops(inner.layers[1], inner.config, 3, 11, backward=False)
    assert both.get_total_flops() == layer_flops(inner.layers[1], inner.config, 3, 11, backward=True)
    assert out.shape == h.shape


def test_split_run_keeps_the_client_side_adapters_private(ray_local, tiny_cfg):
    cfg = tiny_cfg("model.tiny_layers=4", "storage.mode=split", "storage.client_layers=1",
                   "storage.server_num_cpus=0.5")
    summary = run(cfg, log=lambda *a: None)
    run_dir = Path(summary["run_dir"])
    assert summary["complete"] and 0 <= summary["final"]["auc"] <= 1 and summary["dropped"] == []

    # Per layer, LoRA on q and v: r x d_in + d_out x r each.
    mc = json.loads((run_dir / "model" / "config.json").read_text())
    r, d = cfg.model.lora.r, mc["hidden_size"]
    kv = mc["num_key_value_heads"] * d // mc["num_attention_heads"]
    per_layer = (r * d + d * r) + (r * d + kv * r)
    middle, private = 2 * per_layer, 2 * per_layer  # server: layers 1, 2; client: layers 0 and 3

    # What the aggregator received: the middle layers' adapters only, from each of the 3 clients.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    rid = summary["mlflow_run_id"]
    hist = lambda key: [m.value for m in client.get_metric_history(rid, key)]  # noqa: E731
    assert hist("lora/upload_params") == [middle, middle]
    assert hist("bytes_up") == [3 * middle * 4] * 2
    assert summary["lora_params"] == middle

    # The exported global adapter: client-side layers at the shared init (B = 0, nothing of theirs
    # reached the aggregator); the middle layers trained and aggregated.
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for key, v in adapter.items():
        if "lora_B" in key:
            on_server = ".layers.1." in key or ".layers.2." in key
            assert (v.abs().max() > 0) == on_server, key

    # Each client keeps its own trained client-side adapters in its store.
    store = ClientStore(run_dir / "client_state")
    local = [store.load(c, 10**9)["local"] for c in range(3)]
    assert all(v.numel() == private for v in local)
    assert not torch.equal(local[0], local[1]) and not torch.equal(local[1], local[2])

    # Memory, FLOPs and traffic reports.
    params = client.get_run(rid).data.params
    layer_params = 2 * d * d + 2 * d * kv + 3 * d * mc["intermediate_size"] + 2 * d  # q o, k v, mlp, norms
    assert float(params["split/server_params"]) == 2 * (layer_params + per_layer)
    assert float(params["split/client_params"]) == (mc["vocab_size"] * d + 2 * layer_params + d  # tied head
                                                   + private + middle)
    steps = cfg.train.local_steps
    for c in range(3):
        assert hist(f"client/{c}/split/lora_bytes_to_server") == [steps * middle * 4.0] * 2
        assert hist(f"client/{c}/split/act_bytes_to_server")[0] > hist(f"client/{c}/split/act_bytes_to_client")[0] > 0
        share = hist(f"client/{c}/split/client_flop_share")[0]
        assert 0.5 < share < 0.6  # 2 of 4 equal layers on each side, plus the client's two-row head


def test_client_layers_out_of_range_is_an_error_before_any_actor_starts(tiny_cfg):
    cfg = tiny_cfg("model.tiny_layers=4", "storage.mode=split", "storage.client_layers=3")
    with pytest.raises(ConfigError, match=r"storage.client_layers: 3 is out of range for model.name 'tiny-random' "
                                          r"with 4 decoder layers.*k must be in \[1, 2\]"):
        run(cfg, log=lambda *a: None)
    assert not list(Path(cfg.output_dir).glob("*/client_state"))  # no executor ever ran


def test_split_needs_a_model_that_exposes_its_decoder_layers(tiny_cfg, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    cfg = tiny_cfg(f"model.name={tmp_path / 'gpt2'}", "storage.mode=split")
    with pytest.raises(ConfigError, match=r"storage.mode 'split': model.name '.*gpt2' \(GPT2LMHeadModel\) does not "
                                          r"expose its decoder layers as model.model.layers"):
        run(cfg, log=lambda *a: None)
    assert not list(Path(cfg.output_dir).glob("*/client_state"))


@pytest.mark.parametrize("override,key", [
    ("strategy.lora_mode=stack", "strategy.lora_mode"),
    ("strategy.lora_mode=fedsa", "strategy.lora_mode"),
    ("privacy.sample_dp.enabled=true", "privacy.sample_dp.enabled"),
    ("executors.fused=true", "executors.fused"),
    ("storage.client_layers=0", "storage.client_layers"),
    ("storage.server_num_gpus=2", "storage.server_num_gpus"),
])
def test_split_rejects_what_it_cannot_run(override, key):
    extra = ["privacy.sample_dp.noise_multiplier=1.0"] if "sample_dp" in override else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/tiny.yaml", ["storage.mode=split", override, *extra])
