"""faults.round_timeout: a straggler is dropped from its round, and its late update (and whatever it
saved of that round) is discarded, never applied to a later round."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsim.client.faults import claim, claim_path, claims_dir, start_attempt
from fedsim.config import ConfigError, load_config
from fedsim.simulation import run

QUIET = dict(log=lambda *a: None)


def test_the_first_to_claim_a_client_round_wins(tmp_path):
    assert claim(tmp_path, 2, 0, "late") and not claim(tmp_path, 2, 0, "done")  # the executor discards
    assert claim(tmp_path, 1, 0, "done") and not claim(tmp_path, 1, 0, "late")  # the driver waits for it
    assert claim_path(tmp_path, 2, 0).read_text() == "late"


def test_a_resumed_run_claims_apart_from_the_killed_driver_it_replaces(tmp_path):
    old = start_attempt(tmp_path)  # what the killed driver's executors read when they started
    new = start_attempt(tmp_path)  # the resumed driver's, before its executors start
    assert claims_dir(tmp_path) == new != old
    assert claim(new, 1, 0, "done")
    # A straggler of the killed driver that Ray has not ended yet waits on its own attempt's claim:
    # it is not woken by the new run's, and what it claims is not the new run's to abide by.
    assert not claim_path(old, 1, 0).exists()
    assert claim(old, 1, 0, "late") and claim(new, 1, 0, "done")


def test_slow_needs_a_timeout():
    with pytest.raises(ConfigError, match=r"faults\.slow\[0\]: .* needs faults\.round_timeout"):
        load_config("configs/tiny.yaml", ["faults.slow=[{round: 0, client: 1}]"])
    with pytest.raises(ConfigError, match=r"faults\.round_timeout: 0(\.0)? must be > 0 seconds or null"):
        load_config("configs/tiny.yaml", ["faults.round_timeout=0"])


def test_a_straggler_is_dropped_and_its_late_update_never_reaches_a_later_round(ray_local, tiny_cfg, crash_round0_run):
    # 15 s is far beyond a tiny round (about a second on an idle CPU): only the straggler misses it.
    # Two executors: clients 0 and 2 on one, the straggler alone on the other.
    slow = run(tiny_cfg("tracking.enabled=false", "executors.num=2", "faults.round_timeout=15",
                        "faults.slow=[{round: 0, client: 1}]"), **QUIET)
    # The same client lost in the same round to a crash, before it could report or save anything
    # (the same config with faults.crash instead of faults.slow; shared with tests/test_e2e.py).
    crash = crash_round0_run
    assert slow["complete"] and slow["dropped"] == crash["dropped"] == [{"round": 0, "client": 1}]
    run_dir = Path(slow["run_dir"])
    assert claim_path(claims_dir(run_dir), 1, 0).read_text() == "late"
    # The straggler did finish its round-0 training later, and kept nothing of it: its store holds
    # only round 1's entry, so round 1 started from the global model as after the crash.
    assert sorted(p.name for p in (run_dir / "client_state" / "client_00001").glob("r*.pt")) == ["r1.pt"]
    a = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(crash["run_dir"]) / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert slow["final"]["auc"] == pytest.approx(crash["final"]["auc"], abs=1e-6)
