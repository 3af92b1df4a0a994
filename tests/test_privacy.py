"""Differential privacy: accountants against Opacus, client-level DP-FedAvg, DP-LoRA, record-level
DP-SGD with Opacus on the tiny model, and whole runs on a real local Ray."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedsim.config import Config, ConfigError, load_config
from fedsim.postprocessors import ClientContext, RoundContext, build_postprocessors, run_client_hooks, run_server_hooks
from fedsim.privacy.accountant import calibrate_noise, epsilon_for, make_accountant
from fedsim.privacy.client_dp import ClientDP
from fedsim.privacy.dp_lora import DPLoRA, part_masks
from fedsim.privacy.dp_sgd import SampleDP, dp_optimizer, dp_step
from fedsim.server.strategy import FedAvg, Update
from fedsim.server.aggregator import Aggregator
from fedsim.simulation import Simulation, load_checkpoint, run, sample_clients

QUIET = dict(log=lambda *a: None)


def privacy_cfg(**sections):
    """A Config built directly (no range checks), with the given privacy sections' fields set."""
    cfg = Config()
    cfg.clients.num, cfg.clients.per_round, cfg.train.rounds = 10, 4, 5
    for section, fields in sections.items():
        for k, v in fields.items():
            setattr(getattr(cfg.privacy, section), k, v)
    return cfg


# ---------------------------------------------------------------------------------------------
# Accountants and calibration


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_accountant_matches_opacus_and_grows_with_steps(kind):
    from opacus.accountants import PRVAccountant, RDPAccountant

    ours = make_accountant(kind)
    theirs = {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]()
    for _ in range(20):
        theirs.step(noise_multiplier=1.1, sample_rate=0.05)
    ours.step(1.1, 0.05, steps=15)
    ours.step(1.1, 0.05, steps=5)
    assert ours.history == [(1.1, 0.05, 20)] and ours.steps == 20
    eps20 = ours.get_epsilon(1e-5)
    assert eps20 == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-9)
    assert 0 < eps20 < math.inf
    ours.step(1.1, 0.05, steps=20)
    assert ours.get_epsilon(1e-5) > eps20
    # A mechanism with another setting composes with the first.
    ours.step(2.0, 0.1)
    assert ours.history[-1] == (2.0, 0.1, 1)
    # The state is the history: a restored accountant reports the same epsilon.
    again = make_accountant(kind)
    again.load_state_dict(ours.state_dict())
    assert again.get_epsilon(1e-5) == ours.get_epsilon(1e-5)
    assert make_accountant(kind).get_epsilon(1e-5) == 0.0


def test_accountant_no_noise_is_infinite_and_kinds_are_checked():
    acc = make_accountant("rdp")
    acc.step(0.0, 0.5)
    assert acc.get_epsilon(1e-5) == math.inf
    with pytest.raises(ValueError, match="'gdp' is not one of 'rdp', 'prv'"):
        make_accountant("gdp")
    with pytest.raises(ValueError, match="saved accountant is 'rdp'"):
        make_accountant("prv").load_state_dict(acc.state_dict())


@pytest.mark.parametrize("kind,q,steps", [("rdp", 0.5, 30), ("prv", 0.5, 30), ("rdp", 1.0, 3)])
def test_calibration_round_trips(kind, q, steps):
    z = calibrate_noise(3.0, 1e-5, q, steps, kind)
    eps = epsilon_for(z, q, steps, 1e-5, kind)
    assert 0.97 * 3.0 <= eps <= 3.0
    # Less noise than calibrated would overspend.
    assert epsilon_for(0.97 * z, q, steps, 1e-5, kind) > 3.0


def test_calibration_agrees_with_opacus():
    from opacus.accountants.utils import get_noise_multiplier

    theirs = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=1.0, steps=10)
    assert calibrate_noise(8.0, 1e-5, 1.0, 10, "rdp") == pytest.approx(theirs, rel=0.02)


def test_an_unreachable_target_is_a_value_error_naming_the_key():
    with pytest.raises(ValueError, match=r"privacy.client_dp.epsilon: 0.01 cannot be reached with delta=1e-05 "
                                         r"in 30 rounds at sample rate 1 \(noise multiplier would exceed 1000\)"):
        calibrate_noise(0.01, 1e-5, 1.0, 30, "rdp", key="privacy.client_dp.epsilon", unit="rounds")
    with pytest.raises(ValueError, match=r"privacy.sample_dp.epsilon: -1.0 must be a finite number > 0"):
        calibrate_noise(-1.0, 1e-5, 0.5, 30, "rdp", key="privacy.sample_dp.epsilon")
    # Through the postprocessor, as the aggregator meets it before the first round.
    cfg = privacy_cfg(client_dp=dict(enabled=True, epsilon=0.01))
    cfg.clients.per_round = 10
    with pytest.raises(ValueError, match=r"privacy.client_dp.epsilon: 0.01 cannot be reached .* "
                                         r"in 5 rounds at sample rate 1 "):
        ClientDP(cfg).params()


@pytest.mark.parametrize("override,message", [
    (["privacy.client_dp.noise_multiplier=1.0", "privacy.client_dp.delta=0.5"],
     r"privacy.client_dp.delta: 0.5 must be < 1/clients.num = 0.3333"),
    (["privacy.client_dp.noise_multiplier=1.0", "privacy.client_dp.clip=0"],
     r"privacy.client_dp.clip: 0.0 must be > 0"),
    (["privacy.client_dp.noise_multiplier=1.0", "privacy.client_dp.epsilon=2"],
     r"privacy.client_dp.epsilon: 2.0 set exactly one of privacy.client_dp.epsilon \(a target\) and "
     r"privacy.client_dp.noise_multiplier \(got noise_multiplier=1.0\)"),
    ([], r"privacy.client_dp.epsilon: None set exactly one of"),
    (["privacy.client_dp.epsilon=0"], r"privacy.client_dp.epsilon: 0.0 must be > 0"),
    (["privacy.client_dp.noise_multiplier=-1"], r"privacy.client_dp.noise_multiplier: -1.0 must be > 0"),
    (["privacy.client_dp.noise_multiplier=1", "privacy.client_dp.accountant=gdp"],
     r"privacy.client_dp.accountant: 'gdp' is not one of 'rdp', 'prv'"),
    (["privacy.client_dp.noise_multiplier=1", "strategy.name=pplr"],
     r"privacy.client_dp.enabled: True needs strategy.name 'fedavg' \(DP-FedAvg\), not 'pplr'"),
])
def test_client_dp_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", ["privacy.client_dp.enabled=true", *override])


def test_other_privacy_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"privacy.dp_lora.clip: -1.0 must be > 0"):
        load_config("configs/tiny.yaml", ["privacy.dp_lora.enabled=true", "privacy.dp_lora.clip=-1"])
    with pytest.raises(ConfigError, match=r"privacy.sample_dp.epsilon: 1.0 set exactly one of"):
        load_config("configs/tiny.yaml", ["privacy.sample_dp.enabled=true", "privacy.sample_dp.epsilon=1",
                                          "privacy.sample_dp.noise_multiplier=1"])
    with pytest.raises(ConfigError, match=r"privacy.sample_dp.max_grad_norm: 0.0 must be > 0"):
        load_config("configs/tiny.yaml", ["privacy.sample_dp.enabled=true", "privacy.sample_dp.noise_multiplier=1",
                                          "privacy.sample_dp.max_grad_norm=0"])
    with pytest.raises(ConfigError, match=r"unknown config key 'privacy.client_dp.sigma'"):
        load_config("configs/tiny.yaml", ["privacy.client_dp.sigma=1"])
    # Disabled sections are not checked; the default config builds no postprocessor.
    cfg = load_config("configs/tiny.yaml", ["privacy.client_dp.clip=0"])
    assert build_postprocessors(cfg) == []


# ---------------------------------------------------------------------------------------------
# Client-level DP-FedAvg


def test_client_dp_clips_every_update_and_makes_weights_uniform():
    cfg = privacy_cfg(client_dp=dict(enabled=True, noise_multiplier=1.0, clip=0.5))
    [dp] = build_postprocessors(cfg)
    assert isinstance(dp, ClientDP)
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.1, 0.5, 3.0, 1e4):
        delta = torch.randn(5000, generator=gen) * scale
        out, weight, metrics = run_client_hooks([dp], delta, 123.0, ClientContext(0, 0, 123, 4, 10))
        assert float(out.norm()) <= 0.5 and weight == 1.0
        if delta.norm() <= 0.5:
            assert torch.equal(out, delta) and metrics["dp/clipped"] == 0.0
        else:
            assert float(out.norm()) == pytest.approx(0.5, rel=1e-5) and metrics["dp/clipped"] == 1.0
            assert torch.allclose(out / out.norm(), delta / delta.norm(), atol=1e-6)  # direction kept


def test_client_dp_server_noise_has_std_z_clip_over_sampled_clients():
    cfg = privacy_cfg(client_dp=dict(enabled=True, noise_multiplier=1.3, clip=0.7))
    dp = ClientDP(cfg)
    step = torch.zeros(1_000_000)
    out, metrics = run_server_hooks([dp], step, RoundContext(0, num_sampled=4, num_reported=4, num_clients=10))
    expected = 1.3 * 0.7 / 4
    assert float(out.std()) == pytest.approx(expected, rel=0.02) and abs(float(out.mean())) < 3 * expected / 1000
    assert metrics["dp/noise_std"] == pytest.approx(expected)
    assert metrics["dp/epsilon"] == pytest.approx(epsilon_for(1.3, 0.4, 1, 1e-5))
    # m counts the sampled clients: two dropping does not shrink the noise, and the mean over the
    # two reporters is rescaled to a sum over the four sampled.
    out, metrics = run_server_hooks([dp], torch.ones(1_000_000), RoundContext(1, 4, 2, 10))
    assert float(out.std()) == pytest.approx(expected, rel=0.02)
    assert float(out.mean()) == pytest.approx(0.5, abs=3 * expected / 1000)
    # noise against signal: the mean update 0.5 * sqrt(1e6), the noise z C / m * sqrt(1e6)
    assert metrics["dp/update_norm"] == pytest.approx(500.0) and metrics["dp/noise_norm"] == pytest.approx(expected * 1000, rel=0.01)
    assert metrics["dp/noise_to_update"] == pytest.approx(expected * 2, rel=0.01)
    assert dp.accountant.history == [(1.3, 0.4, 2)]
    assert dp.params() == {"dp/noise_multiplier": 1.3, "dp/sample_rate": 0.4, "dp/delta": 1e-5, "dp/accountant": "rdp",
                           "dp/clip": 0.7, "dp/planned_epsilon": pytest.approx(epsilon_for(1.3, 0.4, 5, 1e-5))}


def test_poisson_sampling_draws_each_client_with_rate_q():
    cfg = load_config("configs/tiny.yaml", ["clients.num=200", "clients.per_round=20", "clients.sampling=poisson"])
    rounds = [sample_clients(cfg, r) for r in range(300)]
    assert rounds == [sample_clients(cfg, r) for r in range(300)]  # a function of (seed, round): resumable
    counts = np.array([len(r) for r in rounds])
    assert abs(counts.mean() - 20) < 1.0 and counts.std() > 2  # E = qN = 20, sd = sqrt(Nq(1-q)) = 4.2
    share = np.bincount(np.concatenate(rounds), minlength=200) / 300
    assert abs(share.mean() - 0.1) < 0.01 and share.max() < 0.25
    assert all(r == sorted(set(r)) for r in rounds)
    fixed = load_config("configs/tiny.yaml", ["clients.num=200", "clients.per_round=20"])
    assert {len(sample_clients(fixed, r)) for r in range(50)} == {20}


def test_client_dp_divides_by_the_configured_m_not_by_who_was_drawn():
    # Poisson sampling drew 6 clients where 4 are expected: the mean over the 6 becomes sum / 4 and
    # the noise stays z C / 4 (a denominator that moved with the draw would leak who took part).
    dp = ClientDP(privacy_cfg(client_dp=dict(enabled=True, noise_multiplier=1.3, clip=0.7)))
    out, metrics = run_server_hooks([dp], torch.ones(1_000_000), RoundContext(0, 6, 6, 10))
    assert float(out.mean()) == pytest.approx(1.5, abs=0.001)
    assert float(out.std()) == pytest.approx(1.3 * 0.7 / 4, rel=0.02) and metrics["dp/noise_std"] == pytest.approx(1.3 * 0.7 / 4)
    assert dp.accountant.history == [(1.3, 0.4, 1)]


def test_a_round_with_no_client_still_releases_the_noise_and_spends_epsilon():
    n = 5000
    cfg = load_config("configs/tiny.yaml", ["clients.num=10", "clients.per_round=2", "clients.sampling=poisson",
                                            "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1.0",
                                            "privacy.client_dp.clip=0.5"])
    agg = Aggregator(cfg, torch.zeros(n))
    metrics = agg.aggregate(0, [], [])
    assert float(agg.global_params().std()) == pytest.approx(1.0 * 0.5 / 2, rel=0.05)
    assert metrics["dp/epsilon"] == pytest.approx(epsilon_for(1.0, 0.2, 1, 1e-5))
    plain = Aggregator(load_config("configs/tiny.yaml", ["clients.num=10"]), torch.zeros(n))
    assert plain.aggregate(0, [], []) == {"bytes_up": 0.0, "lora/upload_params": 0.0, "bytes_down": 0.0}
    assert torch.equal(plain.global_params(), torch.zeros(n))


def test_client_dp_without_noise_and_with_a_huge_clip_is_uniform_fedavg():
    cfg = privacy_cfg(client_dp=dict(enabled=True, noise_multiplier=0.0, clip=1e9))
    cfg.clients.per_round = 3
    chain = build_postprocessors(cfg)
    gen = torch.Generator().manual_seed(1)
    deltas = [torch.randn(1000, generator=gen) for _ in range(3)]
    updates = []
    for c, (d, n) in enumerate(zip(deltas, (10, 50, 200))):
        out, w, _ = run_client_hooks(chain, d, float(n), ClientContext(c, 0, n, 3, 10))
        updates.append(Update(c, out, n, w))
    dp_avg, plain = FedAvg(), FedAvg()
    for s in (dp_avg, plain):
        s.initialize(torch.zeros(1000), 10)
    dp_avg.aggregate(0, updates, lambda step: run_server_hooks(chain, step, RoundContext(0, 3, 3, 10)))
    plain.aggregate(0, [Update(c, d, 1, 1.0) for c, d in enumerate(deltas)])
    assert torch.allclose(dp_avg.global_params(), plain.global_params(), atol=1e-6)
    assert torch.allclose(plain.global_params(), sum(deltas) / 3, atol=1e-6)


def test_client_dp_state_resumes_the_noise_and_the_accountant_exactly():
    cfg = privacy_cfg(client_dp=dict(enabled=True, noise_multiplier=1.0))
    a = ClientDP(cfg)
    run_server_hooks([a], torch.zeros(100), RoundContext(0, 4, 4, 10))
    b = ClientDP(cfg)
    b.load_state_dict(a.state_dict())
    out_a, m_a = run_server_hooks([a], torch.zeros(100), RoundContext(1, 4, 4, 10))
    out_b, m_b = run_server_hooks([b], torch.zeros(100), RoundContext(1, 4, 4, 10))
    assert torch.equal(out_a, out_b) and m_a == m_b
    assert m_a["dp/epsilon"] == pytest.approx(epsilon_for(1.0, 0.4, 2, 1e-5))


def test_client_dp_calibrates_to_the_target_over_the_rounds():
    cfg = privacy_cfg(client_dp=dict(enabled=True, epsilon=4.0, accountant="rdp"))
    cfg.clients.per_round = 10  # q = 1: calibration is quick
    p = ClientDP(cfg).params()
    assert p["dp/target_epsilon"] == 4.0 and p["dp/sample_rate"] == 1.0
    assert 0.97 * 4.0 <= p["dp/planned_epsilon"] <= 4.0
    assert p["dp/noise_multiplier"] == calibrate_noise(4.0, 1e-5, 1.0, 5, "rdp")


# ---------------------------------------------------------------------------------------------
# DP-LoRA

LAYOUT = [("m.layers.0.q_proj.lora_A.default.weight", 300), ("m.layers.0.q_proj.lora_B.default.weight", 200),
          ("m.layers.0.v_proj.lora_A.default.weight", 300), ("m.layers.0.v_proj.lora_B.default.weight", 200)]


def test_dp_lora_clips_the_a_and_b_parts_each_to_their_own_norm():
    cfg = privacy_cfg(dp_lora=dict(enabled=True, clip=1.0, noise_multiplier=0.0))
    [dp] = build_postprocessors(cfg, LAYOUT)
    masks = part_masks(LAYOUT)
    assert masks["lora_A"].sum() == 600 and masks["lora_B"].sum() == 400
    assert not (masks["lora_A"] & masks["lora_B"]).any()
    delta = torch.zeros(1000)
    delta[masks["lora_A"]] = 5.0  # norm ~122: clipped
    delta[masks["lora_B"]] = 0.01  # norm 0.2: kept
    out, weight, metrics = dp.on_client_update(delta, 7.0, ClientContext(0, 0, 7, 3, 3))
    assert weight == 7.0
    assert float(out[masks["lora_A"]].norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(out[masks["lora_A"]], torch.full((600,), 1 / math.sqrt(600)), atol=1e-6)
    assert torch.equal(out[masks["lora_B"]], delta[masks["lora_B"]])
    assert metrics["dp_lora/clipped_A"] == 1.0 and metrics["dp_lora/clipped_B"] == 0.0


def test_dp_lora_noise_and_per_client_accounting():
    big = [("x.lora_A.w", 200_000), ("x.lora_B.w", 100_000)]
    cfg = privacy_cfg(dp_lora=dict(enabled=True, clip=0.5, noise_multiplier=2.0))
    dp = DPLoRA(cfg, big)
    state = {}
    out, _, m1 = dp.on_client_update(torch.zeros(300_000), 1.0, ClientContext(3, 0, 1, 3, 3, state))
    assert float(out[:200_000].std()) == pytest.approx(1.0, rel=0.02)  # z * C per entry, each part
    assert float(out[200_000:].std()) == pytest.approx(1.0, rel=0.02)
    # Each participation is two Gaussian mechanisms (A and B) on the client's data, no sampling.
    assert m1["dp_lora/epsilon"] == pytest.approx(epsilon_for(2.0, 1.0, 2, 1e-5))
    _, _, m2 = dp.on_client_update(torch.zeros(300_000), 1.0, ClientContext(3, 4, 1, 3, 3, state))
    assert m2["dp_lora/epsilon"] == pytest.approx(epsilon_for(2.0, 1.0, 4, 1e-5))
    assert m2["dp_lora/epsilon"] > m1["dp_lora/epsilon"]
    # The noise is a function of (seed, client, round) only.
    again, _, _ = DPLoRA(cfg, big).on_client_update(torch.zeros(300_000), 1.0, ClientContext(3, 0, 1, 3, 3))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="'x.bias' is neither a lora_A nor a lora_B"):
        part_masks([*big, ("x.bias", 3)])
    with pytest.raises(RuntimeError, match="needs the adapter layout"):
        DPLoRA(cfg).on_client_update(torch.zeros(3), 1.0, ClientContext(0, 0, 1, 3, 3))


# ---------------------------------------------------------------------------------------------
# Record-level DP-SGD with Opacus on the tiny model


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """The tiny random Llama with LoRA, on its device before peft and Opacus touch it, a set of
    labelled prompts, and their loss, outside Ray."""
    from fedsim.data.prompt import DEFAULT_TEMPLATE, render_prompt
    from fedsim.models.loader import build_tiny_random, load_base
    from fedsim.models.lora import attach_lora, flat_layout, trainable
    from fedsim.models.scoring import answer_token_ids, encode, preference_loss, yes_no_logits

    cfg = load_config("configs/tiny.yaml", ["privacy.sample_dp.enabled=true", "privacy.sample_dp.noise_multiplier=1.0"])
    titles = [f"Movie {i}" for i in range(40)]
    texts = [DEFAULT_TEMPLATE, 'Liked: Disliked: Target movie: "none" Answer: Yes No', *titles]
    base, tok = load_base(str(build_tiny_random(tmp_path_factory.mktemp("tiny") / "model", texts)), "float32")
    model = attach_lora(base, cfg.model.lora, 0)
    yes, no = answer_token_ids(tok)
    rng = np.random.default_rng(0)
    # Prompts of different lengths, so batches are padded.
    prompts = [render_prompt(list(rng.choice(titles, rng.integers(0, 5))), list(rng.choice(titles, 2)),
                             rng.choice(titles)) for _ in range(32)]
    labels = torch.tensor(rng.integers(0, 2, 32))

    def loss_of(idx):
        batch = encode(tok, [prompts[i] for i in idx], cfg.model.max_length, "cpu")
        return preference_loss(yes_no_logits(model, batch, yes, no), labels[idx])

    sdp = SampleDP(model, cfg)  # attaches Opacus' per-sample-gradient hooks
    model.train()
    return dict(cfg=cfg, model=model, params=trainable(model), layout=flat_layout(model), loss_of=loss_of, sdp=sdp)


def _flat(params):
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


def _set(params, flat):
    from fedsim.models.lora import set_flat

    set_flat(params, flat)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_of_the_lora_layers_match_single_example_gradients(tiny_lm):
    params, loss_of = tiny_lm["params"], tiny_lm["loss_of"]
    assert [n for n, _ in tiny_lm["layout"]] and all(".lora_A." in n or ".lora_B." in n for n, _ in tiny_lm["layout"])
    loss_of(np.arange(4)).backward()
    per_sample = [p.grad_sample.clone() for p in params]
    assert all(g.shape == (4, *p.shape) for g, p in zip(per_sample, params))
    for p in params:
        p.grad, p.grad_sample = None, None
    for i in range(4):
        loss_of(np.array([i])).backward()
        for p, g in zip(params, per_sample):
            assert torch.allclose(p.grad, g[i], atol=1e-6, rtol=1e-4)
            p.grad, p.grad_sample = None, None


def test_one_dp_step_changes_the_lora_weights(tiny_lm):
    params, loss_of = tiny_lm["params"], tiny_lm["loss_of"]
    start = _flat(params)
    opt = dp_optimizer(torch.optim.AdamW(params, lr=1e-2), 0.0, 1.0, 8, seed=0)
    loss = dp_step(opt, params, loss_of, np.arange(8))
    assert loss > 0
    moved = _flat(params) - start
    starts = np.cumsum([0] + [k for _, k in tiny_lm["layout"]])
    b = torch.cat([moved[i:i + k] for i, (n, k) in zip(starts, tiny_lm["layout"]) if ".lora_B." in n])
    assert b.abs().max() > 1e-4  # peft starts B at zero: a real gradient step moved it
    _set(params, start)


def test_dp_sgd_noise_is_z_times_max_grad_norm_on_the_clipped_sum(tiny_lm):
    params, loss_of = tiny_lm["params"], tiny_lm["loss_of"]
    start = _flat(params)
    after = {}
    for z in (0.0, 3.0):
        _set(params, start)
        # SGD with lr 1: the step is the gradient Opacus hands the optimizer, (clipped sum + noise) / 8.
        opt = dp_optimizer(torch.optim.SGD(params, lr=1.0), z, 0.05, 8, seed=1)
        dp_step(opt, params, loss_of, np.arange(8, 16))
        after[z] = _flat(params)
    clipped_sum = (start - after[0.0]) * 8
    assert float(clipped_sum.norm()) <= 8 * 0.05 * (1 + 1e-4)  # eight per-sample gradients, each clipped to 0.05
    noise = (after[0.0] - after[3.0]) * 8
    assert float(noise.std()) == pytest.approx(3.0 * 0.05, rel=0.1)  # ~1800 entries
    # An empty Poisson batch still takes a step: noise only.
    _set(params, start)
    opt = dp_optimizer(torch.optim.SGD(params, lr=1.0), 3.0, 0.05, 8, seed=2)
    assert dp_step(opt, params, loss_of, np.array([], dtype=int)) is None
    assert float(((start - _flat(params)) * 8).std()) == pytest.approx(0.15, rel=0.1)
    _set(params, start)


def test_sample_dp_training_keeps_a_per_client_accountant(tiny_lm):
    params, loss_of, sdp = tiny_lm["params"], tiny_lm["loss_of"], tiny_lm["sdp"]
    start = _flat(params)
    state = {}
    rng = np.random.default_rng(0)
    q = sdp.sample_rate(32)
    assert q == 8 / 32 and sdp.expected_samples(32, 3) == 24
    losses, seen, m1 = sdp.train(torch.optim.AdamW(params, lr=1e-3), loss_of, 32, 3, rng,
                                 client=0, round=0, state=state)
    assert len(losses) <= 3 and 0 <= seen <= 32 * 3
    assert state["sample_dp"]["history"] == [[1.0, 0.25, 3]]
    assert m1["dp/sample_epsilon"] == pytest.approx(epsilon_for(1.0, 0.25, 3, 1e-5))
    _, _, m2 = sdp.train(torch.optim.AdamW(params, lr=1e-3), loss_of, 32, 3, rng, client=0, round=1, state=state)
    assert m2["dp/sample_epsilon"] == pytest.approx(epsilon_for(1.0, 0.25, 6, 1e-5))
    assert m2["dp/sample_epsilon"] > m1["dp/sample_epsilon"]
    assert not torch.equal(_flat(params), start)
    _set(params, start)


def test_sample_dp_calibrates_per_client_from_its_sample_rate():
    cfg = load_config("configs/tiny.yaml", ["privacy.sample_dp.enabled=true", "privacy.sample_dp.epsilon=8",
                                            "train.batch_size=16"])
    sdp = SampleDP.__new__(SampleDP)  # the calibration only; no model needed
    sdp.p, sdp.rounds, sdp.batch_size = cfg.privacy.sample_dp, cfg.train.rounds, cfg.train.batch_size
    z = sdp.noise_multiplier(16, 4)  # q = 1: 2 rounds x 4 local steps
    assert 0.97 * 8 <= epsilon_for(z, 1.0, 8, 1e-5) <= 8
    cfg.privacy.sample_dp.epsilon = 1e-3
    with pytest.raises(ValueError, match=r"privacy.sample_dp.epsilon: 0.001 cannot be reached with delta=1e-05 in 8 "
                                         r"local steps \(train.rounds=2 x 4\) at sample rate 1"):
        sdp.noise_multiplier(16, 4)


# ---------------------------------------------------------------------------------------------
# Whole runs on a local Ray


def mlflow_client(cfg):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)


def test_run_with_client_dp_logs_epsilon_every_round(ray_local, tiny_cfg):
    cfg = tiny_cfg("train.rounds=3", "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1.0",
                   "privacy.client_dp.clip=0.5")
    summary = run(cfg, **QUIET)
    assert summary["complete"] and summary["rounds_done"] == 3
    client = mlflow_client(cfg)
    r = client.get_run(summary["mlflow_run_id"])
    p = r.data.params
    assert p["dp/noise_multiplier"] == "1.0" and p["dp/sample_rate"] == "1.0" and p["dp/delta"] == "1e-05"
    assert p["dp/accountant"] == "rdp" and p["dp/clip"] == "0.5" and p["privacy.client_dp.enabled"] == "True"
    hist = client.get_metric_history(r.info.run_id, "dp/epsilon")
    assert [m.step for m in hist] == [0, 1, 2]
    eps = [m.value for m in hist]
    assert eps[0] < eps[1] < eps[2] and eps[2] == pytest.approx(float(p["dp/planned_epsilon"]))
    assert eps[1] == pytest.approx(epsilon_for(1.0, 1.0, 2, 1e-5))
    assert [m.step for m in client.get_metric_history(r.info.run_id, "client/0/dp/clipped")] == [0, 1, 2]


def test_a_run_with_poisson_client_sampling_accounts_every_round_even_an_empty_one(ray_local, tiny_cfg):
    over = ["clients.num=6", "clients.per_round=1", "clients.sampling=poisson", "train.rounds=3",
            "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1.0", "privacy.client_dp.clip=0.5"]
    cfg = tiny_cfg(*over)
    drawn = [sample_clients(cfg, r) for r in range(3)]
    assert [] in drawn and any(len(d) > 1 for d in drawn), drawn  # this seed has an empty and a crowded round
    summary = run(cfg, **QUIET)
    assert summary["complete"]
    history = load_checkpoint(Path(summary["run_dir"]))["history"]
    assert [h["clients_sampled"] for h in history] == [len(d) for d in drawn]
    assert [h["dp/epsilon"] for h in history] == pytest.approx([epsilon_for(1.0, 1 / 6, r + 1, 1e-5) for r in range(3)])
    assert all(h["update_norm"] > 0 for h in history)  # noise even where no one trained


def test_run_with_sample_dp_and_dp_lora_logs_client_epsilons(ray_local, tiny_cfg):
    cfg = tiny_cfg("privacy.sample_dp.enabled=true", "privacy.sample_dp.noise_multiplier=1.0",
                   "privacy.dp_lora.enabled=true", "privacy.dp_lora.noise_multiplier=5.0", "privacy.dp_lora.clip=0.1")
    summary = run(cfg, **QUIET)
    assert summary["complete"] and 0 <= summary["final"]["auc"] <= 1
    client = mlflow_client(cfg)
    r = client.get_run(summary["mlflow_run_id"])
    assert r.data.params["dp_lora/noise_multiplier"] == "5.0"
    for c in range(3):
        eps = [m.value for m in client.get_metric_history(r.info.run_id, f"client/{c}/dp/sample_epsilon")]
        assert len(eps) == 2 and 0 < eps[0] < eps[1]
        lora_eps = [m.value for m in client.get_metric_history(r.info.run_id, f"client/{c}/dp_lora/epsilon")]
        assert lora_eps == [pytest.approx(epsilon_for(5.0, 1.0, k, 1e-5)) for k in (2, 4)]
    # q = batch_size / rows of the client (the tiny config caps rows at 64).
    q = client.get_metric_history(r.info.run_id, "client/0/dp/sample_rate")[0].value
    eps0 = client.get_metric_history(r.info.run_id, "client/0/dp/sample_epsilon")[-1].value
    assert q == 8 / 64 and eps0 == pytest.approx(epsilon_for(1.0, q, 2 * 4, 1e-5))  # 2 rounds x 4 local steps
    adapter = load_file(Path(summary["run_dir"]) / "adapter" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0


def test_resume_with_client_dp_and_sample_dp_equals_an_uninterrupted_run(ray_local, tiny_cfg):
    cfg = tiny_cfg("train.rounds=3", "clients.per_round=2", "privacy.client_dp.enabled=true",
                   "privacy.client_dp.noise_multiplier=0.5", "privacy.sample_dp.enabled=true",
                   "privacy.sample_dp.noise_multiplier=1.0")
    full = run(cfg, **QUIET)
    sim = Simulation(cfg, **QUIET)
    partial = sim.run(stop_after=2)
    assert not partial["complete"] and load_checkpoint(sim.run_dir)["round"] == 1
    resumed = run(run_dir=sim.run_dir, **QUIET)
    assert resumed["complete"]
    for key in ("auc", "logloss", "accuracy"):
        assert resumed["final"][key] == pytest.approx(full["final"][key], abs=1e-6), key
    a = load_file(Path(full["run_dir"]) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(resumed["run_dir"]) / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    h_full = load_checkpoint(Path(full["run_dir"]))["history"]
    h_res = load_checkpoint(sim.run_dir)["history"]
    eps_keys = [k for k in h_full[-1] if k == "dp/epsilon" or k.endswith("dp/sample_epsilon")]
    assert "dp/epsilon" in eps_keys and len(eps_keys) == 3  # two sampled clients in the last round
    for k in eps_keys:
        assert h_res[-1][k] == pytest.approx(h_full[-1][k]), k
    assert h_full[-1]["dp/epsilon"] == pytest.approx(epsilon_for(0.5, 2 / 3, 3, 1e-5))


def test_unreachable_target_fails_in_the_cli_before_any_actor(tmp_path, capsys):
    from fedsim.cli import main

    code = main(["run", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}", "--set", "tracking.enabled=false",
                 "--set", "privacy.client_dp.enabled=true", "--set", "privacy.client_dp.epsilon=0.0001",
                 "--set", "privacy.client_dp.delta=0.001"])
    err = capsys.readouterr().err
    assert code == 2
    assert "privacy.client_dp.epsilon: 0.0001 cannot be reached" in err and "Traceback" not in err


def test_membership_audit_sees_memorisation_and_not_an_untrained_model(ray_local, tiny_cfg, tmp_path, capsys):
    import pandas as pd

    from fedsim.cli import main
    from fedsim.compare import compare_runs
    from fedsim.simulation import run

    # Eight rows per client (and eight held out as non-members), 8 rounds of 40 steps: the averaged
    # model memorises its members. Measured (mia_auc, its interval's low end): 0.903, 0.793 (seed 0)
    # and 0.893, 0.750 (seed 1). An earlier 2 rounds at lr 0.05 memorised on one CPU and diverged on
    # another (AVX-512: member loss 0.73, above the held-out rows' 0.69): too fast a rate is chaos.
    memorised = run(tiny_cfg("privacy.audit.enabled=true", "data.max_train_per_client=16", "privacy.audit.holdout=0.5",
                             "train.local_steps=40",
                             "train.lr=0.01", "train.batch_size=8", "train.rounds=8", "tracking.enabled=false"),
                    log=lambda *a: None)
    f = memorised["final"]
    assert f["privacy/member_loss"] < f["privacy/nonmember_loss"]
    assert f["privacy/mia_auc"] > 0.65, f
    # Its 95 % interval over the scored rows brackets it and excludes 0.5: the leak is not noise.
    assert 0.5 < f["privacy/mia_auc_ci_low"] < f["privacy/mia_auc"] < f["privacy/mia_auc_ci_high"]
    # One tiny step: members and held-out rows look alike to the attack.
    untrained = run(tiny_cfg("privacy.audit.enabled=true", "train.local_steps=1", "train.lr=1e-6",
                             "train.rounds=1", "tracking.enabled=false"), log=lambda *a: None)
    u = untrained["final"]["privacy/mia_auc"]
    print(f"membership-inference AUC: memorised {f['privacy/mia_auc']:.3f}, untrained {u:.3f}")
    assert abs(u - 0.5) < 0.12 and f["privacy/mia_auc"] > u + 0.1

    # The audit's rows are kept (audit.parquet), so two runs' attacks compare as a paired difference:
    # the memorising run against the same members and held-out rows after one round of the same training.
    early = run(tiny_cfg("privacy.audit.enabled=true", "data.max_train_per_client=16", "privacy.audit.holdout=0.5",
                         "train.local_steps=40", "train.lr=0.01", "train.batch_size=8", "train.rounds=1",
                         "tracking.enabled=false", "name=early"), log=lambda *a: None)
    audit = pd.read_parquet(Path(memorised["run_dir"]) / "audit.parquet")
    assert list(audit.columns) == ["user", "item", "timestamp", "client", "member", "loss"]
    assert audit.groupby("member")["loss"].mean().to_dict() == pytest.approx(
        {1: f["privacy/member_loss"], 0: f["privacy/nonmember_loss"]})
    d = compare_runs(memorised["run_dir"], early["run_dir"], audit=True)
    assert d["rows"] == len(audit) and d["positives"] == audit["member"].sum()
    # the same rows as each run's own audit: its AUC is the logged one, the difference theirs
    assert d["a"]["auc"] == pytest.approx(f["privacy/mia_auc"], abs=1e-12)
    assert d["diff"] == pytest.approx(f["privacy/mia_auc"] - early["final"]["privacy/mia_auc"], abs=1e-12)
    print(f"attack after 8 rounds − after 1: {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({d['verdict']})")
    assert d["low"] < d["diff"] < d["high"] and d["verdict"] in ("A leaks more", "within noise", "B leaks more")
    with pytest.raises(ValueError, match="--audit compares two runs' membership attacks; a baseline has none"):
        compare_runs(memorised["run_dir"], "baseline:popularity", audit=True)
    with pytest.raises(FileNotFoundError, match="has no audit.parquet: privacy.audit was off"):
        compare_runs(memorised["run_dir"], tmp_path, audit=True)
    capsys.readouterr()
    assert main(["compare", memorised["run_dir"], early["run_dir"], "--audit"]) == 0
    out = capsys.readouterr().out
    assert f"membership-attack AUC {f['privacy/mia_auc']:.4f}" in out and f"({d['positives']} members;" in out


def test_audit_holdout_rows_are_never_trained_on_and_are_the_non_members(prepare_run, tmp_path):
    cfg = load_config("configs/tiny.yaml", ["tracking.enabled=false", "privacy.audit.enabled=true",
                                            "privacy.audit.holdout=0.5", "data.max_train_per_client=20",
                                            "train.local_steps=10", "train.batch_size=4"])
    ex = prepare_run("holdout", cfg).executor(tmp_path / "own", cfg)
    key = lambda df: set(zip(df["user"], df["item"], df["timestamp"]))  # noqa: E731
    train, held = ex._train_rows(0)
    assert len(train) == len(held) == 10
    assert key(train).isdisjoint(key(held)) and key(train) | key(held) == key(ex._rows(0, "train"))
    assert key(ex._train_rows(0)[1]) == key(held)  # a pure function of (seed, client): the same every call
    # 10 steps x 4 rows over 10 trainable rows: the client reaches every one, and no held-out row.
    ex.train(0, 0, ex.initial_params(), 5e-3, [0])
    scored = ex.membership(0, ex.initial_params(), 64)
    # Non-members: the held-out rows of the members' users (scored in the same order).
    assert len(scored["member"]) == 10 and len(scored["nonmember"]) == held["user"].isin(train["user"]).sum() > 0
    members = ex.store.latest(0)["members"]
    assert key(train.iloc[members]) == key(train)
