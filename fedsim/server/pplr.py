"""PPLR's "dynamic balance" aggregation: every client keeps its own adapter, pulled towards the
others in proportion to how similar they are, more strongly as training goes on and more slowly
for clients that are still lagging.

Per round t (0-based), over the clients P that reported:

    theta_i  = params_for(i) + delta_i                      client i's adapter after local training
    s_ij     = (cos(theta_i, theta_j) + 1) / 2,  s_ii = 1   similarity, in [0, 1]
               (similarity_on="update": cos(theta_i - theta_0, theta_j - theta_0), theta_0 the shared init;
                similarity_on="round": cos(delta_i, delta_j), what each client learned this round alone)
    p        = softmax(L / temperature)                     L: the clients' mean train losses this round
    w_i      = tanh(alpha / p_i ** (t + 1/beta))            "heats up" over rounds; slower for large p_i
    theta_i' = (theta_i + sum_{j != i} w_i s_ij theta_j) / (1 + sum_{j != i} w_i s_ij)

Implementation choices (the public PPLR code differs on the first two):

- Every theta_i' is computed from one frozen snapshot of the thetas, in ascending client-id order,
  so the result does not depend on the order the updates arrive in (the public code updates
  in place while iterating, so later clients mix already-mixed adapters).
- `finish` (server postprocessing, e.g. central noise) is applied per client to the step that
  client's adapter takes this round, step_i = theta_i' - params_for_old(i); the client's new adapter
  is params_for_old(i) + finish(step_i), in ascending client order. Of the metrics `finish`
  returns, the last call's are logged: stateful hooks report cumulative values (a privacy
  accountant's epsilon), so the last is the state after the round.
- Numerics: w_i is computed in log space, log(alpha / p_i^e) = log(alpha) - e * log_softmax(L/T)_i,
  so a p_i that underflows gives w_i = tanh(inf) = 1 rather than 0/0. Non-finite losses are replaced
  by the largest (NaN, +inf) or smallest (-inf) finite loss of the round and every loss is clipped
  to +-1e12 before dividing by the temperature.
- Sample counts and aggregation weights play no part (the formula has none).
- Clients that did not report keep their last theta'; before its first report a client uses the
  shared initial adapter.
- `global_params()` (the exported adapter) is the plain mean of all clients' current adapters,
  including clients that never reported (still at the initial adapter), kept as a running float64
  sum so it never reads the whole table.
- The clients' adapters live in a table (`fedsim.server.table`): in RAM, or on disk in the run
  directory for thousands of clients (`strategy.pplr.table`).

Learning-speed control (`lr_rule`), applied when the loop asks for next round's learning rates:
    loss_gap: lr_i = base_lr * clip(1 + gamma * (L_i - mean(L)) / (std(L) + 1e-8), lr_min, lr_max)
with L_i the client's most recent train loss and mean/std (population std) over every client that
has reported a loss so far; a client with no loss yet trains at base_lr. `none` keeps base_lr.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fedsim.server.base import Finish, Strategy, Update, no_finish
from fedsim.server.table import DiskTable, MemoryTable

LOSS_CLIP = 1e12
TABLE_RAM_LIMIT = 2**30  # bytes of adapters above which table: auto keeps them on disk
SIMILARITY_ON = ("adapter", "update", "round")  # what s_ij compares (PPLR.compared)


def sanitize_losses(losses) -> np.ndarray:
    """Non-finite losses -> the round's largest (NaN, +inf) / smallest (-inf) finite loss; clipped."""
    L = np.asarray(losses, dtype=np.float64)
    finite = L[np.isfinite(L)]
    hi, lo = (finite.max(), finite.min()) if finite.size else (0.0, 0.0)
    L = np.where(np.isnan(L) | (L == np.inf), hi, L)
    L = np.where(L == -np.inf, lo, L)
    return np.clip(L, -LOSS_CLIP, LOSS_CLIP)


def balance_weights(losses, round: int, alpha: float, beta: float, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(w, p): w_i = tanh(alpha / p_i^(round + 1/beta)), p = softmax(losses / temperature); finite."""
    z = sanitize_losses(losses) / temperature
    log_p = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    e = round + 1.0 / beta
    with np.errstate(over="ignore", invalid="ignore"):
        # log_p <= 0; where it is exactly 0 (p_i = 1), p_i^e = 1 even for an infinite exponent.
        log_arg = math.log(alpha) - np.where(log_p == 0, 0.0, e * log_p)
        w = np.tanh(np.exp(log_arg))
    return np.nan_to_num(w, nan=1.0), np.exp(log_p)


def similarity(thetas: torch.Tensor) -> np.ndarray:
    """s_ij = (cos(theta_i, theta_j) + 1) / 2 with s_ii = 1; rows of `thetas` are the adapters."""
    x = thetas.double()
    norms = x.norm(dim=1)
    cos = (x @ x.T) / torch.clamp(norms[:, None] * norms[None, :], min=1e-300)
    s = ((cos.clamp(-1, 1) + 1) / 2).numpy()
    s = np.nan_to_num(s, nan=0.5)
    np.fill_diagonal(s, 1.0)
    return s


def mix(thetas: torch.Tensor, s: np.ndarray, w: np.ndarray) -> torch.Tensor:
    """theta_i' = (theta_i + sum_{j!=i} w_i s_ij theta_j) / (1 + sum_{j!=i} w_i s_ij), all i at once
    from the same snapshot; float64 result."""
    a = w[:, None] * s
    np.fill_diagonal(a, 1.0)
    a = a / a.sum(1, keepdims=True)
    return torch.from_numpy(a) @ thetas.double()


def loss_gap_scale(loss: float, all_losses, gamma: float, lo: float, hi: float) -> float:
    L = sanitize_losses(list(all_losses))
    x = float(sanitize_losses([loss])[0])
    scale = 1.0 + gamma * (x - L.mean()) / (L.std() + 1e-8)
    return float(np.clip(scale, lo, hi)) if math.isfinite(scale) else 1.0


class PPLR(Strategy):
    name = "pplr"
    # It mixes each client's whole adapter with the others' (so it needs every client's own update),
    # and what it applies is no mean of updates (so DP-FedAvg's bound does not hold).
    needs = {"whole_adapter": "needs whole per-client adapters, which {key} {value!r} does not upload",
             "each_update": "needs each client's own update, which {key} hides"}
    breaks = {"mean_of_updates": None}

    def __init__(self, alpha: float = 0.7, beta: float = 1.0, temperature: float = 0.05,
                 lr_rule: str = "loss_gap", lr_gamma: float = 0.5, lr_min_scale: float = 0.5,
                 lr_max_scale: float = 2.0, similarity_on: str = "adapter", table: str = "memory",
                 table_dir: Path | None = None):
        if not (alpha > 0 and beta > 0 and temperature > 0):
            raise ValueError(f"PPLR needs alpha, beta, temperature > 0, got {alpha}, {beta}, {temperature}")
        if lr_rule not in ("none", "loss_gap"):
            raise ValueError(f"PPLR lr_rule {lr_rule!r} is not one of 'none', 'loss_gap'")
        if similarity_on not in SIMILARITY_ON:
            raise ValueError(f"PPLR similarity_on {similarity_on!r} is not one of {', '.join(map(repr, SIMILARITY_ON))}")
        self.similarity_on = similarity_on
        if table not in ("auto", "memory", "disk"):
            raise ValueError(f"PPLR table {table!r} is not one of 'auto', 'memory', 'disk'")
        if table == "disk" and table_dir is None:
            raise ValueError("PPLR table 'disk' needs a directory (the aggregator gives the run's)")
        self.table_kind, self.table_dir = table, table_dir
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.lr_rule, self.lr_gamma = lr_rule, lr_gamma
        self.lr_min_scale, self.lr_max_scale = lr_min_scale, lr_max_scale

    @classmethod
    def from_config(cls, cfg, workdir: Path | None = None) -> "PPLR":
        p = cfg.strategy.pplr
        table = p.table if workdir is not None else "memory"  # no run directory (a unit test): RAM
        return cls(p.alpha, p.beta, p.temperature, p.lr_rule, p.lr_gamma, p.lr_min_scale, p.lr_max_scale,
                   p.similarity_on, table, Path(workdir) / "pplr_table" if workdir is not None else None)

    def initialize(self, params, num_clients):
        self.num_clients = num_clients
        self.initial = params.detach().float().clone()
        disk = self.table_kind == "disk" or (self.table_kind == "auto" and self.table_dir is not None
                                             and num_clients * self.initial.numel() * 4 > TABLE_RAM_LIMIT)
        # Clients that reported at least once; the others are at `initial`.
        self.theta = DiskTable(self.table_dir) if disk else MemoryTable()
        self.sum = self.initial.double() * num_clients  # of every client's current adapter
        self.loss: dict[int, float] = {}  # each client's most recent train loss
        self.last_sim: np.ndarray | None = None
        self.last_sim_clients: list[int] = []
        self.last_sim_round = -1

    def params_for(self, client):
        # The same tensor object for every client still at the start: the aggregator broadcasts it once.
        t = self.theta.get(client)
        return self.initial if t is None else t

    # -- learning speed --------------------------------------------------------------------------

    def lr_scale(self, client: int) -> float:
        if self.lr_rule == "none" or client not in self.loss:
            return 1.0
        return loss_gap_scale(self.loss[client], self.loss.values(), self.lr_gamma,
                              self.lr_min_scale, self.lr_max_scale)

    def client_lr(self, client, base_lr):
        return base_lr * self.lr_scale(client)

    # -- aggregation -----------------------------------------------------------------------------

    def compared(self, thetas: torch.Tensor, updates: list[Update]) -> torch.Tensor:
        """What s_ij is the cosine of. `update`: everything learned since the shared init; clients
        start each round from mixes near the mean, so these converge and s goes to 1 within a few
        rounds (measured: 0.999 by round 9 on k-means clients). `round`: only this round's local
        steps, which follow each client's own data from wherever it started."""
        if self.similarity_on == "update":
            return thetas - self.initial.double()
        if self.similarity_on == "round":
            return torch.stack([u.delta.double() for u in updates])
        return thetas

    def aggregate(self, round: int, updates: list[Update], finish: Finish = no_finish) -> dict[str, float]:
        updates = sorted(updates, key=lambda u: u.client)  # canonical order: independent of arrival
        clients = [u.client for u in updates]
        if len(set(clients)) != len(clients):
            raise ValueError(f"PPLR got more than one update for a client in round {round}: {clients}")
        # What each client trained with this round, before anything changes (the frozen snapshot).
        old = [self.params_for(c) for c in clients]
        thetas = torch.stack([o.double() + u.delta.double() for o, u in zip(old, updates)])
        losses = sanitize_losses([u.metrics.get("loss", float("nan")) for u in updates])
        scales = {c: self.lr_scale(c) for c in clients}  # the scale each trained with this round

        s = similarity(self.compared(thetas, updates))
        w, p = balance_weights(losses, round, self.alpha, self.beta, self.temperature)
        mixed = mix(thetas, s, w)

        metrics: dict[str, float] = {}
        finish_metrics: dict[str, float] = {}
        norms = []
        new = {}
        for k, c in enumerate(clients):
            step = (mixed[k] - old[k].double()).float()
            step, m = finish(step)
            new[c] = (old[k].double() + step.double()).float()
            norms.append(float(step.norm()))
            finish_metrics.update({key: float(v) for key, v in m.items()})
            metrics[f"client/{c}/w"] = float(w[k])
            metrics[f"client/{c}/p"] = float(p[k])
            metrics[f"client/{c}/lr_scale"] = scales[c]
        for k, c in enumerate(clients):
            self.sum += new[c].double() - old[k].double()
        self.theta.put(round, new)
        self.loss.update({c: float(x) for c, x in zip(clients, losses)})
        self.last_sim, self.last_sim_clients, self.last_sim_round = s, clients, round

        n = len(clients)
        if n > 1:
            metrics["pplr/sim_mean"] = float((s.sum() - n) / (n * (n - 1)))
        metrics["pplr/w_mean"] = float(w.mean())
        metrics["update_norm"] = float(np.mean(norms))
        metrics.update(finish_metrics)
        return metrics

    def global_params(self):
        return (self.sum / self.num_clients).float()

    def after_checkpoint(self, round: int) -> None:
        self.theta.prune(round)

    # -- artifacts and checkpoints ---------------------------------------------------------------

    def write_artifacts(self, out_dir) -> list:
        if self.last_sim is None:
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ids = self.last_sim_clients
        csv = out / "pplr_similarity.csv"
        lines = ["client," + ",".join(str(c) for c in ids)]
        lines += [f"{c}," + ",".join(f"{v:.6f}" for v in row) for c, row in zip(ids, self.last_sim)]
        csv.write_text("\n".join(lines) + "\n")

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(ids)
        size = min(12.0, 2.5 + 0.6 * n)
        fig, ax = plt.subplots(figsize=(size + 1.2, size))
        im = ax.imshow(self.last_sim, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), [str(c) for c in ids])
        ax.set_yticks(range(n), [str(c) for c in ids])
        ax.set_xlabel("client j")
        ax.set_ylabel("client i")
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    v = self.last_sim[i, j]
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                            color="black" if v > 0.6 else "white")
        ax.set_title(f"PPLR similarity s_ij = (cos+1)/2, round {self.last_sim_round + 1}")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        png = out / "pplr_similarity.png"
        fig.savefig(png, dpi=120)
        plt.close(fig)
        return [png, csv]

    def state_dict(self):
        return {
            "num_clients": self.num_clients,
            "initial": self.initial.clone(),
            **self.theta.state_dict(),  # memory: every adapter; disk: the round the files cover
            "sum": self.sum.clone(),
            "loss": dict(self.loss),
            "last_sim": None if self.last_sim is None else self.last_sim.copy(),
            "last_sim_clients": list(self.last_sim_clients),
            "last_sim_round": self.last_sim_round,
        }

    def load_state_dict(self, state):
        self.num_clients = state["num_clients"]
        self.initial = state["initial"].clone()
        self.theta.load_state_dict(state)
        if "sum" in state:
            self.sum = state["sum"].clone()
        else:  # a checkpoint from before the running sum (always a memory table then)
            rows = self.theta.rows
            self.sum = self.initial.double() * (self.num_clients - len(rows)) + sum(t.double() for t in rows.values())
        self.loss = {int(c): float(v) for c, v in state["loss"].items()}
        self.last_sim = None if state["last_sim"] is None else np.array(state["last_sim"], dtype=np.float64)
        self.last_sim_clients = [int(c) for c in state["last_sim_clients"]]
        self.last_sim_round = state["last_sim_round"]
