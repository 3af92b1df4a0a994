"""Secure aggregation (pairwise additive masks): exact cancellation, masked vectors that look
uniform, dropout recovery, fixed-point range, what the aggregator holds, and a whole run on Ray
that matches the same run without SecAgg."""
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import ConfigError, load_config
from fedsim.postprocessors import ClientContext, build_postprocessors, run_client_hooks
from fedsim.privacy.client_dp import ClientDP
from fedsim.privacy.secagg import (SecAgg, SecAggClient, advertise_keys, client_private_key, decode, encode,
                                   from_wire, pair_seed, prg, remove_dropped_masks, representable, ring_mask, ring_sum)
from fedsim.server.aggregator import Aggregator
from fedsim.simulation import load_checkpoint

SEED = 7


def on_grid(rng, n, scale_bits, magnitude=1.0):
    """Values that fixed point represents exactly (so encodings of sums are exact too)."""
    return np.rint(rng.uniform(-magnitude, magnitude, n) * 2.0**scale_bits) / 2.0**scale_bits


def masked_round(xs: dict[int, np.ndarray], bits, scale_bits, round=0):
    sampled = sorted(xs)
    return {c: SecAggClient(SEED, c, round, sampled, bits).mask(encode(x, bits, scale_bits, len(sampled)))
            for c, x in xs.items()}


def secagg_cfg(*overrides, num=4):
    cfg = load_config("configs/tiny.yaml", [f"clients.num={num}", "privacy.secagg.enabled=true", *overrides])
    cfg.train.seed = SEED
    return cfg


# ---------------------------------------------------------------------------------------------
# Keys, masks, encoding


def test_pair_seeds_agree_on_both_sides_and_differ_by_pair_and_round():
    pk = advertise_keys(SEED, 3, [1, 4, 6])
    sk = {c: client_private_key(SEED, c, 3) for c in (1, 4, 6)}
    s14 = pair_seed(sk[1], pk[4], 1, 4, 3)
    assert s14 == pair_seed(sk[4], pk[1], 4, 1, 3) and len(s14) == 32
    assert s14 != pair_seed(sk[1], pk[6], 1, 6, 3)
    assert s14 != SecAggClient(SEED, 1, 4, [1, 4, 6], 48).seed_with(4)  # fresh keys every round
    # Client 1 adds m_14 and m_16 (the ChaCha20 keystreams of the pair seeds); client 6 subtracts m_16.
    for bits in (20, 32, 48, 64):
        q = encode(np.linspace(-1, 1, 1001), bits, 8, 3)
        m14, m16 = prg(s14, 1001, bits), prg(pair_seed(sk[1], pk[6], 1, 6, 3), 1001, bits)
        assert np.array_equal(SecAggClient(SEED, 1, 3, [1, 4, 6], bits).mask(q), (q + m14 + m16) & ring_mask(bits))
        m46 = prg(pair_seed(sk[4], pk[6], 4, 6, 3), 1001, bits)
        assert np.array_equal(SecAggClient(SEED, 6, 3, [1, 4, 6], bits).mask(q), (q - m16 - m46) & ring_mask(bits))
        assert m14.max() <= ring_mask(bits)
    with pytest.raises(ValueError, match="client 2 is not among the round's sampled clients"):
        SecAggClient(SEED, 2, 3, [1, 4, 6], 48)


@pytest.mark.parametrize("bits,scale_bits", [(32, 16), (48, 24), (64, 30)])
def test_masks_cancel_exactly_in_the_sum_of_all_sampled_clients(bits, scale_bits):
    rng = np.random.default_rng(0)
    xs = {c: on_grid(rng, 10_001, scale_bits) for c in (0, 2, 3, 5, 8, 9)}
    masked = masked_round(xs, bits, scale_bits)
    total = ring_sum(list(masked.values()), bits)
    plain_sum = sum(xs.values())
    assert np.array_equal(total, encode(plain_sum, bits, scale_bits, 1))  # the encoding of the sum
    assert np.array_equal(decode(total, bits, scale_bits), plain_sum)  # exactly
    # Arbitrary floats: the masked sum is still exactly the sum of the clients' encodings.
    ys = {c: rng.normal(0, 0.1, 777) for c in (1, 4, 6)}
    enc = [encode(y, bits, scale_bits, 3) for y in ys.values()]
    assert np.array_equal(ring_sum(list(masked_round(ys, bits, scale_bits).values()), bits), ring_sum(enc, bits))


def test_a_masked_vector_looks_uniform_and_reveals_nothing_obvious():
    bits, scale_bits, n = 48, 24, 200_000
    x = np.sin(np.arange(n) / 500.0) * 3  # very structured plaintext
    masked = masked_round({0: x, 1: np.zeros(n), 2: np.zeros(n)}, bits, scale_bits)
    u = masked[0].astype(np.float64) / 2.0**bits  # in [0, 1)
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    counts = np.histogram(u, bins=16, range=(0, 1))[0]
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 50  # 15 degrees of freedom: P(chi2 > 50) ~ 1e-5 for a uniform vector
    q = decode(encode(x, bits, scale_bits, 3), bits, scale_bits)
    assert abs(np.corrcoef(u, q)[0, 1]) < 0.02
    assert abs(np.corrcoef(u, np.abs(q))[0, 1]) < 0.02
    # Decoding a masked vector as if it were an encoding gives noise of the ring's size, not x.
    assert np.abs(decode(masked[0], bits, scale_bits) - x).mean() > 1e5
    # A zero vector and a structured one are masked alike; masks are fresh each round.
    assert abs(masked[1].astype(np.float64).mean() / 2.0**bits - 0.5) < 0.005
    again = masked_round({0: x, 1: np.zeros(n), 2: np.zeros(n)}, bits, scale_bits, round=1)
    assert (again[0] == masked[0]).mean() < 1e-3


@pytest.mark.parametrize("bits", [32, 48])
def test_dropout_recovery_gives_the_exact_sum_of_the_survivors(bits):
    scale_bits = 16 if bits == 32 else 24
    rng = np.random.default_rng(1)
    sampled = [0, 1, 3, 4, 6, 7, 9]
    xs = {c: on_grid(rng, 5000, scale_bits) for c in sampled}
    masked = masked_round(xs, bits, scale_bits)
    for dropped in ([0], [4, 9], [0, 3, 6, 9]):  # the lowest id, the highest, a mix
        survivors = [c for c in sampled if c not in dropped]
        total = ring_sum([masked[c] for c in survivors], bits)
        expected = sum(xs[c] for c in survivors)
        assert not np.array_equal(decode(total, bits, scale_bits), expected)  # masks left in
        revealed = {j: SecAggClient(SEED, j, 0, sampled, bits).reveal(dropped) for j in survivors}
        assert all(set(r) == set(dropped) for r in revealed.values())  # seeds with the dropped only
        recovered = remove_dropped_masks(total, revealed, bits)
        assert np.array_equal(decode(recovered, bits, scale_bits), expected)


@pytest.mark.parametrize("bits,scale_bits", [(32, 16), (48, 24), (48, 40), (64, 32)])
def test_encode_decode_round_trip_error_is_within_the_resolution(bits, scale_bits):
    rng = np.random.default_rng(2)
    m = 100
    limit = representable(bits, scale_bits, m)
    x = np.concatenate([rng.normal(0, 1e-3, 10_000), rng.uniform(-limit, limit, 10_000), [limit, -limit, 0.0]])
    err = np.abs(decode(encode(x, bits, scale_bits, m), bits, scale_bits) - x)
    assert err.max() <= 2.0**-(scale_bits + 1) <= 2.0**-scale_bits  # rounding to the nearest step


def test_overflow_is_a_clear_error():
    bits, scale_bits = 32, 16
    limit = representable(bits, scale_bits, 10)  # (2^31 - 1) // 10 / 2^16 ~ 3276.8
    encode(np.array([limit, -limit]), bits, scale_bits, 10)  # the edge itself is fine
    with pytest.raises(ValueError, match=r"secagg: client 3's weighted update has entry 1 = -4000, outside the range "
                                         r"\+-3276.8 that privacy.secagg.bits=32 with privacy.secagg.scale_bits=16 "
                                         r"can sum over 10 clients without overflow; raise privacy.secagg.bits"):
        encode(np.array([0.0, -4000.0]), bits, scale_bits, 10, who="client 3")
    with pytest.raises(ValueError, match="entry 0 = nan"):
        encode(np.array([np.nan]), 48, 24, 2)
    # Through the client hook: the weight multiplies the delta before encoding.
    cfg = secagg_cfg("privacy.secagg.bits=32", "privacy.secagg.scale_bits=16")
    [sa] = build_postprocessors(cfg)
    ctx = ClientContext(1, 0, 64, 4, 4, sampled=[0, 1, 2, 3])
    sa.on_client_update(torch.full((5,), 100.0), 64.0, ctx)  # 6400 < 32767 / 4
    with pytest.raises(ValueError, match=r"client 1's weighted update has entry 0 = 12800"):
        sa.on_client_update(torch.full((5,), 200.0), 64.0, ctx)


@pytest.mark.parametrize("override,message", [
    (["strategy.name=pplr"], r"privacy.secagg.enabled: True needs strategy.name 'fedavg' \(the server sees only "
                             r"the sum of the updates\), not 'pplr'"),
    (["strategy.lora_mode=stack"], r"privacy.secagg.enabled: True cannot be combined with strategy.lora_mode 'stack'"),
    (["privacy.secagg.bits=8"], r"privacy.secagg.bits: 8 must be in \[16, 64\]"),
    (["privacy.secagg.scale_bits=47"], r"privacy.secagg.scale_bits: 47 must be in \[0, privacy.secagg.bits - 2 = 46\]"),
    (["privacy.secagg.bits=16", "privacy.secagg.scale_bits=14"],
     r"privacy.secagg.scale_bits: 14 leaves entries of at most 0.667 representable with 3 clients per round"),
])
def test_secagg_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", ["privacy.secagg.enabled=true", *override])


def test_secagg_is_last_in_the_chain_and_off_by_default():
    assert build_postprocessors(load_config("configs/tiny.yaml")) == []
    cfg = secagg_cfg("privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1.0",
                     "privacy.client_dp.delta=1e-3")
    chain = build_postprocessors(cfg)
    assert [type(p) for p in chain] == [ClientDP, SecAgg]
    assert chain[1].params() == {"secagg/bits": 48, "secagg/scale_bits": 24,
                                 "secagg/max_abs_entry": ((2**47 - 1) // 4) / 2**24}


# ---------------------------------------------------------------------------------------------
# What the aggregator holds


def client_uploads(cfg, deltas, weights, sampled, round=0):
    """What each client uploads after its client hooks: (metas, wire vectors, hook metrics)."""
    chain = build_postprocessors(cfg)
    metas, wires = [], []
    for c in deltas:
        out, w, metrics = run_client_hooks(chain, deltas[c], weights[c],
                                           ClientContext(c, round, int(weights[c]), len(sampled), cfg.clients.num,
                                                         {}, list(sampled)))
        metas.append({"client": c, "num_samples": int(weights[c]), "weight": w, "metrics": metrics})
        wires.append(out)
    return metas, wires


def spy(aggregator):
    seen = []
    inner = aggregator.strategy.aggregate

    def aggregate(round, updates, finish):
        seen.append(list(updates))
        return inner(round, updates, finish)

    aggregator.strategy.aggregate = aggregate
    return seen


@pytest.mark.parametrize("dropped", [[], [2]])
def test_the_aggregator_holds_only_masked_vectors_and_the_strategy_gets_one_aggregate(dropped):
    gen = torch.Generator().manual_seed(3)
    sampled, n = [0, 1, 2, 3], 20_000
    deltas = {c: torch.randn(n, generator=gen) * 1e-2 * (c + 1) for c in sampled if c not in dropped}
    weights = {c: float(8 * (c + 1)) for c in deltas}  # FedAvg's sample counts, unequal

    plain_cfg, sa_cfg = load_config("configs/tiny.yaml", ["clients.num=4"]), secagg_cfg()
    plain, secure = Aggregator(plain_cfg, torch.zeros(n)), Aggregator(sa_cfg, torch.zeros(n))
    seen = spy(secure)
    m_plain = plain.aggregate(0, sampled, [{"client": c, "num_samples": int(weights[c]), "weight": weights[c]}
                                           for c in deltas], *deltas.values())
    metas, wires = client_uploads(sa_cfg, deltas, weights, sampled)
    # Clients report weight 1 and a masked int64 vector (the real weight is its masked last entry).
    assert all(m["weight"] == 1.0 and "secagg/seconds_client" in m["metrics"] for m in metas)
    for (c, d), y in zip(deltas.items(), wires):
        assert y.dtype == torch.int64 and y.shape == (n + 1,)
        q = encode(np.append(d.double().numpy() * weights[c], weights[c]), 48, 24, len(sampled))
        assert (from_wire(y) == q).mean() < 1e-3
        assert abs(np.corrcoef(from_wire(y).astype(np.float64), q.view(np.int64).astype(np.float64))[0, 1]) < 0.05
    m_secure = secure.aggregate(0, sampled, metas, *wires)

    [[agg]] = seen  # the strategy saw a single, unmasked update
    expected = sum(weights[c] * deltas[c].double() for c in deltas) / sum(weights.values())
    assert agg.client == -1 and agg.weight == 1.0 and agg.delta.dtype == torch.float32
    assert agg.metrics["secagg/dropped"] == dropped
    assert torch.allclose(agg.delta.double(), expected, atol=1e-6, rtol=0)
    # Same model as plain FedAvg with the same weights, within the fixed-point tolerance.
    gap = (secure.global_params() - plain.global_params()).abs().max()
    assert gap <= 1e-6, gap
    assert m_secure["secagg/bits"] == 48 and m_secure["secagg/dropped"] == len(dropped)
    assert m_secure["secagg/seconds_server"] > 0 and m_secure["secagg/weight_sum"] == sum(weights.values())
    assert m_secure["bytes_up"] == len(deltas) * (n + 1) * 8  # 48-bit ring elements travel as int64
    assert m_secure["update_norm"] == pytest.approx(m_plain["update_norm"], rel=1e-5)


def test_an_unmasked_update_reaching_secagg_is_refused():
    sa = SecAgg(secagg_cfg())
    agg = Aggregator(secagg_cfg(), torch.zeros(3))
    with pytest.raises(TypeError, match="expected a masked int32/int64 vector, got float32"):
        agg.aggregate(0, [0, 1], [{"client": 0, "num_samples": 1, "weight": 1.0}], torch.ones(4))
    assert sa.on_server_updates([], None) == ([], {})


def test_secagg_composes_with_client_dp_clip_then_mask_unmask_then_noise():
    gen = torch.Generator().manual_seed(4)
    sampled, n = [0, 1, 2, 3], 5000
    deltas = {c: torch.randn(n, generator=gen) * (0.5 if c % 2 else 0.001) for c in (0, 1, 3)}  # 2 dropped
    weights = {c: 16.0 for c in deltas}
    dp = ["privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=0.5", "privacy.client_dp.clip=1.0",
          "privacy.client_dp.delta=1e-3", "privacy.secagg.bits=32", "privacy.secagg.scale_bits=16"]
    dp_cfg = load_config("configs/tiny.yaml", ["clients.num=4", *dp[:-2]])
    dp_cfg.train.seed = SEED
    both_cfg = secagg_cfg(*dp)
    results = []
    for cfg in (dp_cfg, both_cfg):
        a = Aggregator(cfg, torch.zeros(n))
        metas, wires = client_uploads(cfg, deltas, weights, sampled)
        m = a.aggregate(0, sampled, metas, *wires)
        results.append((a.global_params(), m))
    (p_dp, m_dp), (p_both, m_both) = results
    assert m_both["dp/noise_std"] == m_dp["dp/noise_std"] and m_both["secagg/weight_sum"] == 3.0  # weights 1
    assert m_both["bytes_up"] == 3 * (n + 1) * 4  # 32-bit ring: int32 on the wire
    # The same clipped mean, the same rescaling by r / m and the same noise, up to fixed point.
    assert (p_both - p_dp).abs().max() <= 3 * 2.0**-16 / 3 + 1e-6


# ---------------------------------------------------------------------------------------------
# A whole run on Ray


def test_a_run_with_secagg_matches_the_same_run_without(ray_local, crash_run_pair):
    # Client 1 crashes in round 2: that round recovers its masks from the survivors' seeds.
    plain, secure, gap = crash_run_pair("privacy.secagg.enabled=true")
    assert gap < 1e-5, gap
    assert secure["final"]["auc"] == pytest.approx(plain["final"]["auc"], abs=1e-3)
    history = load_checkpoint(Path(secure["run_dir"]))["history"]
    assert [h["secagg/dropped"] for h in history] == [0, 1]
    assert all(h["secagg/bits"] == 48 and h["secagg/seconds_server"] > 0 for h in history)
    assert history[0]["client/0/secagg/seconds_client"] > 0
    plain_history = load_checkpoint(Path(plain["run_dir"]))["history"]
    assert history[0]["bytes_up"] == 2 * plain_history[0]["bytes_up"] + 3 * 8  # int64 entries and the weight
