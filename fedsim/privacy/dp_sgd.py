"""Record-level DP-SGD on each client (Abadi et al. 2016) with Opacus.

Per local step: a Poisson-sampled batch (each of the client's n train rows independently with
probability q = batch_size / n), per-sample gradients of the LoRA parameters, each clipped to
L2 norm `max_grad_norm` (C), summed, N(0, (z C)^2) noise added, divided by the expected batch size
q n, then the client's own optimizer (AdamW) steps. What is protected is one training row of one
client (add/remove adjacency), over every local step the client ever runs.

Opacus pieces: `GradSampleHooks` attaches per-sample-gradient hooks to the model in place (no
wrapper module, so `fedsim.models.scoring.yes_no_logits`, which calls the peft model's inner
decoder, works unchanged); only modules with trainable parameters get hooks, which are the LoRA
A/B `nn.Linear` layers (the base is frozen). `DPOptimizer` wraps the AdamW of each local training
call. The model must be on its device before peft wraps it and the hooks attach
(`fedsim.models.loader.load_base` moves it first).

Each client's accountant (history of (z, q, steps)) is kept in the client's persistent state in
the executor's client store, so the epsilon a client has spent (`dp/sample_epsilon`) carries over
rounds, actor restarts and resumed runs. With `epsilon` set, z is calibrated per client from its
own q, for train.rounds x local steps steps (as if the client took part in every round, so it
cannot overspend however often it is sampled).
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch

from fedsim.models.lora import trainable
from fedsim.privacy import noise_seed
from fedsim.privacy.accountant import calibrate_noise, make_accountant

NOISE_TAG = 0x5D9


def poisson_batch(rng: np.random.Generator, num_rows: int, sample_rate: float) -> np.ndarray:
    """Indices of a Poisson-sampled batch: each row in with probability `sample_rate` (may be empty)."""
    return np.flatnonzero(rng.random(num_rows) < sample_rate)


def dp_optimizer(opt: torch.optim.Optimizer, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, seed: int):
    """`opt` wrapped by Opacus' DPOptimizer, its noise from a generator seeded with `seed`."""
    from opacus.optimizers import DPOptimizer

    device = opt.param_groups[0]["params"][0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    return DPOptimizer(opt, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                       expected_batch_size=expected_batch_size, loss_reduction="mean", generator=gen)


def dp_step(dp_opt, params: list[torch.nn.Parameter], loss_of: Callable[[np.ndarray], torch.Tensor],
            idx: np.ndarray) -> float | None:
    """One DP-SGD step on the batch `idx`; returns its loss, None for an empty batch (which still
    takes a noise-only step, as Poisson sampling requires)."""
    loss = None
    if len(idx):
        out = loss_of(idx)  # mean over the batch: the hooks and DPOptimizer are set for "mean"
        with warnings.catch_warnings():
            # The first LoRA layer's input comes from the frozen embedding and needs no gradient,
            # which torch remarks on at every backward; the hooks only need the output gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            out.backward()
        loss = out.item()
    else:
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    dp_opt.step()
    dp_opt.zero_grad(set_to_none=True)
    return loss


class SampleDP:
    """DP-SGD for one executor's model (shared by the virtual clients the executor serves)."""

    def __init__(self, model, cfg):
        from opacus.grad_sample import GradSampleHooks

        self.p = cfg.privacy.sample_dp
        self.rounds = cfg.train.rounds
        self.batch_size = cfg.train.batch_size
        self.seed = cfg.train.seed
        self.params = trainable(model)
        # strict: refuse trainable modules with buffers (their per-sample gradients are not private).
        self.hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)

    def sample_rate(self, num_rows: int) -> float:
        return min(1.0, self.batch_size / num_rows)

    def expected_samples(self, num_rows: int, steps: int) -> float:
        """Rows a client's local training uses in expectation; a data-independent aggregation
        weight (the actual count of a Poisson-sampled run would leak membership)."""
        return self.sample_rate(num_rows) * num_rows * steps

    def noise_multiplier(self, num_rows: int, local_steps: int) -> float:
        if self.p.noise_multiplier is not None:
            return self.p.noise_multiplier
        return calibrate_noise(self.p.epsilon, self.p.delta, self.sample_rate(num_rows), self.rounds * local_steps,
                               self.p.accountant, key="privacy.sample_dp.epsilon",
                               unit=f"local steps (train.rounds={self.rounds} x {local_steps})")

    def begin(self, opt: torch.optim.Optimizer, num_rows: int, steps: int, client: int, round: int,
              state: dict) -> "DPRun":
        """One client's DP-SGD run: its noise multiplier, its accountant from `state`, `opt` wrapped."""
        q = self.sample_rate(num_rows)
        z = self.noise_multiplier(num_rows, steps)
        acc = make_accountant(self.p.accountant)
        if "sample_dp" in state:
            acc.load_state_dict(state["sample_dp"])
        dp_opt = dp_optimizer(opt, z, self.p.max_grad_norm, q * num_rows, noise_seed(self.seed, client, round, NOISE_TAG))
        return DPRun(self, dp_opt, num_rows, steps, q, z, acc, state)

    def train(self, opt: torch.optim.Optimizer, loss_of: Callable[[np.ndarray], torch.Tensor], num_rows: int,
              steps: int, rng: np.random.Generator, client: int, round: int, state: dict,
              before_step: Callable[[int], None] = lambda step: None) -> tuple[list, int, dict]:
        """`steps` DP-SGD steps with `opt` for one client; updates the client's accountant in
        `state["sample_dp"]`. Returns (batch losses, rows used, metrics). (The executor runs the
        same pieces, `begin` / `DPRun.batch` / `DPRun.step` / `DPRun.finish`, in its shared loop.)"""
        run = self.begin(opt, num_rows, steps, client, round, state)
        losses, seen = [], 0
        for step in range(steps):
            before_step(step)  # the lr schedule
            idx = run.batch(rng)
            loss = run.step(loss_of, idx)
            if loss is not None:
                losses.append(loss)
            seen += len(idx)
        return losses, seen, run.finish()


class DPRun:
    """One client's DP-SGD in progress (what `SampleDP.begin` sets up)."""

    def __init__(self, sdp: SampleDP, dp_opt, num_rows: int, steps: int, q: float, z: float, acc, state: dict):
        self.sdp, self.dp_opt, self.num_rows, self.steps = sdp, dp_opt, num_rows, steps
        self.q, self.z, self.acc, self.state = q, z, acc, state

    def batch(self, rng: np.random.Generator) -> np.ndarray:
        return poisson_batch(rng, self.num_rows, self.q)

    def step(self, loss_of: Callable[[np.ndarray], torch.Tensor], idx: np.ndarray) -> float | None:
        return dp_step(self.dp_opt, self.sdp.params, loss_of, idx)

    def finish(self) -> dict:
        """The client's accountant takes this run's steps; its metrics."""
        self.acc.step(self.z, self.q, self.steps)
        self.state["sample_dp"] = self.acc.state_dict()
        return {"dp/sample_epsilon": self.acc.get_epsilon(self.sdp.p.delta), "dp/sample_noise_multiplier": self.z,
                "dp/sample_rate": self.q}
