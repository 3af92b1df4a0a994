"""Differential privacy for fedsim: accountants, client-level DP-FedAvg, DP-LoRA (local noise on
the LoRA A and B parts of an update) and record-level DP-SGD on each client (Opacus); and two ways
for the server to see only the sum of the updates: secure aggregation with pairwise additive masks
(`secagg`) and homomorphic aggregation with CKKS (`he`), sharing `summed`.

Config: the `privacy` section (`privacy.client_dp`, `privacy.dp_lora`, `privacy.sample_dp`,
`privacy.secagg`, `privacy.he`, `privacy.audit`); the postprocessors are put in the chain by
`fedsim.postprocessors.build_postprocessors`.
"""
from __future__ import annotations

import numpy as np


def noise_seed(*keys: int) -> int:
    """A seed for one noise stream, a function of its keys only (e.g. run seed, client, round, a
    mechanism tag), so the noise does not depend on which actor draws it or on a resume."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] % (2**63))
