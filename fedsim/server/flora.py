"""FLoRA-style exact aggregation by stacking (`strategy.lora_mode: stack`).

Averaging LoRA factors apart is inexact, mean_k(B_k A_k) != mean_k(B_k) mean_k(A_k). Stacking is
not: with A_s = [p_1 A_1; ...; p_K A_K] and B_s = [B_1, ..., B_K],

    B_s @ A_s = sum_k p_k B_k A_k,     p_k = w_k / sum_j w_j  (w: the updates' aggregation weights)

which is a LoRA of rank K r. Per round:

- Down: every sampled client gets the same payload {"version": v, "delta_w": flat float32}, the
  accumulated dense update sum_rounds sum_k p_k scaling B_k A_k of every target module's base weight
  (module after module, each d_out x d_in; `fedsim.models.lora.split_dense`). The executor sets each
  frozen base weight to W0 + delta_w (W0: the base weight it loaded) whenever `version` differs from
  the version it last merged, so an executor serving many clients merges once per round, and a
  restarted or new executor (version 0) catches up in one step.
- The client trains a *fresh* LoRA (the shared-seed init: A0, B = 0) on top of the merged base and
  uploads delta = trained - init over all A and B entries (the factors, as the init is known).
- Up -> server: factors_k = init + delta_k; step = sum_k p_k scaling B_k A_k (dense, per module,
  computed from the stacked factors); `finish(step)` (server postprocessors); delta_w += step;
  version += 1.
- Evaluation uses the merged base with the fresh LoRA (B = 0, so the LoRA adds nothing).

Why the dense payload and not the per-round stacked factors: it is the simplest design that is
correct whichever executor serves a client, after restarts and resumed runs (it is idempotent: no
executor has to have seen every round), and its size does not grow with the rounds. It is what
`bytes_down` counts (sum of target module weight sizes x 4 bytes per client). FLoRA's own broadcast
of one round's stacked factors would be K x (upload size) entries; that count is logged as
`lora/stacked_factor_params` for comparison.

The exported "adapter" is the accumulated dense update, one d_out x d_in tensor per target module,
keyed by the base weight's name (W_merged = W_base[name] + delta[name]); it is no longer rank r.
"""
from __future__ import annotations

import dataclasses

import torch

from fedsim.models.lora import LoraModule, stacked_delta_w
from fedsim.server.base import Finish, Strategy, Update, no_finish


class StackedLoRA(Strategy):
    name = "stack"

    def initialize(self, params, num_clients):
        """`params`: {"init": the fresh adapter vector, "modules": its LoraModule geometry}, as
        `ClientExecutor.initial_params` gives it in stack mode."""
        if not isinstance(params, dict) or "modules" not in params:
            raise TypeError("strategy.lora_mode 'stack' needs the executor's initial params with their LoRA geometry")
        self.init = params["init"].detach().float().clone()
        self.modules = [m if isinstance(m, LoraModule) else LoraModule(**m) for m in params["modules"]]
        self.delta_w = torch.zeros(sum(m.dense_numel for m in self.modules), dtype=torch.float64)
        self.version = 0
        self._payload = None

    def params_for(self, client):
        # One object for every client until the next merge: the aggregator broadcasts it once.
        if self._payload is None:
            self._payload = {"version": self.version, "delta_w": self.delta_w.float()}
        return self._payload

    def aggregate(self, round: int, updates: list[Update], finish: Finish = no_finish) -> dict[str, float]:
        updates = sorted(updates, key=lambda u: u.client)
        factors = [self.init.double() + u.delta.double() for u in updates]
        step = stacked_delta_w(factors, [u.weight for u in updates], self.modules).float()
        step, metrics = finish(step)
        self.delta_w += step.double()
        self.version += 1
        self._payload = None
        return {"update_norm": float(step.norm()), "lora/stack_rank": float(len(updates) * self.modules[0].r),
                "lora/stacked_factor_params": float(len(updates) * self.init.numel()), **metrics}

    def global_params(self):
        return self.params_for(-1)

    def state_dict(self):
        return {"init": self.init.clone(), "modules": [dataclasses.asdict(m) for m in self.modules],
                "delta_w": self.delta_w.clone(), "version": self.version}

    def load_state_dict(self, state):
        self.initialize({"init": state["init"], "modules": state["modules"]}, 0)
        self.delta_w = state["delta_w"].clone().double()
        self.version = int(state["version"])
