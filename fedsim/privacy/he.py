"""Homomorphic aggregation with TenSEAL CKKS: the server adds encrypted updates it cannot read.

An alternative to pairwise masking (`fedsim.privacy.secagg`) with a different trust model: the
clients share one CKKS secret key (in a deployment: threshold keys, or a key holder that is not the
server); the server gets only a public context (no secret key) and the clients' ciphertexts, adds
them, and sends the encrypted sum back for decryption. No dropout recovery is needed (a missing
client's ciphertext is simply absent from the sum), at the price of much larger uploads and CPU time
(`benchmarks/he_overhead.py` measures both on the SmolLM2 LoRA vector).

CKKS is approximate: the decrypted sum carries an error of about 2^-scale_bits times the number of
summands. A vector longer than one ciphertext's slots (poly_modulus_degree / 2) is cut into chunks.

Optional: `pip install tenseal` (imported lazily).
"""
from __future__ import annotations

import numpy as np


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
