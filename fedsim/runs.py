"""One entry point for a training run: the CLI and Tune ask for a run and do not know which kind runs.

A config with unlearning.shards >= 1 trains one adapter per shard and merges them (fedsim.unlearning);
any other config is a plain federated Simulation. Both have `run_dir` and `run() -> summary`.
"""
from pathlib import Path

from fedsim.config import Config
from fedsim.simulation import Simulation, load_run_config


def make_run(cfg: Config | None, run_dir: Path | str | None = None, tracking_uri: str | None = None, **kw):
    """A Simulation or a ShardedRun for `cfg`, or for the saved config of `run_dir` when resuming (cfg None)."""
    run_dir = Path(run_dir) if run_dir else None
    if run_dir is not None and (run_dir / "config.yaml").exists():
        cfg = load_run_config(run_dir)  # a resumed run keeps its saved config, as both classes do
    if cfg is not None and cfg.unlearning.shards:
        from fedsim.unlearning.sharded import ShardedRun

        return ShardedRun(cfg, run_dir, tracking_uri=tracking_uri, **kw)
    return Simulation(cfg, run_dir, tracking_uri=tracking_uri, **kw)
