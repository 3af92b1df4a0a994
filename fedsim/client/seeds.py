"""Seeds as pure functions of (seed, client, round)."""
from __future__ import annotations


def client_seed(seed: int, client: int, round: int) -> int:
    # Batches and dropout depend only on (seed, client, round): not on which actor runs the
    # client, nor on whether the run was resumed.
    return (seed * 1_000_003 + client * 10_007 + round) % (2**31)
