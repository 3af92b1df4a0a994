"""LoRA adapters via peft, moved around as one flat float32 vector.

Aggregation, clipping and noise all work on flat vectors; the order of the entries is the order of
the trainable parameters in the peft model, which is the same in every actor that builds the same
model with the same LoRA config.

What the flat vector holds depends on `strategy.lora_mode`: its roles per factor (`MODE_ROLES`)
give the parameter layout (`fedsim.models.layout`), whose shared blocks are the vector:

- `separate`: every A and B block (averaged apart by the server, which is inexact:
  mean_k(B_k A_k) != mean_k(B_k) mean_k(A_k)).
- `ffa` (FFA-LoRA): the A blocks are frozen at the shared-seed init (`freeze_lora_A`), so the
  trainable parameters, and the vector, are the B blocks only; averaging B is exact because A is the
  same in every client: mean_k(B_k A) = mean_k(B_k) A.
- `fedsa` (FedSA-LoRA): A and B are trained, only the A blocks are in the vector; each client's B
  stays with the client (`local_params`).
- `stack` (FLoRA): A and B as in `separate`, but the server combines them with
  `stacked_delta_w` (sum_k p_k B_k A_k, exactly) into a dense update of the base weights; the
  `LoraModule` geometry says where each module's A and B lie in the vector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.models.layout import Layout, lora_sites, part_of_name  # noqa: F401 (lora_sites: callers import it here)
from fedsim.schema import ConfigError

PARTS = ("lora_A", "lora_B")


def attach_lora(model, lora_cfg, seed: int):
    from peft import LoraConfig, get_peft_model

    # Every actor seeds the same way so all clients start from the same adapter.
    torch.manual_seed(seed)
    layers = None
    top = getattr(lora_cfg, "top_layers", None)
    if top is not None:
        # Only the last `top` decoder layers get adapters: backward then stops at the first of
        # them, so a step costs a forward plus top/L of a backward.
        depth = model.config.num_hidden_layers
        if not 1 <= top <= depth:
            raise ValueError(f"model.lora.top_layers: {top} must be in [1, {depth}] (the model's decoder layers)")
        layers = list(range(depth - top, depth))
    cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                     target_modules=list(lora_cfg.target_modules), bias="none", layers_to_transform=layers)
    try:
        # get_peft_model leaves the model in train mode (dropout on): an executor whose first call is
        # an evaluation would score with dropout. Training switches to train() itself.
        return get_peft_model(model, cfg).eval()
    except ValueError as e:
        raise ValueError(f"model.lora.target_modules {lora_cfg.target_modules}: {e}") from e


def check_lora_targets(cfg, model_path: str) -> None:
    """Before any actor starts: every `model.lora.target_modules` entry names a layer of the
    model, and `model.lora.top_layers` fits its depth (peft would refuse either inside every
    executor, after Ray has started). Builds the model on the meta device (no weights, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    lora = cfg.model.lora
    try:
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot read the model config of {model_path!r}: "
                          f"{str(e).splitlines()[0]}") from None
    names = [n for n, _ in lm.named_modules() if n]
    # peft matches a plain name against the end of a module's dotted name.
    unknown = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        # What LoRA can adapt: Linear layers (and GPT-2's Conv1D projections).
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ConfigError(f"model.lora.target_modules: {unknown} not among the layers of model.name "
                          f"{cfg.model.name!r}: {', '.join(layers)}")
    depth = getattr(config, "num_hidden_layers", None)
    if lora.top_layers is not None and depth is not None and lora.top_layers > depth:
        raise ConfigError(f"model.lora.top_layers: {lora.top_layers} must be in [1, {depth}] (the model's decoder layers)")


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_layout(model) -> list[tuple[str, int]]:
    """(parameter name, number of entries) for each trainable parameter, in flat-vector order:
    what a postprocessor needs to find a part of the adapter (e.g. every `lora_A` block)."""
    return [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]


def get_flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in params])


@torch.no_grad()
def set_flat(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    n = sum(p.numel() for p in params)
    if flat.numel() != n:
        raise ValueError(f"adapter vector has {flat.numel()} entries, the model's LoRA has {n}")
    i = 0
    for p in params:
        p.copy_(flat[i:i + p.numel()].view_as(p).to(p.device, p.dtype))
        i += p.numel()


def export_state(model, flat: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """peft-format adapter weights and config for `flat`, ready for safetensors + JSON; `extra`:
    LoRA weights held outside the model by their parameter names (a split model's middle layers)."""
    from peft import get_peft_model_state_dict

    set_flat(trainable(model), flat)
    full = {**model.state_dict(), **extra} if extra else None
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, state_dict=full).items()}
    cfg = model.peft_config["default"].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return state, cfg


# ---------------------------------------------------------------------------------------------
# LoRA modes: which parameters are trained, shared and kept local (`fedsim.models.layout` says it;
# these are the names older callers use)

MODE_ROLES = {
    "separate": {"A": "shared", "B": "shared"},
    "stack": {"A": "shared", "B": "shared"},
    "ffa": {"A": "frozen", "B": "shared"},  # A stays at the shared-seed init in every client
    "fedsa": {"A": "shared", "B": "local"},  # each client's B stays with it
}


def mode_layout(model, mode: str) -> Layout:
    """The layout of `strategy.lora_mode` `mode` (sets which factors train)."""
    return Layout.of(model, MODE_ROLES[mode])


def lora_part(name: str) -> str | None:
    """'lora_A' or 'lora_B' for a LoRA factor's parameter name, None for anything else."""
    return part_of_name(name)


def freeze_lora_A(model) -> None:
    """FFA-LoRA: keep every A block at its (shared-seed) initialisation; only B is trained."""
    mode_layout(model, "ffa")


def shared_params(model, mode: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what crosses the wire in `mode`, in flat-vector order."""
    return mode_layout(model, mode).named("shared")


def local_params(model, mode: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what is trained but never leaves the client (fedsa: the B blocks)."""
    return mode_layout(model, mode).named("local")


# ---------------------------------------------------------------------------------------------
# Stacking (FLoRA)


@dataclass(frozen=True)
class LoraModule:
    """Where one LoRA-wrapped linear layer's factors lie in the flat vector (A: r x d_in at offset
    `a`, B: d_out x r at offset `b`), and the base weight (`weight`, its name in the base model's
    state dict, shape d_out x d_in) that delta_W = scaling * B @ A adds to."""
    name: str
    weight: str
    a: int
    b: int
    r: int
    d_in: int
    d_out: int
    scaling: float

    def factors(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A = flat[self.a:self.a + self.r * self.d_in].view(self.r, self.d_in)
        B = flat[self.b:self.b + self.d_out * self.r].view(self.d_out, self.r)
        return A, B

    @property
    def dense_numel(self) -> int:
        return self.d_out * self.d_in


def lora_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every peft LoRA layer with the default adapter, in module order."""
    return [(site.name, site.layer) for site in lora_sites(model)]


def lora_modules(model, layout: Layout | None = None) -> list[LoraModule]:
    """The geometry of every LoRA layer, for a layout whose trainable blocks are exactly the A and
    B factors (offsets are into the flat vector of the trainable blocks)."""
    layout = layout or Layout.of(model)
    offsets = layout.offsets("shared", "local")
    out = []
    for site in layout.sites:
        A, B = site.A, site.B
        if id(A) not in offsets or id(B) not in offsets:
            raise ValueError(f"LoRA layer {site.name}: its A and B must both be trainable to stack them")
        weight = site.name.removeprefix("base_model.model.") + ".weight"
        out.append(LoraModule(site.name, weight, offsets[id(A)], offsets[id(B)], A.shape[0], A.shape[1], B.shape[0],
                              site.scaling))
    if not out:
        raise ValueError("the model has no LoRA layers")
    return out


def module_delta_w(flat: torch.Tensor, modules: list[LoraModule]) -> list[torch.Tensor]:
    """delta_W = scaling * B @ A of each module for one adapter vector (float64)."""
    out = []
    for m in modules:
        A, B = m.factors(flat.double())
        out.append(m.scaling * B @ A)
    return out


def stack_factors(flats: list[torch.Tensor], weights: list[float],
                  modules: list[LoraModule]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FLoRA's stacking, per module: A_s = [p_1 A_1; ...; p_K A_K] (K r x d_in) and
    B_s = [B_1, ..., B_K] (d_out x K r), p_k = w_k / sum(w), so B_s @ A_s = sum_k p_k B_k A_k
    exactly (a rank-K r LoRA). float64."""
    w = torch.tensor(weights, dtype=torch.float64)
    p = w / w.sum()
    out = []
    for m in modules:
        parts = [m.factors(f.double()) for f in flats]
        out.append((torch.cat([pk * A for pk, (A, _) in zip(p, parts)], 0), torch.cat([B for _, B in parts], 1)))
    return out


def stacked_delta_w(flats: list[torch.Tensor], weights: list[float], modules: list[LoraModule]) -> torch.Tensor:
    """sum_k p_k scaling B_k A_k of every module, flattened module after module (float64): the dense
    update the stacked factors make to the base weights."""
    stacked = stack_factors(flats, weights, modules)
    return torch.cat([(m.scaling * Bs @ As).reshape(-1) for m, (As, Bs) in zip(modules, stacked)])


def split_dense(flat: torch.Tensor, modules: list[LoraModule]) -> list[torch.Tensor]:
    """A flat dense update (as `stacked_delta_w` makes) back into one d_out x d_in matrix per module."""
    out, i = [], 0
    for m in modules:
        out.append(flat[i:i + m.dense_numel].view(m.d_out, m.d_in))
        i += m.dense_numel
    if i != flat.numel():
        raise ValueError(f"dense update has {flat.numel()} entries, the LoRA modules cover {i}")
    return out
