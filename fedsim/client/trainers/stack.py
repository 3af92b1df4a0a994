"""`strategy.lora_mode: stack` (FLoRA, `fedsim.server.flora`): the received object is the server's
accumulated dense update of the target modules' base weights, merged into this executor's frozen
base once per version; the client then trains a fresh LoRA from the shared init (with a fresh
optimizer) and uploads it. The export is the dense update per target module, keyed by the base
weight's name (W_merged = W_base + delta)."""
from __future__ import annotations

import torch

from fedsim.client.trainers.base import Adapter
from fedsim.models.lora import lora_modules, set_flat, split_dense


class Stack(Adapter):
    name = "stack"
    roles = {"A": "shared", "B": "shared"}
    restores_optimizer = False  # a fresh LoRA each round, so a fresh optimizer
    needs = {"each_factor": "cannot be combined with {key} (stacking needs each client's own factors)",
             "peft_lora_layers": "cannot be combined with {key} {value!r} (it merges the model's peft LoRA layers)"}
    breaks = {"whole_adapter": "needs strategy.name 'fedavg', not {value!r} (PPLR mixes whole per-client adapters)",
              "layer_roles": "cannot be combined with storage.mode 'split' (use 'separate' or 'ffa')",
              # A noisy mean of clipped factor deltas bounds nothing once the server multiplies the factors.
              "mean_of_updates": ("cannot be combined with privacy.client_dp (DP-FedAvg's bound holds for a mean of "
                                  "updates, not for stacked products B_k A_k); use 'separate' or 'ffa', or privacy.dp_lora")}

    def __init__(self, host, **kw):
        super().__init__(host, **kw)
        self.modules = lora_modules(self.model, self.layout)
        self.base_layers = [self.model.get_submodule(m.name).base_layer for m in self.modules]
        self.base0 = [layer.weight.detach().clone() for layer in self.base_layers]
        self.merged_version = 0

    def initial_params(self):
        # The server needs the factors' geometry to stack them.
        return {"init": self.initial.clone(), "modules": self.modules}

    @torch.no_grad()
    def merge(self, payload: dict) -> None:
        """base weight = W0 + the server's accumulated dense update, once per version."""
        if payload["version"] == self.merged_version:
            return
        for layer, w0, d in zip(self.base_layers, self.base0, split_dense(payload["delta_w"], self.modules)):
            layer.weight.copy_((w0.float() + d.to(w0.device)).to(w0.dtype))
        self.merged_version = payload["version"]

    def load(self, params, saved):
        self.merge(params)
        set_flat(self.shared, self.initial)  # a fresh LoRA on top of the merged base
        return self.initial

    def export(self, params) -> tuple[dict, dict]:
        cfg = self.host.cfg
        dense = split_dense(params["delta_w"].float(), self.modules)
        state = {m.weight: d.contiguous().clone() for m, d in zip(self.modules, dense)}
        return state, {"fedsim_format": "dense_delta_weight", "lora_mode": "stack",
                       "merged_rounds": params["version"], "base_model": cfg.model.name,
                       "target_modules": list(cfg.model.lora.target_modules),
                       "usage": "for each key k: W[k] = W_base[k] + delta[k]"}
