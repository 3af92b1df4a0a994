"""Homomorphic aggregation (TenSEAL CKKS): the server adds ciphertexts it cannot decrypt, and the
key holder reads back the exact sum up to CKKS's approximation error; in the loop (privacy.he) a run
ends on the same model as without it."""
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import ConfigError, load_config
from fedsim.postprocessors import ClientContext, build_postprocessors, run_client_hooks
from fedsim.privacy import he
from fedsim.server.aggregator import Aggregator
from fedsim.simulation import load_checkpoint


def test_the_encrypted_sum_decrypts_to_the_sum_and_the_server_cannot_read_it():
    secret, public = he.make_keys(8192, 40)
    S, P = he.load(secret), he.load(public)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=9000) * 1e-3 * (k + 1) for k in range(3)]  # 3 chunks of 4096 slots
    uploads = [he.encrypt(S, x, 4096) for x in xs]
    assert all(len(u) == 3 for u in uploads)
    assert all(len(c) > 4096 * 8 for c in uploads[0])  # ciphertexts, bigger than the float64 plaintext
    total = he.encrypted_sum(P, uploads)
    with pytest.raises(ValueError, match="secret_key"):
        he.decrypt(P, total, 9000)  # the server's public context holds no secret key
    assert np.abs(he.decrypt(S, total, 9000) - sum(xs)).max() < 1e-7


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="poly_modulus_degree 4096"):
        he.make_keys(4096)
    secret, public = he.make_keys()
    S = he.load(secret)
    a, b = he.encrypt(S, np.ones(5000), 4096), he.encrypt(S, np.ones(10), 4096)
    with pytest.raises(ValueError, match="different chunk counts"):
        he.encrypted_sum(he.load(public), [a, b])


def test_ciphertexts_travel_as_one_uint8_tensor_and_plaintext_is_refused():
    chunks = [b"abc", b"", b"defgh"]
    wire = he.to_wire(chunks, 11)
    assert wire.dtype == torch.uint8 and wire.numel() == 8 * 5 + 8
    assert he.from_wire(wire) == (chunks, 11)
    with pytest.raises(TypeError, match=r"he: expected an encrypted \(uint8\) upload, got float32"):
        he.from_wire(torch.ones(4))


# ---------------------------------------------------------------------------------------------
# In the loop: privacy.he as a postprocessor


def he_cfg(*overrides, num=4):
    return load_config("configs/tiny.yaml", [f"clients.num={num}", "privacy.he.enabled=true", *overrides])


@pytest.mark.parametrize("dropped", [[], [2]])
def test_the_aggregator_adds_ciphertexts_and_the_strategy_gets_the_weighted_mean(dropped):
    gen = torch.Generator().manual_seed(3)
    sampled, n = [0, 1, 2, 3], 5000
    deltas = {c: torch.randn(n, generator=gen) * 1e-2 * (c + 1) for c in sampled if c not in dropped}
    weights = {c: float(8 * (c + 1)) for c in deltas}
    holder = he.KeyHolder(8192, 40)
    plain_cfg, cfg = load_config("configs/tiny.yaml", ["clients.num=4"]), he_cfg()
    plain, secure = Aggregator(plain_cfg, torch.zeros(n)), Aggregator(cfg, torch.zeros(n), key_holder=holder)
    m_plain = plain.aggregate(0, sampled, [{"client": c, "num_samples": int(weights[c]), "weight": weights[c]}
                                           for c in deltas], *deltas.values())
    chain = build_postprocessors(cfg, key_holder=holder)  # the clients' side
    metas, wires = [], []
    for c in deltas:
        wire, w, metrics = run_client_hooks(chain, deltas[c], weights[c], ClientContext(c, 0, int(weights[c]), 4, 4, {}, sampled))
        assert wire.dtype == torch.uint8 and w == 1.0 and metrics["he/seconds_client"] > 0
        metas.append({"client": c, "num_samples": int(weights[c]), "weight": w, "metrics": metrics})
        wires.append(wire)
    seen = []
    inner = secure.strategy.aggregate
    secure.strategy.aggregate = lambda r, updates, finish: seen.append(list(updates)) or inner(r, updates, finish)
    m = secure.aggregate(0, sampled, metas, *wires)

    [[agg]] = seen  # the strategy saw one decrypted sum, never a client's own update
    assert agg.client == -1 and agg.weight == 1.0 and agg.metrics["he/clients"] == list(deltas)
    expected = sum(weights[c] * deltas[c].double() for c in deltas) / sum(weights.values())
    assert (agg.delta.double() - expected).abs().max() < 1e-6
    assert (secure.global_params() - plain.global_params()).abs().max() < 1e-6
    assert not secure.postprocessors[0]._server_ctx.has_secret_key()  # the aggregator cannot decrypt
    assert m["he/weight_sum"] == pytest.approx(sum(weights.values()), abs=1e-4)
    assert m["he/seconds_server"] > 0 and m["he/seconds_decrypt"] > 0
    # 5001 entries in 2 ciphertexts of 4096 slots: far bigger than 5000 float32s.
    assert m["bytes_up"] > 10 * m_plain["bytes_up"]
    assert m["update_norm"] == pytest.approx(m_plain["update_norm"], rel=1e-5)


def test_an_unencrypted_update_reaching_the_aggregator_is_refused():
    agg = Aggregator(he_cfg(), torch.zeros(3), key_holder=he.KeyHolder(8192, 40))
    with pytest.raises(TypeError, match="he: expected an encrypted"):
        agg.aggregate(0, [0, 1], [{"client": 0, "num_samples": 1, "weight": 1.0}], torch.ones(4))


@pytest.mark.parametrize("override,message", [
    (["strategy.name=pplr"], r"privacy.he.enabled: True needs strategy.name 'fedavg' \(the server sees only"),
    (["strategy.lora_mode=stack"], r"privacy.he.enabled: True cannot be combined with strategy.lora_mode 'stack'"),
    (["privacy.secagg.enabled=true"], r"privacy.he.enabled: True and privacy.secagg.enabled are two ways"),
    (["privacy.he.poly_modulus_degree=4096"], r"privacy.he.poly_modulus_degree: 4096 must be 8192, 16384 or 32768"),
    (["privacy.he.scale_bits=60"], r"privacy.he.scale_bits: 60 must be in \[20, 50\]"),
])
def test_he_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        he_cfg(*override)


def test_a_run_with_he_matches_the_same_run_without(ray_local, crash_run_pair):
    # Client 1 crashes in round 2: its ciphertext is simply missing from that round's sum.
    plain, secure, gap = crash_run_pair("privacy.he.enabled=true")
    assert gap < 1e-5, gap
    assert secure["final"]["auc"] == pytest.approx(plain["final"]["auc"], abs=1e-3)
    history = load_checkpoint(Path(secure["run_dir"]))["history"]
    assert all(h["he/seconds_server"] > 0 and h["he/seconds_decrypt"] > 0 for h in history)
    assert history[0]["client/0/he/seconds_client"] > 0
    plain_history = load_checkpoint(Path(plain["run_dir"]))["history"]
    assert history[0]["bytes_up"] > 10 * plain_history[0]["bytes_up"]
    import ray
    assert not [a for a in ray.util.list_named_actors() if a.startswith("fedsim-he-keys")]  # stopped with the run
