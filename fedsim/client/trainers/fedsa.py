"""`strategy.lora_mode: fedsa` (FedSA-LoRA): A and B are trained, only A is uploaded. Each
client's own B is kept in its store entry (`"local"`; a client's first round starts from the init,
B = 0) and used to train and evaluate that client. The export carries the uniform mean of the B of
every client that trained (the personalised B stay in the client stores)."""
from __future__ import annotations

import torch

from fedsim.client.trainers.base import Adapter
from fedsim.models.lora import export_state, get_flat, set_flat



class FedSA(Adapter):
    name = "fedsa"
    roles = {"A": "shared", "B": "local"}
    breaks = {"both_parts_uploaded": ("cannot be combined with privacy.dp_lora, which clips the A and B parts of an upload apart; "
                                        "'fedsa' uploads only one of them (use privacy.client_dp)"),
              "whole_adapter": "needs strategy.name 'fedavg', not {value!r} (PPLR mixes whole per-client adapters)",
              "layer_roles": "cannot be combined with storage.mode 'split' (use 'separate' or 'ffa')"}

    def export(self, params) -> tuple[dict, dict]:
        set_flat(self.shared, params)
        store = self.host.store
        bs = [s["local"] for c in range(self.host.cfg.clients.num)
              if (s := store.latest(c)) is not None and "local" in s]
        set_flat(self.local, torch.stack(bs).mean(0) if bs else self.initial_local)
        return export_state(self.model, get_flat(self.params))
