"""Bytes and time an idle virtual client costs in the client store (fedsim.client.state).

For a model shape and LoRA config: trains the adapter a few AdamW steps, then saves the client's
store entry the way the executor does (flat buffers) and the way it used to (the optimizer's
state_dict: one small tensor per parameter and moment), and reports bytes on disk, bytes of the
tensors, and save / load times. The store keeps each client's newest two versions, so an idle
client's disk footprint is twice the per-version figure.

    python benchmarks/idle_state.py                 # tiny-random shape and SmolLM2-135M shape
    python benchmarks/idle_state.py --models tiny
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from fedsim.client.state import ClientStore, flat_to_opt_state, opt_state_to_flat, state_nbytes
from fedsim.models.loader import TINY
from fedsim.models.lora import attach_lora, trainable

SHAPES = {
    "tiny": dict(TINY, vocab_size=1000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048),
}


def trained_optimizer(shape: dict, r: int, targets: list[str], steps: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True, pad_token_id=0))
    model = attach_lora(base, SimpleNamespace(r=r, alpha=2 * r, dropout=0.0, target_modules=targets), seed=0)
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randint(0, shape["vocab_size"], (1, 16))
    for _ in range(steps):
        model(input_ids=x, logits_to_keep=1).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params, opt


def timed(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(name: str, r: int, targets: list[str]) -> dict:
    params, opt = trained_optimizer(SHAPES[name], r, targets)
    n = sum(p.numel() for p in params)
    members = np.arange(64, dtype=np.int64)  # a client that trained on 64 rows
    out = {"model": name, "lora_r": r, "target_modules": targets, "lora_params": n,
           "param_tensors": len(params)}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, entry in (("flat", lambda: {"opt": opt_state_to_flat(opt), "privacy": {}, "members": members}),
                           ("state_dict", lambda: {"opt": opt.state_dict(), "privacy": {}, "members": members})):
            store = ClientStore(Path(tmp) / fmt)
            save_s = timed(lambda: store.save(0, 1, entry()))
            path = store.client_dir(0) / "r1.pt"
            load_s = timed(lambda: store.load(0, 2))
            out[fmt] = {"file_bytes": path.stat().st_size, "tensor_bytes": state_nbytes(entry()),
                        "save_ms": round(save_s * 1e3, 2), "load_ms": round(load_s * 1e3, 2)}
        # The round trip the executor does: flat entry -> a fresh AdamW over the same parameters.
        fresh = torch.optim.AdamW(params, lr=1e-3)
        saved = ClientStore(Path(tmp) / "flat").load(0, 2)
        out["flat"]["restore_ms"] = round(timed(lambda: flat_to_opt_state(fresh, saved["opt"])) * 1e3, 2)
        fresh2 = torch.optim.AdamW(params, lr=1e-3)
        saved2 = ClientStore(Path(tmp) / "state_dict").load(0, 2)
        out["state_dict"]["restore_ms"] = round(timed(lambda: fresh2.load_state_dict(saved2["opt"])) * 1e3, 2)
    out["idle_client_disk_bytes"] = 2 * out["flat"]["file_bytes"]  # the newest two versions are kept
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,smollm2-135m")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for name in a.models.split(","):
        print(json.dumps(measure(name, a.lora_r, a.target_modules.split(","))), flush=True)


if __name__ == "__main__":
    main()
