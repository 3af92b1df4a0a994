"""`executors.compile`: the decoder compiled with torch.compile (graphs kept per set-up: peft
layers to evaluate, fused layers to train; dynamic batch and sequence sizes)."""
from __future__ import annotations

from fedsim.core.capabilities import Capable


class Compiled(Capable):
    name = "compile"
    breaks = {"per_sample_grads": "cannot be combined with privacy.sample_dp (Opacus' per-sample hooks run eagerly)"}


def compile_decoder(model) -> None:
    model.get_base_model().base_model.compile(dynamic=True)
