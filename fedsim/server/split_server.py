"""The split server (PPLR flexible storage, `storage.mode: split`): a Ray actor on its own CPU / GPU
fraction that holds only the middle decoder layers [k, L-1) of the base model and runs them for
every client executor (`fedsim.models.split`).

It keeps no client state: each request brings the client's middle-layer LoRA weights, and a
forward that needs gradients leaves its graph here, keyed by the calling executor, until that
executor's backward collects the gradients (an executor runs one step at a time, so one graph per
executor is pending at most; a new forward from the same executor replaces a stale one).
"""
from __future__ import annotations

import gc
import uuid

import ray
import torch
from torch.func import functional_call

from fedsim.core.faults import maybe_crash
from fedsim.core.placement import SERVER_NODE_SHARE, bundle_placement
from fedsim.models.loader import load_base, quiet_transformers
from fedsim.models.lora import attach_lora
from fedsim.models.split import Middle, decoder_of, layer_lora, layer_ranges, param_count
from fedsim.schema import ConfigError, config_from_dict, to_dict


class SplitServer:
    def __init__(self, config: dict, model_path: str, num_threads: int = 1, run_dir: str | None = None):
        torch.set_num_threads(max(1, num_threads))
        quiet_transformers()
        cfg = config_from_dict(config)
        # faults.crash with actor: split_server; the driver says which round starts (start_round).
        self.crashes, self.run_dir, self.round = cfg.faults.crash, run_dir, None
        base, _ = load_base(model_path, cfg.model.dtype)
        # The same LoRA wrapping as the clients' models, so the layers' parameter names match.
        lm = attach_lora(base, cfg.model.lora, cfg.train.seed).get_base_model()
        inner = decoder_of(lm, cfg.model.name)
        _, middle, _ = layer_ranges(len(inner.layers), cfg.storage.client_layers)
        self.middle = Middle(inner, middle).eval()
        self.names = [n for n, _ in layer_lora(inner, middle)]
        del base, lm, inner
        gc.collect()  # the embeddings, head and client-side layers are freed here
        self.device = next(self.middle.parameters()).device
        self.pending: dict[int, tuple] = {}

    def start_round(self, round: int) -> None:
        self.round = round

    def describe(self) -> dict[str, float]:
        n, b = param_count(self.middle.parameters())
        return {"split/server_params": n, "split/server_param_bytes": b, "split/server_device": str(self.device)}

    def forward(self, key: int, h: torch.Tensor, mask: torch.Tensor, weights: list[torch.Tensor], train: bool,
                need_h: bool, need_lora: list[bool], seed: int | None = None) -> torch.Tensor:
        """h_{L-1} = middle(h_k) with these LoRA weights (in `layer_lora` order); `seed`: the
        dropout masks' (training), from the client's generator."""
        if len(weights) != len(self.names):
            raise ValueError(f"split server: got {len(weights)} LoRA tensors, the middle layers have {len(self.names)}")
        if train and self.run_dir:
            maybe_crash(self.crashes, self.run_dir, self.round, actor="split_server")
        self.pending.pop(key, None)
        keep = need_h or any(need_lora)
        h = h.to(self.device).requires_grad_(need_h)
        weights = [w.to(self.device).requires_grad_(n) for w, n in zip(weights, need_lora)]
        self.middle.train(train)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.set_grad_enabled(keep):
            if seed is not None:
                torch.manual_seed(seed)
            out = functional_call(self.middle, dict(zip(self.names, weights)), (h, mask.to(self.device)))
        if keep:
            self.pending[key] = (out, [h, *weights], [need_h, *need_lora])
        return out.detach().cpu()

    def backward(self, key: int, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, list]:
        """(dL/dh_k, [dL/dW for each LoRA weight, None where not needed]) from dL/dh_{L-1}."""
        if key not in self.pending:
            raise RuntimeError(f"split server: no pending forward for executor {key} (did the server restart?)")
        out, inputs, need = self.pending.pop(key)
        grads = iter(torch.autograd.grad(out, [x for x, n in zip(inputs, need) if n],
                                         grad_out.to(out.device, out.dtype)))
        full = [next(grads).detach().cpu() if n else None for n in need]
        return full[0], full[1:]


def start_split_server(cfg, model_path: str, num_executors: int, executor_gpus: float, run_dir: str | None = None):
    """(actor, its name, its GPU fraction): the server actor, checked to fit next to the executors;
    `storage.server_num_gpus: auto` gives it the same GPU fraction as one executor (counted as one
    more actor when the fraction is shared). Executors find it by name, so that one Ray restarts
    finds it again (and no actor handle sits among their constructor arguments)."""
    s = cfg.storage
    total = ray.cluster_resources()
    need = num_executors * cfg.executors.num_cpus + s.server_num_cpus
    if need > total.get("CPU", 0) + 1e-9:
        raise ConfigError(f"storage.server_num_cpus={s.server_num_cpus:g} does not fit: the executors take "
                         f"{num_executors * cfg.executors.num_cpus:g} of the cluster's {total.get('CPU', 0):g} CPUs")
    gpus = executor_gpus if s.server_num_gpus == "auto" else float(s.server_num_gpus)
    node = {}
    if s.server_node_resource:  # a node chosen by a resource it has
        if s.server_node_resource not in total:
            # the nodes' own resources: not CPU/GPU/memory, one node:IP per node, or placement groups' shares
            have = sorted(r for r in total if r not in ("CPU", "GPU", "memory", "object_store_memory")
                          and (not r.startswith("node:") or r == "node:__internal_head__") and "_group_" not in r)
            raise ConfigError(f"storage.server_node_resource: no node of the Ray cluster has the resource "
                              f"{s.server_node_resource!r} (it has {', '.join(have)})")
        node = {"resources": {s.server_node_resource: SERVER_NODE_SHARE}}
    name = f"fedsim-split-server-{uuid.uuid4().hex[:12]}"
    actor = ray.remote(SplitServer).options(name=name, num_cpus=s.server_num_cpus, num_gpus=gpus, **node,
                                            max_restarts=cfg.executors.max_restarts, max_task_retries=0,
                                            **bundle_placement(num_executors + 1))  # in a `fedsim tune` trial: after the executors'
    return actor.remote(to_dict(cfg), model_path, max(1, int(s.server_num_cpus)), run_dir), name, gpus
