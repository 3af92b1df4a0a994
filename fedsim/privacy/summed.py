"""What the "server sees only the sum" protocols share (pairwise masks in `secagg`, CKKS in `he`).

A client sends x = (w * delta, w): its weighted update with the weight itself as the last entry, so
the weights are hidden too. The server opens only sum_i x_i = (sum w_i delta_i, sum w_i) and hands
the strategy one update, delta = sum w_i delta_i / sum w_i with weight 1: FedAvg's weighted mean of
that single update is the weighted mean of the clients' deltas, as without the protocol.
"""
from __future__ import annotations

import numpy as np
import torch

from fedsim.core.update import Update


def weighted_with_weight(delta: torch.Tensor, weight: float) -> np.ndarray:
    d = delta.detach().cpu().double().numpy()
    x = np.empty(len(d) + 1, dtype=np.float64)
    np.multiply(d, float(weight), out=x[:-1])
    x[-1] = float(weight)
    return x


def one_update(total: np.ndarray, updates: list, round: int, who: str, metrics: dict):
    """The strategy's single update from the opened sum of the reporting clients' x."""
    weight_sum = float(total[-1])
    if not weight_sum > 0:
        raise ValueError(f"{who}: round {round + 1}: the reporting clients' weights sum to {weight_sum}")
    step = torch.from_numpy(total[:-1] / weight_sum).float()
    return Update(client=-1, delta=step, num_samples=sum(u.num_samples for u in updates), weight=1.0,
                  metrics=metrics), weight_sum
