"""Privacy accountants behind one small interface, backed by Opacus' RDP and PRV accountants.

An accountant is a pure record of the mechanisms run so far: a list of (noise multiplier, sample
rate, steps) entries, each a Poisson-subsampled Gaussian mechanism repeated `steps` times. Epsilon
is computed from that record on demand, so the state is just the list (cheap to checkpoint, exact
to restore). Both accountants assume add/remove-one adjacency of whatever unit the caller protects
(a record for DP-SGD, a whole client for DP-FedAvg).

`calibrate_noise` finds the smallest noise multiplier (to within 1 % of the target epsilon) that
keeps a whole run within a target epsilon, with the same kind of accountant the run reports with.
"""
from __future__ import annotations

import functools
import math
import warnings

from fedsim.schema import ConfigError
KINDS = ("rdp", "prv")
MAX_NOISE = 1000.0


class Accountant:
    """Composition of subsampled Gaussian mechanisms; `kind` picks Opacus' RDP or PRV analysis."""

    def __init__(self, kind: str = "rdp"):
        if kind not in KINDS:
            raise ValueError(f"accountant {kind!r} is not one of {', '.join(map(repr, KINDS))}")
        self.kind = kind
        self.history: list[tuple[float, float, int]] = []
        self._cache: tuple | None = None

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` runs of the Gaussian mechanism with this noise multiplier and sample rate."""
        if noise_multiplier < 0 or not 0 <= sample_rate <= 1 or steps < 0:
            raise ValueError(f"bad mechanism: noise_multiplier={noise_multiplier}, sample_rate={sample_rate}, "
                             f"steps={steps}")
        if steps == 0:
            return
        z, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (z, q):
            self.history[-1] = (z, q, self.history[-1][2] + int(steps))
        else:
            self.history.append((z, q, int(steps)))

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta (0 before any step, inf if any step had no noise)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        live = [(z, q, s) for z, q, s in self.history if q > 0 and s > 0]
        if not live:
            return 0.0
        if any(z == 0 for z, _, _ in live):
            return math.inf
        key = (tuple(live), delta)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _epsilon(self.kind, key[0], delta))
        return self._cache[1]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"saved accountant is {state['kind']!r}, this one is {self.kind!r}")
        self.history = [(float(z), float(q), int(s)) for z, q, s in state["history"]]
        self._cache = None


def make_accountant(kind: str = "rdp") -> Accountant:
    return Accountant(kind)


@functools.lru_cache(maxsize=256)
def _epsilon(kind: str, history: tuple, delta: float) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=kind)
    acc.history = list(history)
    with warnings.catch_warnings():
        # RDP warns when the best order is at the edge of its grid; PRV warns on log(0) at q = 1.
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float, kind: str = "rdp") -> float:
    acc = Accountant(kind)
    acc.step(noise_multiplier, sample_rate, steps)
    return acc.get_epsilon(delta)


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
                    key: str = "epsilon", unit: str = "steps", rtol: float = 0.01) -> float:
    """The smallest noise multiplier z (found by bisection) with epsilon(z) <= target_epsilon and
    within `rtol` of it, for `steps` subsampled Gaussian steps at `sample_rate`.

    `key` names the config key the target came from and `unit` what a step is, for the error
    raised when the target cannot be reached (epsilon <= 0, or z would exceed MAX_NOISE).
    """
    where = f"with delta={delta:g} in {steps} {unit} at sample rate {sample_rate:g}"
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ConfigError(f"{key}: {target_epsilon!r} must be a finite number > 0")
    if not 0 < delta < 1:
        raise ConfigError(f"{key}: cannot calibrate with delta={delta!r}: delta must be in (0, 1)")
    if steps < 1 or not 0 < sample_rate <= 1:
        raise ConfigError(f"{key}: cannot calibrate noise for {steps} {unit} at sample rate {sample_rate!r}")
    eps = lambda z: epsilon_for(z, sample_rate, steps, delta, accountant)  # noqa: E731
    # Epsilon falls as the noise grows, but not to 0 (RDP's conversion has a floor): a target
    # below epsilon at the largest noise allowed is unreachable.
    if eps(MAX_NOISE) > target_epsilon:
        raise ConfigError(f"{key}: {target_epsilon:g} cannot be reached {where} "
                         f"(noise multiplier would exceed {MAX_NOISE:g})")
    lo, hi = 0.0, 1.0
    while (e_hi := eps(hi)) > target_epsilon:
        lo, hi = hi, min(hi * 2, MAX_NOISE)
    # Invariant: eps(lo) > target >= eps(hi) (eps(0) is inf); shrink until eps(hi) is close.
    while target_epsilon - e_hi > rtol * target_epsilon and hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e <= target_epsilon:
            hi, e_hi = mid, e
        else:
            lo = mid
    return hi
