"""`fedsim tune`: sweep files, trial placement groups, a real sweep under Ray Tune with MLflow parent
and nested runs, an interrupted sweep resumed."""
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedsim.cli import main
from fedsim.config import ConfigError
from fedsim.tuning.sweep import expand, parse_sweep
from fedsim.tuning.tune import check_fit, trial_bundles


def write_sweep(tmp_path, **fields):
    data = {"name": "t", "base": "configs/tiny.yaml",
            "set": {"train.rounds": 1, "executors.num_cpus": 0.5}, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("fields, message", [
    ({"gird": {"clients.num": [2]}}, "unknown sweep key 'gird' (did you mean 'grid'?)"),
    ({"grid": {"clients.nmu": [2]}}, "grid: unknown config key 'clients.nmu' (did you mean 'clients.num'?)"),
    ({"grid": {"model": [1]}}, "'model' is a section"),
    ({"grid": {"clients.num": [2, 0]}}, "trial 1 (clients.num=0): clients.num: 0 must be >= 1"),
    ({"grid": {"privacy.client_dp.epsilon": [4, 1e-4]}}, "trial 1 (privacy.client_dp.epsilon=0.0001): "
                                                         "privacy.client_dp.epsilon: 0.0001 cannot be reached"),
    ({"grid": {"train.seed": [1]}, "seeds": [0]}, "'train.seed' is given 2 times"),
    ({"random": {"params": {"train.lr": {"loguniform": [0, 1]}}}}, "random.params.train.lr.loguniform: [0, 1] needs low > 0"),
    ({"random": {"params": {"train.lr": {"normal": [0, 1]}}}}, "random.params.train.lr: {'normal': [0, 1]} must be one of"),
    ({"metric": "auroc"}, "metric: 'auroc' is not one of auc"),
    ({"scheduler": "asha", "set": {"eval.every": 2}}, "eval.every must be 1, trial 0 has eval.every=2"),
    ({"trial_cpus": 0}, "trial_cpus: 0.0 must be > 0"),
    ({"grid": {"clients.num, train.local_steps": [[1, 8], [2]]}},
     "grid.clients.num, train.local_steps: [2] must be a list of 2 values, one for each of clients.num, train.local_steps"),
    ({"grid": {"clients.num, train.local_stesp": [[1, 8]]}}, "unknown config key 'train.local_stesp'"),
    ({"grid": {"clients.num, train.seed": [[1, 8]]}, "seeds": [0]}, "'train.seed' is given 2 times"),
    ({"grid": {"clients.num": [2, 3]}, "seeds": [0], "against": "train.lr=0.1"},
     "against: 'train.lr=0.1' must be KEY=VALUE[,KEY=VALUE] with each KEY a key the sweep varies (clients.num, train.seed)"),
])
def test_sweep_file_errors_name_the_bad_key(tmp_path, fields, message):
    path = write_sweep(tmp_path, **fields)
    with pytest.raises(ConfigError, match=re.escape(message)):
        expand(parse_sweep(path), path)


def test_keys_that_move_together_are_one_grid_entry(tmp_path):
    # An equal sample budget across client counts: local steps shrink as clients grow.
    path = write_sweep(tmp_path, grid={"clients.num, train.local_steps": [[1, 8], [2, 4], [4, 2]],
                                       "partition.method": ["iid", "kmeans"]})
    trials = expand(parse_sweep(path), path)
    assert [(t.cfg.clients.num, t.cfg.train.local_steps, t.cfg.partition.method) for t in trials] == [
        (1, 8, "iid"), (1, 8, "kmeans"), (2, 4, "iid"), (2, 4, "kmeans"), (4, 2, "iid"), (4, 2, "kmeans")]
    assert set(trials[0].params) == {"clients.num", "train.local_steps", "partition.method"}


def test_cli_reports_a_bad_sweep_before_starting_anything(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"train.lrr": [0.1]})
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr' (did you mean 'train.lr'?)" in err and str(path) in err


def test_cli_resume_takes_a_sweep_directory_alone_and_names_what_is_missing(tmp_path, capsys):
    # `fedsim tune --resume SWEEP_DIR` needs no sweep YAML: the directory's sweep.json holds the sweep.
    assert main(["tune", "--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}: no sweep.json there; is it a fedsim sweep directory?" in capsys.readouterr().err
    for argv in (["tune"], ["tune", "--resume"]):  # neither a sweep nor a directory: nothing to go on
        assert main(argv) == 2
        assert "give a sweep YAML (e.g. tuning/ci_small.yaml), or --resume SWEEP_DIR" in capsys.readouterr().err


def test_grid_random_and_seeds_expand_into_validated_trials(tmp_path):
    path = write_sweep(tmp_path, grid={"privacy.client_dp.epsilon": [1, "inf"], "clients.num": [2, 3]},
                       random={"num_samples": 2, "seed": 3,
                               "params": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.lora.r": {"choice": [2, 4]}}},
                       seeds=[0, 1])
    trials = expand(parse_sweep(path), path)
    assert len(trials) == 2 * 2 * 2 * 2  # epsilons x client counts x random draws x seeds
    for t in trials:
        dp = t.cfg.privacy.client_dp
        if t.params["privacy.client_dp.epsilon"] == math.inf:  # infinity: client-level DP off
            assert not dp.enabled and dp.epsilon is None
        else:
            assert dp.enabled and dp.epsilon == 1.0
        assert 1e-4 <= t.cfg.train.lr <= 1e-2 and t.cfg.model.lora.r in (2, 4)
        assert t.cfg.clients.num == t.params["clients.num"] and t.cfg.train.seed == t.params["train.seed"]
    # A draw is shared by every grid point and seed (paired comparisons); two draws in all.
    assert len({t.cfg.train.lr for t in trials}) == 2
    assert [t.params for t in expand(parse_sweep(path), path)] == [t.params for t in trials]  # reproducible


def test_executors_take_their_bundles_of_the_trial_placement_group(ray_local, tiny_cfg):
    """A placement group that reserves the whole cluster: executors placed outside it could never start."""
    ray = ray_local
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    total = ray.cluster_resources()["CPU"]
    pg = placement_group([{"CPU": total - 3}, {"CPU": 1.5}, {"CPU": 1.5}])
    ray.get(pg.ready(), timeout=60)

    @ray.remote
    class Probe:
        def where(self):
            ctx = ray.get_runtime_context()
            return ctx.get_placement_group_id(), ctx.get_assigned_resources()

    @ray.remote
    def trial(cfg_two, cfg_three):
        from fedsim.simulation import bundle_placement, executor_resources

        n, cpus, gpus = executor_resources(cfg_two)
        probes = [Probe.options(num_cpus=cpus, **bundle_placement(i + 1)).remote() for i in range(n)]
        where = ray.get([p.where.remote() for p in probes], timeout=120)
        try:
            executor_resources(cfg_three)
            error = None
        except ValueError as e:
            error = str(e)
        return (n, cpus, gpus), where, error

    try:
        shape, where, error = ray.get(trial.options(num_cpus=total - 3, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote(
            tiny_cfg("clients.num=2", "executors.num=0", "executors.num_cpus=1.5"),
            tiny_cfg("clients.num=3", "executors.num=0", "executors.num_cpus=1.5")),
            timeout=180)
    finally:
        remove_placement_group(pg)
    assert shape == (2, 1.5, 0.0)
    assert [w[0] for w in where] == [pg.id.hex()] * 2 and all(w[1] == {"CPU": 1.5} for w in where)
    assert "placement group has 2 executor bundle(s)" in error and "3 executors" in error


def test_a_trial_that_cannot_fit_the_cluster_is_an_error_before_tune_starts(ray_local, tmp_path):
    from fedsim.tuning.tune import run_sweep

    path = write_sweep(tmp_path, grid={"clients.num": [2, 8]},
                       set={"train.rounds": 1, "executors.num": 0, "executors.num_cpus": 1.0,
                            "output_dir": str(tmp_path / "runs")})  # an actor per client: 8 x 1 CPU
    cpus = ray_local.cluster_resources()["CPU"]
    with pytest.raises(ConfigError, match=re.escape("trial 1 (clients.num=8) cannot fit the Ray cluster: it needs "
                                                    "8.5 CPU in all") + f".*the cluster has {cpus:g} CPU"):
        run_sweep(str(path), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log=lambda *a: None)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_sweep_under_tune_nested_mlflow_runs_and_resume(ray_local, tmp_path, mlflow_store, notebook):
    """Four trials (2 clients counts x 2 epsilons, two at a time), interrupted as Ctrl+C would once two
    finished (the third is then usually mid-run), then resumed: every trial ends with one nested
    MLflow run holding each round's metrics exactly once. The comparison notebook on this store
    shows the sweep as its parent run holds it."""
    from mlflow import MlflowClient

    from fedsim.tuning.tune import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_store(tmp_path / "mlflow.db")  # its tables made (MLflow takes seconds to make them)
    path = write_sweep(tmp_path, grid={"clients.num": [2, 3], "privacy.client_dp.epsilon": [4, "inf"]},
                       set={"train.rounds": 2, "train.local_steps": 1, "executors.num": 1, "executors.num_cpus": 0.5,
                            # round 1 reports no auc to Tune (NaN until the first evaluation)
                            "eval.every": 2, "output_dir": str(tmp_path / "runs")}, max_concurrent=2,
                       against="privacy.client_dp.epsilon=inf")
    first = run_sweep(str(path), tracking_uri=uri, log=lambda *a: None, stop_after_trials=2)
    assert first["interrupted"]
    before = {r["trial"]: r for r in first["trials"]}
    finished_first = [t for t, r in before.items() if r["status"] == "FINISHED"]
    assert 2 <= len(finished_first) < 4
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first["parent_run_id"]).info.status == "KILLED"

    second = run_sweep(str(path), tracking_uri=uri, resume=True, log=lambda *a: None)
    assert not second["interrupted"] and second["sweep_dir"] == first["sweep_dir"]
    assert second["parent_run_id"] == first["parent_run_id"]
    # (a node id of 8 hex digits may read as a number: "12345678", "1e123456")
    rows = pd.read_csv(f"{second['sweep_dir']}/results.csv", dtype={"trial_node": str, "executor_nodes": str})
    assert len(rows) == 4 and set(rows["status"]) == {"FINISHED"} and (rows["rounds"] == 2).all()
    assert rows["auc"].between(0, 1).all() and (rows["bytes_up"] > 0).all() and (rows["wall_seconds"] > 0).all()
    # one node: every trial and its executors on it (tests/test_placement.py: several nodes)
    node = ray_local.get_runtime_context().get_node_id()[:8]
    assert (rows["trial_node"] == node).all() and (rows["executor_nodes"] == node).all()
    dp = rows["privacy.client_dp.epsilon"] == 4
    assert (rows.loc[~dp, "epsilon"] == math.inf).all() and rows.loc[dp, "epsilon"].between(0.5, 4.0 + 1e-6).all()

    parent = client.get_run(second["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 4
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "sweep.json", "privacy_utility.png", "clients_auc.png", "clients_wall.png"} <= artifacts
    # `against`: each DP trial paired with the no-DP trial of its client count (fedsim compare SWEEP)
    table = client.download_artifacts(parent.info.run_id, "compare/compare_privacy.client_dp.epsilon=inf.md", str(tmp_path))
    lines = [line for line in open(table) if line.startswith("| ")]
    assert sum("reference |" in line for line in lines) == 2 and sum("paired over" in line for line in lines) == 2
    assert "compare/compare_privacy.client_dp.epsilon=inf.png" in {  # the differences along clients.num
        a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    ns = notebook(uri, tmp_path)
    shown = ns["sweep_tables"][parent.info.run_name]
    assert len(shown) == 4 and set(shown["status"]) == {"FINISHED"}
    assert all(re.fullmatch(r"0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]", c) for c in shown["AUC [95 % CI]"])
    assert {"privacy_utility.png", "clients_auc.png", "compare_privacy.client_dp.epsilon=inf.png"} <= {
        p.name for p in ns["sweep_plots"][parent.info.run_name]}
    assert len(ns["table"]) == 4  # the trials' own runs, one row each
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["fedsim.trial"]) for r in nested) == [0, 1, 2, 3]
    by_trial = {int(r.data.tags["fedsim.trial"]): r for r in nested}
    for t, run in by_trial.items():
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "auc")] == [1]  # eval.every 2
        for key in ("bytes_up", "train_loss", "round_seconds") + (("dp/epsilon",) if t in rows[dp]["trial"].tolist() else ()):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1], (t, key)
    for t in finished_first:  # finished before the interruption: not run again
        assert by_trial[t].info.run_id == before[t]["mlflow_run_id"]


def test_trial_rows_hold_every_sweep_metric_so_a_sweep_ranks_on_logloss(tmp_path):
    """trial_row copies every sweep.METRICS key (not only the AUCs), so `finish` ranks on logloss."""
    from fedsim.config import to_dict
    from fedsim.simulation import save_checkpoint
    from fedsim.tuning.report import finish, trial_row

    class Parent:  # what `finish` uses of the MLflow parent run
        run_id, metrics = None, {}

        def log_metrics(self, metrics, step):
            self.metrics.update(metrics)

        def log_artifact(self, path):
            pass

    path = write_sweep(tmp_path, grid={"train.lr": [1e-3, 1e-2]}, metric="logloss", mode="min")
    rows = []
    for t, loss in zip(expand(parse_sweep(path), path), (0.5, 0.4)):
        run_dir = tmp_path / f"trial_{t.index}"
        run_dir.mkdir()
        save_checkpoint(run_dir, {"round": 0, "history": [{"round": 0, "auc": 0.7, "auc_ci_low": 0.65, "auc_ci_high": 0.75,
                                                              "logloss": loss, "bytes_up": 8.0}],
                                  "wall_seconds": 3.0, "mlflow_run_id": None})
        (run_dir / "summary.json").write_text('{"complete": true, "wall_seconds": 4.0}')
        spec = {"trial": t.index, "params": t.params, "config": to_dict(t.cfg), "run_dir": str(run_dir)}
        rows.append(trial_row(spec, None, interrupted=False))
    assert [r["logloss"] for r in rows] == [0.5, 0.4] and math.isnan(rows[0]["auc_std"])  # absent: NaN
    assert all(r["status"] == "FINISHED" and r["wall_seconds"] == 4.0 for r in rows)
    parent = Parent()
    state = {"name": "t", "keys": ["train.lr"], "metric": "logloss", "mode": "min", "tracking": {"uri": "-"}}
    finish(state, rows, tmp_path, parent, log=lambda *a: None)
    assert parent.metrics["best_logloss"] == 0.4
    csv = pd.read_csv(tmp_path / "results.csv")  # the AUC's interval from the last evaluation
    assert csv["auc_ci_low"].tolist() == [0.65, 0.65] and csv["auc_ci_high"].tolist() == [0.75, 0.75]


def test_record_level_epsilon_is_the_largest_over_every_round():
    """A client logs its sample_epsilon only in rounds it was sampled: the last round alone misses it."""
    from fedsim.tuning.report import epsilon_spent

    cfg = {"privacy": {"client_dp": {"enabled": False}, "sample_dp": {"enabled": True}}}
    history = [{"round": 0, "client/0/dp/sample_epsilon": 1.0, "client/1/dp/sample_epsilon": 2.0},
               {"round": 1, "client/0/dp/sample_epsilon": 1.5},
               {"round": 2}]  # Poisson sampling drew no client
    assert epsilon_spent(history, cfg) == 2.0
    assert math.isnan(epsilon_spent([], cfg))


def test_sweep_dirs_match_the_sweep_name_exactly(tmp_path):
    """Sweep 'privacy' is not sweep 'privacy-clients', though both directories start with 'privacy-'."""
    from fedsim.tuning.tune import sweep_dirs

    for name in ("privacy-20240101-120000", "privacy-clients-20240102-120000", "privacy-20240103-120000"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text("{}")
    (tmp_path / "privacy-20240104-120000").mkdir()  # no sweep.json: not a sweep directory
    assert [p.name for p in sweep_dirs(tmp_path, "privacy")] == ["privacy-20240101-120000", "privacy-20240103-120000"]
    assert [p.name for p in sweep_dirs(tmp_path, "privacy-clients")] == ["privacy-clients-20240102-120000"]
    assert sweep_dirs(tmp_path / "missing", "privacy") == []


def test_epsilon_plots_draw_intervals_seeds_baselines_and_the_attack(tmp_path):
    from matplotlib.image import imread

    from fedsim.report import series
    from fedsim.tuning.report import plot_mia, plot_privacy_utility

    rows = [{"privacy.sample_dp.epsilon": eps, "train.seed": seed, "seed": seed, "auc": a + 0.01 * seed,
             "auc_ci_low": a - 0.04, "auc_ci_high": a + 0.04, "auc_min": a - 0.1, "auc_max": a + 0.1,
             "auc_q25": a - 0.05, "auc_q75": a + 0.05, "mia_auc": m, "mia_ci_low": m - 0.05, "mia_ci_high": m + 0.05, "epsilon": eps,
             "baseline/popularity": 0.66, "baseline/history_popularity": 0.81}
            for eps, a, m in ((math.inf, 0.77, 0.71), (8.0, 0.70, 0.55), (2.0, 0.60, 0.50)) for seed in (0, 1)]
    keys = ["privacy.sample_dp.epsilon", "train.seed"]
    # one line, and the legend says what it is (the seeds' mean; the dots are the seeds)
    assert list(series(rows, keys, "privacy.sample_dp.epsilon")) == ["mean over seeds"]
    assert list(series(rows[::2], keys, "privacy.sample_dp.epsilon")) == ["seed 0"]  # a slice of one seed
    assert list(series(rows[::2], ["privacy.sample_dp.epsilon"], "privacy.sample_dp.epsilon",
                       lambda r, k: None if k == "train.seed" else r.get(k))) == ["one run a point"]
    # a sweep of one seed has no train.seed column (not varied); its plots name the seed its rows ran
    from fedsim.tuning.report import _series
    one = [{k: v for k, v in r.items() if k != "train.seed"} for r in rows[1::2]]
    assert list(_series(one, ["privacy.sample_dp.epsilon"], "privacy.sample_dp.epsilon")) == ["seed 1"]
    for plot, name in ((plot_privacy_utility, "pu.png"), (plot_mia, "mia.png")):
        path = plot(rows, keys, tmp_path / name)
        assert path == tmp_path / name and imread(path).shape[:2] == (495, 770)  # 7 x 4.5 in at 110 dpi
    # No audit in any trial (mia_auc NaN): no attack plot rather than an empty one.
    assert plot_mia([{**r, "mia_auc": math.nan} for r in rows], keys, tmp_path / "none.png") is None


def test_client_and_record_level_dp_in_one_sweep_are_a_line_each_from_the_same_no_dp_point(tmp_path):
    from matplotlib.image import imread

    from fedsim.tuning.report import by_dp_kind, plot_privacy_utility

    c, s = "privacy.client_dp.epsilon", "privacy.sample_dp.epsilon"
    pairs = ((math.inf, math.inf, 0.77), (8.0, math.inf, 0.70), (2.0, math.inf, 0.60), (math.inf, 8.0, 0.74), (math.inf, 2.0, 0.71))
    rows = [{c: ce, s: se, "train.seed": 0, "seed": 0, "auc": a, "auc_ci_low": a - 0.04, "auc_ci_high": a + 0.04,
             "auc_min": a - 0.1, "auc_max": a + 0.1, "auc_q25": a - 0.05, "auc_q75": a + 0.05, "epsilon": min(ce, se)} for ce, se, a in pairs]
    kinds = by_dp_kind(rows, [c, s])
    line = lambda kind: [(r["dp_epsilon"], r["auc"]) for r in kinds if r["dp"] == kind]  # noqa: E731
    assert line("client-level") == [(math.inf, 0.77), (8.0, 0.70), (2.0, 0.60)]
    assert line("record-level") == [(math.inf, 0.77), (8.0, 0.74), (2.0, 0.71)]
    path = plot_privacy_utility(rows, [c, s, "train.seed"], tmp_path / "pu.png")
    assert path == tmp_path / "pu.png" and imread(path).shape[:2] == (495, 770)


def test_a_sweep_over_shards_plots_the_merges_against_retraining(tmp_path):
    from matplotlib.image import imread

    from fedsim.tuning.report import plot_unlearning

    def row(k, seed, a):
        out = {"unlearning.shards": k, "train.seed": seed, "seed": seed, "auc": a, "shard_auc_mean": a - 0.01 * k}
        for name, d in (("apa_weights", 0.0), ("apa_outputs", -0.005), ("sisa", 0.01)):
            out.update({f"{name}/auc": a + d, f"{name}/auc_ci_low": a + d - 0.04, f"{name}/auc_ci_high": a + d + 0.04})
        return out

    rows = [row(k, seed, 0.76 - 0.005 * k + 0.01 * seed) for k in (1, 2, 4, 8) for seed in (0, 1)]
    keys = ["train.seed", "unlearning.shards"]
    path = plot_unlearning(rows, keys, tmp_path / "k.png")
    assert path == tmp_path / "k.png" and imread(path).shape[:2] == (495, 770)
    assert plot_unlearning(rows, ["train.seed"], tmp_path / "no.png") is None  # not a sweep over K
    assert plot_unlearning([r for r in rows if r["unlearning.shards"] == 4], keys, tmp_path / "one.png") is None


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("tuning").glob("*.yaml")))
def test_every_shipped_sweep_file_expands_into_valid_trials(path):
    """A recipe in tuning/ that no longer matches the config schema fails here, not hours into a sweep."""
    assert expand(parse_sweep(path), path)


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("tuning").glob("*.yaml")
                                        if "gpu" not in p.name and p.name != "ci_nodes.yaml"))
def test_every_cpu_sweep_file_fits_one_two_core_machine(path):
    """The CPU recipes are sized to the documented 2-core machine (GPU recipes and the multi-node one
    aside): a trial whose bundles cannot be placed there fails at submission, after the user waited
    for Ray to start."""
    sweep = parse_sweep(path)
    trials = [{"trial": t.index, "params": t.params, "bundles": trial_bundles(t.cfg, sweep.trial_cpus, 0)}
              for t in expand(sweep, path)]
    check_fit(trials, {"CPU": 2}, [{"CPU": 2}])
