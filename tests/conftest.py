import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Background:
    """Slow jobs that need no Ray (the real model's training, in a process of its own), started as
    soon as the tests that need them are collected: their minutes of CPU then fill the core that the
    rest of the suite, mostly waiting on Ray processes that start and stop, leaves idle. A test
    marked `@pytest.mark.background.with_args(job)` (`with_args`: a lone function argument would be
    taken for the test to decorate) reads the job's result with the `background` fixture. `job(out)`
    runs in a thread with `out` a fresh directory; it runs its work in a subprocess, so as not to hold
    the GIL the tests need. Not for jobs with a Ray cluster of their own: two clusters starting at
    once on one machine broke each other's runtime envs (tried with tests/test_placement.py's and
    clusters/local_job.sh's)."""

    def __init__(self, tmp_path_factory):
        self.factory = tmp_path_factory
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="background")
        self.jobs: dict = {}

    def start(self, job) -> Future:
        if job not in self.jobs:
            self.jobs[job] = self.pool.submit(job, self.factory.mktemp(job.__name__))
        return self.jobs[job]

    def __call__(self, job):
        """The job's result, once it has ended (started now if no collected test had asked for it)."""
        return self.start(job).result()


BACKGROUND = pytest.StashKey[Background]()


def pytest_collection_finish(session):
    for item in session.items:
        for mark in item.iter_markers("background"):
            session.config.stash.setdefault(BACKGROUND, Background(session.config._tmp_path_factory)).start(mark.args[0])


def pytest_sessionfinish(session):
    if BACKGROUND in session.config.stash:
        session.config.stash[BACKGROUND].pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def background(pytestconfig, tmp_path_factory) -> Background:
    return pytestconfig.stash.setdefault(BACKGROUND, Background(tmp_path_factory))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole test session (starting one costs seconds)."""
    import ray

    # address="local": always a fresh instance, never whatever cluster is already on the machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """`mlflow_store(path)` puts an empty MLflow sqlite store (its tables made) at `path`, unless one is
    there: MLflow makes the tables of a new store in ~6 s (its migrations), a copy takes milliseconds.
    The store is otherwise as a new one: only the Default experiment, no runs."""
    template = []

    def make(path: Path) -> None:
        if not template:
            from mlflow import MlflowClient

            db = tmp_path_factory.mktemp("mlflow_store") / "mlflow.db"
            MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # makes the tables
            template.append(db)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(template[0], path)
    return make


@pytest.fixture
def notebook(monkeypatch):
    """`notebook(uri, cwd)`: notebooks/compare_runs.ipynb's code cells run in order against the MLflow
    store at `uri`, in `cwd` (where it writes its figures); its namespace, to check what it made."""
    cells = json.loads((Path(__file__).parents[1] / "notebooks" / "compare_runs.ipynb").read_text())["cells"]

    def run(uri: str, cwd: Path) -> dict:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.chdir(cwd)
        ns: dict = {}
        for cell in cells:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), "compare_runs.ipynb", "exec"), ns)
        return ns
    return run


@pytest.fixture
def tiny_cfg(tmp_path, mlflow_store):
    """A tiny-random model on synthetic users: a full federated run in seconds on a CPU, on tiny.yaml's
    one pooled executor (an actor's start-up is most of a tiny run); a test about several executors
    sets executors.num, one about per-client actors executors.num=0."""
    from fedsim.config import load_config

    def make(*overrides):
        cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'runs'}",
                                                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])
        if cfg.tracking.enabled and cfg.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}":
            mlflow_store(tmp_path / "mlflow.db")
        return cfg
    return make


@dataclass
class PreparedRun:
    """A prepared run directory (data, shards, model cache) for in-process executor tests."""
    run_dir: Path
    model_path: str

    def executor(self, own: Path, cfg, executor_id: int = 0):
        """A ClientExecutor for `cfg` over `own`, a copy of the prepared run made on first use: executors
        given the same `own` share one client store, as a pool's executors do."""
        from fedsim.client.executor import ClientExecutor
        from fedsim.config import to_dict

        if not own.exists():
            shutil.copytree(self.run_dir, own)
        return ClientExecutor(to_dict(cfg), str(own), self.model_path, executor_id)


@pytest.fixture(scope="session")
def prepare_run(tmp_path_factory):
    """`prepare_run(name, cfg)` -> PreparedRun. Preparing costs seconds, so a test module wraps it
    in a module-scoped fixture with its own config and copies the directory per test."""
    from fedsim.prepare import prepare

    def make(name, cfg) -> PreparedRun:
        run_dir = tmp_path_factory.mktemp(name) / "run"
        run_dir.mkdir()
        info = prepare(cfg, run_dir, log=lambda *a: None)
        return PreparedRun(run_dir, info["model_path"])
    return make


@pytest.fixture(scope="session")
def crash_run_pair(tmp_path_factory):
    """`crash_run_pair(*overrides)` -> (plain, changed, adapter gap): the tiny run with client 1
    crashing in round 2, without and with `overrides` (e.g. a secure-aggregation scheme, which must
    end on the same model). The plain run is made once per session."""
    from safetensors.torch import load_file

    from fedsim.config import load_config
    from fedsim.simulation import run

    def one(*overrides):
        out = tmp_path_factory.mktemp("crash_run")
        # An actor per client (executors.num=0): the crash ends client 1's process alone.
        cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", "tracking.enabled=false", "executors.num=0",
                                                "faults.crash=[{round: 1, client: 1}]", *overrides])
        summary = run(cfg, log=lambda *a: None)
        assert summary["complete"] and summary["dropped"] == [{"round": 1, "client": 1}]
        return summary

    plain = []

    def pair(*overrides):
        if not plain:
            plain.append(one())
        changed = one(*overrides)
        a, b = (load_file(Path(s["run_dir"]) / "adapter" / "adapter_model.safetensors") for s in (plain[0], changed))
        return plain[0], changed, max(float((a[k] - b[k]).abs().max()) for k in a)
    return pair


@pytest.fixture(scope="session")
def crash_round0_run(tmp_path_factory, ray_local):
    """The summary of the tiny run with client 1's executor killed in round 1 (two executors: client 1
    alone on one). Made once per session: tests/test_e2e.py checks the drop and restart on it,
    tests/test_stragglers.py compares a straggler run with it."""
    from fedsim.config import load_config
    from fedsim.simulation import run

    out = tmp_path_factory.mktemp("crash_round0")
    cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", "tracking.enabled=false", "executors.num=2",
                                            "faults.crash=[{round: 0, client: 1}]"])
    return run(cfg, log=lambda *a: None)
