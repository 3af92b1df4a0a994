"""`privacy.sample_dp`: record-level DP-SGD (`fedsim.privacy.dp_sgd`): Poisson-sampled batches,
per-sample clipping and noise in the client's optimizer, a per-client accountant in the client's
store; the aggregation weight is the expected number of rows (the actual count would leak
membership). Opacus' per-sample hooks need the whole model in one eager process, one client at a time."""
from __future__ import annotations

from fedsim.client.trainers.base import Trainer
from fedsim.models.scoring import preference_loss
from fedsim.privacy.dp_sgd import SampleDP


class SampleDPTrainer(Trainer):
    name = "sample_dp"
    needs = {"per_sample_grads": ("cannot be combined with {key} {value!r} (DP-SGD needs per-sample gradients of the whole "
                                  "model in one process); use privacy.client_dp or privacy.dp_lora")}

    def __init__(self, host):
        super().__init__(host)
        self.sdp = SampleDP(host.model, host.cfg)  # attaches the per-sample-gradient hooks once

    def open(self, clients, round, params, lrs):
        runs = super().open(clients, round, params, lrs)
        for run in runs:
            run.extra["dp"] = self.sdp.begin(run.opt, len(run.rows), run.steps, run.client, run.round, run.state)
        return runs

    def next_batch(self, run):
        return run.extra["dp"].batch(run.rng)

    def step(self, runs, batches):
        out = {}
        for slot, idx in batches.items():
            run = runs[slot]

            def loss_of(idx, run=run):
                logits, labels, tokens = self.host.logits(self.host.take(run, idx))
                run.tokens = run.tokens + tokens.sum()
                return preference_loss(logits, labels)

            out[slot] = run.extra["dp"].step(loss_of, idx)  # None for an empty (noise-only) batch
        return out

    def close(self, run, slot):
        return self.sdp.expected_samples(len(run.rows), run.steps), run.extra["dp"].finish()
