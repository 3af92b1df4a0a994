"""`fedsim compare` and the per-row prediction files it reads, on hand-made run directories."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.compare import compare_by_client, compare_runs, paired_vs_baselines
from fedsim.metrics import auc
from fedsim.report import fmt_signed, summary_table
from fedsim.simulation import write_predictions
from fedsim.tuning.report import compared

N = 600


def rows(n=N, seed=0):
    """Evaluated rows with a label and a latent signal that scorers see through more or less noise."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    return pd.DataFrame({"user": np.arange(n) // 6, "item": 1000 + np.arange(n) % 97, "timestamp": 10 * np.arange(n),
                         "client": np.arange(n) % 3, "label": (signal + rng.normal(size=n) > 0).astype("int64"),
                         "signal": signal})


def scorer(df, noise, seed):
    return 1 / (1 + np.exp(-(df["signal"] + noise * np.random.default_rng(seed).normal(size=len(df)))))


def make_run(path, df, noise, seed, baselines=()):
    path.mkdir(parents=True)
    out = df.drop(columns="signal").assign(prob=scorer(df, noise, seed))
    for name, bnoise in baselines:
        out[f"baseline/{name}"] = scorer(df, bnoise, seed + 100)
    out.to_parquet(path / "predictions.parquet", index=False)
    return path


@pytest.fixture
def runs(tmp_path):
    df = rows()
    good = make_run(tmp_path / "good", df, 0.3, 1, baselines=[("popularity", 3.0), ("logistic_mf", 0.35)])
    # The second run evaluated an overlapping but different set of rows: 400 shared, 100 of its own.
    other = pd.concat([df.iloc[200:], rows(100, seed=9).assign(timestamp=lambda d: 10**9 + d["timestamp"])])
    weak = make_run(tmp_path / "weak", other, 2.0, 2)
    return good, weak


def test_compare_pairs_two_runs_on_their_shared_rows(runs):
    good, weak = runs
    r = compare_runs(good, weak, seed=0, n_boot=500)
    assert (r["rows"], r["rows_a"], r["rows_b"]) == (400, 600, 500)
    a, b = pd.read_parquet(good / "predictions.parquet"), pd.read_parquet(weak / "predictions.parquet")
    shared = a.merge(b, on=["user", "item", "timestamp"], suffixes=("_a", "_b"))
    assert r["a"]["auc"] == pytest.approx(auc(shared["label_a"], shared["prob_a"]))
    assert r["diff"] == pytest.approx(r["a"]["auc"] - r["b"]["auc"])
    for side in ("a", "b"):
        assert r[side]["low"] < r[side]["auc"] < r[side]["high"]
    assert r["low"] > 0 and r["verdict"] == "A better"
    flipped = compare_runs(weak, good, seed=0, n_boot=500)
    assert flipped["high"] < 0 and flipped["verdict"] == "B better"
    same = compare_runs(good, good, n_boot=200)
    assert (same["diff"], same["low"], same["high"], same["verdict"]) == (0.0, 0.0, 0.0, "within noise")


def test_compare_against_a_baseline_column_of_the_same_run(runs):
    good, _ = runs
    assert compare_runs(good, "baseline:popularity", n_boot=300)["verdict"] == "A better"
    close = compare_runs(good, "baseline:logistic_mf", n_boot=300)  # nearly the same scorer
    assert close["verdict"] == "within noise" and close["low"] < 0 < close["high"] and close["rows"] == N


def test_compare_command_prints_a_verdict_and_writes_json(runs, tmp_path, capsys):
    good, weak = runs
    out = tmp_path / "cmp.json"
    assert main(["compare", str(good), str(weak), "--seed", "3", "--boot", "300", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "paired over 400 rows" in text and "verdict: A better (the interval excludes 0" in text
    saved = json.loads(out.read_text())
    assert saved["seed"] == 3 and saved["n_boot"] == 300 and saved["verdict"] == "A better"


def test_compare_errors_say_what_is_wrong(runs, tmp_path, capsys):
    good, weak = runs
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert main(["compare", str(good), str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert (f"run {unfinished} has no predictions.parquet: it did not finish "
            f"(resume it with fedsim run --resume {unfinished})") in err

    elsewhere = make_run(tmp_path / "elsewhere", rows(50, seed=4).assign(user=lambda d: d["user"] + 10**6), 1.0, 0)
    with pytest.raises(ValueError, match="share no evaluated rows"):
        compare_runs(good, elsewhere)
    with pytest.raises(ValueError, match=r"no scores for baseline:nope \(baselines in its predictions.parquet: "
                                         r"baseline:popularity, baseline:logistic_mf\)"):
        compare_runs(good, "baseline:nope")
    relabelled = make_run(tmp_path / "relabelled", rows().assign(label=lambda d: 1 - d["label"]), 1.0, 0)
    with pytest.raises(ValueError, match="label 600 of their 600 shared rows differently"):
        compare_runs(good, relabelled)
    assert main(["compare", str(tmp_path / "missing"), str(good)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compare_by_client_finds_the_client_a_run_fails(tmp_path, capsys):
    """B scores clients 0 and 1 as well as A and client 2 nearly at random: B's worst client and gap
    are worse, and the per-client differences say where."""
    df = rows(900)
    fair = make_run(tmp_path / "fair", df, 0.3, 1)
    unfair = make_run(tmp_path / "unfair", df, 0.3, 1)
    preds = pd.read_parquet(unfair / "predictions.parquet")
    on2 = preds["client"] == 2
    preds.loc[on2, "prob"] = scorer(df[on2.to_numpy()], 4.0, 7).to_numpy()
    preds.to_parquet(unfair / "predictions.parquet", index=False)

    r = compare_by_client(fair, unfair, n_boot=400)
    assert [c["client"] for c in r["clients"]] == [0, 1, 2] and r["rows"] == 900
    same, hurt = r["clients"][0], r["clients"][2]
    assert same["diff"] == 0 and same["low"] == 0 == same["high"]     # identical scores on client 0
    assert hurt["diff"] > 0.2 and hurt["low"] > 0
    assert r["min"]["b"] == hurt["b"] and r["min"]["low"] > 0 and r["verdicts"]["min"] == "A better"
    assert r["gap"]["diff"] < 0 and r["verdicts"]["gap"] == "A fairer"
    assert abs(r["mean"]["diff"] - hurt["diff"] / 3) < 1e-9 and r["verdicts"]["mean"] == "A better"
    for s in ("mean", "min", "gap"):
        assert r[s]["a_low"] <= r[s]["a"] <= r[s]["a_high"] and r[s]["low"] <= r[s]["diff"] <= r[s]["high"]

    png = tmp_path / "clients.png"
    assert main(["compare", str(fair), str(unfair), "--by-client", "--boot", "300", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "worst client" in text and "A better" in text and "gap (max − min)" in text and "A fairer" in text
    assert f"plot: {png}" in text and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert main(["compare", str(fair), str(unfair), "--plot", str(png)]) == 2
    assert "--plot draws the per-client comparison: add --by-client" in capsys.readouterr().err

    moved = make_run(tmp_path / "moved", df.assign(client=lambda d: (d["client"] + 1) % 3), 0.3, 1)
    with pytest.raises(ValueError, match="put 900 of their 900 shared rows in different clients"):
        compare_by_client(fair, moved)


def test_predictions_file_joins_the_baselines_by_row_key(tmp_path):
    df = rows(60)
    # prepare.py's file: every evaluated row, in its own order, with each baseline's score.
    base = df[["user", "item", "timestamp", "label"]].iloc[::-1].assign(popularity=np.linspace(0, 1, 60))
    base.to_parquet(tmp_path / "baseline_scores.parquet", index=False)
    results = [{"client": c, "labels": g["label"].to_numpy(), "probs": g["signal"].to_numpy(np.float32),
                **{k: g[k].to_numpy() for k in ("user", "item", "timestamp")}} for c, g in df.groupby("client")]
    preds = pd.read_parquet(write_predictions(tmp_path, results))
    assert list(preds.columns) == ["user", "item", "timestamp", "client", "label", "prob", "baseline/popularity"]
    assert len(preds) == 60
    check = preds.merge(base, on=["user", "item", "timestamp"])
    assert (check["baseline/popularity"] == check["popularity"]).all() and (check["label_x"] == check["label_y"]).all()


def test_summary_table_shows_intervals_and_paired_verdicts(runs):
    good, _ = runs
    paired = paired_vs_baselines(pd.read_parquet(good / "predictions.parquet"), n_boot=300)
    assert set(paired) == {"popularity", "logistic_mf"} and paired["popularity"]["rows"] == N
    summary = {"name": "t", "rounds_done": 2, "clients": 3, "wall_seconds": 5.0, "strategy": "fedavg",
               "final": {"auc": 0.78123, "auc_ci_low": 0.7521, "auc_ci_high": 0.8094, "logloss": 0.5, "accuracy": 0.7,
                         "rows": 600.0},
               "baselines": {"popularity": {"auc": 0.6, "auc_ci_low": 0.55, "auc_ci_high": 0.65, "logloss": 0.7,
                                            "accuracy": 0.6},
                             "logistic_mf": {"auc": 0.7, "logloss": 0.6, "accuracy": 0.65}},  # an older run: no interval
               "paired_vs_baselines": paired, "clients_final": {}, "bytes_up": 0, "bytes_down": 0, "dropped": []}
    text = summary_table(summary)
    assert "0.7812 [0.752, 0.809]" in text and "0.6000 [0.550, 0.650]" in text and "0.7000 " in text
    p = paired["popularity"]
    assert f"federated − popularity: {p['diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] paired over {N} rows " \
           f"(federated better)" in text
    assert "federated − logistic_mf: " in text and "(within noise)" in text


def test_compare_sweep_pairs_each_trial_with_its_reference_of_the_same_seed(tmp_path, capsys):
    """`fedsim compare SWEEP --against KEY=VALUE`: each trial against the trial of the same seed
    and other settings with KEY=VALUE, on the rows both scored; per arm, its seeds' differences.
    A trial without predictions is named as not finished; a bad --against names the sweep's keys."""
    from fedsim.compare import compare_sweep

    sweep, trials = tmp_path / "sweep", []
    noise = {"plain": 1.0, "good": 0.3, "bad": 3.0}
    for seed in (0, 1):
        df = rows()  # the same evaluated rows in every trial, as a sweep over one split scores them
        for arm in ("plain", "good", "bad"):
            n = len(trials)
            run = sweep / "runs" / f"trial_{n:03d}"
            if (seed, arm) != (1, "bad"):  # one trial did not finish
                make_run(run, df, noise[arm], 1000 + n)  # a noise stream apart from the rows' own
            trials.append({"trial": n, "params": {"train.seed": seed, "arm": arm}, "run_dir": str(run)})
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("demo")).info.run_id  # the sweep's parent run
    (sweep / "sweep.json").write_text(json.dumps({"name": "demo", "keys": ["arm", "train.seed"], "trials": trials,
                                                  "tracking": {"enabled": True, "uri": uri}, "parent_run_id": parent}))

    r = compare_sweep(sweep, "arm=plain", n_boot=300)
    by = {(t["params"]["train.seed"], t["params"]["arm"]): t for t in r["trials"]}
    assert by[0, "plain"]["status"] == by[1, "plain"]["status"] == "reference"
    assert by[0, "good"]["reference"] == by[0, "plain"]["trial"] and by[1, "good"]["reference"] == by[1, "plain"]["trial"]
    for seed in (0, 1):
        a = pd.read_parquet(sweep / "runs" / f"trial_{3 * seed + 1:03d}" / "predictions.parquet")
        b = pd.read_parquet(sweep / "runs" / f"trial_{3 * seed:03d}" / "predictions.parquet")
        assert by[seed, "good"]["diff"]["diff"] == pytest.approx(auc(a["label"], a["prob"]) - auc(b["label"], b["prob"]))
        assert by[seed, "good"]["verdict"] == "trial better" and by[seed, "good"]["rows"] == N
    assert by[0, "bad"]["verdict"] == "reference better" and by[1, "bad"]["status"] == "not finished"
    arms = {a["arm"]["arm"]: a for a in r["arms"]}
    assert arms["good"]["seeds"] == [0, 1] and arms["good"]["better"] == 2 and arms["bad"]["worse"] == 1
    # the arm's mean over its seeds, with an interval of its own on the rows both seeds scored
    mean = arms["good"]["mean"]
    assert mean["diff"] == pytest.approx(np.mean(arms["good"]["diffs"])) and mean["rows"] == N and mean["seeds"] == 2
    assert 0 < mean["low"] < mean["diff"] < mean["high"] and "mean" not in arms["bad"]  # one seed finished

    assert main(["compare", str(sweep), "--against", "arm=plain", "--boot", "300"]) == 0
    out = capsys.readouterr().out
    assert "| good | 0 |" in out and "trial better" in out and "not finished" in out
    assert "arm = good: − (arm = plain) in seeds [0, 1]" in out and "better in 2 of 2" in out
    assert (f"(mean {fmt_signed(mean['diff'])} [{fmt_signed(mean['low'])}, {fmt_signed(mean['high'])}] over the "
            f"{N} rows the seeds scored, trial better)") in out
    # kept beside the sweep and on its MLflow parent run
    assert (sweep / "compare_arm=plain.md").read_text().strip() in out
    assert json.loads((sweep / "compare_arm=plain.json").read_text())["against"] == {"arm": "plain"}
    assert sorted(a.path for a in client.list_artifacts(parent, "compare")) == [
        "compare/compare_arm=plain.json", "compare/compare_arm=plain.md"]
    # keys that move together (a grid's joint keys): the reference names them all
    joint = compare_sweep(sweep, "arm=plain,train.seed=0", n_boot=300)
    by = {(t["params"]["train.seed"], t["params"]["arm"]): t for t in joint["trials"]}
    assert by[1, "good"]["reference"] == by[0, "plain"]["trial"] and by[1, "good"]["status"] == "compared"
    assert by[1, "plain"]["status"] == "compared" and by[0, "plain"]["status"] == "reference"
    assert main(["compare", str(sweep), "--against", "lr=1"]) == 2
    assert "the sweep's keys ['arm', 'train.seed']" in capsys.readouterr().err
    assert main(["compare", str(sweep), "--against", "arm=huge"]) == 2
    assert "no trial has arm = huge (its values: ['bad', 'good', 'plain'])" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), "--against", "arm=plain"]) == 2
    assert "is not a sweep directory (no sweep.json" in capsys.readouterr().err

    # The membership attacks the same way (--audit, audit.parquet): here each trial's attack scores
    # (-loss) are its test scores with label as member, so the attacks' differences are the test AUC's.
    for t in trials:
        preds = Path(t["run_dir"]) / "predictions.parquet"
        if preds.exists():
            df = pd.read_parquet(preds)
            df.assign(member=df["label"], loss=-df["prob"])[["user", "item", "timestamp", "client", "member", "loss"]] \
                .to_parquet(preds.with_name("audit.parquet"), index=False)
    (sweep / "runs" / "trial_001" / "audit.parquet").unlink()  # seed 0's "good" did not audit
    attacks = compare_sweep(sweep, "arm=plain", n_boot=300, audit=True)
    by_a = {(t["params"]["train.seed"], t["params"]["arm"]): t for t in attacks["trials"]}
    assert by_a[0, "good"]["status"] == "not finished"
    plain = {(t["params"]["train.seed"], t["params"]["arm"]): t for t in r["trials"]}  # test AUC, against arm=plain
    assert by_a[1, "good"]["diff"]["diff"] == pytest.approx(plain[1, "good"]["diff"]["diff"], abs=1e-12)
    assert by_a[1, "good"]["verdict"] == "trial leaks more" and by_a[0, "bad"]["verdict"] == "reference leaks more"
    compared(sweep, "arm=plain", parent=type("Parent", (), {"log_artifact": lambda *a: None})(), log=print)
    out = capsys.readouterr().out
    assert "every trial's membership attack against that of its arm = plain trial of the same" in out and "| attack AUC |" in out
    assert "arm = good: − (arm = plain) in seeds [1]: " in out and "leaks more in 1 of 1, less in 0" in out
    assert (sweep / "compare_arm=plain_audit.md").read_text().strip() in out
    assert (sweep / "compare_arm=plain.md").read_text().strip() in out  # test AUC first, as before


def test_slices_of_one_sweep_compare_as_the_whole_sweep_and_pair_across_slices(tmp_path, capsys):
    """A sweep file run in slices (a seed a slice, on a small machine): `fedsim compare SLICE_A
    --against KEY=VALUE --slice SLICE_B` gives each trial's and each arm's figures as one sweep
    holding all the trials would. A trial pairs with a reference of its own slice where it has one,
    else of another slice; a trial run in two slices counts once in its arm's seeds."""
    from fedsim.compare import compare_sweep

    noise = {"plain": 1.0, "good": 0.3, "bad": 3.0}
    data = {seed: rows(seed=seed) for seed in (0, 1)}  # a seed draws its own rows
    prob = {}  # (seed, arm) -> its run's predictions, the same in whichever slice it ran

    def sweep(name, cells):
        d, trials = tmp_path / name, []
        for seed, arm in cells:
            run = d / "runs" / f"trial_{len(trials):03d}"
            run.mkdir(parents=True)
            if (seed, arm) not in prob:
                prob[seed, arm] = data[seed].drop(columns="signal").assign(prob=scorer(data[seed], noise[arm], 100 + len(prob)))
            prob[seed, arm].to_parquet(run / "predictions.parquet", index=False)
            trials.append({"trial": len(trials), "params": {"train.seed": seed, "arm": arm}, "run_dir": str(run)})
        (d / "sweep.json").write_text(json.dumps({"name": "demo", "keys": ["arm", "train.seed"], "trials": trials}))
        return d

    cells = [(s, a) for s in (0, 1) for a in ("plain", "good", "bad")]
    whole = compare_sweep(sweep("whole", cells), "arm=plain", n_boot=300)
    # slice A: seed 0 whole, and seed 1's bad arm without its reference; slice B: seed 1, good and plain
    a, b = sweep("a", cells[:3] + [(1, "bad")]), sweep("b", [(1, "plain"), (1, "good")])
    r = compare_sweep(a, "arm=plain", n_boot=300, slices=[b])
    by = {(t["params"]["train.seed"], t["params"]["arm"]): t for t in r["trials"]}
    assert by[1, "bad"]["trial"] == "a/3" and by[1, "bad"]["reference"] == "b/0"  # from the slice that has it
    assert by[1, "good"]["reference"] == "b/0" and by[0, "good"]["reference"] == "a/0"
    for t in whole["trials"]:
        key = (t["params"]["train.seed"], t["params"]["arm"])
        assert by[key]["status"] == t["status"] and by[key].get("diff") == t.get("diff"), key
    assert {tuple(x["arm"].items()): x for x in r["arms"]} == {tuple(x["arm"].items()): x for x in whole["arms"]}

    # seed 1's good arm run again in slice A: it pairs with A's own reference, and counts once
    twice = compare_sweep(sweep("c", cells), "arm=plain", n_boot=300, slices=[b])
    good = next(x for x in twice["arms"] if x["arm"] == {"arm": "good"})
    assert good["seeds"] == [0, 1] and good["mean"] == next(x for x in whole["arms"] if x["arm"] == {"arm": "good"})["mean"]
    assert next(t for t in twice["trials"] if t["trial"] == "b/1")["reference"] == "b/0"

    assert main(["compare", str(a), "--against", "arm=plain", "--slice", str(b), "--boot", "300"]) == 0
    out = capsys.readouterr().out
    assert "sweep demo (with its slices b):" in out and "| a/3 | bad | 1 |" in out
    assert "arm = good: − (arm = plain) in seeds [0, 1]" in out
    assert (a / "compare_arm=plain_slices.md").read_text().strip() in out and not (a / "compare_arm=plain.md").exists()
    # slices that vary other keys, and --slice without --against, say what is wrong
    other = sweep("other", cells[:1])
    (other / "sweep.json").write_text(json.dumps({**json.loads((other / "sweep.json").read_text()), "keys": ["arm"]}))
    assert main(["compare", str(a), "--against", "arm=plain", "--slice", str(other)]) == 2
    assert f"--slice {other} varies ['arm'], {a} varies ['arm', 'train.seed']: the slices of one sweep vary the same keys" \
        in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--slice", str(b)]) == 2
    assert "--slice joins another directory of the same sweep" in capsys.readouterr().err


def test_a_sweep_over_client_counts_plots_each_partitions_gap_to_centralized_along_the_clients(tmp_path):
    """The FedAvg-vs-centralized sweep's shape: clients.num with local steps tied to it, a line per
    partition, each trial against the 1-client trial of its partition and seed. The plot's lines
    run along the clients (the tied key does not split them into points), its points are the seeds'
    mean paired differences, and the PNG lands beside the table."""
    from fedsim.compare import compare_sweep, comparison_lines, save_sweep_comparison

    sweep, trials = tmp_path / "sweep", []
    noise = {1: 1.0, 4: 0.3, 16: 2.0}  # 4 clients better than one, 16 worse
    for seed in (0, 1):
        df = rows()
        for method in ("iid", "kmeans"):
            for clients, steps in ((1, 32), (4, 8), (16, 2)):
                run = make_run(sweep / "runs" / f"trial_{len(trials):03d}", df, noise[clients], 1000 + len(trials))
                trials.append({"trial": len(trials), "run_dir": str(run), "params": {
                    "clients.num": clients, "train.local_steps": steps, "partition.method": method, "train.seed": seed}})
    keys = ["clients.num", "train.local_steps", "partition.method", "train.seed"]
    (sweep / "sweep.json").write_text(json.dumps({"name": "fedavg_vs_central", "keys": keys, "trials": trials}))

    r = compare_sweep(sweep, "clients.num=1,train.local_steps=32", n_boot=200)
    drawn = comparison_lines(r)
    assert drawn["x"] == "clients.num" and list(drawn["lines"]) == ["partition.method=iid", "partition.method=kmeans"]
    by = {t["trial"]: t for t in r["trials"]}
    for label, method in (("partition.method=iid", "iid"), ("partition.method=kmeans", "kmeans")):
        pts = {p["x"]: p for p in drawn["lines"][label]}
        assert sorted(pts) == [1, 4, 16] and pts[1]["diff"] == 0 and pts[1]["seeds"] == [0, 0]
        mine = [t for t in trials if t["params"]["partition.method"] == method and t["params"]["clients.num"] == 16]
        assert pts[16]["seeds"] == [by[t["trial"]]["diff"]["diff"] for t in mine]
        assert pts[16]["diff"] == pytest.approx(np.mean(pts[16]["seeds"])) and pts[16]["high"] < 0 < pts[4]["low"]
        # the bars: the seeds' mean with its own interval (rows resampled once for both seeds)
        arm = next(a for a in r["arms"] if a["arm"] == {"clients.num": 16, "train.local_steps": 2, "partition.method": method})
        assert (pts[16]["low"], pts[16]["high"]) == (arm["mean"]["low"], arm["mean"]["high"])
    written = save_sweep_comparison(r, "table")
    png = sweep / "compare_clients.num=1,train.local_steps=32.png"
    assert png in written and png.stat().st_size > 10_000
    # nothing numeric varies: no plot, the table alone
    assert comparison_lines({**r, "keys": ["partition.method", "train.seed"]}) == {}
    assert [t["seed"] for t in r["trials"][:2]] == [0, 0]


def test_a_sweep_plot_bars_the_seeds_mean_with_its_own_interval_from_the_rows_they_scored(tmp_path):
    """Three seeds of an arm, each on rows of its own: the plot's bar is the interval of their mean
    AUC (about 1/sqrt(3) of one seed's), not their interval ends averaged; a trial without its rows
    falls back to the averaged ends. With --audit's rows, the attack's AUC the same way."""
    from fedsim.compare import auc_over_seeds
    from fedsim.metrics import auc_ci
    from fedsim.tuning.report import _pooled_ci, plot_privacy_utility

    dirs, each = [], []
    for s in range(3):
        df = rows(seed=s).assign(timestamp=lambda d: d["timestamp"] + 10**8 * s)  # rows of its own
        d = make_run(tmp_path / f"seed{s}", df, 1.0, s)
        p = pd.read_parquet(d / "predictions.parquet")
        dirs.append(d)
        each.append((auc(p["label"], p["prob"]), *auc_ci(p["label"], p["prob"])))
    mean, low, high = auc_over_seeds(dirs)
    assert mean == pytest.approx(np.mean([e[0] for e in each])) and low < mean < high
    assert high - low == pytest.approx(np.mean([e[2] - e[1] for e in each]) / np.sqrt(3), rel=0.25)
    trial = [{"privacy.client_dp.epsilon": 8.0, "train.seed": s, "seed": s, "run_dir": str(d), "auc": e[0],
              "auc_ci_low": e[1], "auc_ci_high": e[2], "auc_q25": 0.5, "auc_q75": 0.7, "epsilon": 8.0}
             for s, (d, e) in enumerate(zip(dirs, each))]
    assert _pooled_ci(trial, audit=False) == pytest.approx((low, high))
    assert _pooled_ci([{k: v for k, v in r.items() if k != "run_dir"} for r in trial], audit=False) is None
    assert _pooled_ci([*trial[:2], {**trial[2], "run_dir": str(tmp_path / "gone")}], audit=False) is None
    no_dp = [{**r, "privacy.client_dp.epsilon": float("inf"), "epsilon": float("inf")} for r in trial]
    assert plot_privacy_utility(trial + no_dp, ["privacy.client_dp.epsilon", "train.seed"], tmp_path / "pu.png").exists()

    audit = rows(seed=7).assign(member=lambda d: d["label"], loss=lambda d: -d["signal"]).drop(columns=["label", "signal"])
    audit.to_parquet(dirs[0] / "audit.parquet", index=False)
    assert auc_over_seeds(dirs[:1], audit=True)[0] == pytest.approx(auc(audit["member"], -audit["loss"]))
    assert _pooled_ci(trial, audit=True) is None  # two of the seeds kept no audit
