"""The client executor: a Ray actor that holds one frozen base model and trains LoRA for clients.

One actor per client (cross-silo) and a pool of actors serving many virtual clients
(cross-device) are the same code: the executor swaps in a client's adapter and optimizer state,
trains on that client's own Parquet shard, and writes the state back to the client's store.

A client's state lives on disk (`<run>/client_state/`), not in the actor, so that an actor that
dies and is restarted, or a resumed run, finds every client where it left off.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedsim.config import config_from_dict
from fedsim.data.prompt import render_prompt
from fedsim.models.loader import load_base
from fedsim.models.lora import attach_lora, export_state, flat_layout, get_flat, set_flat, trainable
from fedsim.models.scoring import answer_token_ids, encode, p_yes, preference_loss, yes_no_logits
from fedsim.postprocessors import ClientContext, build_postprocessors, run_client_hooks


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
        self.params = trainable(self.model)
        self.yes_id, self.no_id = answer_token_ids(self.tokenizer)
        self.store = ClientStore(self.run_dir / "client_state")
        self.postprocessors = build_postprocessors(self.cfg, flat_layout(self.model))
        self.sample_dp = None
        if self.cfg.privacy.sample_dp.enabled:
            from fedsim.privacy.dp_sgd import SampleDP

            self.sample_dp = SampleDP(self.model, self.cfg)

    def ready(self) -> dict:
        return {"executor": self.executor_id, "pid": os.getpid(), "device": str(self.device),
                "lora_params": sum(p.numel() for p in self.params)}

    def initial_params(self) -> torch.Tensor:
        return get_flat(self.params)

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

    def train(self, client: int, round: int, params: torch.Tensor, lr: float, num_sampled: int) -> tuple[dict, torch.Tensor]:
        """Local training from `params`; returns (metadata, delta = trained - received), the delta
        already through the client-side postprocessors."""
        self._maybe_crash(client, round)
        t0 = time.perf_counter()
        t = self.cfg.train
        rows = self._rows(client, "train")
        if len(rows) == 0:
            raise ValueError(f"client {client} has no train rows in {shard_path(self.run_dir, client)}")
        set_flat(self.params, params)
        opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=t.weight_decay)
        saved = self.store.load(client, round)
        if saved is not None:
            opt.load_state_dict(saved["opt"])
            for g in opt.param_groups:  # the aggregator may have changed this client's rate
                g["lr"] = lr
        seed = client_seed(t.seed, client, round)
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        steps = t.local_steps or max(1, math.ceil(t.local_epochs * len(rows) / t.batch_size))
        # Per-client state that privacy accountants and client hooks keep across rounds.
        state = (saved or {}).get("privacy", {})

        def loss_of(idx):
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
        delta = get_flat(self.params) - params.float()
        ctx = ClientContext(client, round, seen, num_sampled, self.cfg.clients.num, state)
        delta, weight, post_metrics = run_client_hooks(self.postprocessors, delta, weight, ctx)
        self.store.save(client, round, {"opt": opt.state_dict(), "privacy": state})
        meta = {"client": client, "executor": self.executor_id, "num_samples": seen, "weight": weight,
                "steps": steps, "lr": lr, "loss": float(np.mean(losses)) if losses else float("nan"),
                "seconds": time.perf_counter() - t0, "metrics": {**dp_metrics, **post_metrics}}
        return meta, delta

    @torch.no_grad()
    def evaluate(self, client: int, params: torch.Tensor, split: str) -> dict:
        set_flat(self.params, params)
        rows = self._rows(client, split)
        probs = []
        bs = self.cfg.eval.batch_size
        for i in range(0, len(rows), bs):
            logits = yes_no_logits(self.model, self._batch(rows.iloc[i:i + bs]), self.yes_id, self.no_id)
            probs.append(p_yes(logits).cpu().numpy())
        probs = np.concatenate(probs) if probs else np.zeros(0)
        return {"client": client, "labels": rows["label"].to_numpy(), "probs": probs}

    def export(self, params: torch.Tensor) -> tuple[dict, dict]:
        return export_state(self.model, params)
