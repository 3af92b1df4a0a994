"""Injected faults (`faults.crash`): a client's executor process dies at the start of a chosen
round, once, as a lost machine would look."""
from __future__ import annotations

import os
from pathlib import Path


def maybe_crash(cfg, run_dir: Path, client: int, round: int) -> None:
    for crash in cfg.faults.crash:
        if crash["round"] == round and crash["client"] == client:
            marker = Path(run_dir) / "faults" / f"crash_r{round}_c{client}"
            if not marker.exists():  # once: the restarted actor must get through
                marker.parent.mkdir(exist_ok=True)
                marker.touch()
                os._exit(1)  # a real process death
