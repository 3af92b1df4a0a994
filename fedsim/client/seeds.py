"""Seeds as pure functions of (seed, client, round)."""
from __future__ import annotations


def client_seed(seed: int, client: int, round: int) -> int:
    # Batches and dropout depend only on (seed, client, round): not on which actor runs the
    # client, nor on whether the run was resumed.
    return (seed * 1_000_003 + client * 10_007 + round) % (2**31)


# Seed streams that are not a training round: each is a "round" far past any real one, so its draws
# never coincide with a round's batches or dropout.
AUDIT_STREAM = 10**6             # the membership audit's member / non-member sample
INTERIM_EVAL_STREAM = 10**6 + 1  # the rows an interim evaluation scores (eval.interim_rows)
HOLDOUT_STREAM = 10**6 + 2       # the train rows privacy.audit.holdout keeps out of training
