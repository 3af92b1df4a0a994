"""The update a client sends and the contexts hooks see: shared by the client executor, the
aggregator, the strategies and the privacy mechanisms, so none of them has to import another."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# Server-side postprocessing of an aggregated step (e.g. central DP noise): step -> (step, metrics).
Finish = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]


def no_finish(step: torch.Tensor) -> tuple[torch.Tensor, dict]:
    return step, {}


@dataclass
class Update:
    client: int
    delta: torch.Tensor
    num_samples: int
    weight: float  # aggregation weight: the sample count unless a postprocessor changed it
    metrics: dict = field(default_factory=dict)


@dataclass
class ClientContext:
    client: int
    round: int
    num_samples: int
    num_sampled: int  # m: clients sampled this round
    num_clients: int  # N: clients in the population
    # This client's persistent state for client hooks (e.g. a privacy accountant), kept in the
    # client's store between rounds; hooks read and update it in place under their own key.
    state: dict = field(default_factory=dict)
    sampled: list[int] = field(default_factory=list)  # the ids of the clients sampled this round


@dataclass
class RoundContext:
    round: int
    num_sampled: int
    num_reported: int
    num_clients: int
    sampled: list[int] = field(default_factory=list)  # the ids of the clients sampled this round
