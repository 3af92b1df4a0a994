"""RecLoRA personalisation (`model.personal`): the bank routed per row equals the adapters it mixes,
the router gives each user their own mix, what is uploaded is the bank (and the router only when
shared), the config refuses what the bank cannot run with, and a federated bank learns."""
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim.config import ConfigError, load_config
from fedsim.data.prompt import render_prompt
from fedsim.models.bank import Bank
from fedsim.models.loader import load_base
from fedsim.models.lora import attach_lora, lora_sites
from fedsim.models.scoring import answer_token_ids, encode, yes_no_logits

BANK = ["tracking.enabled=false", "model.personal.bank=4"]


def tiny(*overrides):
    return load_config("configs/tiny.yaml", ["tracking.enabled=false", *overrides])


@pytest.fixture(scope="module")
def prepared(prepare_run):
    return prepare_run("personal", tiny(*BANK))


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("overrides,message", [
    (["model.personal.bank=-1"], r"model.personal.bank: -1 must be >= 0 \(0 = off\)"),
    (["model.personal.bank=2", "model.personal.temperature=0"], "model.personal.temperature: 0.0 must be > 0"),
    (["model.personal.bank=2", "model.personal.router_hidden=-3"], "model.personal.router_hidden: -3 must be >= 0"),
    (["model.personal.merge=sum"], "model.personal.merge: 'sum' is not one of"),
    (["model.personal.crm=lstm"], "model.personal.crm: 'lstm' is not one of"),
    (["model.personal.bank=2", "model.personal.crm=sequential", "model.personal.crm_history=0"],
     "model.personal.crm_history: 0 must be >= 1"),
    (["model.personal.bank=2", "strategy.lora_mode=stack"],
     "model.personal.bank: 2 cannot be combined with strategy.lora_mode 'stack'"),
    (["model.personal.bank=2", "storage.mode=split", "model.tiny_layers=3"],
     "model.personal.bank: 2 cannot be combined with storage.mode 'split'"),
    (["model.personal.bank=2", "privacy.sample_dp.enabled=true", "privacy.sample_dp.noise_multiplier=1"],
     "model.personal.bank: 2 cannot be combined with privacy.sample_dp"),
    (["model.personal.bank=2", "model.personal.share_router=true", "privacy.dp_lora.enabled=true"],
     "model.personal.share_router: True cannot be combined with privacy.dp_lora"),
    (["model.personal.bank=2", "unlearning.shards=2"], "model.personal.bank: 2 replaces the peft adapter"),
    (["model.personal.bank=2", "model.personal.crm=sequential", "model.personal.crm_training=federated"],
     "model.personal.crm_training: 'federated' needs model.personal.crm mf"),
    (["model.personal.bank=2", "model.personal.crm_rounds=0"], "model.personal.crm_rounds: 0 must be >= 1"),
])
def test_bad_or_incompatible_personal_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_what_the_bank_runs_with():
    for extra in ([], ["strategy.lora_mode=ffa"], ["strategy.lora_mode=fedsa"], ["strategy.name=pplr"],
                  ["privacy.dp_lora.enabled=true"], ["privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1",
                                                     "privacy.client_dp.delta=0.1"], ["privacy.secagg.enabled=true"]):
        assert tiny("model.personal.bank=2", *extra).model.personal.bank == 2


# ---------------------------------------------------------------------------------------------
# The bank in the model


def _model_and_batch(prepared):
    base, tok = load_base(prepared.model_path, "float32")
    model = attach_lora(base, tiny().model.lora, 0)
    rows = pd.read_parquet(prepared.run_dir / "shards" / "client_0000.parquet").head(6)
    prompts = [render_prompt(a, b, t) for a, b, t in zip(rows["liked"], rows["disliked"], rows["title"])]
    return model, encode(tok, prompts, 128, torch.device("cpu")), answer_token_ids(tok)


def _set_peft(model, As, Bs):
    """The model's plain peft LoRA takes factors As[i], Bs[i] at its i-th site."""
    with torch.no_grad():
        for site, a, b in zip(lora_sites(model), As, Bs):
            site.A.copy_(a)
            site.B.copy_(b)


@torch.no_grad()
def test_one_hot_weights_are_the_single_adapter_and_a_bank_of_one_is_plain_lora(prepared):
    model, batch, (yes, no) = _model_and_batch(prepared)
    ref = copy.deepcopy(model)  # plain LoRA, for comparison
    bank = Bank(model, lora_sites(model), 3, "weights", seed=0)
    gen = torch.Generator().manual_seed(1)
    for _, layer in bank.layers:  # trained-looking factors (B starts at 0)
        layer.A.copy_(torch.randn(layer.A.shape, generator=gen) * 0.3)
        layer.B.copy_(torch.randn(layer.B.shape, generator=gen) * 0.3)
    n = batch["input_ids"].shape[0]
    ks = [0, 2, 1, 2, 0, 1][:n]  # rows through different adapters, not in slot order
    bank.set(torch.eye(3)[ks])
    mixed = yes_no_logits(model, batch, yes, no)
    for k in range(3):
        _set_peft(ref, [layer.A[k] for _, layer in bank.layers], [layer.B[k] for _, layer in bank.layers])
        want = yes_no_logits(ref, batch, yes, no)
        rows = [i for i in range(n) if ks[i] == k]
        torch.testing.assert_close(mixed[rows], want[rows], rtol=1e-5, atol=1e-5)
        bank.set(torch.eye(3)[[k] * n])  # every row through adapter k (the one-bmm path)
        torch.testing.assert_close(yes_no_logits(model, batch, yes, no), want, rtol=1e-5, atol=1e-5)
    # RecLoRA's merge: one user's alpha mixes the factors, A_u = sum a_k A_k, B_u = sum a_k B_k.
    alpha = torch.tensor([0.5, 0.3, 0.2])
    bank.set(alpha.repeat(n, 1))
    _set_peft(ref, [torch.einsum("k,kri->ri", alpha, layer.A) for _, layer in bank.layers],
              [torch.einsum("k,kor->or", alpha, layer.B) for _, layer in bank.layers])
    torch.testing.assert_close(yes_no_logits(model, batch, yes, no), yes_no_logits(ref, batch, yes, no),
                               rtol=1e-5, atol=1e-5)

    # A bank of one is plain LoRA: the same init (B = 0, A = peft's), the same output once trained.
    model, batch, _ = _model_and_batch(prepared)
    init = [s.A.detach().clone() for s in lora_sites(model)]
    Bs = [torch.randn(s.B.shape, generator=gen) * 0.3 for s in lora_sites(model)]
    _set_peft(model, init, Bs)
    ref = copy.deepcopy(model)
    one = Bank(model, lora_sites(model), 1, "outputs", seed=0)
    for (_, layer), a, b in zip(one.layers, init, Bs):
        assert torch.equal(layer.A[0], a) and not layer.B.any()
        layer.B[0] = b
    one.set(torch.ones(n, 1))
    torch.testing.assert_close(yes_no_logits(model, batch, yes, no), yes_no_logits(ref, batch, yes, no),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The router and the upload


def test_each_user_gets_their_own_mix_and_the_upload_is_the_bank(prepared, tmp_path):
    cfg = tiny(*BANK)
    ex = prepared.executor(tmp_path / "own", cfg)
    sites = lora_sites(attach_lora(load_base(prepared.model_path, "float32")[0], cfg.model.lora, 0))
    plain_lora, plain_b = sum(s.A.numel() + s.B.numel() for s in sites), sum(s.B.numel() for s in sites)
    rows = ex._rows(0, "train")
    with torch.no_grad():
        alpha = ex.adapter.alpha(rows).numpy()
    assert alpha.shape == (len(rows), 4) and np.allclose(alpha.sum(1), 1)
    per_user = pd.DataFrame(alpha).groupby(rows["user"].to_numpy()).agg(["min", "max"])
    assert len(per_user) >= 3
    spread = per_user.xs("max", axis=1, level=1).to_numpy() - per_user.xs("min", axis=1, level=1).to_numpy()
    assert np.abs(spread).max() < 1e-6  # one user, one mix
    users = pd.DataFrame(alpha).groupby(rows["user"].to_numpy()).first().to_numpy()
    assert np.abs(users[:, None] - users[None]).max() > 0.01  # different users, different mixes

    router0 = torch.cat([p.detach().reshape(-1) for p in ex.adapter.router.parameters()]).clone()
    meta, delta = ex.train(0, 0, ex.initial_params(), cfg.train.lr, [0, 1, 2])
    assert delta.numel() == 4 * plain_lora  # the bank's A and B: the upload
    assert meta["metrics"]["personal/alpha_entropy"] < np.log(4)
    saved = ex.store.load(0, 2**62)
    assert saved["local"].numel() == router0.numel()  # the router stays with the client, trained
    assert not torch.equal(saved["local"], router0)
    assert ex.adapter.describe()["personal/upload_params"] == 4 * plain_lora

    shared = prepared.executor(tmp_path / "shared", tiny(*BANK, "model.personal.share_router=true",
                                                          "strategy.lora_mode=ffa"))
    meta, delta = shared.train(0, 0, shared.initial_params(), cfg.train.lr, [0, 1, 2])
    # ffa: only each B_k travels; a shared router travels with it.
    assert delta.numel() == 4 * plain_b + router0.numel()
    assert "local" not in shared.store.load(0, 2**62)


# ---------------------------------------------------------------------------------------------
# It learns

# tests/test_learning.py's setting: synthetic users whose labels follow their own like-tendency.
LEARNS = ["data.synthetic.generosity=3.0", "data.synthetic.num_users=120", "data.synthetic.num_clusters=8",
          "data.max_test_per_client=null", "train.rounds=5", "train.local_steps=10", "train.lr=0.01",
          "train.schedule=cosine", "train.warmup=0.1"]


@pytest.mark.parametrize("crm", ["mf", "sequential", "mf-federated", "mf-fused"])
def test_a_federated_bank_learns(tiny_cfg, tmp_path, crm):
    """3 clients, 5 FedAvg rounds of the bank (4 meta-LoRAs) with private routers, fedsim's client
    and server code in one process (`fedsim.inprocess`). Measured (mf): test AUC 0.87 and train loss
    0.68 -> 0.34; with training off (train.lr=1e-9) AUC 0.47, so the bar fails a bank that does not
    train. sequential (routed by the DIN-style CRM's pooled history): see docs/personalisation.md."""
    from fedsim.inprocess import train_in_process
    from fedsim.metrics import auc

    crm_keys = {"mf-federated": ["model.personal.crm=mf", "model.personal.crm_training=federated"],
                # the 3 clients of each round trained at once (train_many), each through its own router
                "mf-fused": ["model.personal.crm=mf", "executors.fused=true"]}.get(crm, [f"model.personal.crm={crm}"])
    cfg = tiny_cfg(*LEARNS, *BANK, *crm_keys)
    ex, strategy, losses, _ = train_in_process(cfg, tmp_path / "run")
    results = [ex.evaluate(c, strategy.params_for(c), "test") for c in range(cfg.clients.num)]
    score = auc(np.concatenate([r["labels"] for r in results]), np.concatenate([r["probs"] for r in results]))
    entropy = [r["metrics"]["personal/eval_alpha_entropy"] for r in results]
    alone = auc(np.concatenate([r["labels"] for r in results]), np.concatenate([r["scores"]["crm"] for r in results]))
    print(f"RecLoRA bank of 4, crm {crm}: test AUC {score:.3f} (the CRM alone {alone:.3f}), train loss by round {np.round(losses, 3)}, "
          f"routing entropy at evaluation by client {np.round(entropy, 3)}")
    assert score >= 0.8
    assert losses[-1] < losses[0] - 0.1
    # Where each client is scored, its routing is a mix (not one meta-LoRA), sharper than uniform.
    assert all(0 < e < np.log(4) for e in entropy)


# ---------------------------------------------------------------------------------------------
# The sequential CRM (model.personal.crm: sequential)


def _synthetic_samples():
    from fedsim.data.samples import build_samples
    from fedsim.data.synthetic import make_synthetic

    ratings, items = make_synthetic(num_users=60, num_items=80, ratings_per_user=20, num_clusters=3,
                                    generosity=3.0, seed=0)
    s = build_samples(ratings, items, history_len=5)
    return s[s["split"] == "train"].reset_index(drop=True), s[s["split"] != "train"].reset_index(drop=True)


def test_the_sequential_crm_learns_and_gives_each_user_a_seeded_vector():
    """Fitted on the train rows of synthetic users whose labels follow their own like-tendency, it
    scores the later rows well above chance and above the same model untrained. Measured: held-out
    AUC 0.99 (0.67 untrained: the liked flags alone carry some signal), ~0.5 s on the tiny data."""
    from fedsim.metrics import auc
    from fedsim.models.sequential_crm import DIM, fit_sequential, sequential_scores, sequential_user_vectors

    train, held = _synthetic_samples()
    m = fit_sequential(train, seed=0, length=60)
    untrained = fit_sequential(train, seed=0, length=60, epochs=0)
    score, before = auc(held["label"], sequential_scores(m, held)), auc(held["label"], sequential_scores(untrained, held))
    print(f"sequential CRM: held-out AUC {score:.3f} ({before:.3f} untrained)")
    assert score > 0.8 and score > before + 0.1

    h = sequential_user_vectors(m, held)
    assert h.shape == (len(held), DIM)
    per_user = pd.DataFrame(h.numpy()).groupby(held["user"].to_numpy()).mean().to_numpy()
    assert len(per_user) >= 10
    gaps = np.abs(per_user[:, None] - per_user[None]).max(-1)[np.triu_indices(len(per_user), 1)]
    assert gaps.min() > 1e-4  # every pair of users apart
    assert torch.equal(h, sequential_user_vectors(fit_sequential(train, seed=0, length=60), held))  # seeded
    assert not torch.equal(h, sequential_user_vectors(fit_sequential(train, seed=1, length=60), held))


def test_a_federated_mf_shares_the_item_side_and_helps_clients_that_see_little():
    """12 clients of 5 users each: alone, a client sees too few ratings per item to learn items; FedAvg
    over the item side (user factors local) learns them from everyone. Measured: held-out AUC of the
    clients' own later rows, pooled over clients, federated 0.843 vs local 0.628 (central MF 0.842)."""
    from fedsim.baselines import fit_mf, fit_mf_federated, mf_scores
    from fedsim.data.samples import build_samples
    from fedsim.data.synthetic import make_synthetic
    from fedsim.metrics import auc

    ratings, items = make_synthetic(num_users=60, num_items=80, ratings_per_user=20, num_clusters=3, seed=0)
    s = build_samples(ratings, items, history_len=5)
    s["client"] = s["user"].rank(method="dense").astype(int) % 12
    train, held = s[s["split"] == "train"], s[s["split"] != "train"]
    clients = [train[train["client"] == c] for c in range(12)]
    shared = fit_mf_federated(clients, seed=0, rounds=20, local_steps=5)
    assert set(shared) == {"q", "bi", "b", "items", "item_of_title"}  # no user factor is shared
    assert len(shared["items"]) == train["item"].nunique()
    assert torch.equal(shared["q"], fit_mf_federated(clients, seed=0, rounds=20, local_steps=5)["q"])  # seeded

    def pooled(fit):
        labels, scores = [], []
        for c, rows in enumerate(clients):
            h = held[held["client"] == c]
            labels.append(h["label"].to_numpy())
            scores.append(mf_scores(fit(rows), h))
        return auc(np.concatenate(labels), np.concatenate(scores))

    federated = pooled(lambda rows: fit_mf(rows, 0, items=shared))
    local = pooled(lambda rows: fit_mf(rows, 0))
    print(f"MF CRM on 12 small clients: held-out AUC federated {federated:.3f}, local {local:.3f}")
    assert federated > local + 0.1 and federated > 0.75


def test_a_long_id_history_holds_only_earlier_rows():
    """A row's history: its user's train rows strictly before it (not itself, not a row of the same
    second, nothing later, no other user's), then its own text-history items, the last `length`."""
    from fedsim.models.sequential_crm import id_history

    train = pd.DataFrame({"user": [1, 1, 1, 1, 1, 2], "item": [10, 11, 12, 13, 14, 15],
                          "timestamp": [100, 200, 300, 300, 400, 50], "label": [1, 0, 1, 1, 0, 1],
                          "title": ["a", "b", "c", "d", "e", "f"]})
    rows = pd.DataFrame({"user": [1, 1, 1, 3], "item": [12, 14, 16, 10], "timestamp": [300, 400, 500, 999],
                         "liked": [["b"], [], ["f", "zzz"], ["a"]], "disliked": [[], ["c"], ["e"], []]})
    hist = id_history(train, rows, length=60)
    assert hist[0] == [(10, 1), (11, 0)]  # the row's own label (item 12) and item 13 of the same second: out
    assert hist[1] == [(10, 1), (11, 0), (12, 1), (13, 1)]  # text item c is there already
    assert hist[2] == [(10, 1), (11, 0), (12, 1), (13, 1), (14, 0), (15, 1)]  # + text f (liked); unknown zzz out
    assert hist[3] == [(10, 1)]  # a user without train rows: the text history only
    assert id_history(train, rows, length=2)[2] == [(14, 0), (15, 1)]  # the most recent


def test_through_ray_the_upload_is_the_bank_and_router_and_dp_applies_to_it(ray_local, tiny_cfg):
    """A real run (executor actors, the aggregator, the postprocessor chain) with a shared router
    under client-level DP: every round each client uploads the bank and the router, float32, the
    server clips and noises them, and the export holds the bank. The routing's entropy at each
    evaluation reaches MLflow per client, and its bar plot is an artifact."""
    import mlflow
    from safetensors.torch import load_file

    from fedsim.simulation import load_checkpoint, run

    cfg = tiny_cfg("model.personal.bank=4", "model.personal.share_router=true", "privacy.client_dp.enabled=true",
                   "privacy.client_dp.noise_multiplier=0.1", "privacy.client_dp.delta=0.1",
                   "privacy.client_dp.clip=1.0", "model.personal.crm=sequential")
    summary = run(cfg, log=lambda *a: None)
    run_dir = Path(summary["run_dir"])
    history = load_checkpoint(run_dir)["history"]
    exported = load_file(f"{run_dir}/adapter/adapter_model.safetensors")
    bank = sum(t.numel() for k, t in exported.items() if ".bank_" in k)
    router = sum(t.numel() for k, t in exported.items() if k.startswith("router."))
    assert bank > 0 and router > 0
    for h in history:
        assert h["lora/upload_params"] == bank + router
        assert h["bytes_up"] == 3 * (bank + router) * 4
    assert history[-1]["dp/epsilon"] > 0
    # Each client's routing entropy per round (an MLflow plot per client), below uniform's log 4.
    assert all(0 < h[f"client/{c}/personal/alpha_entropy"] < np.log(4) for h in history for c in range(3))
    assert {k for k in exported if k.endswith(".bank_A")} and summary["complete"]
    client, run_id = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri), summary["mlflow_run_id"]
    for c in range(3):
        logged = client.get_metric_history(run_id, f"client/{c}/personal/eval_alpha_entropy")
        assert [m.step for m in logged] == [0, 1] and all(0 < m.value < np.log(4) for m in logged)
    assert "routing_entropy.png" in {a.path for a in client.list_artifacts(run_id)}
    # The CRM alone (each client's own, what the router reads) is scored on the same rows: a column
    # of predictions.parquet, its AUC with an interval in the summary and per client in MLflow, and
    # the run's paired difference against it.
    import pandas as pd

    from fedsim.metrics import auc

    preds = pd.read_parquet(run_dir / "predictions.parquet")
    final = summary["final"]
    assert final["crm/auc"] == pytest.approx(auc(preds["label"], preds["baseline/crm"]))
    assert final["crm/auc_ci_low"] < final["crm/auc"] < final["crm/auc_ci_high"]
    assert summary["paired_vs_baselines"]["crm"]["rows"] == len(preds)
    assert [m.step for m in client.get_metric_history(run_id, "client/0/crm/auc")] == [0, 1]
    from fedsim.compare import compare_by_client  # the bank against the CRM alone, client by client

    by_client = compare_by_client(run_dir, "baseline:crm")
    assert [c["client"] for c in by_client["clients"]] == [0, 1, 2]
    assert by_client["clients"][0]["b"] == pytest.approx(history[-1]["client/0/crm/auc"])
