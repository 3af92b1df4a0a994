"""The client side's two interfaces, chosen once when an executor starts (`fedsim.client.trainers`):

- an `Adapter` says which of the model's parameters a client trains, uploads ("shared") and keeps
  ("local", private to the client), as a `fedsim.models.layout.Layout`; how what the server sends
  is loaded and the client's own part stored; the forward; what a user takes away (export).
- a `Trainer` says how a batch is formed and how one local step is taken, for one client or for
  several at once; `local_loop` is the one step loop every trainer runs in.

The executor (`fedsim.client.executor`) hosts the base model and dispatches to both; it has no
branch on a mode.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from fedsim.core.capabilities import Capable
from fedsim.models.fused import FusedLoRA, StackedGroup
from fedsim.models.layout import Layout
from fedsim.models.lora import export_state, get_flat, set_flat
from fedsim.models.scoring import yes_no_logits


@dataclass
class LocalRun:
    """One client's local training in progress: what every trainer shares."""
    client: int
    round: int
    lr: float
    setup_seconds: float  # in the executor's begin_local: rows, adapter, optimizer state
    rows: pd.DataFrame
    params: torch.Tensor  # what the server sent; the delta is measured from it
    opt: torch.optim.AdamW
    saved: dict | None  # the client's store entry from its previous round
    rng: np.random.Generator  # its batch order
    steps: int
    state: dict  # what privacy accountants and client hooks keep per client across rounds
    used: set = field(default_factory=set)  # rows trained on: the members a privacy audit attacks
    tokens: torch.Tensor | int = 0  # non-padding tokens trained on
    seen: int = 0  # rows trained on, with repeats
    extra: dict = field(default_factory=dict)  # a trainer's own per-client state (e.g. its batch stream)


# ---------------------------------------------------------------------------------------------
# Adapters


class Adapter(Capable):
    """Which parameters are shared / local / frozen, and how they move in and out of the model."""
    name = "base"
    roles: dict[str, str] = {"A": "shared", "B": "shared"}
    restores_optimizer = True  # a client's saved AdamW moments come back with it

    def __init__(self, host, **_):
        """`host`: the executor (its model, config, tokenizer, answer ids, client store)."""
        self.host, self.model = host, host.model
        self.layout = self.build_layout()
        self.shared = self.layout.params("shared")  # what is received and uploaded
        self.local = self.layout.params("local")  # trained, never uploaded
        self.params = self.trainable()  # what the optimizer trains, in flat-vector order
        self.initial = get_flat(self.params)  # the shared-seed init every executor starts from
        self.initial_local = get_flat(self.local) if self.local else None

    def build_layout(self) -> Layout:
        return Layout.of(self.model, self.roles)

    def trainable(self) -> list[torch.nn.Parameter]:
        return self.layout.trainable

    def initial_params(self):
        return get_flat(self.shared)

    def load(self, params, saved: dict | None) -> torch.Tensor:
        """Put what the server sent (and the client's own local part from its store entry `saved`)
        into the model; returns the shared vector the upload is measured from."""
        set_flat(self.shared, params)
        if self.local:
            set_flat(self.local, saved["local"] if saved and "local" in saved else self.initial_local)
        return params

    def needs_saved(self) -> bool:
        """Whether evaluating a client needs its store entry (its local part)."""
        return bool(self.local)

    def keep(self, saved: dict) -> None:
        """Add the client's own part to its store entry."""
        if self.local:
            saved["local"] = get_flat(self.local)

    def fuse(self, num_clients: int) -> StackedGroup:
        """`num_clients` slots of what the clients train, stacked for fused training (`executors.fused`)."""
        return FusedLoRA(self.model, num_clients, self.params, self.layout)

    def route(self, rows: pd.DataFrame) -> None:
        """Before the rows' batch runs through `forward` (RecLoRA: each row's mix of the bank, from its user)."""

    def forward(self, batch: dict) -> torch.Tensor:
        """(B, 2) Yes/No logits of a batch."""
        return yes_no_logits(self.model, batch, self.host.yes_id, self.host.no_id)

    def begin(self) -> None:
        """Before a client's local run (counters to reset)."""

    def metrics(self) -> dict:
        """A client's adapter-side metrics after its local run."""
        return {}

    def begin_eval(self) -> None:
        """Before a client's evaluation (counters to reset)."""

    def eval_metrics(self) -> dict:
        """A client's adapter-side metrics from its evaluation (RecLoRA: the routing's entropy)."""
        return {}

    def eval_scores(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        """Other models' p(like) of a client's evaluated rows, reported beside the run's own as the
        per-row baseline `baseline/<name>` (RecLoRA: the client's own CRM alone)."""
        return {}

    def describe(self) -> dict:
        """Sizes to log as MLflow params."""
        return {}

    def export(self, params) -> tuple[dict, dict]:
        """peft-format adapter a user takes away."""
        set_flat(self.shared, params)
        return export_state(self.model, get_flat(self.params))


# ---------------------------------------------------------------------------------------------
# Trainers


class Trainer(Capable):
    """How a batch is formed and one local step taken, for the clients of `local_loop`."""
    name = "base"

    def __init__(self, host):
        self.host = host

    def open(self, clients: list[int], round: int, params: list, lrs: list[float]) -> list[LocalRun]:
        """Each client's run set up (its adapter, optimizer, rows, seeded batch order)."""
        return [self.host.begin_local(c, round, p, lr) for c, p, lr in zip(clients, params, lrs)]

    def set_lr(self, run: LocalRun, slot: int, step: int) -> None:
        for group in run.opt.param_groups:  # Opacus' DPOptimizer shares these param_groups
            group["lr"] = self.host.step_lr(run, step)

    def running(self):
        """A context the loop runs in (fused: the stacked layers installed in the model)."""
        return contextlib.nullcontext()

    def next_batch(self, run: LocalRun) -> np.ndarray:
        raise NotImplementedError

    def step(self, runs: list[LocalRun], batches: dict[int, np.ndarray]) -> dict:
        """One local step of the clients in `batches` (slot -> row indices); slot -> loss (None: no loss)."""
        raise NotImplementedError

    def close(self, run: LocalRun, slot: int) -> tuple[float, dict]:
        """After the loop, before the client's upload: (aggregation weight, metrics)."""
        return float(run.seen), {}


def local_loop(trainer: Trainer, runs: list[LocalRun]) -> list[list[float]]:
    """The local steps, whatever the trainer: per step, each client still training gets its learning
    rate and its batch, then the trainer takes the step. Returns each client's batch losses."""
    losses = [[] for _ in runs]
    for step in range(max(run.steps for run in runs)):
        batches = {}
        for slot, run in enumerate(runs):
            if step < run.steps:  # local_epochs: clients with fewer rows finish earlier
                trainer.set_lr(run, slot, step)
                batches[slot] = trainer.next_batch(run)
                run.seen += len(batches[slot])
        for slot, loss in trainer.step(runs, batches).items():
            if loss is not None:
                losses[slot].append(loss)
    # Losses may be device scalars (a fused step keeps them there): read them back once, at the end.
    return [torch.stack(ls).tolist() if ls and torch.is_tensor(ls[0]) else list(ls) for ls in losses]


def batch_stream(rng: np.random.Generator, num_rows: int, batch_size: int):
    """Each local step's row indices: passes over fresh permutations of the client's rows; a pass
    that cannot fill a batch starts a new one (a client with fewer rows than a batch uses them all)."""
    order, pos = rng.permutation(num_rows), 0
    while True:
        if pos + batch_size > len(order) and pos > 0:
            order, pos = rng.permutation(num_rows), 0
        idx = order[pos:pos + batch_size]
        pos += len(idx)
        yield idx
