"""The learning-rate schedule over a run's federated time: a pure function of (round, local step).

A client's local step s in round r is global step r * steps + s of rounds * steps, whichever
rounds the client was sampled in, so the schedule is the same for a resumed run, for any actor,
and for clients trained fused or one by one. Warm-up then decay (a one-cycle shape) lets a short
run use a peak lr that would overshoot from the first step: with batch 4 and a constant 5e-3 the
quickstart's round-1 loss sat above ln 2.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, warmup: float, step: int, total: int) -> float:
    """Multiplier of the base lr at global step `step` (0-based) of `total`: linear warm-up over
    the first `warmup` fraction of the steps, then constant, linear or cosine decay towards 0."""
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    # The last step keeps a small lr (progress < 1): a step at lr 0 would be wasted work.
    progress = (step - warm) / max(1, total - warm)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {schedule!r}")


def client_lr(train_cfg, base_lr: float, round: int, step: int, steps: int) -> float:
    """The lr of local step `step` (of `steps` this round) in `round` for a client whose base lr
    (after the aggregator's per-client rule) is `base_lr`."""
    total = train_cfg.rounds * steps
    return base_lr * lr_factor(train_cfg.schedule, train_cfg.warmup, round * steps + step, total)
