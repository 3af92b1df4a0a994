"""APA-style exact unlearning (fedsim.unlearning, docs/unlearning.md): shard partitions, the
per-row merge, shard adapters that never mix, and a deletion that retrains only what it touches
and ends bit for bit where a run that never saw the rows ends."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim.config import ConfigError, load_config
from fedsim.models.routing import Route, StackedLoRALinear
from fedsim.unlearning.merge import neighbour_weights, row_losses
from fedsim.unlearning.partition import assign, balanced_shards, random_shards, user_shards


def _rows(n_users=30, per_user=12, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user": np.repeat(np.arange(n_users), per_user),
                         "item": rng.integers(0, 500, n_users * per_user),
                         "timestamp": np.arange(n_users * per_user) * 7 + 10**9})


# -- partitions -------------------------------------------------------------------------------------

def test_user_partition_keeps_each_user_in_one_shard_and_is_seeded():
    rows = _rows()
    s = assign(rows, "user", 4, seed=3)
    assert rows.assign(s=s).groupby("user")["s"].nunique().max() == 1
    assert set(s) == {0, 1, 2, 3}
    assert np.array_equal(s, assign(rows, "user", 4, seed=3))
    assert not np.array_equal(s, assign(rows, "user", 4, seed=4))


def test_hash_partitions_do_not_move_rows_when_others_are_deleted():
    rows = _rows()
    for method in ("random", "user"):
        full = assign(rows, method, 4, seed=1)
        kept = (rows["user"] != 5).to_numpy() & (np.arange(len(rows)) % 3 != 0)
        assert np.array_equal(assign(rows[kept], method, 4, seed=1), full[kept])
    r = random_shards(rows["user"], rows["item"], rows["timestamp"], 4, 0)
    assert np.bincount(r, minlength=4).min() > len(rows) / 4 * 0.6  # roughly balanced
    assert np.array_equal(user_shards([7, 7, 9], 3, 0)[:2], user_shards([7, 7], 3, 0))


def test_semantic_partition_is_balanced_and_follows_the_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    x = np.concatenate([c + rng.normal(0, 0.5, (n, 2)) for c, n in zip(centres, (40, 30, 20))])
    s = balanced_shards(x, 3, seed=0)
    sizes = np.bincount(s, minlength=3)
    assert sizes.tolist() == [30, 30, 30]  # the cap ceil(90 / 3): the big cluster overflows
    # the smaller clusters stay whole, the big one keeps 30 rows in its own shard
    assert len(set(s[40:70])) == 1 and len(set(s[70:])) == 1 and len({s[40], s[70]}) == 2
    assert np.bincount(s[:40], minlength=3).max() == 30
    assert np.array_equal(s, balanced_shards(x, 3, seed=0))
    loose = balanced_shards(x, 3, seed=0, cap=60)
    assert np.bincount(loose).max() <= 60 and np.bincount(loose).max() > 30
    with pytest.raises(ValueError, match="unlearning.shard_size: 20 x 3 shards holds fewer than the 90"):
        balanced_shards(x, 3, seed=0, cap=20)
    with pytest.raises(ValueError, match="unlearning.partition=semantic needs one hidden state per train row"):
        assign(_rows(), "semantic", 2, 0)
    # One shard is plain retraining: every row in it, no hidden states asked for, the cap still checked.
    assert assign(_rows(), "semantic", 1, 0).tolist() == [0] * len(_rows())
    with pytest.raises(ValueError, match="unlearning.shard_size: 2 x 1 shards holds fewer than"):
        assign(_rows(), "semantic", 1, 0, cap=2)


def test_the_driver_scores_the_merge_on_the_idle_executors_cores():
    """A Tune trial's driver holds 0.5 CPU (1 thread); the partition's hidden states and the merge run
    while the run's executors wait, on their cores (at most the machine's), never on fewer threads
    than the process already has."""
    import os

    from fedsim.core.threads import executor_threads, threads

    cfg = load_config("configs/tiny.yaml", ["executors.num=2", "executors.num_cpus=0.75"])
    with threads(1):
        assert executor_threads(cfg) == min(2, os.cpu_count())
        with threads(executor_threads(cfg)):
            assert torch.get_num_threads() == min(2, os.cpu_count())
        assert torch.get_num_threads() == 1
    with threads(64):
        assert executor_threads(cfg) == 64


def test_unlearning_config_is_off_by_default_and_errors_name_the_key():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.unlearning.shards == 0
    ok = load_config("configs/tiny.yaml", ["unlearning.shards=4", "unlearning.partition=semantic", "unlearning.shard_size=500"])
    assert ok.unlearning.shards == 4
    cases = [(["unlearning.shards=-1"], "unlearning.shards: -1 must be >= 0"),
             (["unlearning.shards=2", "unlearning.partition=kmeans"], "unlearning.partition: 'kmeans' is not one of"),
             (["unlearning.shards=2", "unlearning.shard_size=10"], "unlearning.shard_size: 10 caps the semantic partition only"),
             (["unlearning.shards=2", "unlearning.neighbours=0"], "unlearning.neighbours: 0 must be >= 1"),
             (["unlearning.shards=2", "unlearning.merge=mean"], "unlearning.merge: 'mean' is not one of"),
             (["unlearning.shards=2", "strategy.lora_mode=stack"], "strategy.lora_mode: 'stack' exports a dense update"),
             (["unlearning.shards=2", "strategy.name=pplr"], "strategy.name: 'pplr' keeps per-client adapters"),
             (["unlearning.shards=2", "eval.split=valid"], "eval.split: 'valid' is where the merge finds"),
             (["unlearning.shards=2", "unlearning.tau=-1"], "unlearning.tau: -1.0 must be >= 0")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config("configs/tiny.yaml", overrides)


def test_unlearn_requests_are_checked_with_clear_errors(tmp_path, capsys):
    from fedsim.cli import main
    from fedsim.config import save_config
    from fedsim.unlearning.unlearn import rows_to_delete

    rows = _rows(4, 3)
    assert rows_to_delete(rows, [1, 2], None).sum() == 6
    path = tmp_path / "rows.csv"
    rows.iloc[[0, 5]].to_csv(path, index=False)
    assert rows_to_delete(rows, None, str(path)).tolist() == [i in (0, 5) for i in range(12)]
    rows.iloc[[0]].assign(timestamp=1).to_csv(path, index=False)
    with pytest.raises(ValueError, match="1 of its 1 rows are not in the run"):
        rows_to_delete(rows, None, str(path))
    rows[["user", "item"]].to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no column\(s\) \['timestamp'\]"):
        rows_to_delete(rows, None, str(path))
    with pytest.raises(ValueError, match=r"--users: the run has no rows of users \[99\]"):
        rows_to_delete(rows, [99], None)
    assert main(["unlearn", str(tmp_path)]) == 2
    assert "give exactly one of --users" in capsys.readouterr().err
    save_config(load_config("configs/tiny.yaml"), tmp_path / "config.yaml")
    assert main(["unlearn", str(tmp_path), "--users", "1"]) == 2
    assert "not a sharded run (unlearning.shards is 0)" in capsys.readouterr().err


# -- the merge --------------------------------------------------------------------------------------

def test_neighbour_weights_favour_the_adapter_that_is_right_on_similar_rows():
    keys = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    # adapter 0 is right on the first two rows, adapter 1 on the last two
    loss = np.array([[0.1, 2.0], [0.1, 2.0], [2.0, 0.1], [2.0, 0.1]])
    w = neighbour_weights(np.array([[1.0, 0.05], [0.05, 1.0]]), keys, loss, neighbours=2, tau=2.0)
    expect = np.exp(-2.0 * np.array([0.1, 2.0]))
    assert np.allclose(w[0], expect / expect.sum()) and np.allclose(w[1], expect[::-1] / expect.sum())
    assert np.allclose(neighbour_weights(keys, keys, loss, 2, tau=0.0), 0.5)  # tau 0: uniform
    p, y = np.array([[0.9, 0.2]]), np.array([1])
    assert np.allclose(row_losses(p, y), [[-math.log(0.9), -math.log(0.2)]])


def test_stacked_layer_mixes_factors_or_outputs_per_row():
    torch.manual_seed(0)
    C, r, d_in, d_out, n = 3, 2, 5, 4, 6
    base = torch.nn.Linear(d_in, d_out)
    A, B = torch.randn(C, r, d_in), torch.randn(C, d_out, r)
    route = Route(C, "cpu")
    layer = StackedLoRALinear(base, A, B, 0.5, 0.0, route).eval()
    x = torch.randn(n, 1, d_in)
    w = torch.softmax(torch.randn(n, C), 1)
    route.set_weights(w, factors=True)
    got = layer(x)
    for i in range(n):
        a, b = torch.einsum("c,crd->rd", w[i], A), torch.einsum("c,cor->or", w[i], B)
        assert torch.allclose(got[i, 0], base(x[i, 0]) + 0.5 * b @ a @ x[i, 0], atol=1e-5)
    route.set_weights(w, factors=False)
    got = layer(x)
    for i in range(n):
        mix = sum(w[i, c] * B[c] @ A[c] @ x[i, 0] for c in range(C))
        assert torch.allclose(got[i, 0], base(x[i, 0]) + 0.5 * mix, atol=1e-5)
    one = torch.eye(C)[[1] * n]  # one-hot weights: the single adapter, either way
    for factors in (True, False):
        route.set_weights(one, factors=factors)
        assert torch.allclose(layer(x)[:, 0], base(x[:, 0]) + 0.5 * x[:, 0] @ A[1].T @ B[1].T, atol=1e-5)


def test_score_cache_returns_only_what_it_holds_for_its_own_model(tmp_path):
    """Kept scores come back by prompt text, for the tag they were kept under; a prompt never scored,
    a prompt whose text changed or another model's tag is a miss (scored again), and a later put
    adds to the file without losing what it held."""
    from fedsim.unlearning.merge import ScoreCache, cached

    path = tmp_path / "scores.npz"
    c = ScoreCache(path, "adapter-a")
    assert c.get(["p1"]) is None
    c.put(["p1", "p2"], np.array([0.1, 0.2]), 0.5)
    values, seconds = c.get(["p2", "p1"])
    assert values[:, 0].tolist() == [0.2, 0.1] and seconds == 0.5
    assert c.get(["p1", "p3"]) is None and ScoreCache(path, "adapter-b").get(["p1"]) is None
    c.put(["p3"], np.array([0.3]), 0.25)
    assert c.get(["p1", "p2", "p3"])[0][:, 0].tolist() == [0.1, 0.2, 0.3]
    calls = []
    got = cached(c, ["p3", "p4"], lambda: calls.append(1) or np.array([0.33, 0.4]))[0]
    assert calls == [1] and got[:, 0].tolist() == [0.33, 0.4]  # a partial hit scores every row asked
    assert cached(c, ["p4"], lambda: calls.append(1) or np.array([9.0]))[0][:, 0].tolist() == [0.4]
    assert calls == [1]
    h = ScoreCache(tmp_path / "hidden.npz", "base")  # vectors (hidden states) as well as scores
    h.put(["a", "b"], np.arange(6.0).reshape(2, 3), 0.1)
    assert h.get(["b"])[0].tolist() == [[3.0, 4.0, 5.0]]


@pytest.fixture(scope="module")
def prepared(prepare_run):
    cfg = load_config("configs/tiny.yaml", ["tracking.enabled=false", "unlearning.shards=3"])
    return cfg, prepare_run("unlearning", cfg)


def test_stacked_shard_model_scores_like_each_peft_adapter_and_merges_in_one_forward(prepared):
    """The merge model (K adapters stacked) gives shard k's own peft model's scores; one-hot merge
    weights give the single adapter; per-row merges differ from both and from each other."""
    from fedsim.models.loader import load_base
    from fedsim.models.lora import attach_lora, export_state, get_flat, trainable
    from fedsim.models.scoring import answer_token_ids, encode, p_yes, yes_no_logits
    from fedsim.unlearning.merge import ShardModel, prompts
    from fedsim.unlearning.sharded import read_rows

    cfg, run = prepared
    rows = read_rows(run.run_dir)
    test = rows[rows["split"] == "test"].head(24).reset_index(drop=True)
    base, tok = load_base(run.model_path, "float32")
    model = attach_lora(base, cfg.model.lora, 0)
    flat0 = get_flat(trainable(model))
    states, expected = [], []
    yes, no = answer_token_ids(tok)
    for k in range(3):
        flat = flat0 + 0.3 * torch.randn(flat0.shape, generator=torch.Generator().manual_seed(k))
        state, _ = export_state(model, flat)
        states.append({n: v.clone() for n, v in state.items()})  # export_state gives views of the model
        with torch.no_grad():
            batch = encode(tok, prompts(cfg, test), cfg.model.max_length, "cpu")
            expected.append(p_yes(yes_no_logits(model, batch, yes, no)).numpy())
    m = ShardModel(cfg, run.model_path, states)
    emb = m.embed(test)
    assert emb.shape == (24, 64) and np.isfinite(emb).all()
    for k in range(3):
        assert np.allclose(m.predict(test, shard=k)[0], expected[k], atol=1e-5)
        one = np.eye(3)[[k] * len(test)]
        assert np.allclose(m.predict(test, weights=one, factors=True)[0], expected[k], atol=1e-5)
    w = np.full((len(test), 3), 1 / 3)
    pw, po = m.predict(test, weights=w, factors=True)[0], m.predict(test, weights=w, factors=False)[0]
    sisa = np.mean(expected, 0)
    assert not np.allclose(pw, po, atol=1e-4) and not np.allclose(po, sisa, atol=1e-4)
    # One adapter (K = 1, plain retraining): every merge is that adapter, scored once.
    from fedsim.unlearning.merge import evaluate_merge

    metrics, preds = evaluate_merge(cfg, run.model_path, states[:1], test.iloc[:0], test, log=lambda *a: None)
    assert np.allclose(preds["prob_weights"], expected[0], atol=1e-5)
    assert (preds["prob_weights"] == preds["prob_outputs"]).all() and (preds["prob_sisa"] == preds["prob_shard_0"]).all()
    assert metrics["apa_weights/auc"] == metrics["sisa/auc"] == metrics["shard/0/auc"]


def test_a_merge_with_kept_scores_scores_only_the_adapters_it_has_not_seen(prepared, tmp_path, monkeypatch):
    """The merge keeps each adapter's scores and the base model's hidden states; merging again with
    one adapter replaced (what a deletion does) runs single-adapter forwards for that adapter only,
    and gives what a merge without kept scores gives."""
    from fedsim.models.loader import load_base
    from fedsim.models.lora import attach_lora, export_state, get_flat, trainable
    from fedsim.unlearning.merge import ScoreCache, ShardModel, evaluate_merge
    from fedsim.unlearning.sharded import read_rows

    cfg, run = prepared
    rows = read_rows(run.run_dir)
    valid = rows[rows["split"] == "valid"].head(16).reset_index(drop=True)
    test = rows[rows["split"] == "test"].head(16).reset_index(drop=True)
    model = attach_lora(load_base(run.model_path, "float32")[0], cfg.model.lora, 0)
    flat0 = get_flat(trainable(model))
    state = lambda k: {n: v.clone() for n, v in export_state(  # noqa: E731
        model, flat0 + 0.3 * torch.randn(flat0.shape, generator=torch.Generator().manual_seed(k)))[0].items()}
    states = [state(0), state(1)]
    calls = []
    predict, embed = ShardModel.predict, ShardModel.embed
    monkeypatch.setattr(ShardModel, "predict", lambda self, r, weights=None, shard=None, factors=False: (
        calls.append(shard), predict(self, r, weights, shard, factors))[1])
    monkeypatch.setattr(ShardModel, "embed", lambda self, r: (calls.append("embed"), embed(self, r))[1])
    caches = lambda tags: [ScoreCache(tmp_path / f"s{k}_{t}.npz", t) for k, t in enumerate(tags)]  # noqa: E731
    hidden = ScoreCache(tmp_path / "hidden.npz", "base")
    quiet = lambda *a: None  # noqa: E731
    first, _ = evaluate_merge(cfg, run.model_path, states, valid, test, quiet, caches(["a", "b"]), hidden)
    assert sorted(calls, key=str) == sorted([0, 0, 1, 1, None, None, "embed", "embed"], key=str)
    calls.clear()
    states[1] = state(2)  # shard 1 retrained: a new adapter file, a new tag
    again, preds = evaluate_merge(cfg, run.model_path, states, valid, test, quiet, caches(["a", "c"]), hidden)
    assert sorted(calls, key=str) == sorted([1, 1, None, None], key=str)
    assert again["shard/0/auc"] == first["shard/0/auc"]
    fresh, ref = evaluate_merge(cfg, run.model_path, states, valid, test, quiet)
    for col in ("prob_shard_0", "prob_shard_1", "prob_weights", "prob_outputs"):
        assert np.allclose(preds[col], ref[col], atol=1e-6), col


def test_semantic_assignment_from_the_base_models_hidden_states_is_balanced(prepared):
    import dataclasses

    from fedsim.unlearning.sharded import build_assignment, read_rows, with_shard

    cfg, run = prepared
    cfg = dataclasses.replace(cfg, unlearning=dataclasses.replace(cfg.unlearning, partition="semantic"))
    rows = read_rows(run.run_dir)
    a = build_assignment(cfg, rows, run.model_path, log=lambda *x: None)
    n = int((rows["split"] == "train").sum())
    sizes = np.bincount(a["shard"], minlength=3)
    assert len(a) == n and sizes.max() == math.ceil(n / 3) and sizes.min() > 0  # the cap, every shard used
    assert np.array_equal(a["shard"], build_assignment(cfg, rows, run.model_path, log=lambda *x: None)["shard"])
    shard = with_shard(rows, a)["shard"]
    assert ((shard >= 0) == (rows["split"] == "train")).all()


def test_each_shard_is_an_ordinary_run_with_the_privacy_chain_and_its_own_namespace(tmp_path):
    from fedsim.unlearning.sharded import shard_config, shard_dir

    cfg = load_config("configs/tiny.yaml", ["unlearning.shards=4", "privacy.secagg.enabled=true",
                                            "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1.0",
                                            "privacy.client_dp.delta=0.01"])
    sub = shard_config(cfg, 2)
    assert sub.unlearning.shards == 0 and sub.name == "tiny-shard2" and not sub.tracking.enabled
    assert sub.privacy == cfg.privacy and sub.train == cfg.train and cfg.unlearning.shards == 4
    assert shard_dir(tmp_path, 2) == tmp_path / "unlearning" / "shard_02"


# -- shard adapters through Ray: they learn, and a deletion is exact -----------------------------------

SHARDED = ["data.synthetic.generosity=3.0", "data.synthetic.num_users=120", "data.synthetic.num_clusters=8",
           "data.max_test_per_client=null", "train.rounds=3", "train.local_steps=8", "train.lr=0.01",
           "train.schedule=cosine", "train.warmup=0.1", "eval.every=100", "executors.num=1",
           "unlearning.shards=2", "unlearning.partition=user"]


def test_shard_adapters_learn_and_a_deletion_retrains_only_its_shard_exactly(ray_local, tiny_cfg, tmp_path):
    """Two shard adapters (all of a user's rows in one shard), each its own federation of 3 clients.
    The merged model must learn (fails when shard training stops working). Deleting a user retrains
    only that user's shard; its adapter then equals, bit for bit, the adapter of a run whose data
    never had the user; the other shard's files are untouched; the user is in no shard's data."""
    import shutil

    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from fedsim.prepare import prepare
    from fedsim.unlearning.sharded import ShardedRun, read_rows, shard_dir, train_shard, with_shard
    from fedsim.cli import main
    from fedsim.unlearning.unlearn import shard_files

    cfg = tiny_cfg(*SHARDED)
    quiet = lambda *a: None  # noqa: E731
    a_dir = tmp_path / "a"
    info = prepare(cfg, a_dir, log=quiet)
    b_dir = tmp_path / "b"
    shutil.copytree(a_dir, b_dir)
    summary = ShardedRun(cfg, a_dir, log=quiet).run()
    f = summary["final"]
    print(f"2 shards: APA weights {f['apa_weights/auc']:.3f}, outputs {f['apa_outputs/auc']:.3f}, "
          f"SISA {f['sisa/auc']:.3f}, shards {f['shard/0/auc']:.3f} {f['shard/1/auc']:.3f}, "
          f"history share {summary['baselines']['history_share']['auc']:.3f}")
    assert f["rows"] >= 200 and f["auc"] == f["apa_weights/auc"]
    assert f["auc"] >= 0.75 and f["auc_ci_low"] > 0.65
    assert f["apa_outputs/auc"] >= 0.75 and f["sisa/auc"] > 0.6 and f["shard_auc_mean"] > 0.58
    preds = pd.read_parquet(a_dir / "predictions.parquet")
    assert {"prob", "prob_sisa", "prob_weights", "prob_outputs", "prob_shard_0", "prob_shard_1"} <= set(preds.columns)
    # A shard run only trains (its time is what a deletion redoes); the merge scores its adapter.
    assert [s["auc"] for s in summary["shards"]] == [f["shard/0/auc"], f["shard/1/auc"]]
    assert not (shard_dir(a_dir, 0) / "predictions.parquet").exists()

    rows = with_shard(read_rows(a_dir), pd.read_parquet(a_dir / "unlearning" / "assignment.parquet"))
    train = rows[rows["split"] == "train"]
    scored_users = set(rows.loc[rows["split"] != "train", "user"])  # a user with rows the merge scored
    user = int(next(u for u in train["user"] if u in scored_users))
    k = int(train.loc[train["user"] == user, "shard"].iloc[0])
    other = 1 - k
    files = shard_files(a_dir, other)
    adapter = lambda d, s: load_file(str(shard_dir(d, s) / "adapter" / "adapter_model.safetensors"))  # noqa: E731
    old = adapter(a_dir, k)
    from fedsim.unlearning.merge import ScoreCache, prompts

    scored = lambda path: set(np.load(path)["keys"].tolist())  # noqa: E731  (prompt hashes with a kept score)
    kept_scores = scored(shard_dir(a_dir, other) / "scores.npz")

    assert main(["unlearn", str(a_dir), "--users", str(user)]) == 0
    report = json.loads(next((a_dir / "unlearning").glob("deletion_*.json")).read_text())
    report["data_sha256_before"] = {int(s): h for s, h in report["data_sha256_before"].items()}
    report["data_sha256_after"] = {int(s): h for s, h in report["data_sha256_after"].items()}
    assert report["shards_retrained"] == [k] and report["shards_untouched"] == [other]
    assert report["rows_naming_deleted_in_history"] == 0 and report["history_mentions_file"] is None
    assert report["rows_deleted_by_split"]["train"] == int((train["user"] == user).sum()) > 0
    assert report["untouched_files_unchanged"] and shard_files(a_dir, other) == files
    # the re-merge scored the retrained shard only: the untouched shard's scores were reused as kept,
    # less those of the user's rows (no score of a deleted row is kept, nor its hidden state)
    after = pd.read_parquet(a_dir / "predictions.parquet").merge(preds, on=["user", "item", "timestamp"])
    gone = set(ScoreCache.keys(prompts(cfg, rows[rows["user"] == user])).tolist())
    assert scored(shard_dir(a_dir, other) / "scores.npz") == kept_scores - gone and kept_scores & gone
    assert not scored(a_dir / "unlearning" / "hidden_states.npz") & gone
    assert (after[f"prob_shard_{other}_x"] == after[f"prob_shard_{other}_y"]).all() and len(after) > 100
    assert 0 < report["merge_seconds"] < report["unlearn_seconds"]
    assert report["data_sha256_before"][k] != report["data_sha256_after"][k]
    assert report["data_sha256_before"][other] == report["data_sha256_after"][other]
    assert report["auc_after"]["auc"] > 0.7 and report["original_train_seconds"] > report["retrain_seconds"] > 0
    # the user's rows are in no data of the run, no shard's training set among them
    for d in [a_dir, shard_dir(a_dir, 0), shard_dir(a_dir, 1)]:
        assert user not in read_rows(d)["user"].tolist()
    assert user not in pd.read_parquet(a_dir / "unlearning" / "assignment.parquet")["user"].tolist()
    # the MLflow run of the deletion points at the original run
    runs = MlflowClient(cfg.tracking.uri).search_runs(
        [e.experiment_id for e in MlflowClient(cfg.tracking.uri).search_experiments()],
        f"tags.`fedsim.unlearning.original_run` = '{summary['mlflow_run_id']}'")
    assert len(runs) == 1 and runs[0].data.metrics["rows_deleted"] == report["rows_deleted"]

    # A run whose data never had the user: its shard k trained from scratch equals the retrained one.
    for path in (b_dir / "shards").glob("client_*.parquet"):
        df = pd.read_parquet(path)
        df[df["user"] != user].to_parquet(path, index=False)
    from fedsim.unlearning.sharded import build_assignment

    b_rows = read_rows(b_dir)
    b_rows = with_shard(b_rows, build_assignment(cfg, b_rows, info["model_path"], quiet))
    train_shard(cfg, b_dir, b_rows, k, info, quiet)
    new, ref = adapter(a_dir, k), adapter(b_dir, k)
    assert set(new) == set(ref) and all(torch.equal(new[n], ref[n]) for n in new)
    assert not all(torch.equal(new[n], old[n]) for n in new)  # the deletion changed the adapter


def test_a_sharded_trials_row_in_a_sweep_holds_the_merge_and_its_comparisons(tmp_path):
    """`fedsim tune` over unlearning.shards (tuning/apa_k.yaml): a sharded run has no checkpoint of
    its own; its results row comes from its summary (merged AUC, SISA, both merges, shard mean)."""
    from fedsim.config import to_dict
    from fedsim.tuning.report import trial_row
    from fedsim.tuning.sweep import expand, parse_sweep

    trials = expand(parse_sweep("tuning/apa_k.yaml"), "tuning/apa_k.yaml")
    assert [t.cfg.unlearning.shards for t in trials] == [1, 2, 4, 8]
    assert {t.cfg.unlearning.partition for t in trials} == {"semantic"} and trials[0].cfg.model.name == "smollm2-135m"
    t = trials[2]
    final = {"auc": 0.71, "auc_ci_low": 0.68, "auc_ci_high": 0.74, "logloss": 0.6, "sisa/auc": 0.69,
             "apa_weights/auc": 0.71, "apa_outputs/auc": 0.70, "shard_auc_mean": 0.66}
    (tmp_path / "summary.json").write_text(json.dumps({"complete": True, "unlearning": {"shards": 4}, "final": final,
                                                       "wall_seconds": 9.0, "train_seconds": 7.0, "mlflow_run_id": "r"}))
    row = trial_row({"trial": 2, "params": t.params, "config": to_dict(t.cfg), "run_dir": str(tmp_path)}, None, False)
    assert row["status"] == "FINISHED" and row["unlearning.shards"] == 4 and row["train_seconds"] == 7.0
    assert {k: row[k] for k in final} == final and row["wall_seconds"] == 9.0


def test_deleting_one_rating_names_the_later_rows_whose_history_holds_it(prepared):
    """A rating's title is in the history of the same user's later rows (built at prepare): deleting
    the rating alone leaves that trace, so the deletion names those rows; deleting the user leaves none."""
    from fedsim.unlearning.sharded import read_rows
    from fedsim.unlearning.unlearn import history_mentions

    _, run = prepared
    rows = read_rows(run.run_dir)
    rows = rows.sort_values(["user", "timestamp"]).reset_index(drop=True)
    first = rows.groupby("user").head(1)
    user_rows = lambda u: rows[rows["user"] == u]  # noqa: E731
    # a user's earliest row in the run, whose title the next rows' histories hold
    pick = next(r for _, r in first.iterrows()
                if any(r["title"] in set(a) | set(b) for a, b in zip(user_rows(r["user"])["liked"].iloc[1:],
                                                                      user_rows(r["user"])["disliked"].iloc[1:])))
    gone = (rows["user"] == pick["user"]) & (rows["timestamp"] == pick["timestamp"]) & (rows["item"] == pick["item"])
    named = history_mentions(rows[~gone], rows[gone])
    later = user_rows(pick["user"]).iloc[1:]
    expected = [i for i, a, b in zip(later.index, later["liked"], later["disliked"]) if pick["title"] in set(a) | set(b)]
    assert sorted(named.index.tolist()) == expected and len(expected) > 0
    assert (named["user"] == pick["user"]).all() and (named["timestamp"] > pick["timestamp"]).all()
    everyone = rows["user"] == pick["user"]
    assert history_mentions(rows[~everyone], rows[everyone]).empty
