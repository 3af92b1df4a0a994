"""The client executor: a Ray actor that holds one frozen base model and trains LoRA for clients.

One actor per client (cross-silo) and a pool of actors serving many virtual clients
(cross-device) are the same code: the executor swaps in a client's adapter and optimizer state,
trains on that client's own Parquet shard, and writes the state back to the client's store.

A client's state lives on disk (`<run>/client_state/`), not in the actor, so that an actor that
dies and is restarted, or a resumed run, finds every client where it left off.

The executor only hosts the model and dispatches. *How* a client trains is chosen once, here in
the constructor, from `fedsim.client.trainers`: an adapter (`strategy.lora_mode` separate / ffa /
fedsa / stack, or `storage.mode` split: which parameters are shared, local or frozen, how they are
loaded, kept and exported, the forward) and a trainer (plain or `privacy.sample_dp`: how a batch
is formed and a step taken; `train_many` runs the fused trainer). Every trainer runs in the same
step loop (`fedsim.client.trainers.base.local_loop`).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedsim.client.compiled import compile_decoder
from fedsim.client.faults import claim, claims_dir, maybe_slow
from fedsim.client.schedule import client_lr
from fedsim.client.seeds import AUDIT_STREAM, HOLDOUT_STREAM, INTERIM_EVAL_STREAM, client_seed
from fedsim.client.trainers import Fused, LocalRun, adapter_class, local_loop, trainer_class
from fedsim.core.faults import maybe_crash
from fedsim.core.store import ClientStore, flat_to_opt_state, opt_state_to_flat
from fedsim.data.prompt import prompt_template, render_prompts
from fedsim.models.loader import load_base, quiet_transformers
from fedsim.models.lora import attach_lora, get_flat
from fedsim.models.scoring import answer_token_ids, encode, p_yes, preference_loss
from fedsim.postprocessors import ClientContext, build_postprocessors, run_client_hooks
from fedsim.schema import config_from_dict




def shard_path(run_dir: Path, client: int) -> Path:
    return Path(run_dir) / "shards" / f"client_{client:04d}.parquet"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory this process allocated on `device`; on a CPU, its peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class ClientExecutor:
    def __init__(self, config: dict, run_dir: str, model_path: str, executor_id: int, num_threads: int = 1,
                 split_server=None, key_holder=None):
        torch.set_num_threads(max(1, num_threads))
        quiet_transformers()
        self.cfg = config_from_dict(config)
        self.run_dir = Path(run_dir)
        self.claims = claims_dir(self.run_dir)  # its driver's attempt's (fedsim.client.faults)
        self.executor_id = executor_id
        base, self.tokenizer = load_base(model_path, self.cfg.model.dtype)
        self.device = next(base.parameters()).device
        self.model = attach_lora(base, self.cfg.model.lora, self.cfg.train.seed)
        self.yes_id, self.no_id = answer_token_ids(self.tokenizer)
        self.template = prompt_template(self.cfg)
        self.store = ClientStore(self.run_dir / "client_state")
        # The client-side mode, chosen once: what is shared / local (adapter), how steps are taken (trainer).
        self.adapter = adapter_class(self.cfg)(self, split_server=split_server)
        self.postprocessors = build_postprocessors(self.cfg, self.adapter.layout.flat_parts("shared"), key_holder)
        if self.cfg.executors.compile:  # a setting, not a mode (fedsim.client.compiled)
            compile_decoder(self.model)
        self.trainer = trainer_class(self.cfg)(self)

    # What tests and tools read off an executor: the adapter's parameter groups (shared: received
    # and uploaded; local: trained, never uploaded; params: what the optimizer trains) and state
    # (stack: modules, merged_version).
    shared = property(lambda self: self.adapter.shared)
    local = property(lambda self: self.adapter.local)
    params = property(lambda self: self.adapter.params)

    def __getattr__(self, name):
        if name.startswith("__") or "adapter" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["adapter"], name)

    def ready(self) -> dict:
        return {"executor": self.executor_id, "pid": os.getpid(), "device": str(self.device),
                "lora_params": sum(p.numel() for p in self.shared), "split": self.adapter.describe()}

    def initial_params(self) -> torch.Tensor | dict:
        return self.adapter.initial_params()

    def _rows(self, client: int, split: str) -> pd.DataFrame:
        df = pd.read_parquet(shard_path(self.run_dir, client))
        return df[df["split"] == split].reset_index(drop=True)

    def _train_rows(self, client: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(the train rows the client trains on, the rows privacy.audit.holdout keeps out as non-members).
        The held-out rows are a seeded pure function of (seed, client), the same every round."""
        rows = self._rows(client, "train")
        n = int(round(self.cfg.privacy.audit.holdout * len(rows)))
        if n == 0 or n == len(rows):
            return rows, rows.iloc[:0]
        held = np.zeros(len(rows), dtype=bool)
        held[np.random.default_rng(client_seed(self.cfg.train.seed, client, HOLDOUT_STREAM)).choice(len(rows), n, replace=False)] = True
        return rows[~held].reset_index(drop=True), rows[held].reset_index(drop=True)

    def _batch(self, rows: pd.DataFrame) -> dict:
        self.adapter.route(rows)  # the rows' batch is the next forward
        return encode(self.tokenizer, render_prompts(rows, self.template), self.cfg.model.max_length, self.device)

    def begin_local(self, client: int, round: int, params, lr: float) -> LocalRun:
        """Everything before a client's first local step: its rows, the received adapter (and its own
        local part) in the model, its AdamW with its saved moments, its seeded batch order."""
        maybe_crash(self.cfg.faults.crash, self.run_dir, round, client)
        maybe_slow(self.cfg, self.claims, client, round)
        t0 = time.perf_counter()
        t = self.cfg.train
        rows, _ = self._train_rows(client)
        if len(rows) == 0:
            raise ValueError(f"client {client} has no train rows in {shard_path(self.run_dir, client)}")
        saved = self.store.load(client, round)
        params = self.adapter.load(params, saved)
        self.adapter.begin()
        opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=t.weight_decay)
        if saved is not None and self.adapter.restores_optimizer:
            # Only the moments come back: lr (which the aggregator may change per client) stays as built.
            flat_to_opt_state(opt, saved["opt"])
        seed = client_seed(t.seed, client, round)
        torch.manual_seed(seed)
        steps = t.local_steps or max(1, math.ceil(t.local_epochs * len(rows) / t.batch_size))
        return LocalRun(client, round, lr, time.perf_counter() - t0, rows, params, opt, saved, np.random.default_rng(seed), steps,
                        (saved or {}).get("privacy", {}))

    def step_lr(self, run: LocalRun, step: int) -> float:
        return client_lr(self.cfg.train, run.lr, run.round, step, run.steps)

    def take(self, run: LocalRun, idx) -> pd.DataFrame:
        run.used.update(int(i) for i in idx)
        return run.rows.iloc[idx]

    def logits(self, rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Yes/No logits, labels, non-padding tokens) of each row."""
        batch = self._batch(rows)
        logits = self.adapter.forward(batch)
        labels = torch.tensor(rows["label"].to_numpy(), device=logits.device)
        return logits, labels, batch["attention_mask"].sum(1)

    _logits = logits  # the name tests have always used

    def _sync(self) -> None:
        if self.device.type == "cuda":  # so that a timing covers the queued GPU work
            torch.cuda.synchronize(self.device)

    def _end_local(self, run: LocalRun, losses: list[float], weight: float, metrics: dict, sampled: list[int],
                   step_seconds: float) -> tuple[dict, torch.Tensor]:
        """Everything after a client's last local step (its trained adapter is in the model): the
        delta through the client-side postprocessors, the client's store entry, the metadata."""
        t_end = time.perf_counter()
        delta = get_flat(self.shared) - run.params.float()
        ctx = ClientContext(run.client, run.round, run.seen, len(sampled), self.cfg.clients.num, run.state, list(sampled))
        delta, weight, post_metrics = run_client_hooks(self.postprocessors, delta, weight, ctx)
        members = np.union1d((run.saved or {}).get("members", np.zeros(0, dtype=np.int64)), sorted(run.used))
        saved = {"opt": opt_state_to_flat(run.opt), "privacy": run.state, "members": members.astype(np.int64)}
        self.adapter.keep(saved)
        # Past faults.round_timeout the driver has dropped this client from the round: nothing of
        # the round is kept, so its late update never reaches a later one.
        late = self.cfg.faults.round_timeout is not None and not claim(self.claims, run.client, run.round, "done")
        if not late:
            self.store.save(run.client, run.round, saved)
        meta = {"client": run.client, "executor": self.executor_id, "num_samples": run.seen, "weight": weight,
                "steps": run.steps, "lr": run.lr, "loss": float(np.mean(losses)) if losses else float("nan"),
                # This client's own time (fused: its share of the loop, not the whole group's).
                "seconds": run.setup_seconds + step_seconds + time.perf_counter() - t_end,
                "metrics": {**metrics, **post_metrics, **self.adapter.metrics()},
                # for throughput and overhead figures (fedsim bench): time in the local-training loop,
                # tokens trained on, this process's peak memory
                "step_seconds": step_seconds, "tokens": int(run.tokens), "peak_bytes": peak_memory_bytes(self.device),
                "late": late}
        return meta, delta

    def _train(self, trainer, clients: list[int], round: int, params: list, lrs: list[float],
               sampled: list[int]) -> list:
        """Local training of `clients` with `trainer`: [meta_0, delta_0, meta_1, delta_1, ...]."""
        runs = trainer.open(clients, round, params, lrs)
        t_loop = time.perf_counter()
        self.model.train()
        with trainer.running():
            losses = local_loop(trainer, runs)
        self.model.eval()
        self._sync()
        share = (time.perf_counter() - t_loop) / len(runs)  # each client's share of the loop
        out = []
        for slot, run in enumerate(runs):
            weight, metrics = trainer.close(run, slot)
            out += self._end_local(run, losses[slot], weight, metrics, sampled, share)
        return out

    def train(self, client: int, round: int, params: torch.Tensor, lr: float, sampled: list[int]) -> tuple[dict, torch.Tensor]:
        """Local training from `params`; returns (metadata, delta = trained - received), the delta
        already through the client-side postprocessors."""
        meta, delta = self._train(self.trainer, [client], round, [params], [lr], sampled)
        return meta, delta

    def train_many(self, clients: list[int], round: int, lrs: list[float], sampled: list[int], *params) -> list:
        """Fused local training of several clients (`executors.fused`, `fedsim.client.trainers.fused`).
        Gives each client the (meta, delta) `train` would, flat as [meta_0, delta_0, meta_1, delta_1,
        ...] so that Ray hands each out as its own object (`num_returns=2 * len(clients)`). `params`
        are the received adapters, one per client, as separate arguments so Ray resolves their refs."""
        if not (len(clients) == len(lrs) == len(params)):
            raise ValueError(f"train_many: {len(clients)} clients, {len(lrs)} lrs, {len(params)} adapters")
        return self._train(Fused(self), clients, round, list(params), lrs, sampled)

    @torch.no_grad()
    def evaluate(self, client: int, params: torch.Tensor, split: str, max_rows: int | None = None,
                 round: int | None = None) -> dict:
        """p(Yes) for the client's rows of `split`; `max_rows`: a fixed seeded subset of them
        (the same rows at every call, so interim evaluations are comparable with each other).
        `round`: the driver's round, for an injected crash (faults.crash with phase: eval)."""
        maybe_crash(self.cfg.faults.crash, self.run_dir, round, client, phase="eval")
        self.adapter.load(params, self.store.latest(client) if self.adapter.needs_saved() else None)
        rows = self._rows(client, split)
        if max_rows is not None and len(rows) > max_rows:
            pick = np.random.default_rng(client_seed(self.cfg.train.seed, client, INTERIM_EVAL_STREAM)).choice(len(rows), max_rows, replace=False)
            rows = rows.iloc[np.sort(pick)].reset_index(drop=True)
        self.adapter.begin_eval()
        # Rows of similar length are batched together (less padding to compute; a row's score does
        # not depend on its batch, fedsim.models.scoring), then put back in order.
        size = rows["title"].str.len() + rows["liked"].map(lambda t: sum(map(len, t))) + rows["disliked"].map(lambda t: sum(map(len, t)))
        order = np.argsort(size.to_numpy(), kind="stable")
        probs = np.zeros(len(rows))
        bs = self.cfg.eval.batch_size
        for i in range(0, len(rows), bs):
            part = order[i:i + bs]
            probs[part] = p_yes(self.adapter.forward(self._batch(rows.iloc[part]))).cpu().numpy()
        # The row key (user, item, timestamp) lets the driver save per-row predictions that other
        # runs and the baselines can be paired with.
        return {"client": client, "labels": rows["label"].to_numpy(), "probs": probs,
                **{k: rows[k].to_numpy() for k in ("user", "item", "timestamp")},
                "metrics": self.adapter.eval_metrics(), "scores": self.adapter.eval_scores(rows)}

    @torch.no_grad()
    def membership(self, client: int, params, max_rows: int) -> dict:
        """Per-row losses of the final model on rows the client trained on (members) and on held-out
        rows of the same users (non-members), for a loss-threshold membership-inference attack, with
        the rows' keys (`member_rows`, `nonmember_rows`: user, item, timestamp).

        Non-members are the client's train-split rows it never trained on, from the members' users:
        the same users and the same time span as the members, so a model that learned nothing scores
        0.5. They are the rows privacy.audit.holdout kept out of training when it is set, else the
        rows the client happened not to reach. (Valid / test rows come later in time and differ in
        distribution; they are used only when a client trained on every train row it has.)"""
        saved = self.store.latest(client) or {}
        self.adapter.load(params, saved)
        train, holdout = self._train_rows(client)
        used = saved.get("members", np.zeros(0, dtype=np.int64))
        members = train.iloc[used]
        unused = train.drop(index=train.index[used])
        held = holdout if len(holdout) else unused if len(unused) else pd.concat([self._rows(client, "valid"), self._rows(client, "test")])
        same_users = held[held["user"].isin(members["user"])]
        held = same_users if len(same_users) else held
        rng = np.random.default_rng(client_seed(self.cfg.train.seed, client, AUDIT_STREAM))
        out = {"client": client}
        for name, df in (("member", members), ("nonmember", held)):
            if len(df) > max_rows:
                df = df.iloc[np.sort(rng.choice(len(df), size=max_rows, replace=False))]
            losses = []
            for i in range(0, len(df), self.cfg.eval.batch_size):
                part = df.iloc[i:i + self.cfg.eval.batch_size]
                logits = self.adapter.forward(self._batch(part))
                labels = torch.tensor(part["label"].to_numpy(), device=logits.device)
                losses.append(preference_loss(logits, labels, reduction="none").cpu().numpy())
            out[name] = np.concatenate(losses) if losses else np.zeros(0)
            # which rows: audit.parquet keys them, so two runs' attacks compare row by row (paired)
            out[f"{name}_rows"] = {k: df[k].to_numpy() for k in ("user", "item", "timestamp")}
        return out

    def export(self, params) -> tuple[dict, dict]:
        """The adapter a user takes away: peft format for separate / ffa (A is the shared init) /
        fedsa (B: the uniform mean of the B of every client that trained); for stack the
        accumulated dense update per target module (see each adapter's `export`)."""
        return self.adapter.export(params)
