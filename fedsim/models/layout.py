"""The parameter layout: what is trainable and how it is grouped, said once, explicitly.

Every LoRA-wrapped layer of a peft model is a *site* (the layer, its A and B factors for one
adapter). A *block* is one factor of one site with its group labels:

    adapter  the peft adapter name ("default"; APA's shards / RecLoRA's bank add more)
    module   the wrapped layer's name
    part     "A" or "B"
    role     "shared" (uploaded and aggregated), "local" (trained, kept private in the client's
             store: fedsa's B, a split model's client-side layers) or "frozen" (not trained: ffa's A)

The flat adapter vector of a role is its blocks' parameters concatenated in block order, which is
the order of `model.parameters()` (sites in module order, A before B), so every actor that builds
the same model agrees on it. The sites are found from the module structure (`lora_A` /
`lora_B` / `base_layer` attributes), not by parsing parameter names; `part_of_name` is kept only
for callers that still hand over (name, numel) lists.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

ROLES = ("shared", "local", "frozen")


@dataclass(frozen=True)
class Site:
    name: str  # the LoRA-wrapped layer's module name
    layer: torch.nn.Module
    adapter: str

    @property
    def A(self) -> torch.nn.Parameter:
        return self.layer.lora_A[self.adapter].weight

    @property
    def B(self) -> torch.nn.Parameter:
        return self.layer.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def dropout(self) -> float:
        return float(getattr(self.layer.lora_dropout[self.adapter], "p", 0.0))


@dataclass(frozen=True)
class Block:
    name: str  # the parameter's name in the model (peft's state-dict key)
    param: torch.nn.Parameter
    adapter: str
    module: str
    part: str  # "A" | "B"
    role: str  # "shared" | "local" | "frozen"

    @property
    def numel(self) -> int:
        return self.param.numel()


def lora_sites(model, adapter: str = "default") -> list[Site]:
    """Every peft LoRA layer holding `adapter`, in module order."""
    return [Site(n, m, adapter) for n, m in model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer") and adapter in m.lora_A]


class Layout:
    """The blocks of a model's adapter and their roles; `params(role)` / `flat_parts(role)` are
    what the executor trains, uploads and keeps, and what DP-LoRA clips part by part."""

    def __init__(self, sites: list[Site], blocks: list[Block]):
        self.sites, self.blocks = sites, blocks

    @classmethod
    def of(cls, model, roles: dict[str, str] | None = None, adapter: str = "default") -> "Layout":
        """The layout of `model`'s LoRA with each part's role (e.g. {"A": "frozen", "B": "shared"}),
        setting `requires_grad` to match (frozen: False); without `roles`, the model as it is
        (trainable factors shared, the others frozen)."""
        sites = lora_sites(model, adapter)
        if not sites:
            raise ValueError("the model has no LoRA layers")
        names = {id(p): n for n, p in model.named_parameters()}
        blocks = []
        for s in sites:
            for part, p in (("A", s.A), ("B", s.B)):
                role = roles[part] if roles else ("shared" if p.requires_grad else "frozen")
                blocks.append(Block(names[id(p)], p, adapter, s.name, part, role))
                p.requires_grad_(role != "frozen")
        layout = cls(sites, blocks)
        layout.check_covers(model)
        return layout

    def check_covers(self, model) -> None:
        """Every trainable parameter of the model is a block (so the flat vectors cover them all)."""
        mine = {id(b.param) for b in self.blocks}
        odd = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in mine]
        if odd:
            raise ValueError(f"trainable parameter {odd[0]!r} is neither a lora_A nor a lora_B weight of the "
                             f"adapter layout")

    def with_roles(self, role_of) -> "Layout":
        """The same blocks with `role_of(block)` as their role (e.g. by layer, for a split model)."""
        return Layout(self.sites, [replace(b, role=role_of(b)) for b in self.blocks])

    def select(self, *roles: str) -> list[Block]:
        return [b for b in self.blocks if b.role in roles]

    def params(self, *roles: str) -> list[torch.nn.Parameter]:
        return [b.param for b in self.select(*roles)]

    def named(self, *roles: str) -> list[tuple[str, torch.nn.Parameter]]:
        return [(b.name, b.param) for b in self.select(*roles)]

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return self.params("shared", "local")

    def flat_parts(self, *roles: str) -> list[tuple[str, int, str]]:
        """(name, entries, part) of each block of the roles' flat vector, in order."""
        return [(b.name, b.numel, b.part) for b in self.select(*roles)]

    def offsets(self, *roles: str) -> dict[int, int]:
        """id(parameter) -> its offset in the roles' flat vector."""
        out, i = {}, 0
        for b in self.select(*roles):
            out[id(b.param)] = i
            i += b.numel
        return out


def part_of_name(name: str) -> str | None:
    """'lora_A' or 'lora_B' from a peft parameter name, None for anything else: for callers that
    only have (name, numel) pairs (the one place the naming convention is read)."""
    hits = [p for p in ("lora_A", "lora_B") if f".{p}." in f".{name}."]
    return hits[0] if len(hits) == 1 else None
