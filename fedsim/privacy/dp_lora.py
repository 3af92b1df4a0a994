"""DP-LoRA: a local Gaussian mechanism on each client's update, with the LoRA A and B parts clipped
and noised separately before upload.

The A blocks (every `lora_A` weight, all layers together) and the B blocks each get clipped to L2
norm `clip` (C) and N(0, (z C)^2) noise per entry. Clipping the parts apart keeps the small B
update (peft starts B at zero) from being drowned by A's larger norm under one joint clip.

Accounting: each upload releases two Gaussian mechanisms of sensitivity C and noise z C on the
client's whole data, with no sampling amplification (the client knows it is sending): per round it
participates, its accountant records 2 steps at sample rate 1. The epsilon reported
(`dp_lora/epsilon`) is that client's local guarantee over the rounds it took part in so far. The
accountant's state lives in the client's persistent state (`ClientContext.state`), which the
executor keeps in the client's store, so a restarted actor or a resumed run continues it.
"""
from __future__ import annotations

import torch

from fedsim.core.hooks import Postprocessor
from fedsim.core.update import ClientContext
from fedsim.models.layout import part_of_name
from fedsim.privacy import noise_seed
from fedsim.privacy.accountant import make_accountant
from fedsim.privacy.client_dp import clip_to

NOISE_TAG = 0xD910
PARTS = ("lora_A", "lora_B")


def part_masks(layout: list[tuple]) -> dict[str, torch.Tensor]:
    """Boolean masks over the flat adapter vector: which entries are LoRA A, which are LoRA B.
    `layout`: (name, entries, part) per block as `fedsim.models.layout.Layout.flat_parts` gives it
    (part "A" / "B"); a bare (name, entries) pair has its part read from the name."""
    n = sum(block[1] for block in layout)
    masks = {p: torch.zeros(n, dtype=torch.bool) for p in PARTS}
    i = 0
    for name, k, *part in layout:
        hit = f"lora_{part[0]}" if part else part_of_name(name)
        if hit not in masks:
            raise ValueError(f"privacy.dp_lora: trainable parameter {name!r} is neither a lora_A nor a lora_B "
                             f"weight; DP-LoRA needs an adapter made only of LoRA A and B blocks")
        masks[hit][i:i + k] = True
        i += k
    if not all(m.any() for m in masks.values()):
        raise ValueError("privacy.dp_lora: the adapter has no lora_A or no lora_B weights")
    return masks


class DPLoRA(Postprocessor):
    name = "dp_lora"
    needs = {"both_parts_uploaded": "clips the A and B parts of an upload apart; {key} {value!r} uploads only one"}

    def __init__(self, cfg, layout: list[tuple] | None = None):
        p = cfg.privacy.dp_lora
        self.clip, self.noise_multiplier, self.delta = p.clip, p.noise_multiplier, p.delta
        self.seed = cfg.train.seed
        self.masks = part_masks(layout) if layout is not None else None

    def on_client_update(self, delta: torch.Tensor, weight: float, ctx: ClientContext):
        if self.masks is None:
            raise RuntimeError("DPLoRA needs the adapter layout: build_postprocessors(cfg, layout=Layout.flat_parts(...))")
        gen = torch.Generator().manual_seed(noise_seed(self.seed, ctx.client, ctx.round, NOISE_TAG))
        out = delta.clone()
        metrics = {}
        for part, mask in self.masks.items():
            clipped, norm = clip_to(delta[mask], self.clip)
            noise = torch.normal(0.0, self.noise_multiplier * self.clip, size=clipped.shape, generator=gen)
            out[mask] = clipped + noise.to(clipped.dtype)
            metrics[f"dp_lora/clipped_{part[-1]}"] = float(norm > self.clip)  # diagnostic for tuning C
        acc = make_accountant("rdp")
        if "dp_lora" in ctx.state:
            acc.load_state_dict(ctx.state["dp_lora"])
        acc.step(self.noise_multiplier, 1.0, steps=len(PARTS))
        ctx.state["dp_lora"] = acc.state_dict()
        metrics["dp_lora/epsilon"] = acc.get_epsilon(self.delta)
        return out, weight, metrics

    def params(self) -> dict:
        return {"dp_lora/noise_multiplier": self.noise_multiplier, "dp_lora/clip": self.clip,
                "dp_lora/delta": self.delta, "dp_lora/accountant": "rdp"}
