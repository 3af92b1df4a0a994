import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole test session (starting one costs seconds)."""
    import ray

    # address="local": always a fresh instance, never whatever cluster is already on the machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_cfg(tmp_path):
    """A tiny-random model on synthetic users: a full federated run in seconds on a CPU."""
    from fedsim.config import load_config

    def make(*overrides):
        return load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'runs'}",
                                                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])
    return make
