"""Homomorphic aggregation with TenSEAL CKKS (`privacy.he`): the server adds encrypted updates it
cannot read.

An alternative to pairwise masking (`fedsim.privacy.secagg`) with a different trust model: the
clients share one CKKS secret key (in a deployment: threshold keys, or a key holder that is not the
server); the server gets only a public context (no secret key) and the clients' ciphertexts, adds
them, and sends the encrypted sum back for decryption. No dropout recovery is needed (a missing
client's ciphertext is simply absent from the sum), at the price of much larger uploads and CPU time
(`benchmarks/he_overhead.py` measures both on the SmolLM2 LoRA vector).

In a run, a `KeyHolder` Ray actor plays the clients' joint key: it makes the keys, hands the secret
context to the clients and the public one to the aggregator, and decrypts the encrypted sum the
aggregator sends it (as in `secagg`, an honest-but-curious server that sends only sums is assumed).
Each client uploads x = (w * delta, w) as ciphertexts (`fedsim.privacy.summed`), so the aggregator
learns sum w_i delta_i and sum w_i only.

CKKS is approximate: the decrypted sum carries an error of about 2^-scale_bits times the number of
summands. A vector longer than one ciphertext's slots (poly_modulus_degree / 2) is cut into chunks.

Optional: `pip install tenseal` (imported lazily).
"""
from __future__ import annotations

import time
import uuid

import numpy as np
import torch

from fedsim.core.faults import maybe_crash
from fedsim.core.hooks import Postprocessor
from fedsim.core.update import ClientContext, RoundContext
from fedsim.privacy.summed import one_update, weighted_with_weight


def _ts():
    try:
        import tenseal
    except ImportError as e:  # an optional extra
        raise ImportError("homomorphic aggregation needs TenSEAL: pip install 'fedsim[he]'") from e
    return tenseal


def make_keys(poly_modulus_degree: int = 8192, scale_bits: int = 40) -> tuple[bytes, bytes]:
    """(secret context for the clients, public context for the server), serialized."""
    ts = _ts()
    if poly_modulus_degree not in (8192, 16384, 32768):
        raise ValueError(f"CKKS poly_modulus_degree {poly_modulus_degree}: use 8192, 16384 or 32768")
    # Sums need no multiplicative depth: one data prime at the encoding scale between two 60-bit
    # primes (the last one is the key-switching prime), which keeps ciphertexts small.
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_modulus_degree,
                     coeff_mod_bit_sizes=[60, scale_bits, 60])
    ctx.global_scale = 2.0**scale_bits
    secret = ctx.serialize(save_secret_key=True)
    ctx.make_context_public()
    return secret, ctx.serialize()


def load(context: bytes):
    return _ts().context_from(context)


def encrypt(context, x: np.ndarray, chunk: int) -> list[bytes]:
    """The client's upload: `x` (e.g. weight * delta, with the weight appended) as CKKS ciphertexts
    of `chunk` (at most poly_modulus_degree / 2) entries each."""
    ts = _ts()
    x = np.asarray(x, dtype=np.float64)
    return [ts.ckks_vector(context, x[i:i + chunk].tolist()).serialize() for i in range(0, len(x), chunk)]


def encrypted_sum(public_context, uploads: list[list[bytes]]) -> list[bytes]:
    """The server's work: add the clients' ciphertexts chunk by chunk, never decrypting."""
    ts = _ts()
    if not uploads:
        raise ValueError("encrypted_sum: no uploads")
    if len({len(u) for u in uploads}) != 1:
        raise ValueError(f"encrypted_sum: uploads have different chunk counts {sorted({len(u) for u in uploads})}")
    out = []
    for parts in zip(*uploads):
        acc = ts.ckks_vector_from(public_context, parts[0])
        for p in parts[1:]:
            acc += ts.ckks_vector_from(public_context, p)
        out.append(acc.serialize())
    return out


def decrypt(secret_context, total: list[bytes], n: int) -> np.ndarray:
    ts = _ts()
    flat = np.concatenate([np.asarray(ts.ckks_vector_from(secret_context, c).decrypt()) for c in total])
    return flat[:n]


# ---------------------------------------------------------------------------------------------
# Ciphertexts on the wire: one uint8 tensor, so the loop moves and counts them like any update


def to_wire(ciphertexts: list[bytes], n: int) -> torch.Tensor:
    """[n plaintext entries, chunk count, each chunk's length] as int64, then the chunks' bytes."""
    head = np.array([n, len(ciphertexts), *map(len, ciphertexts)], dtype=np.int64).view(np.uint8)
    return torch.from_numpy(np.concatenate([head, np.frombuffer(b"".join(ciphertexts), dtype=np.uint8)]))


def from_wire(t: torch.Tensor) -> tuple[list[bytes], int]:
    """(the chunks, the plaintext length)."""
    a = t.detach().cpu().numpy()
    if a.dtype != np.uint8:
        raise TypeError(f"he: expected an encrypted (uint8) upload, got {a.dtype} (an unencrypted update?)")
    n, k = (int(v) for v in a[:16].view(np.int64))
    start = 8 * (k + 2)
    ends = start + np.cumsum(a[16:start].view(np.int64))
    return [a[e - size:e].tobytes() for size, e in zip(np.diff(ends, prepend=start), ends)], n


# ---------------------------------------------------------------------------------------------
# The two roles: the key holder (the clients' joint key) and the postprocessor


class KeyHolder:
    """The clients' shared CKKS key. Clients get the secret context, the aggregator the public one;
    the aggregator's encrypted sums come back decrypted."""

    def __init__(self, poly_modulus_degree: int, scale_bits: int, crashes: list | None = None,
                 run_dir: str | None = None):
        self._secret, self._public = make_keys(poly_modulus_degree, scale_bits)
        self._context = load(self._secret)
        self.crashes, self.run_dir = crashes or [], run_dir  # faults.crash with actor: key_holder

    def client_context(self) -> bytes:
        return self._secret

    def server_context(self) -> bytes:
        return self._public

    def decrypt_sum(self, total: list[bytes], n: int, round: int | None = None) -> np.ndarray:
        if self.crashes:
            maybe_crash(self.crashes, self.run_dir, round, actor="key_holder")
        return decrypt(self._context, total, n)


def start_key_holder(cfg, run_dir: str | None = None):
    """(actor, its name): the run's key holder, found by name by the executors and the aggregator
    (a restarted executor finds it again); the caller keeps the handle, which keeps it alive. No
    CPU slot: it works only when a round is summed."""
    import ray

    name = f"fedsim-he-keys-{uuid.uuid4().hex[:12]}"
    he = cfg.privacy.he
    holder = ray.remote(KeyHolder).options(name=name, num_cpus=0)
    return holder.remote(he.poly_modulus_degree, he.scale_bits, cfg.faults.crash, run_dir), name


def _call(holder, method: str, *args):
    """`holder`: a key-holder actor's name (in a run) or a `KeyHolder` object (tests, benchmarks)."""
    if isinstance(holder, str):
        import ray

        return ray.get(getattr(ray.get_actor(holder), method).remote(*args))
    return getattr(holder, method)(*args)


class HEAggregation(Postprocessor):
    name = "he"
    needs = {"plain_uploads": "and privacy.secagg.enabled are two ways to hide the updates from the server; enable one"}
    # The server learns only the sum of the updates: a rule needing each client's own update
    # (PPLR's per-client mixing, stacking the clients' LoRA factors) cannot run on it.
    breaks = {"each_update": "needs strategy.name 'fedavg' (the server sees only the sum of the updates), not {value!r}",
              "each_factor": "cannot be combined with strategy.lora_mode 'stack', which needs each client's own factors"}

    def __init__(self, cfg, key_holder=None):
        _ts()  # a missing optional extra fails here, when the chain is built, not mid-round
        he = cfg.privacy.he
        self.poly_modulus_degree, self.scale_bits = he.poly_modulus_degree, he.scale_bits
        self.chunk = he.poly_modulus_degree // 2  # CKKS slots per ciphertext
        self.key_holder = key_holder
        self._client_ctx = self._server_ctx = None  # fetched from the key holder on first use

    def _holder(self):
        if self.key_holder is None:
            raise RuntimeError("privacy.he: no key holder (build_postprocessors(cfg, key_holder=...))")
        return self.key_holder

    def on_client_update(self, delta: torch.Tensor, weight: float, ctx: ClientContext):
        t0 = time.perf_counter()
        if self._client_ctx is None:
            self._client_ctx = load(_call(self._holder(), "client_context"))
        x = weighted_with_weight(delta, weight)
        # Weight 1: the real weight is the last (encrypted) entry.
        return to_wire(encrypt(self._client_ctx, x, self.chunk), len(x)), 1.0, {"he/seconds_client": time.perf_counter() - t0}

    def on_server_updates(self, updates: list, ctx: RoundContext):
        if not updates:
            return updates, {}
        t0 = time.perf_counter()
        if self._server_ctx is None:
            self._server_ctx = load(_call(self._holder(), "server_context"))
            assert not self._server_ctx.has_secret_key()  # the point of the exercise
        uploads = [from_wire(u.delta) for u in updates]
        if len({n for _, n in uploads}) != 1:
            raise ValueError(f"he: round {ctx.round + 1}: uploads of different lengths {sorted({n for _, n in uploads})}")
        total = encrypted_sum(self._server_ctx, [cts for cts, _ in uploads])
        t_sum = time.perf_counter() - t0
        plain = _call(self._holder(), "decrypt_sum", total, uploads[0][1], ctx.round)
        agg, weight_sum = one_update(plain, updates, ctx.round, "he", {"he/clients": [u.client for u in updates]})
        return [agg], {"he/seconds_server": t_sum, "he/seconds_decrypt": time.perf_counter() - t0 - t_sum,
                       "he/weight_sum": weight_sum}

    def params(self) -> dict:
        return {"he/poly_modulus_degree": self.poly_modulus_degree, "he/scale_bits": self.scale_bits}
