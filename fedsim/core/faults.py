"""`faults.crash`: an actor's process dies at a chosen moment, once per run, as a lost machine would
look. Here, below the client and the server, because executors and the aggregator both inject it.

An entry is {round, client[, phase: train | eval]} (the executor serving `client` dies when it
starts that client's local training or evaluation) or {round, actor: NAME}: the aggregator dies
when it starts folding in the round's updates, the split server (`storage.mode: split`) at the
round's first training forward, the CKKS key holder (`privacy.he`) when asked to decrypt the
round's sum.
"""
from __future__ import annotations

import os
from pathlib import Path

ACTORS = ("aggregator", "split_server", "key_holder")
PHASES = ("train", "eval")


def maybe_crash(crashes: list[dict], run_dir, round: int, client: int | None = None, phase: str = "train",
                actor: str | None = None) -> None:
    for c in crashes:
        if (c["round"], c.get("client"), c.get("phase", "train"), c.get("actor")) != (round, client, phase, actor):
            continue
        who = actor or (f"c{client}" if phase == "train" else f"c{client}_{phase}")
        marker = Path(run_dir) / "faults" / f"crash_r{round}_{who}"
        if not marker.exists():  # once: the restarted actor (or a resumed run) must get through
            marker.parent.mkdir(exist_ok=True)
            marker.touch()
            os._exit(1)  # a real process death
