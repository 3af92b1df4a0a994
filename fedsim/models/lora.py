"""LoRA adapters via peft, moved around as one flat float32 vector.

Aggregation, clipping and noise all work on flat vectors; the order of the entries is the order of
the trainable parameters in the peft model, which is the same in every actor that builds the same
model with the same LoRA config.
"""
from __future__ import annotations

import torch


def attach_lora(model, lora_cfg, seed: int):
    from peft import LoraConfig, get_peft_model

    # Every actor seeds the same way so all clients start from the same adapter.
    torch.manual_seed(seed)
    cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                     target_modules=list(lora_cfg.target_modules), bias="none")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise ValueError(f"model.lora.target_modules {lora_cfg.target_modules}: {e}") from e


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


def export_state(model, flat: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """peft-format adapter weights and config for `flat`, ready for safetensors + JSON."""
    from peft import get_peft_model_state_dict

    set_flat(trainable(model), flat)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    cfg = model.peft_config["default"].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return state, cfg
