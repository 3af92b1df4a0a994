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

import contextlib
import math

import torch
import torch.nn.functional as F

from fedsim.models.fused import StackedGroup
from fedsim.models.layout import Block, Layout, Site
from fedsim.models.routing import Route, StackedLoRALinear


class Bank:
    """The stacked meta-LoRAs of every LoRA site of `model`, installed in the model."""

    def __init__(self, model, sites: list[Site], size: int, merge: str, seed: int):
        if size < 1 or not sites:
            raise ValueError(f"bank: {size} adapters over {len(sites)} LoRA sites")
        self.model, self.size, self.factors = model, size, merge == "weights"
        self.fused = False  # while a FusedBank's layers stand in for the bank's (fused training)
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


def routing_entropy(alpha: torch.Tensor) -> torch.Tensor:
    """[rows] entropy of each row's weights over the bank (0: one meta-LoRA; log N_m: uniform)."""
    a = alpha.detach()
    return -(a * a.clamp_min(1e-12).log()).sum(1)


class FusedBank(StackedGroup):
    """Fused training of C clients' banks and routers (`executors.fused` with `model.personal`):
    one forward over a batch of every client's rows, row i of client c through its own client's
    mix, weight alpha_ik on adapter c * N_m + k of a [C, N_m, ...] stack and 0 on every other
    client's, alpha from client c's own router (its slot of the stacked router weights). A zero
    weight adds an exact 0, so each client's gradient is its own mean loss's, as for `FusedLoRA`.
    `user_vectors(rows)`: h_u of one client's rows (its frozen CRM's)."""

    def __init__(self, bank: Bank, router: torch.nn.Module, num_clients: int, trainable: list[torch.nn.Parameter],
                 user_vectors):
        self.bank, self.router, self.user_vectors = bank, router, user_vectors
        factors = [p for _, layer in bank.layers for p in (layer.A, layer.B)] + list(router.parameters())
        super().__init__(factors, trainable, num_clients, "a bank factor or the router")
        self.route = Route(num_clients * bank.size, self.weight.device)
        self.idx = self.counts = None
        self.entropy: list[list[float]] = [[] for _ in range(num_clients)]  # per slot, per step

    def set_rows(self, counts: list[int], rows) -> None:
        C, N = self.num_clients, self.bank.size
        self.counts = torch.tensor(counts, dtype=torch.long)
        self.idx = torch.repeat_interleave(torch.arange(C), self.counts).to(self.weight.device)
        blocks, start = [], 0
        for slot, n in enumerate(counts):
            if not n:
                continue
            h = self.user_vectors(rows.iloc[start:start + n])
            own = {name: self.stacked[id(p)][slot] for name, p in self.router.named_parameters()}
            alpha = torch.func.functional_call(self.router, own, (h,))
            self.entropy[slot].append(float(routing_entropy(alpha).mean()))
            blocks.append(F.pad(alpha, (slot * N, (C - slot - 1) * N)))
            start += n
        self.route.set_weights(torch.cat(blocks), factors=self.bank.factors)

    def metrics(self, slot: int) -> dict:
        e = self.entropy[slot]
        return {"personal/alpha_entropy": sum(e) / len(e)} if e else {}

    @contextlib.contextmanager
    def installed(self):
        """The model runs through every client's stacked bank inside the block, its own bank after it."""
        layers = []
        for name, layer in self.bank.layers:
            fused = StackedLoRALinear(layer.base, self.stacked[id(layer.A)], self.stacked[id(layer.B)],
                                      layer.scaling, layer.dropout, self.route)
            layers.append((name, fused.train(layer.training)))
        self.bank.fused = True
        try:
            with self.swapped(self.bank.model, layers):
                yield self
        finally:
            self.bank.fused = False
