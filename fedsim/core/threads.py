"""torch's intra-op threads for a block: one for small CPU models (the baselines' MF, RecLoRA's
CRMs), the run's executor cores for work the driver does while its executors wait (APA's
hidden states and shard merge)."""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread():
    # Ops on small tensors (up to ~80k x 16) gain little from intra-op threads, and on a busy 2-core
    # machine (Ray workers alongside) thread spinning made training ~10x slower.
    return threads(1)


def executor_threads(cfg) -> int:
    """The threads a run's executors hold in all (each max(1, int(executors.num_cpus))), at most
    this machine's cores, or the process's own when it has more: a driver that works while every
    executor waits may use them (a Tune trial holds 0.5 CPU, so Ray gives it 1 thread)."""
    n = (cfg.executors.num or cfg.clients.num) * max(1, int(cfg.executors.num_cpus))
    return max(torch.get_num_threads(), min(n, os.cpu_count() or 1))
