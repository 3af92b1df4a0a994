"""A client's state between the rounds it is sampled in, kept on disk as a few flat buffers.

A virtual client that is not training costs only its store entry; nothing of it stays in an
executor's memory or on a GPU. The adapter-sized part of the entry is one contiguous float32 vector
per kind, in the flat-vector order of `fedsim.models.lora` (the order of the optimizer's params):

- `opt`: AdamW's `exp_avg` and `exp_avg_sq` (and `max_exp_avg_sq` under amsgrad), one vector each,
  plus `step`, one count per parameter tensor (-1: the parameter has no optimizer state yet);
- `local`: the client's own never-uploaded parameters (fedsa: its B blocks);

next to small things: `privacy` (accountants' histories, a few numbers per round) and `members`
(the train rows it used, for the membership audit). A dict of one small tensor per parameter and
kind (what `Optimizer.state_dict()` gives: 3 x 120 tensors for SmolLM2-135M with LoRA on q/v)
costs a file record and a copy each time it is saved, loaded or moved; a flat vector is one.

`ClientStore` keeps each client's entries in a directory of its own, one file per round the
client trained in: the newest two while a round runs (a run resumed from the last checkpoint must
find the state that round started from), the newest one once the round's checkpoint is written
(`prune`, called by the driver), so an idle client holds one entry. Finding a client's newest
entry lists that client's directory only, so it stays fast at 10,000 clients.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fedsim.core.files import StateFileError, load_torch, save_torch

FORMAT = 2  # 1: one file per client version in a shared directory, the optimizer as a state_dict
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def opt_state_to_flat(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An Adam-family optimizer's per-parameter state as {"step": float64 (num params,), kind: one
    contiguous float32 CPU vector over all params} for each moment kind it holds."""
    params = _params(opt)
    steps = torch.full((len(params),), -1.0, dtype=torch.float64)
    for i, p in enumerate(params):
        if "step" in opt.state.get(p, {}):
            steps[i] = float(opt.state[p]["step"])
    out = {"step": steps}
    for kind in MOMENTS:
        if any(kind in opt.state.get(p, {}) for p in params):
            # A parameter without state (never stepped) gets zeros, which its step of -1 ignores.
            out[kind] = torch.cat([opt.state[p][kind].detach().reshape(-1).float().cpu()
                                   if kind in opt.state.get(p, {}) else torch.zeros(p.numel()) for p in params])
    return out


def flat_to_opt_state(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Put what `opt_state_to_flat` made back into `opt` (same parameters, same order). The
    moments become views of one buffer on the parameters' device; the param groups (lr, betas,
    weight decay) stay as `opt` was built."""
    params = _params(opt)
    steps = flat["step"]
    if steps.numel() != len(params):
        raise ValueError(f"saved optimizer state covers {steps.numel()} parameter tensors, the optimizer has {len(params)}")
    n = sum(p.numel() for p in params)
    kinds = [k for k in MOMENTS if k in flat]
    for kind in kinds:
        if flat[kind].numel() != n:
            raise ValueError(f"saved optimizer state {kind!r} has {flat[kind].numel()} entries, the parameters have {n}")
    # fused / capturable Adam keep `step` on the parameters' device; the default keeps it on the CPU.
    on_device = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
    first = params[0] if params else None
    bufs = {k: flat[k].to(first.device, first.dtype) for k in kinds} if first is not None else {}
    i = 0
    for p, step in zip(params, steps.tolist()):
        k = p.numel()
        if step < 0:
            opt.state.pop(p, None)
        else:
            state = {"step": torch.tensor(step, dtype=torch.float32, device=p.device if on_device else "cpu")}
            for kind in kinds:
                state[kind] = bufs[kind][i:i + k].view_as(p).to(p.device, p.dtype)
            opt.state[p] = state
        i += k


def state_nbytes(state: dict) -> int:
    """Bytes of the tensors and arrays in a store entry (what an idle client holds, before the
    file format's own overhead)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if hasattr(state, "nbytes"):  # numpy
        return int(state.nbytes)
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


class ClientStore:
    """Each client's state on disk, versioned by the round it was saved after."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def client_dir(self, client: int) -> Path:
        return self.root / f"client_{client:05d}"

    def _versions(self, client: int) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self.client_dir(client))
        except FileNotFoundError:
            return []
        return sorted((int(n[1:-3]), self.client_dir(client) / n) for n in names
                      if n.startswith("r") and n.endswith(".pt"))

    def latest(self, client: int) -> dict | None:
        """The client's newest entry, or None."""
        return self.load(client, 2**62)

    def load(self, client: int, before_round: int) -> dict | None:
        """The newest entry saved after a round < `before_round`, or None."""
        older = [(r, p) for r, p in self._versions(client) if r < before_round]
        if not older:
            return None
        path = older[-1][1]
        entry = load_torch(path, f"client {client}'s store entry",
                           "delete that file and resume: the client then continues from its previous entry, "
                           "or from the global model")
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            found = entry.get("format") if isinstance(entry, dict) else type(entry).__name__
            raise StateFileError(f"client {client}'s store entry {path} has format {found!r}, this fedsim reads "
                                 f"format {FORMAT}: resume with the fedsim version that wrote it, or start a new run")
        return entry

    def save(self, client: int, round: int, state: dict) -> None:
        d = self.client_dir(client)
        d.mkdir(exist_ok=True)
        save_torch({"format": FORMAT, **state}, d / f"r{round}.pt")
        # Keep the previous version too: a crash mid-round leaves the round's new one unusable.
        for _, p in self._versions(client)[:-2]:
            p.unlink(missing_ok=True)

    def discard(self, client: int, round: int) -> None:
        """Forget what the client saved after `round` (it was dropped from that round): its next
        round loads its previous entry. `save` keeps two versions for this."""
        (self.client_dir(client) / f"r{round}.pt").unlink(missing_ok=True)

    def prune(self, clients: list[int], through_round: int) -> None:
        """Once a checkpoint covers `through_round`, a resumed run never reads a version older than
        each client's newest one up to that round: delete those, so an idle client keeps one."""
        for c in clients:
            old = [p for r, p in self._versions(c) if r <= through_round]
            for p in old[:-1]:
                p.unlink(missing_ok=True)

    def delete(self, client: int) -> None:
        """Forget a client: every saved entry of it (its next round starts from the init)."""
        for _, p in self._versions(client):
            p.unlink(missing_ok=True)
        try:
            self.client_dir(client).rmdir()
        except OSError:
            pass  # gone already, or another process is writing into it

    def reset(self) -> None:
        """Forget every client."""
        for c in self.clients():
            self.delete(c)

    def disk_bytes(self, client: int) -> int:
        """Bytes this client's kept versions take on disk."""
        return sum(p.stat().st_size for _, p in self._versions(client))

    def clients(self) -> list[int]:
        """Clients with at least one saved entry."""
        return sorted(int(p.name.split("_")[1]) for p in self.root.glob("client_*") if any(p.glob("r*.pt")))
