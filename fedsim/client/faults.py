"""Injected faults and stragglers.

`faults.crash` (in fedsim.core.faults): a client's executor process dies at the start of its
training or evaluation in a chosen round, once. `faults.slow`: a client is a straggler in a chosen round.

`faults.round_timeout`: whether a client's round counts is decided by one file per (round, client),
created exclusively (O_EXCL) by whoever comes first: the executor when the client's local training
is done ("done"), or the driver when the client is not back in time ("late"). The loser abides:
an executor that finds "late" discards the update and saves nothing of the round (no optimizer
moments, no local factors), so a late update never reaches a later round; a driver that finds
"done" waits for that client's result, which is on its way.

The claims live in a directory of the driver's attempt at the run (a new one on every start or
resume), which each executor reads once, when it starts: an executor of a killed driver that Ray
has not ended yet never sees, nor makes, a claim of the run that resumed it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path



def start_attempt(run_dir: Path) -> Path:
    """A driver starting (or resuming) the run, before its executors: its own claims directory."""
    path = Path(run_dir) / "faults" / "attempt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}-{time.time_ns()}")
    return claims_dir(run_dir)


def claims_dir(run_dir: Path) -> Path:
    """The current attempt's claims directory (read once by each process that starts)."""
    path = Path(run_dir) / "faults" / "attempt"
    return Path(run_dir) / "faults" / "claims" / (path.read_text().strip() if path.exists() else "0")


def claim_path(claims: Path, client: int, round: int) -> Path:
    return Path(claims) / f"r{round}_c{client}"


def claim(claims: Path, client: int, round: int, who: str) -> bool:
    """Claim (round, client) for `who` ("done" or "late") in the attempt's `claims` directory;
    False when the other side has it."""
    path = claim_path(claims, client, round)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return path.read_text().strip() == who if path.stat().st_size else False
    with os.fdopen(fd, "w") as f:
        f.write(who)
    return True


def clear_claims(claims: Path, clients: list[int], round: int) -> None:
    """Before a round is dispatched: claims of an earlier dispatch of it (a shard retrained by an
    unlearning request) are void."""
    for c in clients:
        claim_path(claims, c, round).unlink(missing_ok=True)


def maybe_slow(cfg, claims: Path, client: int, round: int) -> None:
    """A straggler: start only after the driver has marked the client late (bounded, in case it never does)."""
    if not any(s["round"] == round and s["client"] == client for s in cfg.faults.slow):
        return
    deadline = time.monotonic() + 10 * cfg.faults.round_timeout + 60
    while not claim_path(claims, client, round).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
