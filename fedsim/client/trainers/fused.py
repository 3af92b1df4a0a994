"""`executors.fused`: several clients trained at once (`fedsim.models.fused`): each step is one
forward and backward over a batch made of every client's own batch, each row through its own
client's adapter (one-hot routing over the stacked adapters; RecLoRA's bank: its own client's
router mix of its own client's bank), and one AdamW step of every client. What is stacked is the
adapter's (`Adapter.fuse`).
Each client ends with the state (adapter, optimizer, store entry) training alone would give it, to
float32 rounding."""
from __future__ import annotations

import pandas as pd
import torch

from fedsim.client.seeds import client_seed
from fedsim.client.trainers.base import Trainer, batch_stream
from fedsim.models.fused import StackedAdamW, chunks
from fedsim.models.scoring import preference_loss


class Fused(Trainer):
    name = "fused"
    needs = {"whole_model_here": ("cannot be combined with {key} {value!r} (the fused layers hold every client's adapter in "
                                  "the client's model, the split server runs one client per request)")}
    # Record-level DP-SGD clips per-sample gradients per client (Opacus hooks on peft's layers);
    # the fused layers hold every client's adapter in one tensor, which those hooks cannot split.
    breaks = {"per_sample_grads": ("cannot be combined with privacy.sample_dp (per-sample clipping runs per client, "
                                   "unfused); client-level privacy.client_dp, privacy.dp_lora, privacy.secagg and "
                                   "privacy.he work fused")}

    def open(self, clients, round, params, lrs):
        host = self.host
        self.group = host.adapter.fuse(len(clients))  # the adapter's parameters, stacked over the clients
        self.opt = StackedAdamW(self.group.weight, self.group.grad)
        runs = []
        for slot, (client, p, lr) in enumerate(zip(clients, params, lrs)):
            runs.append(host.begin_local(client, round, p, lr))
            self.group.load(slot)  # the model holds this client's adapter now
            self.opt.load(slot, runs[-1].opt)
        # LoRA dropout draws one mask over the mixed batch: seeded per group, not per client.
        torch.manual_seed(client_seed(host.cfg.train.seed, clients[0], round))
        for run in runs:
            run.extra["batches"] = batch_stream(run.rng, len(run.rows), host.cfg.train.batch_size)
        self.tokens = torch.zeros(len(runs), dtype=torch.long, device=host.device)
        return runs

    def running(self):
        return self.group.installed()  # the model runs through the stacked layers during the loop

    def set_lr(self, run, slot, step):
        self.opt.lr[slot] = self.host.step_lr(run, step)

    def next_batch(self, run):
        return next(run.extra["batches"])

    def step(self, runs, batches):
        host, group = self.host, self.group
        frames = {slot: host.take(runs[slot], idx) for slot, idx in batches.items()}
        counts = [len(frames[s]) if s in frames else 0 for s in range(len(runs))]
        step_losses = torch.zeros(len(runs), device=host.device)
        for part in chunks(counts, host.cfg.executors.fused_rows):  # whole clients per pass
            rows = pd.concat([frames[s] for s in part])
            group.set_rows([counts[s] if s in part else 0 for s in range(len(runs))], rows)
            logits, labels, row_tokens = host.logits(rows)
            per_client = group.client_losses(preference_loss(logits, labels, reduction="none"))
            group.backward(per_client.sum())  # accumulates over the passes
            step_losses += per_client.detach()
            self.tokens.index_add_(0, group.idx, row_tokens)
        self.opt.step(torch.tensor(counts) > 0)
        group.zero_grad()
        return {slot: step_losses[slot] for slot in batches}

    def close(self, run, slot):
        self.group.store(slot)  # the model holds this client's trained adapter now
        self.opt.store(slot, run.opt)
        run.tokens = self.tokens[slot]
        return float(run.seen), self.group.metrics(slot)
