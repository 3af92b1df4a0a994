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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fedsim.config import config_from_dict
from fedsim.data.prompt import render_prompt
from fedsim.models.loader import load_base
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


class ClientStore:
    """Each client's optimizer state, versioned by round so a resumed run reads a consistent one."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _versions(self, client: int) -> list[tuple[int, Path]]:
        out = []
        for p in self.root.glob(f"client_{client:05d}.r*.pt"):
            out.append((int(p.name.split(".r")[1].split(".")[0]), p))
        return sorted(out)

    def load(self, client: int, before_round: int) -> dict | None:
        older = [(r, p) for r, p in self._versions(client) if r < before_round]
        return torch.load(older[-1][1], weights_only=False) if older else None

    def save(self, client: int, round: int, state: dict) -> None:
        path = self.root / f"client_{client:05d}.r{round}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        # Keep the previous version too: a crash mid-round leaves the round's new one unusable.
        for r, p in self._versions(client)[:-2]:
            p.unlink(missing_ok=True)


def quiet_transformers() -> None:
    # Per-actor weight-loading bars would interleave with the run's own progress lines.
    import warnings

    from transformers.utils import logging

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    logging.disable_progress_bar()
    logging.set_verbosity_error()


class ClientExecutor:
    def __init__(self, config: dict, run_dir: str, model_path: str, executor_id: int, num_threads: int = 1):
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
        self.params = trainable(self.model)  # what the optimizer trains
        shared, local = shared_params(self.model, self.mode), local_params(self.model, self.mode)
        self.shared = [p for _, p in shared]  # what is received and uploaded
        self.local = [p for _, p in local]  # trained, never uploaded (fedsa: B)
        self.initial = get_flat(self.params)  # the shared-seed init every executor starts from
        self.initial_local = get_flat(self.local) if self.local else None
        if self.mode == "stack":
            self.modules = lora_modules(self.model)
            self.base_layers = [self.model.get_submodule(m.name).base_layer for m in self.modules]
            self.base0 = [layer.weight.detach().clone() for layer in self.base_layers]
            self.merged_version = 0
        self.yes_id, self.no_id = answer_token_ids(self.tokenizer)
        self.store = ClientStore(self.run_dir / "client_state")
        self.postprocessors = build_postprocessors(self.cfg, [(n, p.numel()) for n, p in shared])
        self.sample_dp = None
        if self.cfg.privacy.sample_dp.enabled:
            from fedsim.privacy.dp_sgd import SampleDP

            self.sample_dp = SampleDP(self.model, self.cfg)

    def ready(self) -> dict:
        return {"executor": self.executor_id, "pid": os.getpid(), "device": str(self.device),
                "lora_params": sum(p.numel() for p in self.shared)}

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

    def _load_params(self, client: int, params, before_round: int) -> torch.Tensor:
        """Put what the server sent (and, for fedsa, the client's own B) into the model; returns the
        shared vector the upload is measured from."""
        if self.mode == "stack":
            self.merge(params)
            params = self.initial  # a fresh LoRA on top of the merged base
        set_flat(self.shared, params)
        if self.local:
            saved = self.store.load(client, before_round)
            set_flat(self.local, saved["local"] if saved and "local" in saved else self.initial_local)
        return params

    def _rows(self, client: int, split: str) -> pd.DataFrame:
        df = pd.read_parquet(shard_path(self.run_dir, client))
        return df[df["split"] == split].reset_index(drop=True)

    def _batch(self, rows: pd.DataFrame) -> dict:
        prompts = [render_prompt(a, b, t) for a, b, t in zip(rows["liked"], rows["disliked"], rows["title"])]
        return encode(self.tokenizer, prompts, self.cfg.model.max_length, self.device)

    def _maybe_crash(self, client: int, round: int) -> None:
        for crash in self.cfg.faults.crash:
            if crash["round"] == round and crash["client"] == client:
                marker = self.run_dir / "faults" / f"crash_r{round}_c{client}"
                if not marker.exists():
                    marker.parent.mkdir(exist_ok=True)
                    marker.touch()
                    os._exit(1)  # a real process death, as a lost machine would look

    def train(self, client: int, round: int, params: torch.Tensor, lr: float, sampled: list[int]) -> tuple[dict, torch.Tensor]:
        """Local training from `params`; returns (metadata, delta = trained - received), the delta
        already through the client-side postprocessors."""
        self._maybe_crash(client, round)
        t0 = time.perf_counter()
        t = self.cfg.train
        rows = self._rows(client, "train")
        if len(rows) == 0:
            raise ValueError(f"client {client} has no train rows in {shard_path(self.run_dir, client)}")
        params = self._load_params(client, params, round)
        opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=t.weight_decay)
        saved = self.store.load(client, round)
        if saved is not None and self.mode != "stack":  # stack: a fresh LoRA, a fresh optimizer
            opt.load_state_dict(saved["opt"])
            for g in opt.param_groups:  # the aggregator may have changed this client's rate
                g["lr"] = lr
        seed = client_seed(t.seed, client, round)
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        steps = t.local_steps or max(1, math.ceil(t.local_epochs * len(rows) / t.batch_size))
        # Per-client state that privacy accountants and client hooks keep across rounds.
        state = (saved or {}).get("privacy", {})

        used: set[int] = set()  # the rows this client trained on: the members a privacy audit attacks

        def loss_of(idx):
            used.update(int(i) for i in idx)
            batch = rows.iloc[idx]
            logits = yes_no_logits(self.model, self._batch(batch), self.yes_id, self.no_id)
            labels = torch.tensor(batch["label"].to_numpy(), device=logits.device)
            return preference_loss(logits, labels)

        self.model.train()
        if self.sample_dp is not None:  # record-level DP-SGD (Poisson batches, per-sample clipping, noise)
            losses, seen, dp_metrics = self.sample_dp.train(opt, loss_of, len(rows), steps, rng, client, round, state)
            weight = self.sample_dp.expected_samples(len(rows), steps)
        else:
            order, pos, losses, seen, dp_metrics = rng.permutation(len(rows)), 0, [], 0, {}
            for _ in range(steps):
                if pos + t.batch_size > len(order) and pos > 0:
                    order, pos = rng.permutation(len(rows)), 0
                idx = order[pos:pos + t.batch_size]
                pos += len(idx)
                loss = loss_of(idx)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                seen += len(idx)
            weight = float(seen)
        self.model.eval()
        delta = get_flat(self.shared) - params.float()
        ctx = ClientContext(client, round, seen, len(sampled), self.cfg.clients.num, state, list(sampled))
        delta, weight, post_metrics = run_client_hooks(self.postprocessors, delta, weight, ctx)
        members = np.union1d((saved or {}).get("members", np.zeros(0, dtype=np.int64)), sorted(used))
        saved = {"opt": opt.state_dict(), "privacy": state, "members": members.astype(np.int64)}
        if self.local:
            saved["local"] = get_flat(self.local)
        self.store.save(client, round, saved)
        meta = {"client": client, "executor": self.executor_id, "num_samples": seen, "weight": weight,
                "steps": steps, "lr": lr, "loss": float(np.mean(losses)) if losses else float("nan"),
                "seconds": time.perf_counter() - t0, "metrics": {**dp_metrics, **post_metrics}}
        return meta, delta

    @torch.no_grad()
    def evaluate(self, client: int, params: torch.Tensor, split: str) -> dict:
        self._load_params(client, params, LATEST)
        rows = self._rows(client, split)
        probs = []
        bs = self.cfg.eval.batch_size
        for i in range(0, len(rows), bs):
            logits = yes_no_logits(self.model, self._batch(rows.iloc[i:i + bs]), self.yes_id, self.no_id)
            probs.append(p_yes(logits).cpu().numpy())
        probs = np.concatenate(probs) if probs else np.zeros(0)
        return {"client": client, "labels": rows["label"].to_numpy(), "probs": probs}

    @torch.no_grad()
    def membership(self, client: int, params, max_rows: int) -> dict:
        """Per-row losses of the final model on rows the client trained on (members) and on held-out
        rows of the same users (non-members), for a loss-threshold membership-inference attack."""
        self._load_params(client, params, LATEST)
        saved = self.store.load(client, LATEST) or {}
        train = self._rows(client, "train")
        members = train.iloc[saved.get("members", np.zeros(0, dtype=np.int64))]
        held = pd.concat([self._rows(client, "valid"), self._rows(client, "test")])
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
                logits = yes_no_logits(self.model, self._batch(part), self.yes_id, self.no_id)
                labels = torch.tensor(part["label"].to_numpy(), device=logits.device)
                losses.append(F.cross_entropy(logits, (1 - labels).long(), reduction="none").cpu().numpy())
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
        set_flat(self.shared, params)
        if self.local:
            bs = [s["local"] for c in range(self.cfg.clients.num)
                  if (s := self.store.load(c, LATEST)) is not None and "local" in s]
            set_flat(self.local, torch.stack(bs).mean(0) if bs else self.initial_local)
        return export_state(self.model, get_flat(self.params))
