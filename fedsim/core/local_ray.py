"""The local Ray instance fedsim starts for itself: recorded, ended on exit, and its leftovers ended
by the next run if the driver was killed.

Ray's own shutdown (at exit, after Ctrl+C, or after SIGTERM through the handler `ray.init`
installs) stops the whole instance. A driver killed with SIGKILL takes the GCS and the raylet with
it (they share its fate), but the raylet's agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`)
live on, reparented to init, and ignore SIGTERM. So fedsim records each process of the instance it
started (pid and start time, which together name one process for good: a reused pid has another
start time) in `FEDSIM_HOME/ray/<session>.json`, and the next local start ends whatever of a dead
driver's record is still running. Processes are never looked up by name.
"""
from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

import psutil
import ray

from fedsim.cache import fedsim_home

_record: Path | None = None  # this process's record, while its local instance runs


def records_dir() -> Path:
    return fedsim_home() / "ray"


def start(log=print, **init_kwargs) -> None:
    """End a killed run's leftovers, start a fresh local instance, record it, end it at exit."""
    global _record
    end_leftovers(log)
    began = time.time() - 1.0  # (start times have a resolution of 1/100 s)
    # "local": a fresh instance of our own, not whatever cluster happens to run on this machine.
    ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False, **init_kwargs)
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    _record = records_dir() / f"{Path(session_dir).name}.json"
    me = psutil.Process()
    _write(_record, {"session_dir": session_dir, "driver": _ident(me), "began": began, "processes": [], "updates": 0})
    record()
    # atexit runs last-registered first: this runs before Ray's own shutdown hook, and calls it.
    atexit.register(stop)


def record() -> None:
    """Add the instance's processes running now to the record: the driver's descendants started
    since `ray.init` began (GCS, raylet, agents, workers; not, say, a server a test started before).
    Called after start and again once the actors are up."""
    if _record is None or not _record.exists():
        return
    data = json.loads(_record.read_text())
    known = {(p["pid"], p["started"]) for p in data["processes"]}
    for p in psutil.Process().children(recursive=True):
        try:
            ident = _ident(p)
        except psutil.Error:  # gone already
            continue
        if ident["started"] >= data["began"] and (ident["pid"], ident["started"]) not in known:
            data["processes"].append(ident)
    data["updates"] += 1
    _write(_record, data)


def stop() -> None:
    """Shut down the instance this process started, end what outlives the shutdown, drop the record."""
    global _record
    if _record is None:
        return
    ray.shutdown()
    if _record.exists():
        left = _end(json.loads(_record.read_text())["processes"])
        if not left:
            _record.unlink(missing_ok=True)
    _record = None


def end_leftovers(log=print) -> list[dict]:
    """End the processes of every recorded instance whose driver is gone; one line per instance
    that had any. Returns the processes that could not be ended (their record is kept)."""
    stuck = []
    for path in sorted(records_dir().glob("*.json")) if records_dir().is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written by a run starting right now
        if alive(data["driver"]):
            continue  # a run still going: its instance is in use
        running = [p for p in data["processes"] if alive(p)]
        left = _end(running)
        where = f"{data['session_dir']} (driver pid {data['driver']['pid']}, gone)"
        if running and not left:
            names = ", ".join(sorted({p["name"] for p in running}))
            log(f"fedsim: ended {len(running)} leftover process(es) of an earlier run's local Ray instance "
                f"{where}: {names}")
        if left:
            pids = " ".join(str(p["pid"]) for p in left)
            log(f"fedsim: could not end {len(left)} leftover process(es) of the local Ray instance {where}: "
                + ", ".join(f"pid {p['pid']} {p['name']}" for p in left) + f"; end them with: kill -9 {pids}")
            stuck += left
        else:
            path.unlink(missing_ok=True)
    return stuck


def _end(procs: list[dict], grace: float = 2.0) -> list[dict]:
    """SIGTERM the recorded processes still running, SIGKILL those alive after `grace` seconds;
    returns those still alive after that."""
    live = {}
    for p in procs:
        proc = _process(p)
        if proc is not None and proc.pid != os.getpid():
            live[proc] = p
            # what a recorded process started since (a worker, an agent's helper) goes with it
            for child in _children(proc):
                try:
                    live.setdefault(child, _ident(child))
                except psutil.Error:  # gone already
                    pass
    for sig in ("terminate", "kill"):
        for proc in live:
            try:
                getattr(proc, sig)()
            except psutil.NoSuchProcess:
                pass
            except psutil.AccessDenied:
                continue
        _, alive = psutil.wait_procs(list(live), timeout=grace)
        live = {proc: live[proc] for proc in alive if _process(live[proc]) is not None}
        if not live:
            break
    return list(live.values())


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _ident(p: psutil.Process) -> dict:
    return {"pid": p.pid, "started": p.create_time(), "name": p.name()}


def _process(ident: dict) -> psutil.Process | None:
    """The recorded process if it is still running: the same pid *and* start time (not a reused pid);
    a zombie (dead, not yet reaped by its new parent) does not count."""
    try:
        p = psutil.Process(ident["pid"])
        if abs(p.create_time() - ident["started"]) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def alive(ident: dict) -> bool:
    """Whether the recorded process (`{"pid", "started", "name"}`) still runs."""
    return _process(ident) is not None


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
