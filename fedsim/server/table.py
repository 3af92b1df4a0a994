"""Where a personalised rule (PPLR) keeps each client's adapter between rounds.

`MemoryTable`: a dict in the aggregator's RAM, checkpointed whole; right for tens of clients.
`DiskTable`: one directory per client in the run directory (a `ClientStore`, versioned by round),
so the aggregator holds only the round's sampled clients in RAM and a checkpoint records only the
round it covers: 10,000 SmolLM2 clients are 18 GB of adapters, which no aggregator should hold.

Both: `get(client)` (None before its first report), `put(round, {client: adapter})`, `clients()`,
`state_dict()` / `load_state_dict()` for the checkpoint, `prune(round)` once that checkpoint is written,
`delete(client)` / `reset()` to forget one client / all of them (unlearning).
"""
from __future__ import annotations

from pathlib import Path

import torch

from fedsim.core.store import ClientStore


class MemoryTable:
    def __init__(self):
        self.rows: dict[int, torch.Tensor] = {}

    def get(self, client: int) -> torch.Tensor | None:
        return self.rows.get(client)

    def put(self, round: int, rows: dict[int, torch.Tensor]) -> None:
        self.rows.update(rows)

    def clients(self) -> list[int]:
        return sorted(self.rows)

    def state_dict(self) -> dict:
        return {"theta": {c: t.clone() for c, t in self.rows.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.rows = {int(c): t.clone() for c, t in state["theta"].items()}

    def prune(self, through_round: int) -> None:
        pass

    def delete(self, client: int) -> None:
        self.rows.pop(client, None)

    def reset(self) -> None:
        self.rows = {}


class DiskTable:
    def __init__(self, root: Path):
        self.store = ClientStore(root)
        self.round = -1  # the last round put: get() reads each client's newest version up to it
        self.known: set[int] = set()
        self.written: list[int] = []  # the clients of the last put, whose older versions prune drops

    def get(self, client: int) -> torch.Tensor | None:
        if client not in self.known:
            return None
        # A resumed run's table may hold versions of the interrupted round: read up to self.round only.
        return self.store.load(client, self.round + 1)["theta"]

    def put(self, round: int, rows: dict[int, torch.Tensor]) -> None:
        for c, t in rows.items():
            self.store.save(c, round, {"theta": t.detach().float().contiguous()})
        self.known.update(rows)
        self.round, self.written = round, list(rows)

    def clients(self) -> list[int]:
        return sorted(self.known)

    def state_dict(self) -> dict:
        return {"round": self.round, "clients": sorted(self.known), "written": list(self.written)}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.known, self.written = state["round"], set(state["clients"]), list(state["written"])

    def prune(self, through_round: int) -> None:
        self.store.prune(self.written, through_round)

    def delete(self, client: int) -> None:
        self.store.delete(client)
        self.known.discard(client)
        self.written = [c for c in self.written if c != client]

    def reset(self) -> None:
        self.store.reset()
        self.known, self.written = set(), []
