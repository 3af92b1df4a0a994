"""`fedsim` command line: run, unlearn, tune, compare, config, data fetch, model fetch, baselines."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedsim.config import ConfigError, load_config
from fedsim.core.files import StateFileError


def _err(msg: str) -> int:
    print(f"fedsim: error: {msg}", file=sys.stderr)
    return 2


def cmd_run(a) -> int:
    from fedsim.runs import make_run
    from fedsim.simulation import RunStopped, resume_config

    if a.resume:
        if a.config:
            return _err("--resume continues a run with its saved config; drop CONFIG (--set changes it, with --force)")
        cfg = resume_config(Path(a.resume), a.set, force=a.force)
    else:
        if not a.config:
            return _err("give a CONFIG file (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
        if a.force:
            return _err("--force goes with --resume (to continue a run with a changed config)")
        cfg = load_config(a.config, a.set)
    sim = make_run(cfg if not a.resume else None, a.resume, tracking_uri=a.tracking_uri)
    try:
        summary = sim.run()
    except RunStopped as e:  # too few clients, an actor lost: one line with the resume command
        return _err(str(e))
    except KeyboardInterrupt:
        # The last checkpoint is whole (written atomically); Ray's actors go with this process.
        print(f"\nfedsim: interrupted; continue with: fedsim run --resume {sim.run_dir}", file=sys.stderr)
        return 130
    if a.summary_json:
        Path(a.summary_json).write_text(json.dumps(summary, indent=1, default=float))
    print(f"run directory: {summary['run_dir']}")
    return 0


def cmd_unlearn(a) -> int:
    from fedsim.unlearning.unlearn import unlearn

    if bool(a.users) == bool(a.rows):
        return _err("give exactly one of --users U [U ...] and --rows FILE")
    report = unlearn(a.run_dir, users=a.users, rows_file=a.rows, tracking_uri=a.tracking_uri)
    print(f"deletion report: {report['report_path']}")
    return 0


def cmd_tune(a) -> int:
    from fedsim.tuning.tune import run_sweep

    if a.resume and a.set:
        return _err("--resume continues a sweep with its saved trials; drop --set")
    if not a.sweep and not isinstance(a.resume, str):  # a sweep directory holds its sweep (sweep.json)
        return _err("give a sweep YAML (e.g. tuning/ci_small.yaml), or --resume SWEEP_DIR to continue a sweep")
    summary = run_sweep(a.sweep, a.set, a.tracking_uri, resume=a.resume)
    if a.summary_json:
        Path(a.summary_json).write_text(json.dumps(summary, indent=1, default=float))
    print(f"sweep directory: {summary['sweep_dir']}")
    if summary["interrupted"]:
        return 130
    failed = [r["trial"] for r in summary["trials"] if r["status"] == "ERROR"]
    return _err(f"trials {failed} failed; see their logs above, then --resume") if failed else 0


def cmd_data_fetch(a) -> int:
    from fedsim.data.movielens import fetch_movielens_100k

    if a.dataset != "movielens-100k":
        return _err(f"unknown dataset {a.dataset!r}; available: movielens-100k")
    print(fetch_movielens_100k())
    return 0


def cmd_model_fetch(a) -> int:
    from fedsim.models.loader import fetch_smollm2

    if a.model != "smollm2-135m":
        return _err(f"unknown embedded model {a.model!r}; available: smollm2-135m")
    print(fetch_smollm2())
    return 0


def cmd_baselines(a) -> int:
    from fedsim.baselines import evaluate_baselines
    from fedsim.prepare import build_all_samples
    from fedsim.report import fmt_interval

    cfg = load_config(a.config, a.set)
    samples, _ = build_all_samples(cfg)
    train = samples[samples["split"] == "train"]
    rows = {}
    for split in ("valid", "test"):
        for name, m in evaluate_baselines(train, samples[samples["split"] == split], seed=cfg.train.seed).items():
            rows[f"{name} ({split})"] = m
    for name, m in rows.items():
        auc = fmt_interval(m["auc"], m["auc_ci_low"], m["auc_ci_high"])
        print(f"{name:28s} AUC {auc}  LogLoss {m['logloss']:.4f}  Acc {m['accuracy']:.4f}")
    return 0


def cmd_compare(a) -> int:
    from fedsim.compare import (compare_by_client, compare_runs, format_client_comparison, format_comparison,
                                plot_client_comparisons)

    if a.plot and not a.by_client:
        raise ValueError("--plot draws the per-client comparison: add --by-client")
    if a.audit and a.by_client:
        raise ValueError("--audit compares the pooled membership attacks; drop --by-client")
    if a.slice and not a.against:
        raise ValueError("--slice joins another directory of the same sweep: fedsim compare SWEEP_DIR --against "
                         "KEY=VALUE --slice SWEEP_DIR_2")
    if a.against or a.run_b is None:
        if a.run_b is not None or a.by_client or not a.against:
            raise ValueError("compare a sweep as: fedsim compare SWEEP_DIR --against KEY=VALUE (no RUN_B, no --by-client)")
        from fedsim.compare import compare_sweep, format_sweep_comparison, save_sweep_comparison

        result = compare_sweep(a.run_a, a.against, seed=a.seed, n_boot=a.boot, audit=a.audit, slices=a.slice or ())
        text = format_sweep_comparison(result)
        print(text)
        print("written: " + ", ".join(str(p) for p in save_sweep_comparison(result, text)))
    elif a.by_client:
        result = compare_by_client(a.run_a, a.run_b, seed=a.seed, n_boot=a.boot)
        print(format_client_comparison(result))
        if a.plot:
            print(f"plot: {plot_client_comparisons([result], a.plot)}")
    else:
        result = compare_runs(a.run_a, a.run_b, seed=a.seed, n_boot=a.boot, audit=a.audit)
        print(format_comparison(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


def cmd_config_show(a) -> int:
    import yaml

    from fedsim.config import to_dict

    cfg = load_config(a.config, a.set)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_config_reference(a) -> int:
    from fedsim.reference import reference_markdown

    text = reference_markdown()
    if a.output:
        Path(a.output).write_text(text)
    else:
        print(text, end="")
    return 0


def bench_module():
    """benchmarks/throughput.py of this source checkout (None when fedsim is installed without it)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("fedsim_bench_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cmd_bench(a) -> int:
    if a.bench is None:
        return _err("fedsim bench runs benchmarks/throughput.py from a source checkout; it is not here")
    return a.bench.run(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsim", description="Federated LoRA fine-tuning of LLM recommenders on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) a federated simulation")
    r.add_argument("config", nargs="?", help="experiment YAML")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    r.add_argument("--force", action="store_true",
                   help="with --resume: continue even though config.yaml was edited or --set changes it")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///./mlflow.db)")
    r.add_argument("--summary-json", metavar="PATH", help="also write the final summary here")
    r.set_defaults(fn=cmd_run)

    u = sub.add_parser("unlearn", help="forget users or rows of a sharded run (unlearning.shards): "
                       "retrain only the shards that held them, merge again, write a deletion report")
    u.add_argument("run_dir", metavar="RUN", help="a finished run directory with unlearning.shards >= 1")
    u.add_argument("--users", type=int, nargs="+", help="user ids whose rows are deleted (every split)")
    u.add_argument("--rows", metavar="FILE", help="CSV or Parquet with columns user, item, timestamp: the rows deleted")
    u.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///./mlflow.db)")
    u.set_defaults(fn=cmd_unlearn)

    t = sub.add_parser("tune", help="run (or resume) a sweep of simulations under Ray Tune")
    t.add_argument("sweep", nargs="?", help="sweep YAML (see tuning/); not needed with --resume SWEEP_DIR")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base config key")
    t.add_argument("--resume", nargs="?", const=True, metavar="SWEEP_DIR",
                   help="continue an interrupted sweep: SWEEP_DIR, or the sweep YAML's latest directory")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///./mlflow.db)")
    t.add_argument("--summary-json", metavar="PATH", help="also write the results here")
    t.set_defaults(fn=cmd_tune)

    g = sub.add_parser("config", help="show a resolved config, or the reference of every key")
    gsub = g.add_subparsers(dest="action", required=True)
    f = gsub.add_parser("show", help="print CONFIG with --set applied and every default filled in (YAML)")
    f.add_argument("config", nargs="?", help="experiment YAML (none: the defaults)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    f.set_defaults(fn=cmd_config_show)
    f = gsub.add_parser("reference", help="the configuration reference (Markdown) generated from fedsim/schema.py")
    f.add_argument("--output", metavar="PATH", help="write it here (docs/configuration.md) instead of stdout")
    f.set_defaults(fn=cmd_config_reference)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="action", required=True)
    f = dsub.add_parser("fetch", help="download a dataset into FEDSIM_HOME")
    f.add_argument("dataset")
    f.set_defaults(fn=cmd_data_fetch)

    m = sub.add_parser("model", help="embedded models")
    msub = m.add_subparsers(dest="action", required=True)
    f = msub.add_parser("fetch", help="fetch and convert an embedded model into FEDSIM_HOME")
    f.add_argument("model")
    f.set_defaults(fn=cmd_model_fetch)

    b = sub.add_parser("baselines", help="score conventional recommenders on a config's split")
    b.add_argument("config")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.set_defaults(fn=cmd_baselines)

    c = sub.add_parser("compare", help="is run A better than run B (or each trial of a sweep than its reference)? paired AUC difference on their shared rows")
    c.add_argument("run_a", metavar="RUN_A", help="a finished run directory (or a sweep directory, with --against)")
    c.add_argument("run_b", metavar="RUN_B", nargs="?",
                   help="another run directory, or baseline:<name> (that baseline in RUN_A)")
    c.add_argument("--against", metavar="KEY=VALUE",
                   help="RUN_A is a sweep: each trial against the trial of the same settings and seed with KEY=VALUE")
    c.add_argument("--slice", metavar="SWEEP_DIR", action="append",
                   help="with --against: another directory of the same sweep file, run apart (a seed a slice, say); "
                        "its trials join RUN_A's, each paired with its reference in its own slice or else the first "
                        "that has one, the mean over seeds taken across slices (repeatable)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    c.add_argument("--by-client", action="store_true",
                   help="fairness: each client's AUC, and the mean, worst client and gap, paired within clients")
    c.add_argument("--plot", metavar="PNG", help="with --by-client: each client's AUC under A and B, as a picture")
    c.add_argument("--audit", action="store_true",
                   help="compare the membership attacks (privacy.audit) on the rows both runs audited, paired "
                        "(two runs, or a sweep's trials with --against)")
    c.add_argument("--json", metavar="PATH", help="also write the comparison here")
    c.set_defaults(fn=cmd_compare)

    bench = bench_module()
    b = sub.add_parser("bench", help="training throughput: one actor per client vs pooled executors vs fused",
                       description=bench.__doc__.split("\n\n")[0] if bench else None)
    if bench:
        bench.add_arguments(b)
    b.set_defaults(fn=cmd_bench, bench=bench)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (ConfigError, StateFileError) as e:
        # What the user can fix (a config key, a file to restore): one line naming it. Anything
        # else raised mid-run is a bug or a crash, and keeps its traceback.
        return _err(str(e))
    except FileNotFoundError as e:
        if a.command in ("compare", "tune"):  # a run or sweep directory named on the command line
            return _err(str(e))
        raise
    except ValueError as e:
        if a.command == "compare":  # two runs that cannot be compared: nothing ran, nothing to trace
            return _err(str(e))
        raise


if __name__ == "__main__":
    sys.exit(main())
