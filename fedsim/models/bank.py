"""RecLoRA's meta-LoRA bank: N_m LoRA adapters per target module, mixed per row by a router.

Every LoRA site of a peft model is replaced, for good, by a `StackedLoRALinear`
(`fedsim.models.routing`) whose C = N_m stacked adapters are the bank, A [N_m, r, in] and
B [N_m, out, r]. A `Router` maps a user's representation h_u to alpha = softmax(MLP(h_u) / T),
and every row of a batch goes through its own user's mix in one batched forward (not N_m):

    merge weights:  A_u = sum_k a_k A_k,  B_u = sum_k a_k B_k,  dy = B_u A_u x * (lora_alpha / r)
    merge outputs:  dy = sum_k a_k B_k A_k x * (lora_alpha / r)

Each B_k starts at 0 (the model starts as the base model, as plain LoRA does); A_0 is peft's own
init of the site and A_1.. are drawn the way peft draws A, from `seed`, so every executor builds the
same bank and a bank of one is plain LoRA exactly.
"""
from __future__ import annotations

import math

import torch

from fedsim.models.layout import Block, Layout, Site
from fedsim.models.routing import Route, StackedLoRALinear


class Bank:
    """The stacked meta-LoRAs of every LoRA site of `model`, installed in the model."""

    def __init__(self, model, sites: list[Site], size: int, merge: str, seed: int):
        if size < 1 or not sites:
            raise ValueError(f"bank: {size} adapters over {len(sites)} LoRA sites")
        self.model, self.size, self.factors = model, size, merge == "weights"
        device = sites[0].A.device
        self.route = Route(size, device)
        gen = torch.Generator().manual_seed(seed)
        self.layers: list[tuple[str, StackedLoRALinear]] = []
        for site in sites:
            a0 = site.A.detach().float().cpu()
            A = torch.empty(size, *a0.shape)
            A[0] = a0
            for k in range(1, size):  # peft's init of lora_A: kaiming uniform, a = sqrt(5)
                torch.nn.init.kaiming_uniform_(A[k], a=math.sqrt(5), generator=gen)
            B = torch.zeros(size, *site.B.shape)
            layer = StackedLoRALinear(site.layer.base_layer, torch.nn.Parameter(A.to(device)),
                                      torch.nn.Parameter(B.to(device)), site.scaling, site.dropout, self.route)
            layer.train(site.layer.training)
            parent_name, _, attr = site.name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, layer)
            self.layers.append((site.name, layer))

    def set(self, alpha: torch.Tensor) -> None:
        """Route the next forward's rows: row i through sum_k alpha[i, k] of the bank."""
        self.route.set_weights(alpha, factors=self.factors)

    def layout(self, roles: dict[str, str], router: torch.nn.Module, router_role: str) -> Layout:
        """The bank's A / B blocks with `roles` (a LoRA mode's, e.g. ffa: A frozen), then the
        router's blocks (part "router") with `router_role`; sets requires_grad to match."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        blocks = []
        for module, layer in self.layers:
            for part, p in (("A", layer.A), ("B", layer.B)):
                blocks.append(Block(names[id(p)], p, "bank", module, part, roles[part]))
                p.requires_grad_(roles[part] != "frozen")
        for n, p in router.named_parameters():
            blocks.append(Block(f"router.{n}", p, "router", "router", "router", router_role))
            p.requires_grad_(router_role != "frozen")
        layout = Layout([], blocks)
        layout.check_covers(self.model)
        return layout

    def state(self) -> dict[str, torch.Tensor]:
        """The bank's factors by module, to save: <module>.bank_A [N_m, r, in], <module>.bank_B."""
        out = {}
        for module, layer in self.layers:
            out[f"{module}.bank_A"] = layer.A.detach().cpu().contiguous()
            out[f"{module}.bank_B"] = layer.B.detach().cpu().contiguous()
        return out


class Router(torch.nn.Module):
    """alpha = softmax(MLP(h) / temperature): a user's weights over the bank (a linear map when
    `hidden` is 0). Built from `seed`, so every executor starts from the same router."""

    def __init__(self, dim: int, size: int, hidden: int, temperature: float, seed: int):
        super().__init__()
        self.temperature = temperature
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if hidden:
                self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, size))
            else:
                self.net = torch.nn.Linear(dim, size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(h) / self.temperature, dim=-1)
