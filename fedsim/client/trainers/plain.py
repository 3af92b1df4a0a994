"""Plain local training: minibatches from passes over fresh permutations of the client's rows, one
AdamW step each."""
from __future__ import annotations

from fedsim.client.trainers.base import Trainer, batch_stream
from fedsim.models.scoring import preference_loss


class Plain(Trainer):
    name = "plain"

    def next_batch(self, run):
        if "batches" not in run.extra:
            run.extra["batches"] = batch_stream(run.rng, len(run.rows), self.host.cfg.train.batch_size)
        return next(run.extra["batches"])

    def step(self, runs, batches):
        out = {}
        for slot, idx in batches.items():
            run = runs[slot]
            logits, labels, tokens = self.host.logits(self.host.take(run, idx))
            run.tokens = run.tokens + tokens.sum()
            loss = preference_loss(logits, labels)
            loss.backward()
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
            out[slot] = loss.item()
        return out
