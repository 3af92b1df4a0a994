"""`storage.mode: split` (PPLR flexible storage, `fedsim.models.split`): the middle decoder layers
run on the split server actor. Their LoRA is shared (uploaded, aggregated); the LoRA of the
client-side layers (front and back) is local, private to the client, kept in its store entry and
exported at the shared init. `strategy.lora_mode` (separate or ffa) still says which factors train."""
from __future__ import annotations

import torch

from fedsim.client.trainers.base import Adapter
from fedsim.models.layout import Layout
from fedsim.models.lora import MODE_ROLES
from fedsim.models.split import SplitClient


class Split(Adapter):
    name = "split"
    # fedsa and stack decide themselves which factors stay local / how the base changes; split
    # decides by layer. Opacus needs per-sample gradients of every layer in one process.
    needs = {"layer_roles": "cannot be combined with {key} {value!r}"}
    breaks = {"per_sample_grads": None, "whole_model_here": None}

    def __init__(self, host, split_server=None, **kw):
        self.split_server = split_server
        super().__init__(host, **kw)

    def build_layout(self) -> Layout:
        whole = Layout.of(self.model, MODE_ROLES[self.host.cfg.strategy.lora_mode])
        self.split = SplitClient(self.model, self.host.cfg, self.split_server, self.host.executor_id)
        shared = {id(p) for _, p in self.split.shared}
        # By layer: the middle's trainable LoRA is shared, the client-side layers' trainable LoRA local.
        return whole.with_roles(lambda b: b.role if b.role == "frozen" else "shared" if id(b.param) in shared
                                else "local")

    def trainable(self) -> list[torch.nn.Parameter]:
        return self.shared + self.local  # the order the split client's optimizer has always had

    def forward(self, batch: dict) -> torch.Tensor:
        return self.split.logits(batch, self.host.yes_id, self.host.no_id)

    def begin(self) -> None:
        self.split.reset()  # this client's activation traffic and FLOPs

    def metrics(self) -> dict:
        return self.split.take_metrics()

    def describe(self) -> dict:
        return self.split.describe()

    def export(self, params) -> tuple[dict, dict]:
        # The client-side layers' LoRA are private: exported at the shared init.
        return self.split.export_state(self.model, params, self.initial_local)
