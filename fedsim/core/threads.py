"""One torch thread for small CPU models (the baselines' MF, RecLoRA's CRMs)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_thread():
    # Ops on small tensors (up to ~80k x 16) gain little from intra-op threads, and on a busy 2-core
    # machine (Ray workers alongside) thread spinning made training ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
