"""PPLR flexible storage: one LLM run split between the client and a server actor.

With `storage.mode: split` and `storage.client_layers: k` on a model with L decoder layers:

    client front   input embeddings, decoder layers [0, k)              (private LoRA)
    server middle  decoder layers [k, L-1)                              (shared LoRA, aggregated)
    client back    decoder layer L-1, final norm, LM head (Yes/No rows) (private LoRA)

A training step: the client runs its front and sends h_k (and the 2-D attention mask) to the server
actor (`fedsim.server.split_server`), which runs the middle with this client's middle-layer LoRA
weights (sent with the request) and returns h_{L-1}; the client runs its back and the loss.
`loss.backward()` reaches `RemoteMiddle.backward`, which sends dL/dh_{L-1} to the server; the server
backpropagates through the graph it kept from the forward and returns dL/dh_k and the gradients of
the middle-layer LoRA weights; autograd then continues through the client's front. The optimizer
(and its state) stays on the client, so the server holds no per-client state beyond one pending
graph per executor.

The per-call plumbing the layers need (causal mask from the attention mask, position ids, rotary
position embeddings) is computed as transformers 5.x `LlamaModel.forward` computes it, once on
the client (front and last layer) and once on the server (middle), from the same inputs.

Models: Llama-family causal LMs that expose `model.model.{embed_tokens, layers, norm, rotary_emb}`
with full attention in every layer (Llama, SmolLM2, Qwen2 without sliding windows, ...).
"""
from __future__ import annotations

import time

import ray
import torch
from torch import nn

from fedsim.core.store import state_nbytes
from fedsim.models.layout import Layout
from fedsim.models.lora import export_state, set_flat
from fedsim.models.scoring import answer_logits, causal_lm
from fedsim.schema import ConfigError

PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


class SplitError(ConfigError):
    """A split that the model cannot do; the message names the config key."""


# ---------------------------------------------------------------------------------------------
# Which model, which layers


def decoder_of(lm, name: str):
    """The decoder stack (`lm.model`) of a causal LM, checked to hold the parts a split cuts."""
    inner = getattr(lm, "model", None)
    missing = [p for p in PARTS if not hasattr(inner, p)] if inner is not None else ["model"]
    if missing or not isinstance(inner.layers, nn.ModuleList):
        raise SplitError(f"storage.mode 'split': model.name {name!r} ({type(lm).__name__}) does not expose its "
                         f"decoder layers as model.model.layers with embed_tokens / norm / rotary_emb "
                         f"(missing: {', '.join(missing) or 'a ModuleList of layers'}); split execution "
                         f"supports Llama-family models")
    kinds = set(getattr(inner.config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise SplitError(f"storage.mode 'split': model.name {name!r} has layers of kinds {sorted(kinds)}; "
                         f"split execution supports models with full attention in every layer")
    return inner


def layer_ranges(num_layers: int, k: int) -> tuple[list[int], list[int], list[int]]:
    """(client front, server middle, client back) decoder-layer indices."""
    return list(range(k)), list(range(k, num_layers - 1)), [num_layers - 1]


def check_split(cfg, model_path: str) -> int:
    """Before any actor starts: the model can be split at `storage.client_layers`. Returns L.
    Builds the model on the meta device from its config (no weights, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name, k = cfg.model.name, cfg.storage.client_layers
    config = AutoConfig.from_pretrained(model_path)
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise SplitError(f"storage.mode 'split': model.name {name!r} is not a causal LM transformers can build: {e}")
    L = len(decoder_of(lm, name).layers)
    why = (f"so k must be in [1, {L - 2}]" if L >= 3 else "so a split needs at least 3" +
           (" (set model.tiny_layers)" if name == "tiny-random" else ""))
    if not 1 <= k <= L - 2:
        raise SplitError(f"storage.client_layers: {k} is out of range for model.name {name!r} with {L} decoder "
                         f"layers: the client keeps layers [0, k) and the last one, the server layers [k, L-1), {why}")
    return L


# ---------------------------------------------------------------------------------------------
# Running a range of layers


def plumbing(config, rotary_emb, h: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """What every decoder layer gets besides the hidden states, as `LlamaModel.forward` builds it
    (no cache: position ids 0..T-1)."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    mask = create_causal_mask(config=config, inputs_embeds=h, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids)
    return {"attention_mask": mask, "position_ids": position_ids,
            "position_embeddings": rotary_emb(h, position_ids=position_ids)}


def run_layers(layers, h: torch.Tensor, extra: dict) -> torch.Tensor:
    for layer in layers:
        h = layer(h, past_key_values=None, use_cache=False, **extra)
    return h


class Middle(nn.Module):
    """The server's part: decoder layers [k, L-1) (LoRA-wrapped as in the client's model), keyed by
    their index in the full model so parameter names match the client's."""

    def __init__(self, inner, indices: list[int]):
        super().__init__()
        self.config = inner.config
        self.rotary_emb = inner.rotary_emb
        self.layers = nn.ModuleDict({str(i): inner.layers[i] for i in indices})

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_layers(self.layers.values(), h, plumbing(self.config, self.rotary_emb, h, attention_mask))


def layer_lora(inner, indices: list[int]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA weight in these layers (their parameter layout's blocks, in
    order), named as in `Middle`."""
    return [(f"layers.{i}.{b.name}", b.param) for i in indices for b in Layout.of(inner.layers[i]).blocks]


# ---------------------------------------------------------------------------------------------
# Sizes and FLOPs (counted from layer shapes and tokens)


def param_count(params) -> tuple[int, int]:
    """(entries, bytes) of distinct tensors (a tied LM head counts once)."""
    seen, n, b = set(), 0, 0
    for p in params:
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n += p.numel()
        b += p.numel() * p.element_size()
    return n, b


def layer_flops(layer, config, batch: int, seq: int, backward: bool) -> float:
    """Matmul FLOPs of one decoder layer on batch x seq tokens. Forward: 2 d_in d_out per token per
    linear (frozen base and LoRA factors), 4 T n_heads head_dim per token for attention (QK^T and
    AV over the full padded T x T). Backward: frozen linears need only the input gradient (1x),
    LoRA factors input and weight gradients (2x), attention 2x. Norms, rotary and activations
    (elementwise) are left out."""
    base = lora = 0
    for name, m in layer.named_modules():
        if isinstance(m, nn.Linear):
            if "lora_" in name:
                lora += m.in_features * m.out_features
            else:
                base += m.in_features * m.out_features
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tokens = batch * seq
    fwd_lin, fwd_attn = 2 * tokens * (base + lora), 4 * tokens * seq * heads * head_dim
    if not backward:
        return float(fwd_lin + fwd_attn)
    return float(fwd_lin + fwd_attn + 2 * tokens * base + 4 * tokens * lora + 2 * fwd_attn)


# ---------------------------------------------------------------------------------------------
# The client side


class RemoteMiddle(torch.autograd.Function):
    """h_k -> h_{L-1} through the server actor; the backward asks the server for the gradients."""

    @staticmethod
    def forward(ctx, link, h, attention_mask, *lora):
        ctx.link = link
        need = ctx.needs_input_grad
        return link.send_forward(h, attention_mask, lora, need[1], list(need[3:]))

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_lora = ctx.link.send_backward(grad_out)
        return (None, grad_h, None, *grad_lora)


class SplitClient:
    """The client's side of a split model. Drops the middle layers from the client's peft model
    (their frozen weights are freed; their LoRA weights stay here: the client trains them, the
    optimizer holds them, the aggregator gets them) and runs front / server / back per batch.

    `shared`: (name, parameter) of the trainable middle-layer LoRA weights, what is uploaded;
    `local`: those of the client-side layers, private, never uploaded."""

    def __init__(self, model, cfg, server, key: int):
        """`server`: the split server actor, or its name; `key`: this executor's id."""
        self.lm = causal_lm(model)
        self.inner = decoder_of(self.lm, cfg.model.name)
        self.server = ray.get_actor(server) if isinstance(server, str) else server
        self.key = key
        L, k = len(self.inner.layers), cfg.storage.client_layers
        front, middle, back = layer_ranges(L, k)
        self.front, self.back = front, back
        self.num_middle = len(middle)
        # The same shapes in every Llama layer: the dropped middle is counted from layer 0's.
        self.flop_layer = self.inner.layers[0]
        self.middle_lora = layer_lora(self.inner, middle)
        # peft's state-dict keys of the middle LoRA weights, for exporting the adapter.
        full_name = {id(p): n for n, p in model.named_parameters()}
        self.middle_keys = [full_name[id(p)] for _, p in self.middle_lora]
        self.shared = [(n, p) for n, p in self.middle_lora if p.requires_grad]
        for i in middle:  # keep indices (and so parameter names) of the layers that stay
            self.inner.layers[i] = nn.Identity()
        self.local = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.reset()

    # -- reporting --------------------------------------------------------------------------------

    def reset(self) -> None:
        self.counters = dict.fromkeys(("act_bytes_to_server", "act_bytes_to_client", "lora_bytes_to_server",
                                       "lora_bytes_to_client", "client_flops", "server_flops", "server_seconds"), 0.0)

    def take_metrics(self) -> dict[str, float]:
        """This client's split counters since `reset` (logged as client/<id>/split/...)."""
        c = dict(self.counters)
        total = c["client_flops"] + c["server_flops"]
        c["client_flop_share"] = c["client_flops"] / total if total else float("nan")
        return {f"split/{k}": v for k, v in c.items()}

    def describe(self) -> dict[str, float]:
        """Parameters and bytes held by this client and by the server (MLflow params)."""
        n, b = param_count(list(self.lm.parameters()) + [p for _, p in self.middle_lora])
        server = ray.get(self.server.describe.remote())
        total = b + server["split/server_param_bytes"]
        return {"split/client_layers": len(self.front) + len(self.back), "split/server_layers": self.num_middle,
                "split/client_params": n, "split/client_param_bytes": b, **server,
                "split/client_memory_share": b / total,
                "split/shared_lora_params": sum(p.numel() for _, p in self.shared),
                "split/private_lora_params": sum(p.numel() for _, p in self.local)}

    # -- the forward --------------------------------------------------------------------------------

    def logits(self, batch: dict, yes_id: int, no_id: int) -> torch.Tensor:
        """(B, 2) [Yes, No] logits, as `fedsim.models.scoring.yes_no_logits` on the whole model."""
        inner, ids, mask = self.inner, batch["input_ids"], batch["attention_mask"]
        grad = torch.is_grad_enabled()
        self._count_flops(*ids.shape, grad)
        h = inner.embed_tokens(ids)
        extra = plumbing(inner.config, inner.rotary_emb, h, mask)
        h = run_layers([inner.layers[i] for i in self.front], h, extra)
        lora = [p for _, p in self.middle_lora]
        if grad and (h.requires_grad or any(p.requires_grad for p in lora)):
            h = RemoteMiddle.apply(self, h, mask, *lora)
        else:
            h = self.send_forward(h, mask, lora)
        h = run_layers([inner.layers[i] for i in self.back], h, extra)
        hidden = inner.norm(h)
        return answer_logits(self.lm, hidden, batch["last"], yes_id, no_id)

    def _count_flops(self, batch: int, seq: int, grad: bool) -> None:
        one = layer_flops(self.flop_layer, self.inner.config, batch, seq, grad)
        head = 2 * 2 * self.inner.config.hidden_size * batch * (2 if grad else 1)  # the Yes/No rows at one position
        self.counters["client_flops"] += (len(self.front) + len(self.back)) * one + head
        self.counters["server_flops"] += self.num_middle * one

    def send_forward(self, h, mask, lora, need_h: bool = False, need_lora: list[bool] | None = None) -> torch.Tensor:
        """The middle on the server; with gradients needed, the server keeps the graph for
        `send_backward` (one pending step per executor)."""
        h, mask, weights = h.detach().cpu(), mask.cpu(), [p.detach().cpu() for p in lora]
        need_lora = need_lora or [False] * len(weights)
        # The middle layers' dropout masks, drawn on the server from this client's seeded generator,
        # so they do not depend on the order the server serves executors in, nor on a restart.
        seed = int(torch.randint(2**62, ())) if self.inner.training else None
        t0 = time.perf_counter()
        out = ray.get(self.server.forward.remote(self.key, h, mask, weights, self.inner.training, need_h, need_lora,
                                                 seed))
        self.counters["server_seconds"] += time.perf_counter() - t0
        self.counters["act_bytes_to_server"] += state_nbytes([h, mask])
        self.counters["lora_bytes_to_server"] += state_nbytes(weights)
        self.counters["act_bytes_to_client"] += state_nbytes(out)
        return out.to(self.lm.device)

    def send_backward(self, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, list]:
        """dL/dh_{L-1} to the server; back come dL/dh_k and the gradients of the middle LoRA
        weights that need one (None for the others, e.g. the frozen A blocks under ffa)."""
        g = grad_out.detach().cpu()
        t0 = time.perf_counter()
        grad_h, grads = ray.get(self.server.backward.remote(self.key, g))
        self.counters["server_seconds"] += time.perf_counter() - t0
        self.counters["act_bytes_to_server"] += state_nbytes(g)
        self.counters["act_bytes_to_client"] += state_nbytes(grad_h)
        self.counters["lora_bytes_to_client"] += state_nbytes(grads)
        dev = self.lm.device
        return (grad_h.to(dev) if grad_h is not None else None,
                [x.to(dev) if x is not None else None for x in grads])

    # -- the adapter a user takes away --------------------------------------------------------------

    def export_state(self, model, shared_flat: torch.Tensor, local_flat: torch.Tensor) -> tuple[dict, dict]:
        """peft-format adapter of the whole model: the middle layers' LoRA from `shared_flat`, the
        client-side layers' from `local_flat` (the caller passes the shared init: the clients'
        own stay private)."""
        set_flat([p for _, p in self.shared], shared_flat)
        return export_state(model, local_flat, {key: p for key, (_, p) in zip(self.middle_keys, self.middle_lora)})
