"""`strategy.lora_mode: ffa` (FFA-LoRA): A is frozen at the shared-seed init (the same in every
executor), only B is trained and uploaded; averaging B is exact because A is shared:
mean_k(B_k A) = mean_k(B_k) A."""
from __future__ import annotations

from fedsim.client.trainers.base import Adapter


class FFA(Adapter):
    name = "ffa"
    roles = {"A": "frozen", "B": "shared"}
    breaks = {"both_parts_uploaded": ("cannot be combined with privacy.dp_lora, which clips the A and B parts of an upload apart; "
                                        "'ffa' uploads only one of them (use privacy.client_dp)")}
