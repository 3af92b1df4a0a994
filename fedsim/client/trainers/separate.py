"""`strategy.lora_mode: separate`: every A and B block is trained and uploaded; the server
averages them apart (inexact: mean_k(B_k A_k) != mean_k(B_k) mean_k(A_k))."""
from __future__ import annotations

from fedsim.client.trainers.base import Adapter


class Separate(Adapter):
    name = "separate"
    roles = {"A": "shared", "B": "shared"}
