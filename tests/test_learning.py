"""Training must work: tests that fail when the recommender stops learning, and the pieces that
made it learn (TALLRec's protocol and prompt, items with their year, the lr schedule)."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim.client.schedule import lr_factor
from fedsim.config import ConfigError, load_config
from fedsim.data.prompt import PLAIN_TEMPLATE, TALLREC_TEMPLATE, render_prompt
from fedsim.data.samples import build_samples, item_texts
from fedsim.simulation import load_checkpoint, run

ROOT = Path(__file__).resolve().parents[1]


# -- the lr schedule -------------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_decays():
    total = 100
    cos = [lr_factor("cosine", 0.1, s, total) for s in range(total)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert all(a < b for a, b in zip(cos[:9], cos[1:10]))
    assert all(a >= b for a, b in zip(cos[9:], cos[10:])) and 0 < cos[-1] < 0.01
    lin = [lr_factor("linear", 0.0, s, total) for s in range(total)]
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.5) and lin[-1] == pytest.approx(0.01)
    assert {lr_factor("constant", 0.0, s, total) for s in range(total)} == {1.0}
    with pytest.raises(ValueError, match="train.schedule"):
        lr_factor("step", 0.0, 0, 10)


def test_schedule_and_prompt_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train.warmup: 1.5 must be in \[0, 1\)"):
        load_config("configs/tiny.yaml", ["train.warmup=1.5"])
    with pytest.raises(ConfigError, match="train.schedule: 'step' is not one of"):
        load_config("configs/tiny.yaml", ["train.schedule=step"])
    with pytest.raises(ConfigError, match=r"data.prompt: the template must contain \{target\}"):
        load_config("configs/tiny.yaml", ["data.prompt='Liked: {liked} Answer:'"])
    with pytest.raises(ConfigError, match=r"data.prompt: unknown placeholder\(s\) \['tagret'\]"):
        load_config("configs/tiny.yaml", ["data.prompt='{liked} {tagret} Answer:'"])
    with pytest.raises(ConfigError, match=r"or be one of the named templates \['plain', 'tallrec', 'tallrec_rate'\]"):
        load_config("configs/tiny.yaml", ["data.prompt=tallrec_rat"])
    from fedsim.data.prompt import TALLREC_RATE_TEMPLATE, prompt_template

    assert prompt_template(load_config("configs/tiny.yaml", ["data.prompt=tallrec_rate"])) == TALLREC_RATE_TEMPLATE
    with pytest.raises(ConfigError, match="data.protocol: 'talrec' is not one of"):
        load_config("configs/tiny.yaml", ["data.protocol=talrec"])


# -- prompt and item text --------------------------------------------------------------------------

def test_prompt_templates_fill_liked_disliked_and_target():
    p = render_prompt(["Heat (1995)", "Alien (1979)"], [], "Fargo (1996)")
    assert p == TALLREC_TEMPLATE.format(liked='"Heat (1995)", "Alien (1979)"', disliked="none", target="Fargo (1996)")
    assert 'User Preference: "Heat (1995)", "Alien (1979)"\nUser Unpreference: none\n' in p
    assert p.endswith('Whether the user will like the target movie "Fargo (1996)"?\nAnswer:')
    own = render_prompt(["A"], ["B"], "C", "{liked} | {disliked} -> {target}? Answer:")
    assert own == '"A" | "B" -> C? Answer:'  # the template quotes the target if it wants
    assert render_prompt(["A"], ["B"], "C", PLAIN_TEMPLATE).startswith("Given the user's liked and disliked movies")


def test_a_template_can_show_the_target_items_like_rate():
    from fedsim.data.prompt import TALLREC_RATE_TEMPLATE, render_prompts
    from fedsim.data.samples import add_target_rate

    rows = pd.DataFrame({"liked": [["A"], []], "disliked": [[], ["B"]], "title": ["Heat (1995)", "Fargo (1996)"],
                         "target_rate": [0.724, 0.05]})
    p = render_prompts(rows, TALLREC_RATE_TEMPLATE)
    assert p[0].endswith('the target movie "Heat (1995)" (liked by 72% of its viewers)?\nAnswer:')
    assert "(liked by 5% of its viewers)" in p[1]
    assert render_prompts(rows.drop(columns="target_rate"), "{target}: {target_rate}") == ["Heat (1995): unknown",
                                                                                           "Fargo (1996): unknown"]
    # The rate comes from the train split only (smoothed toward the overall rate): valid/test labels never leak in.
    s = pd.DataFrame({"item": [1, 1, 1, 2, 1], "label": [1, 1, 0, 0, 0], "split": ["train"] * 4 + ["test"]})
    rate = add_target_rate(s)["target_rate"].to_numpy()
    overall = 2 / 4
    assert rate[0] == pytest.approx((2 + 5 * overall) / (3 + 5)) and rate[4] == rate[0]
    assert rate[3] == pytest.approx((0 + 5 * overall) / (1 + 5))


def test_items_are_written_with_their_year_where_known():
    items = pd.DataFrame({"item": [1, 2], "title": ["Toy Story", "unknown"], "year": pd.array([1995, None], dtype="Int64")})
    assert item_texts(items, with_year=True).tolist() == ["Toy Story (1995)", "unknown"]
    assert item_texts(items).tolist() == ["Toy Story", "unknown"]
    assert item_texts(items.drop(columns="year"), with_year=True).tolist() == ["Toy Story", "unknown"]


def test_tallrec_protocol_keeps_full_windows_and_the_most_recent_samples():
    # Two users, 14 ratings each, interleaved in time.
    ratings = pd.DataFrame({"user": np.repeat([1, 2], 14), "item": np.tile(np.arange(1, 15), 2),
                            "rating": np.tile([5.0, 1.0], 14), "timestamp": np.r_[np.arange(14) * 2, np.arange(14) * 2 + 1]})
    items = pd.DataFrame({"item": np.arange(1, 15), "title": [f"M{i}" for i in range(1, 15)]})
    every = build_samples(ratings, items, history_len=10, protocol="tallrec", keep_last=100)
    assert len(every) == 2 * 4  # targets 11..14 of each user
    assert (every["liked"].map(len) + every["disliked"].map(len) == 10).all()
    kept = build_samples(ratings, items, history_len=10, protocol="tallrec", keep_last=5, split=(0.6, 0.2, 0.2))
    assert kept["timestamp"].tolist() == every["timestamp"].tolist()[-5:]
    assert kept["split"].tolist() == ["train"] * 3 + ["valid", "test"]
    glob = build_samples(ratings, items, history_len=10)
    assert len(glob) == 2 * 13  # the global protocol keeps every rating after a user's first


# -- training works ---------------------------------------------------------------------------------

LEARNS = ["data.synthetic.generosity=3.0", "data.synthetic.num_users=120", "data.synthetic.num_clusters=8",
          "data.max_test_per_client=null", "train.rounds=5", "train.local_steps=10", "train.lr=0.01",
          "train.schedule=cosine", "train.warmup=0.1", "eval.every=1"]


def test_a_short_federated_run_learns_labels_that_follow_the_history(ray_local, tiny_cfg):
    """Synthetic users whose like-tendency shows in their own history (history-share baseline
    ~0.92): the tiny model, trained by 3 clients through Ray, must pick it up. Fails when training
    stops working (a frozen adapter, a wrong label, a broken schedule or aggregation)."""
    summary = run(tiny_cfg(*LEARNS, "tracking.enabled=false", "eval.interim_rows=20"), log=lambda *a: None)
    history = load_checkpoint(Path(summary["run_dir"]))["history"]
    aucs = [h["auc"] for h in history]
    losses = [h["train_loss"] for h in history]
    print(f"tiny model, 3 clients: AUC by round {np.round(aucs, 3)}, loss {np.round(losses, 3)}, "
          f"history share {summary['baselines']['history_share']['auc']:.3f}")
    assert [h["rows"] for h in history[:-1]] == [3 * 20] * 4  # interim evaluations: a subset
    assert summary["final"]["rows"] >= 200
    assert summary["final"]["auc"] >= 0.8 and summary["final"]["auc_ci_low"] > 0.7
    assert losses[-1] < losses[0] - 0.1  # the loss falls
    assert aucs[-1] > aucs[0] + 0.1


def train_in_process(cfg, tmp: Path) -> tuple[list[float], list[float]]:
    """fedsim's client and server code without Ray (`fedsim.inprocess`), the pooled test AUC
    scored after every round. Returns (AUC, mean train loss) per round."""
    from fedsim.inprocess import evaluate_in_process, train_in_process as train
    from fedsim.metrics import auc

    aucs = []
    def score(r, ex, strategy, metas):
        aucs.append(auc(*evaluate_in_process(ex, strategy, cfg.clients.num, "test")))
    _, _, losses, _ = train(cfg, tmp, after_round=score)
    return aucs, losses


# (overrides, least final AUC, least fall of the train loss). Paths that train fewer factors (ffa:
# B only, A frozen at random) or restart them every round (stack) learn the ranking more slowly per
# step and barely move the loss in 6 rounds; they get a larger rate (as FFA-LoRA recommends) and a
# lower bar, measured: ffa 0.83 / 0.015, stack 0.78 / 0.037; the others 0.89-0.91 / 0.1-0.3.
PATHS = {
    "ffa": (["strategy.lora_mode=ffa", "train.lr=0.05", "train.rounds=6", "model.lora.r=16", "model.lora.alpha=32"], 0.75, 0.005),
    "fedsa": (["strategy.lora_mode=fedsa", "train.lr=0.02", "train.rounds=6"], 0.8, 0.1),
    "stack": (["strategy.lora_mode=stack", "train.rounds=6"], 0.72, 0.01),
    "fused": (["executors.fused=true"], 0.8, 0.05),
    "pplr": (["strategy.name=pplr"], 0.8, 0.05),
    "dp_lora_weak_noise": (["privacy.dp_lora.enabled=true", "privacy.dp_lora.clip=1.0",
                            "privacy.dp_lora.noise_multiplier=0.01"], 0.8, 0.05),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_training_path_learns(tiny_cfg, tmp_path, path):
    """Each way a client can train (LoRA sharing modes, fused clients, PPLR's mixing, DP-LoRA at
    negligible noise) must learn the history signal, not only agree with another path."""
    overrides, least_auc, least_fall = PATHS[path]
    aucs, losses = train_in_process(tiny_cfg(*LEARNS, "tracking.enabled=false", *overrides), tmp_path / "run")
    print(f"{path}: AUC by round {np.round(aucs, 3)}, loss {np.round(losses, 3)}")
    assert aucs[-1] >= least_auc and aucs[-1] > aucs[0] + 0.05
    assert losses[-1] < losses[0] - least_fall


def train_real_smollm2(out: Path) -> None:
    """SmolLM2-135M on MovieLens-100K (TALLRec protocol and prompt), 72 training rows in 18 steps of 4
    (warm-up and cosine decay); the held-out loss on 64 fixed test rows before and after, written to
    out/result.json. Run as this file's script: the test below starts it in the background."""
    from fedsim.client.executor import ClientExecutor
    from fedsim.config import to_dict
    from fedsim.metrics import logloss
    from fedsim.prepare import prepare

    cfg = load_config("configs/quickstart.yaml", ["tracking.enabled=false", "clients.num=1", "data.max_eval_rows=64",
                                                  "train.rounds=1", "train.local_steps=18", "train.batch_size=4"])
    with tempfile.TemporaryDirectory() as tmp:
        info = prepare(cfg, Path(tmp), log=lambda *a: None)
        # One thread: it runs beside the rest of the suite, which leaves about one core idle.
        ex = ClientExecutor(to_dict(cfg), tmp, info["model_path"], 0, num_threads=1)

        def test_loss(params):
            r = ex.evaluate(0, params, "test")
            return logloss(r["labels"], r["probs"]), len(r["labels"])

        params = ex.initial_params()
        before, rows = test_loss(params)
        meta, delta = ex.train(0, 0, params, cfg.train.lr, [0])
        after, _ = test_loss(params + delta)
    (out / "result.json").write_text(json.dumps({"before": before, "after": after, "rows": rows,
                                                 "trained": meta["num_samples"]}))


def real_smollm2_training(out: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.background.with_args(real_smollm2_training)
def test_real_smollm2_learns_on_seventy_real_rows(background):
    """The held-out loss must fall (measured 0.706 -> 0.606; on 100 rows, 24 steps gave 0.738 ->
    0.597 and 12 steps only 0.738 -> 0.699). At this budget the ranking is not learned yet; it is at
    512 rows (0.77, the quickstart and docs/results.md), too slow for a test. The tiny-model tests
    check AUC through Ray."""
    r = background(real_smollm2_training)
    print(f"SmolLM2, {r['trained']} rows: held-out loss {r['before']:.3f} -> {r['after']:.3f} on {r['rows']} rows")
    assert r["rows"] == 64 and r["trained"] == 72
    assert r["after"] < r["before"] - 0.05


if __name__ == "__main__":
    train_real_smollm2(Path(sys.argv[1]))
