"""Client-level DP-FedAvg (McMahan et al., "Learning differentially private recurrent language
models", 2018) as a postprocessor.

- Client hook: clip the client's delta to L2 norm `clip` (C) and set its aggregation weight to 1.
- Server hook: the strategy's uniform mean over the m sampled clients gets N(0, (z C / m)^2) noise
  per entry, and the accountant records one subsampled Gaussian step with q = m / N. A round with
  no client (Poisson sampling) still gets its noise and its accountant step: the aggregator hands
  the strategy a zero update (`noise_every_round`), since an un-noised round would tell that no one
  took part.

What is protected is a whole client (all of its data, add/remove adjacency): its contribution to
the sum of clipped updates is at most C, so the mean over m moves by at most C / m, the
sensitivity the noise is scaled to. That bound holds only for a *uniform* mean: a sample-weighted
mean would let a client with many rows move the model by up to C * n_k / sum(n), and the weights
themselves would reveal the clients' data sizes. Hence weight 1 for every client.

m is the configured number of clients per round (`clients.per_round`), not the number that
reported, nor, with `clients.sampling: poisson`, the number drawn: the denominator must not depend
on the data (nor on who took part or dropped out), so the strategy's mean over the r reporting
clients is rescaled by r / m (the fixed-denominator estimator of McMahan et al.) before the noise is
added. The accountant assumes Poisson sampling with rate q = m / N: exact with `clients.sampling:
poisson` (or q = 1), the usual approximation for the default fixed-size sampling without replacement.
"""
from __future__ import annotations


import torch

from fedsim.core.hooks import Postprocessor
from fedsim.core.update import ClientContext, RoundContext
from fedsim.privacy import noise_seed
from fedsim.privacy.accountant import calibrate_noise, epsilon_for, make_accountant
from fedsim.schema import clients_per_round

NOISE_TAG = 0xC11E


def clip_to(v: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """`v` scaled down (never up) to L2 norm <= clip; returns it and v's norm before clipping."""
    norm = float(v.double().norm())
    if norm <= clip:
        return v, norm
    # The (1 + 1e-6) keeps float32 rounding from leaving the result a hair above `clip`.
    return v * (clip / (norm * (1 + 1e-6))), norm


class ClientDP(Postprocessor):
    name = "client_dp"
    # The noise is scaled to a uniform mean of clipped updates, taken once per round; a rule that
    # mixes updates otherwise (or finishes one step per client) breaks the bound.
    needs = {"mean_of_updates": "needs strategy.name 'fedavg' (DP-FedAvg), not {value!r}"}
    noise_every_round = True

    def __init__(self, cfg):
        p = cfg.privacy.client_dp
        self.clip, self.delta, self.kind = p.clip, p.delta, p.accountant
        self.target_epsilon = p.epsilon
        self._noise_multiplier = p.noise_multiplier
        self.num_clients = cfg.clients.num
        self.rounds = cfg.train.rounds
        self.per_round = clients_per_round(cfg)
        self.sample_rate = self.per_round / cfg.clients.num
        self.accountant = make_accountant(self.kind)
        self.generator = torch.Generator().manual_seed(noise_seed(cfg.train.seed, NOISE_TAG))

    @property
    def noise_multiplier(self) -> float:
        # Calibrated on first use: the driver's describe() runs it before any actor starts, so an
        # unreachable target fails there; executors, which only clip, never pay for it.
        if self._noise_multiplier is None:
            self._noise_multiplier = calibrate_noise(
                self.target_epsilon, self.delta, self.sample_rate, self.rounds, self.kind,
                key="privacy.client_dp.epsilon", unit="rounds")
        return self._noise_multiplier

    def on_client_update(self, delta: torch.Tensor, weight: float, ctx: ClientContext):
        clipped, norm = clip_to(delta, self.clip)
        # Uniform weights: see the module docstring (a weighted mean breaks the sensitivity bound).
        # `dp/clipped` is a simulation diagnostic for tuning C, not part of what a client releases.
        return clipped, 1.0, {"dp/clipped": float(norm > self.clip)}

    def on_server_aggregate(self, step: torch.Tensor, ctx: RoundContext):
        m = self.per_round
        if ctx.num_reported != m:  # mean over the r reporters -> sum / m
            step = step * (ctx.num_reported / m)
        z = self.noise_multiplier
        std = z * self.clip / m
        noise = torch.normal(0.0, std, size=step.shape, generator=self.generator, dtype=torch.float32)
        self.accountant.step(z, self.sample_rate)
        metrics = {"dp/epsilon": self.accountant.get_epsilon(self.delta), "dp/noise_std": std}
        # Noise against signal, a simulation diagnostic outside the guarantee (like dp/clipped). The
        # norms' ratio is large even where DP costs nothing (the noise spreads over all d entries);
        # what predicts the cost is the per-entry std left after R rounds, sqrt(R) * noise_std,
        # against benchmarks/noise_tolerance.py's yardstick (docs/privacy.md).
        update_norm, noise_norm = float(step.double().norm()), float(noise.double().norm())
        metrics.update({"dp/update_norm": update_norm, "dp/noise_norm": noise_norm})
        if update_norm > 0:
            metrics["dp/noise_to_update"] = noise_norm / update_norm
        return step + noise.to(step.device, step.dtype), metrics

    def params(self) -> dict:
        z = self.noise_multiplier
        out = {"dp/noise_multiplier": z, "dp/sample_rate": self.sample_rate, "dp/delta": self.delta,
               "dp/accountant": self.kind, "dp/clip": self.clip,
               # What the whole run will have spent if every round samples the configured m.
               "dp/planned_epsilon": epsilon_for(z, self.sample_rate, self.rounds, self.delta, self.kind)}
        if self.target_epsilon is not None:
            out["dp/target_epsilon"] = self.target_epsilon
        return out

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(), "generator": self.generator.get_state(),
                "noise_multiplier": self._noise_multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.generator.set_state(state["generator"])
        if state.get("noise_multiplier") is not None:
            self._noise_multiplier = state["noise_multiplier"]
