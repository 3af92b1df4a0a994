"""Per-row weights over stacked adapters: the layer fused multi-client training runs through, and
the one APA's sample-adaptive merge and RecLoRA's router need.

A `StackedLoRALinear` holds C adapters stacked, A [C, r, in] and B [C, out, r], and a `Route`
giving each row i of the batch a weight w_ic on adapter c:

    y_i = W x_i + scaling * sum_c w_ic B_c A_c dropout(x_i)

One-hot weights (w_ic = 1 for the row's client, 0 otherwise) are fused training's per-client
routing and run as it always has: rows grouped client after client with equal counts reshape to
[C, k*T, in] (one `torch.bmm` per factor), any other one-hot mix gathers A[c_i], B[c_i] per row.
Other weights run every adapter on every row and mix the results per row ("outputs", APA's
ND merge), or, with `factors`, mix the factors per row and run the mixed adapter
(y_i = W x_i + scaling * (sum_c w_ic B_c)(sum_c w_ic A_c) x_i, APA's D merge).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Route:
    """Which adapters each row of the current batch goes through, and with what weight."""

    def __init__(self, num_clients: int, device):
        self.num_clients, self.device = num_clients, device
        self.idx: torch.Tensor | None = None  # one-hot: each row's slot
        self.counts: torch.Tensor | None = None  # one-hot: rows per slot
        # one-hot, (lo, hi) when the batch is slots lo..hi-1 in order with the same number of rows each
        self.span: tuple[int, int] | None = None
        self.weights: torch.Tensor | None = None  # [rows, C], only when not one-hot
        self.factors = False  # with weights: mix A and B per row, not the adapters' outputs

    def set(self, counts: list[int]) -> None:
        """One-hot routing: the first counts[0] rows to slot 0, the next counts[1] to slot 1, ..."""
        if len(counts) != self.num_clients or not any(counts):
            raise ValueError(f"route: counts {counts} for {self.num_clients} client slots")
        self.counts = torch.tensor(counts, dtype=torch.long)
        self.idx = torch.repeat_interleave(torch.arange(self.num_clients), self.counts).to(self.device)
        used = [i for i, k in enumerate(counts) if k]
        lo, hi = used[0], used[-1] + 1
        self.span = (lo, hi) if all(counts[i] == counts[lo] for i in range(lo, hi)) else None
        self.weights = None

    def set_weights(self, weights: torch.Tensor, factors: bool = False) -> None:
        """Per-row weights [rows, C]; one-hot rows in slot order take exactly the `set` path.
        `factors`: row i runs the adapter (sum_c w_ic B_c)(sum_c w_ic A_c) (the same as mixing
        outputs when the weights are one-hot)."""
        if weights.dim() != 2 or weights.shape[1] != self.num_clients:
            raise ValueError(f"route: weights of shape {tuple(weights.shape)} for {self.num_clients} slots")
        w = weights.detach().cpu()
        one_hot = bool(((w == 0) | (w == 1)).all() and (w.sum(1) == 1).all())
        if not one_hot:
            self.idx = self.counts = self.span = None
            self.weights, self.factors = weights.to(self.device), factors
            return
        idx = w.argmax(1)
        if bool((idx[1:] >= idx[:-1]).all()):  # rows in slot order: today's routing, exactly
            self.set(torch.bincount(idx, minlength=self.num_clients).tolist())
        else:
            self.counts = torch.bincount(idx, minlength=self.num_clients)
            self.idx, self.span, self.weights = idx.to(self.device), None, None


class StackedLoRALinear(torch.nn.Module):
    """A frozen linear layer plus C stacked LoRA adapters, mixed per row by `route`. A and B may also
    be [clients, bank, ...] (several clients' banks in fused training): adapter c * bank + k."""

    def __init__(self, base: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float, dropout: float,
                 route: Route):
        super().__init__()
        self.base, self.A, self.B = base, A, B
        self.scaling, self.dropout, self.route = scaling, dropout, route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, True)
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        if A.dim() == 4:  # fused banks: [clients, bank, ...], adapter c * bank + k (a copy: autograd sends its gradient back)
            A, B = A.flatten(0, 1), B.flatten(0, 1)
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1])
        if self.route.weights is not None and self.route.factors:  # each row's own mixed factors
            w = self.route.weights.to(x.dtype)
            a = torch.einsum("nc,crd->nrd", w, A)
            b = torch.einsum("nc,cor->nor", w, B)
            d = torch.bmm(torch.bmm(x3, a.mT), b.mT)
        elif self.route.weights is not None:  # a mix: every adapter on every row, weighted per row
            w = self.route.weights.to(x.dtype)
            xa = torch.einsum("ntd,crd->ntcr", x3, A)
            d = torch.einsum("ntcr,nc,cor->nto", xa, w, B)
        elif self.route.span is not None:  # client after client, k rows each: one bmm per factor
            lo, hi = self.route.span
            xs = x3.reshape(hi - lo, -1, x.shape[-1])
            d = torch.bmm(torch.bmm(xs, A[lo:hi].mT), B[lo:hi].mT)
        else:  # any one-hot mix: each row's own factors
            idx = self.route.idx
            d = torch.bmm(torch.bmm(x3, A[idx].mT), B[idx].mT)
        return y + d.reshape(y.shape) * self.scaling
