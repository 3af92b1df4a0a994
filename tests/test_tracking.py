"""fedsim.tracking against a real sqlite MLflow store: what a user sees when the store refuses a run."""
import pytest

from fedsim.tracking import Tracker


def test_a_store_that_refuses_writes_stops_the_run_with_its_own_error(tmp_path, mlflow_store):
    # A store fedsim may read but not write (here opened read-only): the run must stop on sqlite's
    # error, which names the problem, not on a lookup of the experiment it could not make.
    db = tmp_path / "mlflow.db"
    mlflow_store(db)
    tracker = Tracker(True, f"sqlite:///file:{db}?mode=ro&uri=true", "fedsim")
    with pytest.raises(Exception, match="attempt to write a readonly database"):
        tracker.start("tiny", {"train.rounds": 1})
