"""Fused multi-client LoRA training: one forward/backward over a batch that mixes the rows of C
clients, each row routed through its own client's adapter; the frozen base model is shared.

Small per-client batches leave a GPU idle (DESIGN.md §6: 13k tokens/s for one client at batch 8,
~160-360k for 8-32 clients fused). `FusedLoRA` takes the LoRA sites of an executor's model (its
parameter layout, `fedsim.models.layout`) and, while `installed()`, replaces each by a
`StackedLoRALinear` (`fedsim.models.routing`) whose adapters are stacked over clients,
A [C, r, in] and B [C, out, r], routed one-hot (each row through its own client's adapter):

    y_i = W x_i + scaling * B[c_i] A[c_i] dropout(x_i)        c_i = the client of row i

as a batched matmul: rows grouped client after client with equal counts reshape to [C, k*T, in]
(`torch.bmm` against A, B directly); any other mix gathers A[c_i], B[c_i] per row. (The same layer
takes non-one-hot per-row weights, for mixing adapters per row.)

Exactness. A row's activations depend only on its own tokens and its own client's adapter
(attention never crosses rows), so with the loss `sum_c mean_{i in c} loss_i` the gradient reaching
client c's slot is exactly the gradient of c's own mean loss: what c alone would compute on its
batch. A step too large for the device's memory runs as several forward/backward passes over runs
of whole clients (`chunks`, executors.fused_rows), their gradients accumulated. `StackedAdamW` then takes torch.optim.AdamW's step on every slot with that client's own
learning rate, weight decay and step count, so one fused step is one local step of every client.

Memory layout. All trainable LoRA entries of the C clients live in one [C, P] buffer whose row c
is client c's flat vector (`fedsim.models.lora.get_flat` order of the trainable parameters): a
client is loaded and read back with one row copy, and the optimizer updates the whole group with a
handful of kernels whatever the number of layers. Each layer's A and B are leaf parameters that
are strided views of that buffer; their `.grad` are views of a [C, P] gradient buffer that autograd
accumulates into in place. Frozen LoRA factors (ffa's A) live in a second buffer the same way.

Master weights and optimizer state are float32; the LoRA matmuls run in the activations' dtype
(bf16 on GPU).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from fedsim.models.layout import Layout
from fedsim.models.lora import get_flat, set_flat
from fedsim.models.routing import Route, StackedLoRALinear


def chunks(counts: list[int], max_rows: int | None) -> list[list[int]]:
    """The slots with rows, in order, packed into runs of consecutive slots of at most `max_rows`
    rows each (a slot with more rows than that is a run of its own); None: one run."""
    used = [i for i, k in enumerate(counts) if k]
    if not max_rows:
        return [used]
    out, rows = [[]], 0
    for i in used:
        if out[-1] and rows + counts[i] > max_rows:
            out.append([])
            rows = 0
        out[-1].append(i)
        rows += counts[i]
    return out


FusedLoRALinear = StackedLoRALinear  # the name fused training has always used


def _stacked_views(params: list[torch.Tensor], num_clients: int, device, requires_grad: bool):
    """A [C, P] float32 buffer and, per parameter, a leaf [C, *shape] view of its columns."""
    total = sum(p.numel() for p in params)
    buf = torch.zeros(num_clients, total, device=device, dtype=torch.float32)
    views, i = [], 0
    for p in params:
        v = torch.nn.Parameter(buf[:, i:i + p.numel()].view(num_clients, *p.shape), requires_grad=requires_grad)
        views.append(v)
        i += p.numel()
    return buf, views


class StackedGroup:
    """C client slots of trained parameters in one [C, P] buffer (see the module's docstring): each
    parameter in `factors` gets a leaf [C, *shape] view, `trainable` ones (flat-vector order) of
    the trained buffer with their gradients in a [C, P] gradient buffer, the rest of a frozen one.
    What the layers are and how rows are routed is the subclass's (`installed`, `set_rows`)."""

    def __init__(self, factors: list[torch.Tensor], trainable: list[torch.nn.Parameter], num_clients: int, what: str):
        self.num_clients = num_clients
        ids, known = {id(p) for p in trainable}, {id(f) for f in factors}
        if any(id(p) not in known for p in trainable):
            raise ValueError(f"fused training: a trainable parameter is not {what}")
        self.trainable = list(trainable)
        self.frozen = [p for p in factors if id(p) not in ids]
        device = trainable[0].device
        self.weight, tviews = _stacked_views(self.trainable, num_clients, device, True)
        self.grad = torch.zeros_like(self.weight)
        self.frozen_weight, fviews = _stacked_views(self.frozen, num_clients, device, False)
        self.stacked = {id(p): v for p, v in zip(self.trainable + self.frozen, tviews + fviews)}
        # Each trainable view's gradient is the matching view of the [C, P] gradient buffer.
        i = 0
        for v in tviews:
            v.grad = self.grad[:, i:i + v[0].numel()].view(v.shape)
            i += v[0].numel()
        self.views = tviews

    # -- client slots ----------------------------------------------------------------------------

    def load(self, slot: int) -> None:
        """Slot `slot` takes the weights the model holds now (one client's)."""
        self.weight[slot].copy_(get_flat(self.trainable))
        if self.frozen:
            self.frozen_weight[slot].copy_(get_flat(self.frozen))

    def store(self, slot: int) -> None:
        """The model takes slot `slot`'s trained weights (to read, evaluate or save them)."""
        set_flat(self.trainable, self.weight[slot])

    # -- training --------------------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def swapped(model, layers: list[tuple[str, torch.nn.Module]]):
        """Each (module name, layer) put in `model` for the block; what stood there comes back after."""
        old = []
        for name, layer in layers:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, layer)
        try:
            yield
        finally:
            for parent, attr, layer in old:
                setattr(parent, attr, layer)

    def set_rows(self, counts: list[int], rows) -> None:
        """Route the next forward: the first counts[0] `rows` are slot 0's, the next counts[1] slot 1's, ..."""
        raise NotImplementedError

    def metrics(self, slot: int) -> dict:
        """A slot's own figures from the loop (its routing, for a bank)."""
        return {}

    def client_losses(self, row_losses: torch.Tensor) -> torch.Tensor:
        """[C] mean loss of each slot over its own rows (0 for a slot with no rows this step);
        their sum is the fused objective."""
        sums = torch.zeros(self.num_clients, device=row_losses.device, dtype=row_losses.dtype)
        sums = sums.index_add(0, self.idx, row_losses)
        return sums / self.counts.clamp(min=1).to(sums.device, sums.dtype)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """loss.backward() into the [C, P] gradient buffer."""
        with warnings.catch_warnings():
            # The stacked parameters are strided views with view gradients, which autograd remarks on.
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            loss.backward(**kwargs)
        self.check_grads()

    def check_grads(self) -> None:
        # Autograd adds into an existing .grad in place; anything that replaced one would make
        # the optimizer read stale gradients.
        i = 0
        for v in self.views:
            if v.grad is None or v.grad.data_ptr() != self.grad[:, i:].data_ptr():
                raise RuntimeError("fused training: a stacked LoRA gradient was replaced (zero_grad(set_to_none)?)")
            i += v[0].numel()

    def zero_grad(self) -> None:
        self.grad.zero_()


class FusedLoRA(StackedGroup):
    """The stacked adapters of C client slots for every LoRA layer of a peft model, routed one-hot.

    `trainable` are the model's trained LoRA parameters in flat-vector order (the executor's
    `params`); every other LoRA factor is frozen (ffa's A) and stacked apart.
    """

    def __init__(self, model, num_clients: int, trainable: list[torch.nn.Parameter], layout: Layout | None = None):
        self.model = model
        # The layout says where the factors are (default: the model's LoRA as it is now).
        self.sites = (layout or Layout.of(model)).sites
        if not self.sites:
            raise ValueError("fused training: the model has no LoRA layers")
        factors = [site.A for site in self.sites] + [site.B for site in self.sites]
        super().__init__(factors, trainable, num_clients, "a LoRA factor")
        self.route = Route(num_clients, self.weight.device)

    @property
    def idx(self) -> torch.Tensor:
        return self.route.idx

    @property
    def counts(self) -> torch.Tensor:
        return self.route.counts

    def set_rows(self, counts: list[int], rows=None) -> None:
        self.route.set(counts)

    def installed(self):
        """The model runs through the fused layers inside the block, its peft layers after it."""
        layers = []
        for site in self.sites:
            fused = StackedLoRALinear(site.layer.base_layer, self.stacked[id(site.A)], self.stacked[id(site.B)],
                                      site.scaling, site.dropout, self.route)
            layers.append((site.name, fused.train(site.layer.training)))
        return self.swapped(self.model, layers)


class StackedAdamW:
    """torch.optim.AdamW (its default algorithm: decoupled weight decay, no amsgrad) on a [C, P]
    buffer, every row a client with its own learning rate, weight decay and step count.

    Per client slot and step t (what torch's single-tensor AdamW does per parameter):
        w *= 1 - lr * wd;  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2
        w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    Slots not `active` in a step are left exactly as they are (no decay, no moment update).
    State moves in and out in torch.optim.AdamW's own format (`load`, `store`), so a client's saved
    optimizer state does not depend on whether it trained fused.
    """

    def __init__(self, weight: torch.Tensor, grad: torch.Tensor):
        self.weight, self.grad = weight, grad
        c, dev = weight.shape[0], weight.device
        self.exp_avg = torch.zeros_like(weight)
        self.exp_avg_sq = torch.zeros_like(weight)
        # float64 like the Python floats torch's AdamW computes its scalars in
        self.step_count = torch.zeros(c, dtype=torch.float64, device=dev)
        self.lr = torch.zeros(c, dtype=torch.float64, device=dev)
        self.weight_decay = torch.zeros(c, dtype=torch.float64, device=dev)
        self.betas: tuple[float, float] | None = None
        self.eps: float | None = None

    def load(self, slot: int, opt: torch.optim.AdamW) -> None:
        """Slot `slot` takes `opt`'s hyperparameters and state (one client's AdamW over the
        trainable LoRA parameters in flat-vector order, as the unfused executor builds it)."""
        if len(opt.param_groups) != 1:
            raise ValueError("fused training: one AdamW param group per client expected")
        g = opt.param_groups[0]
        if g.get("amsgrad") or g.get("maximize") or not g.get("decoupled_weight_decay", True):
            raise ValueError("fused training: only AdamW's default algorithm is stacked (no amsgrad, maximize)")
        hyper = (tuple(g["betas"]), float(g["eps"]))
        if self.betas is not None and (self.betas, self.eps) != hyper:
            raise ValueError("fused training: clients of one group must share AdamW betas and eps")
        self.betas, self.eps = hyper
        self.lr[slot], self.weight_decay[slot] = float(g["lr"]), float(g["weight_decay"])
        states = [opt.state.get(p) for p in g["params"]]
        if not any(states):
            self.exp_avg[slot].zero_()
            self.exp_avg_sq[slot].zero_()
            self.step_count[slot] = 0
            return
        steps = {float(s["step"]) for s in states if s}
        if len(steps) != 1 or not all(states):
            raise ValueError("fused training: a client's AdamW state must cover all its LoRA parameters "
                             "at one step count")
        self.exp_avg[slot].copy_(torch.cat([s["exp_avg"].reshape(-1) for s in states]))
        self.exp_avg_sq[slot].copy_(torch.cat([s["exp_avg_sq"].reshape(-1) for s in states]))
        self.step_count[slot] = steps.pop()

    def store(self, slot: int, opt: torch.optim.AdamW) -> None:
        """Slot `slot`'s state into `opt`, as if `opt` itself had taken the steps."""
        if float(self.step_count[slot]) == 0:
            return
        step = torch.tensor(float(self.step_count[slot]), dtype=torch.float32)
        i = 0
        for p in opt.param_groups[0]["params"]:
            n = p.numel()
            opt.state[p] = {"step": step.clone(),
                            "exp_avg": self.exp_avg[slot, i:i + n].view_as(p).clone().to(p.device),
                            "exp_avg_sq": self.exp_avg_sq[slot, i:i + n].view_as(p).clone().to(p.device)}
            i += n

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        """One AdamW step of every slot (of the slots where `active`, a [C] bool, is true)."""
        b1, b2 = self.betas
        w, g, m, v = self.weight, self.grad, self.exp_avg, self.exp_avg_sq
        if active is not None and bool(active.all()):
            active = None
        if active is not None:
            active = active.to(w.device)
            old = (w.clone(), m.clone(), v.clone())
            self.step_count += active.double()
        else:
            self.step_count += 1
        t = self.step_count.clamp(min=1)
        col = lambda x: x.to(w.dtype).unsqueeze(1)  # noqa: E731  [C] -> [C, 1] for broadcasting
        w.mul_(col(1 - self.lr * self.weight_decay))
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / col((1 - b2 ** t).sqrt())).add_(self.eps)
        w.add_(col(-self.lr / (1 - b1 ** t)) * m / denom)
        if active is not None:
            keep = ~active.unsqueeze(1)
            for new, before in zip((w, m, v), old):
                new.copy_(torch.where(keep, before, new))
