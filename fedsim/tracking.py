"""MLflow tracking, imported lazily so a run with tracking off works where MLflow is absent."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

# MLflow's UI picks its view from this experiment tag; without it an experiment opens in the GenAI
# (traces) view and a run page is titled "Evaluations".
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow checks a dataset digest's length: the first 32 hex digits (128 bits) of the data's sha256.
DIGEST_CHARS = 32
MAX_NOTE = 8000


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_uri(cli_uri: str | None, cfg_uri: str | None) -> str:
    return cli_uri or cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def retry_locked(fn, *args, tries: int = 12, **kwargs):
    """Call an MLflow client method; on sqlite's 'database is locked' (concurrent Tune trials writing
    one store; a read that turns into a write is refused at once, whatever the busy timeout) wait and
    try again, so no metric is lost."""
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if "database is locked" not in str(e) or attempt == tries - 1:
                raise
            time.sleep(min(5.0, 0.1 * 2 ** attempt))


def git_commit(path: Path | None = None) -> str | None:
    """The commit checked out where fedsim's source lives; None outside a git checkout."""
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags (the runs table's Source column): fedsim and its commit."""
    from fedsim import __version__

    tags = {"mlflow.source.name": "fedsim", "mlflow.source.type": "LOCAL", "fedsim.version": __version__}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


class Tracker:
    """One MLflow run per simulation; `enabled=False` keeps the same calls and records nothing.

    Uses MlflowClient with explicit run ids rather than mlflow's process-global active run, so
    several simulations (Tune trials, tests) can share a process.
    """

    def __init__(self, enabled: bool, uri: str, experiment: str):
        self.enabled, self.uri, self.experiment = enabled, uri, experiment
        self.run_id = None
        self._client = None

    @property
    def client(self):
        # Made on first use: a run that stops on a bad config before it starts writes no store.
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment_id(self) -> str:
        return retry_locked(self._get_or_create_experiment)

    def _get_or_create_experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self.client.create_experiment(self.experiment, tags=EXPERIMENT_KIND)
            except Exception:  # another process may have made it between the two calls
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:  # not another process creating it: its own error ('database is locked' retries)
                    raise
        if "mlflow.experimentKind" not in exp.tags:  # made by an older fedsim, or by hand (retried with the rest)
            self.client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id

    def start(self, run_name: str, params: dict, run_id: str | None = None, tags: dict | None = None) -> str | None:
        if not self.enabled:
            return None
        from mlflow.entities import Param

        if run_id:  # resuming: keep writing into the interrupted run
            retry_locked(self.client.update_run, run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        run = retry_locked(self.client.create_run, self._experiment_id(), run_name=run_name,
                           tags={**source_tags(), **{k: str(v) for k, v in (tags or {}).items()}})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            retry_locked(self.client.log_batch, self.run_id, params=items[i:i + 100])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and v == v]
        for i in range(0, len(items), 1000):
            retry_locked(self.client.log_batch, self.run_id, metrics=items[i:i + 1000])

    def log_dataset(self, data: dict) -> None:
        """The run's data as an MLflow dataset input (the runs table's Dataset column): `data` has
        name, sha256, source_type, source (a dict) and profile (a dict), from fedsim.prepare."""
        if not self.enabled or not data:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=data["name"], digest=data["sha256"][:DIGEST_CHARS], source_type=data["source_type"],
                     source=json.dumps(data["source"]), profile=json.dumps(data["profile"]))
        retry_locked(self.client.log_inputs, self.run_id,
                     [DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])])

    def set_note(self, text: str) -> None:
        """The run page's description (Overview tab); MLflow caps a tag value at 8,000 characters."""
        if self.enabled and self.run_id:
            if len(text) > MAX_NOTE:
                text = text[:MAX_NOTE - 40] + "\n... (the full table: summary.json)"
            retry_locked(self.client.set_tag, self.run_id, "mlflow.note.content", text)

    def last_step(self, key: str) -> int:
        """The highest step logged for `key` in this run (-1: none, or tracking off)."""
        if not self.enabled or not self.run_id:
            return -1
        history = retry_locked(self.client.get_metric_history, self.run_id, key)
        return max((m.step for m in history), default=-1)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.enabled or not Path(path).exists():
            return
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or Path(path).name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            retry_locked(self.client.set_terminated, self.run_id, status=status)
