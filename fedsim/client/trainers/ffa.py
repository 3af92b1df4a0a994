"""`strategy.lora_mode: ffa` (FFA-LoRA): A is frozen at the shared-seed init (the same in every
executor), only B is trained and uploaded; averaging B is exact because A is shared:
mean_k(B_k A) = mean_k(B_k) A."""
from __future__ import annotations

from fedsim.client.trainers.base import Adapter


class FFA(Adapter):
    name = "ffa"
    roles = {"A": "frozen", "B": "shared"}
    provides = frozenset({"whole_adapter", "mean_of_updates", "layer_split"})
