"""The client executor: a Ray actor that holds one frozen base model and trains LoRA for clients.

One actor per client (cross-silo) and a pool of actors serving many virtual clients
(cross-device) are the same code: the executor swaps in a client's adapter and optimizer state,
trains on that client's own Parquet shard, and writes the state back to the client's store.

A client's state lives on disk (`<run>/client_state/`), not in the actor, so that an actor that
dies and is restarted, or a resumed run, finds every client where it left off.

`strategy.lora_mode` decides what the received/uploaded vector covers (`fedsim.models.lora`):
`separate` and `stack` all A and B blocks, `ffa` only B (A is frozen at the shared-seed init, the
same in every executor), `fedsa` only A. In `fedsa` the client's own B is kept in its store entry
(`"local"`; a client's first round starts from the init, B = 0) and used to train and evaluate that
client. In `stack` (`fedsim.server.flora`) the received object is the server's accumulated dense
update of the target modules' base weights, merged into this executor's frozen base once per
version; the client then trains a fresh LoRA from the shared init and uploads it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedsim.client.schedule import client_lr
from fedsim.client.state import ClientStore, flat_to_opt_state, opt_state_to_flat
from fedsim.config import config_from_dict
from fedsim.data.prompt import prompt_template, render_prompt
from fedsim.models.fused import FusedLoRA, StackedAdamW, chunks
from fedsim.models.loader import load_base, quiet_transformers
from fedsim.models.lora import (attach_lora, export_state, freeze_lora_A, get_flat, local_params, lora_modules,
                                set_flat, shared_params, split_dense, trainable)
from fedsim.models.scoring import answer_token_ids, encode, p_yes, preference_loss, yes_no_logits
from fedsim.postprocessors import ClientContext, build_postprocessors, run_client_hooks


LATEST = 2**62  # `before_round` that finds a client's newest saved state


def shard_path(run_dir: Path, client: int) -> Path:
    return Path(run_dir) / "shards" / f"client_{client:04d}.parquet"


def client_seed(seed: int, client: int, round: int) -> int:
    # Batches and dropout depend only on (seed, client, round): not on which actor runs the
    # client, nor on whether the run was resumed.
    return (seed * 1_000_003 + client * 10_007 + round) % (2**31)


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


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory this process allocated on `device`; on a CPU, its peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class LocalRun:
    """One client's local training in progress: what `train` and `train_many` share."""
    client: int
    round: int
    lr: float
    setup_seconds: float  # in _begin_local: rows, adapter, optimizer state
    rows: pd.DataFrame
    params: torch.Tensor  # what the server sent; the delta is measured from it
    opt: torch.optim.AdamW
    saved: dict | None  # the client's store entry from its previous round
    rng: np.random.Generator  # its batch order
    steps: int
    state: dict  # what privacy accountants and client hooks keep per client across rounds
    used: set = field(default_factory=set)  # rows trained on: the members a privacy audit attacks
    tokens: torch.Tensor | int = 0  # non-padding tokens trained on


class ClientExecutor:
    def __init__(self, config: dict, run_dir: str, model_path: str, executor_id: int, num_threads: int = 1,
                 split_server=None, key_holder=None):
        torch.set_num_threads(max(1, num_threads))
        quiet_transformers()
        self.cfg = config_from_dict(config)
        self.run_dir = Path(run_dir)
        self.executor_id = executor_id
        base, self.tokenizer = load_base(model_path, self.cfg.model.dtype)
        self.device = next(base.parameters()).device
        self.model = attach_lora(base, self.cfg.model.lora, self.cfg.train.seed)
        self.mode = self.cfg.strategy.lora_mode
        if self.mode == "ffa":
            freeze_lora_A(self.model)
        self.split = None
        if self.cfg.storage.mode == "split":  # PPLR flexible storage: the middle layers run on `split_server`
            from fedsim.models.split import SplitClient

            self.split = SplitClient(self.model, self.cfg, split_server, executor_id)
            shared, local = self.split.shared, self.split.local  # middle-layer LoRA shared, client-side private
            self.params = [p for _, p in shared] + [p for _, p in local]
        else:
            shared, local = shared_params(self.model, self.mode), local_params(self.model, self.mode)
            self.params = trainable(self.model)  # what the optimizer trains
        self.shared = [p for _, p in shared]  # what is received and uploaded
        self.local = [p for _, p in local]  # trained, never uploaded (fedsa: B; split: client-side layers)
        self.initial = get_flat(self.params)  # the shared-seed init every executor starts from
        self.initial_local = get_flat(self.local) if self.local else None
        if self.mode == "stack":
            self.modules = lora_modules(self.model)
            self.base_layers = [self.model.get_submodule(m.name).base_layer for m in self.modules]
            self.base0 = [layer.weight.detach().clone() for layer in self.base_layers]
            self.merged_version = 0
        self.yes_id, self.no_id = answer_token_ids(self.tokenizer)
        self.template = prompt_template(self.cfg)
        self.store = ClientStore(self.run_dir / "client_state")
        self.postprocessors = build_postprocessors(self.cfg, [(n, p.numel()) for n, p in shared], key_holder)
        if self.cfg.executors.compile:
            # The decoder is what training and scoring run; graphs are kept per set-up (peft layers
            # to evaluate, fused layers to train) with dynamic batch and sequence sizes.
            self.model.get_base_model().base_model.compile(dynamic=True)
        self.sample_dp = None
        if self.cfg.privacy.sample_dp.enabled:
            from fedsim.privacy.dp_sgd import SampleDP

            self.sample_dp = SampleDP(self.model, self.cfg)

    def ready(self) -> dict:
        return {"executor": self.executor_id, "pid": os.getpid(), "device": str(self.device),
                "lora_params": sum(p.numel() for p in self.shared),
                "split": self.split.describe() if self.split is not None else {}}

    def initial_params(self) -> torch.Tensor | dict:
        if self.mode == "stack":  # the server needs the factors' geometry to stack them
            return {"init": self.initial.clone(), "modules": self.modules}
        return get_flat(self.shared)

    @torch.no_grad()
    def merge(self, payload: dict) -> None:
        """stack: base weight = W0 + the server's accumulated dense update, once per version."""
        if payload["version"] == self.merged_version:
            return
        for layer, w0, d in zip(self.base_layers, self.base0, split_dense(payload["delta_w"], self.modules)):
            layer.weight.copy_((w0.float() + d.to(w0.device)).to(w0.dtype))
        self.merged_version = payload["version"]

    def _load_params(self, params, saved: dict | None) -> torch.Tensor:
        """Put what the server sent (and the client's own local part from its store entry `saved`:
        fedsa's B, split's client-side layers) into the model; returns the shared vector the upload
        is measured from."""
        if self.mode == "stack":
            self.merge(params)
            params = self.initial  # a fresh LoRA on top of the merged base
        set_flat(self.shared, params)
        if self.local:
            set_flat(self.local, saved["local"] if saved and "local" in saved else self.initial_local)
        return params

    def _rows(self, client: int, split: str) -> pd.DataFrame:
        df = pd.read_parquet(shard_path(self.run_dir, client))
        return df[df["split"] == split].reset_index(drop=True)

    def _batch(self, rows: pd.DataFrame) -> dict:
        prompts = [render_prompt(a, b, t, self.template) for a, b, t in zip(rows["liked"], rows["disliked"], rows["title"])]
        return encode(self.tokenizer, prompts, self.cfg.model.max_length, self.device)

    def _maybe_crash(self, client: int, round: int) -> None:
        for crash in self.cfg.faults.crash:
            if crash["round"] == round and crash["client"] == client:
                marker = self.run_dir / "faults" / f"crash_r{round}_c{client}"
                if not marker.exists():
                    marker.parent.mkdir(exist_ok=True)
                    marker.touch()
                    os._exit(1)  # a real process death, as a lost machine would look

    def _begin_local(self, client: int, round: int, params, lr: float) -> LocalRun:
        """Everything before a client's first local step: its rows, the received adapter (and its own
        local part) in the model, its AdamW with its saved moments, its seeded batch order."""
        self._maybe_crash(client, round)
        t0 = time.perf_counter()
        t = self.cfg.train
        rows = self._rows(client, "train")
        if len(rows) == 0:
            raise ValueError(f"client {client} has no train rows in {shard_path(self.run_dir, client)}")
        saved = self.store.load(client, round)
        params = self._load_params(params, saved)
        if self.split is not None:
            self.split.reset()  # this client's activation traffic and FLOPs, reported in _end_local
        opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=t.weight_decay)
        if saved is not None and self.mode != "stack":  # stack: a fresh LoRA, a fresh optimizer
            # Only the moments come back: lr (which the aggregator may change per client) stays as built.
            flat_to_opt_state(opt, saved["opt"])
        seed = client_seed(t.seed, client, round)
        torch.manual_seed(seed)
        steps = t.local_steps or max(1, math.ceil(t.local_epochs * len(rows) / t.batch_size))
        return LocalRun(client, round, lr, time.perf_counter() - t0, rows, params, opt, saved, np.random.default_rng(seed), steps,
                        (saved or {}).get("privacy", {}))

    def _step_lr(self, run: LocalRun, step: int) -> float:
        return client_lr(self.cfg.train, run.lr, run.round, step, run.steps)

    def _set_lr(self, run: LocalRun, step: int) -> None:
        for group in run.opt.param_groups:  # Opacus' DPOptimizer shares these param_groups
            group["lr"] = self._step_lr(run, step)

    def _take(self, run: LocalRun, idx) -> pd.DataFrame:
        run.used.update(int(i) for i in idx)
        return run.rows.iloc[idx]

    def _logits(self, rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Yes/No logits, labels, non-padding tokens) of each row."""
        batch = self._batch(rows)
        logits = self._forward(batch)
        labels = torch.tensor(rows["label"].to_numpy(), device=logits.device)
        return logits, labels, batch["attention_mask"].sum(1)

    def _forward(self, batch: dict) -> torch.Tensor:
        """Yes/No logits of a batch: through the whole model, or split with the server actor."""
        if self.split is not None:
            return self.split.logits(batch, self.yes_id, self.no_id)
        return yes_no_logits(self.model, batch, self.yes_id, self.no_id)

    def _sync(self) -> None:
        if self.device.type == "cuda":  # so that a timing covers the queued GPU work
            torch.cuda.synchronize(self.device)

    def _end_local(self, run: LocalRun, losses: list[float], seen: int, weight: float, dp_metrics: dict,
                   sampled: list[int], step_seconds: float) -> tuple[dict, torch.Tensor]:
        """Everything after a client's last local step (its trained adapter is in the model): the
        delta through the client-side postprocessors, the client's store entry, the metadata."""
        t_end = time.perf_counter()
        delta = get_flat(self.shared) - run.params.float()
        ctx = ClientContext(run.client, run.round, seen, len(sampled), self.cfg.clients.num, run.state, list(sampled))
        delta, weight, post_metrics = run_client_hooks(self.postprocessors, delta, weight, ctx)
        members = np.union1d((run.saved or {}).get("members", np.zeros(0, dtype=np.int64)), sorted(run.used))
        saved = {"opt": opt_state_to_flat(run.opt), "privacy": run.state, "members": members.astype(np.int64)}
        if self.local:
            saved["local"] = get_flat(self.local)
        self.store.save(run.client, run.round, saved)
        meta = {"client": run.client, "executor": self.executor_id, "num_samples": seen, "weight": weight,
                "steps": run.steps, "lr": run.lr, "loss": float(np.mean(losses)) if losses else float("nan"),
                # This client's own time (fused: its share of the loop, not the whole group's).
                "seconds": run.setup_seconds + step_seconds + time.perf_counter() - t_end,
                "metrics": {**dp_metrics, **post_metrics, **(self.split.take_metrics() if self.split else {})},
                # for throughput and overhead figures (fedsim bench): time in the local-training loop,
                # tokens trained on, this process's peak memory
                "step_seconds": step_seconds, "tokens": int(run.tokens), "peak_bytes": peak_memory_bytes(self.device)}
        return meta, delta

    def train(self, client: int, round: int, params: torch.Tensor, lr: float, sampled: list[int]) -> tuple[dict, torch.Tensor]:
        """Local training from `params`; returns (metadata, delta = trained - received), the delta
        already through the client-side postprocessors."""
        run = self._begin_local(client, round, params, lr)

        def loss_of(idx):
            logits, labels, tokens = self._logits(self._take(run, idx))
            run.tokens = run.tokens + tokens.sum()
            return preference_loss(logits, labels)

        t_loop = time.perf_counter()
        self.model.train()
        if self.sample_dp is not None:  # record-level DP-SGD (Poisson batches, per-sample clipping, noise)
            losses, seen, dp_metrics = self.sample_dp.train(run.opt, loss_of, len(run.rows), run.steps, run.rng,
                                                            client, round, run.state, lambda s: self._set_lr(run, s))
            weight = self.sample_dp.expected_samples(len(run.rows), run.steps)
        else:
            batches = batch_stream(run.rng, len(run.rows), self.cfg.train.batch_size)
            losses, seen, dp_metrics = [], 0, {}
            for step in range(run.steps):
                self._set_lr(run, step)
                idx = next(batches)
                loss = loss_of(idx)
                loss.backward()
                run.opt.step()
                run.opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                seen += len(idx)
            weight = float(seen)
        self.model.eval()
        self._sync()
        return self._end_local(run, losses, seen, weight, dp_metrics, sampled, time.perf_counter() - t_loop)

    def train_many(self, clients: list[int], round: int, lrs: list[float], sampled: list[int], *params) -> list:
        """Fused local training of several clients (`executors.fused`, `fedsim.models.fused`): each
        step is one forward and backward over a batch made of every client's own batch, each row
        through its own client's LoRA, and one AdamW step of every client. Gives each client the
        (meta, delta) `train` would, flat as [meta_0, delta_0, meta_1, delta_1, ...] so that Ray
        hands each out as its own object (`num_returns=2 * len(clients)`). `params` are the
        received adapters, one per client, as separate arguments so Ray resolves their refs."""
        if not (len(clients) == len(lrs) == len(params)):
            raise ValueError(f"train_many: {len(clients)} clients, {len(lrs)} lrs, {len(params)} adapters")
        group = FusedLoRA(self.model, len(clients), self.params)
        opt = StackedAdamW(group.weight, group.grad)
        runs = []
        for slot, (client, p, lr) in enumerate(zip(clients, params, lrs)):
            runs.append(self._begin_local(client, round, p, lr))
            group.load(slot)
            opt.load(slot, runs[-1].opt)
        # LoRA dropout draws one mask over the mixed batch: seeded per group, not per client.
        torch.manual_seed(client_seed(self.cfg.train.seed, clients[0], round))
        streams = [batch_stream(run.rng, len(run.rows), self.cfg.train.batch_size) for run in runs]
        seen, losses = [0] * len(runs), []
        tokens = torch.zeros(len(runs), dtype=torch.long, device=self.device)
        t_loop = time.perf_counter()
        self.model.train()
        with group.installed():
            for step in range(max(run.steps for run in runs)):
                counts, frames = [0] * len(runs), {}
                for slot, run in enumerate(runs):
                    if step < run.steps:  # local_epochs: clients with fewer rows finish earlier
                        frames[slot] = self._take(run, next(streams[slot]))
                        counts[slot] = len(frames[slot])
                        seen[slot] += counts[slot]
                for slot, run in enumerate(runs):
                    if step < run.steps:
                        opt.lr[slot] = self._step_lr(run, step)
                step_losses = torch.zeros(len(runs), device=self.device)
                for part in chunks(counts, self.cfg.executors.fused_rows):  # whole clients per pass
                    group.route.set([counts[s] if s in part else 0 for s in range(len(runs))])
                    logits, labels, row_tokens = self._logits(pd.concat([frames[s] for s in part]))
                    per_client = group.client_losses(preference_loss(logits, labels, reduction="none"))
                    group.backward(per_client.sum())  # accumulates over the passes
                    step_losses += per_client.detach()
                    tokens.index_add_(0, group.route.idx, row_tokens)
                opt.step(torch.tensor(counts) > 0)
                group.zero_grad()
                losses.append(step_losses)
        self.model.eval()
        self._sync()
        share = (time.perf_counter() - t_loop) / len(runs)  # each client's share of the fused loop
        losses = torch.stack(losses).cpu()
        out = []
        for slot, run in enumerate(runs):
            group.store(slot)
            opt.store(slot, run.opt)
            run.tokens = tokens[slot]
            out += self._end_local(run, losses[:run.steps, slot].tolist(), seen[slot], float(seen[slot]), {},
                                   sampled, share)
        return out

    @torch.no_grad()
    def evaluate(self, client: int, params: torch.Tensor, split: str, max_rows: int | None = None) -> dict:
        """p(Yes) for the client's rows of `split`; `max_rows`: a fixed seeded subset of them
        (the same rows at every call, so interim evaluations are comparable with each other)."""
        self._load_params(params, self.store.load(client, LATEST) if self.local else None)
        rows = self._rows(client, split)
        if max_rows is not None and len(rows) > max_rows:
            pick = np.random.default_rng(client_seed(self.cfg.train.seed, client, 10**6 + 1)).choice(len(rows), max_rows, replace=False)
            rows = rows.iloc[np.sort(pick)].reset_index(drop=True)
        # Rows of similar length are batched together (less padding to compute; a row's score does
        # not depend on its batch, fedsim.models.scoring), then put back in order.
        size = rows["title"].str.len() + rows["liked"].map(lambda t: sum(map(len, t))) + rows["disliked"].map(lambda t: sum(map(len, t)))
        order = np.argsort(size.to_numpy(), kind="stable")
        probs = np.zeros(len(rows))
        bs = self.cfg.eval.batch_size
        for i in range(0, len(rows), bs):
            part = order[i:i + bs]
            probs[part] = p_yes(self._forward(self._batch(rows.iloc[part]))).cpu().numpy()
        # The row key (user, item, timestamp) lets the driver save per-row predictions that other
        # runs and the baselines can be paired with.
        return {"client": client, "labels": rows["label"].to_numpy(), "probs": probs,
                **{k: rows[k].to_numpy() for k in ("user", "item", "timestamp")}}

    @torch.no_grad()
    def membership(self, client: int, params, max_rows: int) -> dict:
        """Per-row losses of the final model on rows the client trained on (members) and on held-out
        rows of the same users (non-members), for a loss-threshold membership-inference attack.

        Non-members are the client's train-split rows it never trained on, from the members' users:
        the same users and the same time span as the members, so a model that learned nothing scores
        0.5. (Valid / test rows come later in time and differ in distribution; they are used only
        when a client trained on every train row it has.)"""
        saved = self.store.load(client, LATEST) or {}
        self._load_params(params, saved)
        train = self._rows(client, "train")
        used = saved.get("members", np.zeros(0, dtype=np.int64))
        members = train.iloc[used]
        unused = train.drop(index=train.index[used])
        held = unused if len(unused) else pd.concat([self._rows(client, "valid"), self._rows(client, "test")])
        same_users = held[held["user"].isin(members["user"])]
        held = same_users if len(same_users) else held
        rng = np.random.default_rng(client_seed(self.cfg.train.seed, client, 10**6))
        out = {"client": client}
        for name, df in (("member", members), ("nonmember", held)):
            if len(df) > max_rows:
                df = df.iloc[np.sort(rng.choice(len(df), size=max_rows, replace=False))]
            losses = []
            for i in range(0, len(df), self.cfg.eval.batch_size):
                part = df.iloc[i:i + self.cfg.eval.batch_size]
                logits = self._forward(self._batch(part))
                labels = torch.tensor(part["label"].to_numpy(), device=logits.device)
                losses.append(preference_loss(logits, labels, reduction="none").cpu().numpy())
            out[name] = np.concatenate(losses) if losses else np.zeros(0)
        return out

    def export(self, params) -> tuple[dict, dict]:
        """The adapter a user takes away: peft format for separate / ffa (A is the shared init) /
        fedsa (B: the uniform mean of the B of every client that trained; personalised B stay in
        the client stores); for stack the accumulated dense update per target module, keyed by the
        base weight's name (W_merged = W_base + delta), with a config saying so."""
        if self.mode == "stack":
            dense = split_dense(params["delta_w"].float(), self.modules)
            state = {m.weight: d.contiguous().clone() for m, d in zip(self.modules, dense)}
            return state, {"fedsim_format": "dense_delta_weight", "lora_mode": "stack",
                           "merged_rounds": params["version"], "base_model": self.cfg.model.name,
                           "target_modules": list(self.cfg.model.lora.target_modules),
                           "usage": "for each key k: W[k] = W_base[k] + delta[k]"}
        if self.split is not None:  # client-side layers' LoRA are private: exported at the shared init
            return self.split.export_state(self.model, params, self.initial_local)
        set_flat(self.shared, params)
        if self.local:
            bs = [s["local"] for c in range(self.cfg.clients.num)
                  if (s := self.store.load(c, LATEST)) is not None and "local" in s]
            set_flat(self.local, torch.stack(bs).mean(0) if bs else self.initial_local)
        return export_state(self.model, get_flat(self.params))
