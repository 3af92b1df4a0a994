"""Nothing of a local Ray instance outlives the `fedsim run` that started it: a driver killed with
SIGKILL leaves the raylet's agents running (they ignore SIGTERM), and the next `fedsim run` ends
them from the record the killed run left (pid and start time of each process, never a name); a
driver stopped with SIGTERM ends its whole instance itself and leaves no record."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedsim.core.local_ray import alive

ROOT = Path(__file__).resolve().parents[1]


def fedsim_run(tmp_path: Path, *overrides) -> subprocess.Popen:
    """`fedsim run configs/tiny.yaml` starting its own local Ray instance (no RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), FEDSIM_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(ROOT / "configs" / "tiny.yaml"),
           "--set", f"output_dir={tmp_path / 'runs'}", "--set", "tracking.enabled=false",
           "--set", "executors.num=1", *(a for o in overrides for a in ("--set", o))]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ray_record(tmp_path: Path, proc: subprocess.Popen, skip=(), timeout: float = 120) -> tuple[Path, dict]:
    """The run's record of its Ray instance, once written (right after `ray.init`: GCS, raylet and
    agents running; updated again once the actors are up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (tmp_path / "home" / "ray").glob("*.json"):
            data = json.loads(path.read_text())
            if path not in skip and data["updates"] >= 1:
                return path, data
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    raise TimeoutError("no Ray record with the executor's worker")


def test_a_sigkilled_run_leaves_ray_processes_that_the_next_run_ends(tmp_path):
    killed = fedsim_run(tmp_path, "train.rounds=50")
    path1, rec1 = ray_record(tmp_path, killed)
    killed.kill()
    killed.wait()
    # What this fixes: the raylet's agents outlive a SIGKILLed driver (GCS and raylet die with it).
    left = [p for p in rec1["processes"] if alive(p)]
    assert left, "the killed driver's Ray instance left nothing behind: this test no longer shows the fix"

    nxt = fedsim_run(tmp_path, "train.rounds=50")
    path2, rec2 = ray_record(tmp_path, nxt, skip={path1})
    # The leftovers are gone before the new instance starts, and their record with them.
    assert not [p for p in rec1["processes"] if alive(p)]
    assert not path1.exists()
    # SIGTERM: Ray's handler exits the driver, fedsim ends its instance on the way out.
    nxt.send_signal(signal.SIGTERM)
    out = nxt.communicate(timeout=60)[0]
    ended = re.search(rf"fedsim: ended (\d+) leftover process\(es\) of an earlier run's local Ray instance "
                      rf"{re.escape(rec1['session_dir'])} \(driver pid {killed.pid}, gone\)", out)
    assert ended and 1 <= int(ended[1]) <= len(left), out
    assert not [p for p in rec2["processes"] if alive(p)], out
    assert not path2.exists()


def test_leftovers_are_ended_only_for_a_dead_driver_and_only_the_recorded_processes(tmp_path, monkeypatch):
    """No Ray here: real processes stand in for a recorded instance. One ignores SIGTERM (as the
    agents do) and needs SIGKILL; a live driver's record and a reused pid are left alone."""
    import psutil

    from fedsim.core import local_ray

    monkeypatch.setenv("FEDSIM_HOME", str(tmp_path))
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        p.stdout.readline()  # its SIGTERM handler is in place
    ident = [local_ray._ident(psutil.Process(p.pid)) for p in procs]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_ident = local_ray._ident(psutil.Process(dead.pid))
    dead.wait()
    reused = {**ident[2], "started": ident[2]["started"] - 100}  # the pid now names another process
    records = tmp_path / "ray"
    local_ray._write(records / "killed.json", {"session_dir": "/tmp/ray/session_killed", "driver": dead_ident,
                                                "processes": [ident[0], reused], "updates": 1})
    local_ray._write(records / "running.json", {"session_dir": "/tmp/ray/session_running",
                                                 "driver": local_ray._ident(psutil.Process()),
                                                 "processes": [ident[1]], "updates": 1})
    lines, t0 = [], time.monotonic()
    assert local_ray.end_leftovers(lines.append) == []
    assert time.monotonic() - t0 >= 2.0  # it ignored SIGTERM: SIGKILLed after the grace period
    assert not local_ray.alive(ident[0])  # (reaped by end_leftovers, its parent being this process)
    assert procs[1].poll() is None and procs[2].poll() is None  # a live driver's; a reused pid
    assert lines == [f"fedsim: ended 1 leftover process(es) of an earlier run's local Ray instance "
                     f"/tmp/ray/session_killed (driver pid {dead.pid}, gone): {ident[0]['name']}"]
    assert sorted(p.name for p in records.iterdir()) == ["running.json"]
    for p in procs[1:]:
        p.kill()
        p.wait()
