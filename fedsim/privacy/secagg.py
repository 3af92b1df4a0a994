"""Secure aggregation with pairwise additive masks (Bonawitz et al., "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", CCS 2017), simulated faithfully enough that the
aggregator only ever holds masked vectors and their sum.

What a sampled client i does in round t (`on_client_update`, in its executor):

1. Keys. i has an X25519 key pair for the round. In a deployment it draws a fresh one and
   advertises the public key through the server (the protocol's "AdvertiseKeys" round). The
   simulation has no such round trip: every private key is derived deterministically from
   (run seed, client id, round) with HKDF-SHA256 (`client_private_key`), so any party can be
   simulated on demand, and `advertise_keys` stands in for the server relaying the sampled
   clients' *public* keys. A client only ever uses its own private key and the peers' public keys.
   The run seed is in the config, so this is a faithful simulation of the computation and the data
   flow, not a security boundary.
2. Pair seeds. For each other sampled client j: s_ij = HKDF-SHA256(X25519(sk_i, pk_j), info =
   (min(i, j), max(i, j), t)), 32 bytes; X25519 makes s_ij = s_ji without any message.
3. Fixed-point encoding. The client's contribution x = (w * delta, w) (the weighted delta and, as
   the last entry, the weight itself, so that the weights are masked too) is encoded as
   q = round(x * 2^scale_bits), an integer held mod 2^bits (two's complement).
4. Masking. y_i = q_i + sum_{j > i} m_ij - sum_{j < i} m_ji  (mod 2^bits), where m_ij is the
   ChaCha20 keystream under key s_ij read as uniform ring elements (a cryptographic PRG).
   y_i is uniform in the ring and independent of q_i for anyone without s_ij (with at least one
   other sampled client). The client uploads y_i (int32 on the wire for bits <= 32, else int64)
   and reports weight 1; its true weight travels masked in y_i.

What the server does (`on_server_updates`, in the aggregator, before the strategy):

5. Sum. Y = sum_{i in R} y_i (mod 2^bits) over the reporting clients R. If R is every sampled
   client, the masks cancel pairwise and Y = sum_i q_i exactly.
6. Dropout recovery. If sampled clients D dropped after the masks were fixed, each survivor
   j in R masked with them, so Y still holds sum_{j in R, d in D} +-m_jd. The server announces D
   and every survivor j reveals its pair seeds s_jd with the dropped clients (`SecAggClient.reveal`,
   the "Unmasking" round; executed here by the aggregator on the survivor's behalf rather than by
   a round trip to the executors). The server regenerates those masks and removes them, leaving
   exactly sum_{i in R} q_i. In the paper survivors instead reveal Shamir shares of the dropped
   clients' private keys (t-of-n), and each client also adds a self mask b_i whose shares are
   revealed for survivors, so that a late-arriving update of a client declared dropped stays
   hidden; neither the secret sharing nor the self masks are simulated (an honest-but-curious
   server that announces D truthfully is assumed). The traffic counted is the upload only.
7. Decode. sum_i q_i / 2^scale_bits gives (sum w_i delta_i, sum w_i); the server returns one
   aggregated update, delta = sum w_i delta_i / sum w_i with weight 1, so FedAvg's weighted mean
   of that single update is the weighted mean of the clients' deltas, as without SecAgg.

The server learns sum w_i delta_i and sum w_i only. Outside the protocol, the simulation's
per-client metadata (sample count, training loss, timings) still goes to the driver in the clear
as diagnostics, as with `dp/clipped` in client-level DP.

Range. The decoded sum is exact iff |sum_i q_i| < 2^(bits-1). Each client checks that every entry
of its own q satisfies |q| <= floor((2^(bits-1) - 1) / m), m = the number of sampled clients, so
no sum of up to m clients can overflow, and raises a ValueError naming the settings otherwise.
With the defaults (bits=48, scale_bits=24) an entry (a weighted delta entry, or the weight) may
be up to about 8.4e6 / m in magnitude: 838 for m = 10,000 clients, with a resolution of
2^-24 = 6e-8 (the rounding error of one entry is at most 2^-(scale_bits+1)). bits=32 with
scale_bits=16 halves the upload of bits=48 (int32 vs int64 on the wire) with a range of
32767 / m and a resolution of 1.5e-5.

Composition. The chain puts SecAgg last: client hooks run in list order, so clipping (client_dp)
and local noise (dp_lora) happen before masking; server hooks run in reverse, so unmasking happens
before the strategy and central noise is added to the unmasked mean afterwards.
"""
from __future__ import annotations

import functools
import struct
import time

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsim.core.hooks import Postprocessor
from fedsim.core.update import ClientContext, RoundContext
from fedsim.privacy.summed import one_update, weighted_with_weight

SALT = b"fedsim-secagg-v1"


def _hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=info).derive(ikm)


# ---------------------------------------------------------------------------------------------
# Keys and pair seeds


def client_private_key(seed: int, client: int, round: int) -> X25519PrivateKey:
    """Client's X25519 private key for a round: HKDF(run seed; client, round). Stands in for a
    fresh random key (see the module docstring)."""
    ikm = int(seed).to_bytes(16, "big", signed=True)
    return X25519PrivateKey.from_private_bytes(_hkdf(ikm, b"x25519-key" + struct.pack(">qq", client, round)))


@functools.lru_cache(maxsize=8)
def _advertised(seed: int, round: int, clients: tuple[int, ...]) -> dict[int, bytes]:
    return {c: client_private_key(seed, c, round).public_key().public_bytes_raw() for c in clients}


def advertise_keys(seed: int, round: int, clients: list[int]) -> dict[int, bytes]:
    """The public keys of the round's sampled clients as the server would relay them (the
    "AdvertiseKeys" round). Cached: one executor serving many virtual clients derives them once."""
    return _advertised(int(seed), int(round), tuple(sorted(int(c) for c in clients)))


def pair_seed(sk: X25519PrivateKey, peer_public: bytes, i: int, j: int, round: int) -> bytes:
    """The 32-byte seed of the pair {i, j}: HKDF-SHA256 of the X25519 shared secret. Symmetric."""
    shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(shared, b"pair-mask" + struct.pack(">qqq", min(i, j), max(i, j), round))


def ring_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _zeros(n: int, bits: int) -> bytes:
    """The plaintext whose ChaCha20 encryption is the keystream: a 32-bit word per element for
    bits <= 32, else a 64-bit word."""
    return bytes(n * (4 if bits <= 32 else 8))


def _keystream(seed: bytes, zeros: bytes, bits: int) -> np.ndarray:
    """The mask under `seed` as unreduced words (read-only): element = word mod 2^bits. Adding
    the words and reducing once at the end is the same as adding the reduced elements. A zero
    nonce is safe: each key (a pair's seed for one round) encrypts one keystream only."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(zeros)
    return np.frombuffer(stream, dtype="<u4" if bits <= 32 else "<u8")


def prg(seed: bytes, n: int, bits: int) -> np.ndarray:
    """n uniform elements of Z_{2^bits} (as uint64) from the ChaCha20 keystream under `seed`."""
    return _keystream(seed, _zeros(n, bits), bits).astype(np.uint64) & ring_mask(bits)


# ---------------------------------------------------------------------------------------------
# Fixed point


def max_abs_int(bits: int, num_summands: int) -> int:
    """The largest |q| per entry such that a sum of `num_summands` of them cannot overflow."""
    return ((1 << (bits - 1)) - 1) // max(1, num_summands)


def _float_bound(bits: int, num_summands: int) -> float:
    """`max_abs_int` as a float64 no larger than it (float64 rounds bounds of over 53 bits)."""
    limit = max_abs_int(bits, num_summands)
    bound = float(limit)
    return float(np.nextafter(bound, 0.0)) if int(bound) > limit else bound


def representable(bits: int, scale_bits: int, num_summands: int) -> float:
    """The largest |x| per entry that may be encoded when `num_summands` values are summed."""
    return _float_bound(bits, num_summands) / 2.0**scale_bits


def encode(x: np.ndarray, bits: int, scale_bits: int, num_summands: int, who: str = "a client") -> np.ndarray:
    """round(x * 2^scale_bits) mod 2^bits as uint64; raises ValueError if the sum of
    `num_summands` such encodings could overflow the ring."""
    q = np.rint(np.asarray(x, dtype=np.float64) * 2.0**scale_bits)
    bound = _float_bound(bits, num_summands)
    bad = ~np.isfinite(q) | (np.abs(q) > bound)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"secagg: {who}'s weighted update has entry {i} = {float(x[i]):.6g}, outside the range "
            f"+-{bound / 2.0**scale_bits:.6g} that privacy.secagg.bits={bits} with "
            f"privacy.secagg.scale_bits={scale_bits} can sum over {num_summands} clients without overflow; "
            f"raise privacy.secagg.bits, lower privacy.secagg.scale_bits, or clip the updates "
            f"(privacy.client_dp.clip)")
    return q.astype(np.int64).view(np.uint64) & ring_mask(bits)


def decode(u: np.ndarray, bits: int, scale_bits: int) -> np.ndarray:
    """The inverse of `encode` (float64), reading ring elements as two's complement integers."""
    u = np.asarray(u, dtype=np.uint64) & ring_mask(bits)
    if bits < 64:
        u = u.copy()
        neg = u >= np.uint64(1 << (bits - 1))
        u[neg] |= ~ring_mask(bits)  # sign-extend to 64 bits
    return u.view(np.int64).astype(np.float64) / 2.0**scale_bits


def to_wire(u: np.ndarray, bits: int) -> torch.Tensor:
    """Ring elements as the tensor a client uploads: int32 for bits <= 32, else int64 (bit patterns)."""
    if bits <= 32:
        return torch.from_numpy(u.astype(np.uint32).view(np.int32))
    return torch.from_numpy(u.view(np.int64))


def from_wire(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    if a.dtype == np.int32:
        return a.view(np.uint32).astype(np.uint64)
    if a.dtype == np.int64:
        return a.view(np.uint64)
    raise TypeError(f"secagg: expected a masked int32/int64 vector, got {a.dtype} (an unmasked update?)")


# ---------------------------------------------------------------------------------------------
# The two roles


class SecAggClient:
    """One sampled client's side of the protocol for one round."""

    def __init__(self, seed: int, client: int, round: int, sampled: list[int], bits: int):
        if client not in sampled:
            raise ValueError(f"secagg: client {client} is not among the round's sampled clients {sampled}")
        self.client, self.round, self.bits = client, round, bits
        self.peers = [c for c in sorted(sampled) if c != client]
        self._sk = client_private_key(seed, client, round)
        self._public = advertise_keys(seed, round, sampled)

    def seed_with(self, peer: int) -> bytes:
        return pair_seed(self._sk, self._public[peer], self.client, peer, self.round)

    def mask(self, encoded: np.ndarray) -> np.ndarray:
        """y = q + sum_{j > i} m_ij - sum_{j < i} m_ji (mod 2^bits)."""
        y = np.array(encoded, dtype=np.uint64, copy=True)
        zeros = _zeros(len(y), self.bits)
        for j in self.peers:
            m = _keystream(self.seed_with(j), zeros, self.bits)
            if self.client < j:
                y += m
            else:
                y -= m
        return y & ring_mask(self.bits)

    def reveal(self, dropped: list[int]) -> dict[int, bytes]:
        """The unmasking round: this survivor's pair seeds with the clients the server declares
        dropped (and with no one else: a seed with a reporting client would unmask it)."""
        return {d: self.seed_with(d) for d in dropped if d != self.client}


def remove_dropped_masks(total: np.ndarray, revealed: dict[int, dict[int, bytes]], bits: int) -> np.ndarray:
    """Take out of the survivors' sum the masks they added for dropped clients.
    `revealed[j][d]` = survivor j's pair seed with dropped client d."""
    total = np.array(total, dtype=np.uint64, copy=True)
    zeros = _zeros(len(total), bits)
    for j, seeds in revealed.items():
        for d, s in seeds.items():
            m = _keystream(s, zeros, bits)
            if j < d:  # j added +m_jd
                total -= m
            else:  # j added -m_dj
                total += m
    return total & ring_mask(bits)


def ring_sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros(len(vectors[0]), dtype=np.uint64)
    for v in vectors:
        if len(v) != len(total):
            raise ValueError(f"secagg: masked vectors of different lengths ({len(v)} vs {len(total)})")
        total += v  # uint64 arithmetic wraps mod 2^64, a multiple of 2^bits
    return total & ring_mask(bits)


# ---------------------------------------------------------------------------------------------
# The postprocessor


class SecAgg(Postprocessor):
    name = "secagg"
    # The server learns only the sum of the updates: a rule needing each client's own update
    # (PPLR's per-client mixing, stacking the clients' LoRA factors) cannot run on it.
    breaks = {"each_update": "needs strategy.name 'fedavg' (the server sees only the sum of the updates), not {value!r}",
              "each_factor": "cannot be combined with strategy.lora_mode 'stack', which needs each client's own factors",
              "plain_uploads": None}  # what it sends are masks, not the plaintext another scheme would hide

    def __init__(self, cfg):
        p = cfg.privacy.secagg
        self.bits, self.scale_bits = p.bits, p.scale_bits
        self.seed = cfg.train.seed
        from fedsim.schema import clients_per_round

        self.per_round = clients_per_round(cfg)

    def on_client_update(self, delta: torch.Tensor, weight: float, ctx: ClientContext):
        t0 = time.perf_counter()
        if not ctx.sampled:
            raise ValueError("secagg: the client context has no list of sampled clients (ClientContext.sampled)")
        x = weighted_with_weight(delta, weight)
        q = encode(x, self.bits, self.scale_bits, len(ctx.sampled), who=f"client {ctx.client}")
        y = SecAggClient(self.seed, ctx.client, ctx.round, ctx.sampled, self.bits).mask(q)
        # Weight 1: the real weight is the last (masked) entry of y.
        return to_wire(y, self.bits), 1.0, {"secagg/seconds_client": time.perf_counter() - t0}

    def on_server_updates(self, updates: list, ctx: RoundContext):
        if not updates:
            return updates, {}
        t0 = time.perf_counter()
        sampled = sorted(ctx.sampled)
        reported = [u.client for u in updates]
        if len(set(reported)) != len(reported) or not set(reported) <= set(sampled):
            raise ValueError(f"secagg: reporting clients {reported} are not distinct members of the sampled {sampled}")
        total = ring_sum([from_wire(u.delta) for u in updates], self.bits)
        dropped = sorted(set(sampled) - set(reported))
        if dropped:
            # The unmasking round: each survivor reveals its pair seeds with the dropped clients.
            revealed = {j: SecAggClient(self.seed, j, ctx.round, sampled, self.bits).reveal(dropped) for j in reported}
            total = remove_dropped_masks(total, revealed, self.bits)
        agg, weight_sum = one_update(decode(total, self.bits, self.scale_bits), updates, ctx.round, "secagg",
                                     {"secagg/clients": reported, "secagg/dropped": dropped})
        return [agg], {"secagg/seconds_server": time.perf_counter() - t0, "secagg/bits": float(self.bits),
                       "secagg/dropped": float(len(dropped)), "secagg/weight_sum": float(weight_sum)}

    def params(self) -> dict:
        return {"secagg/bits": self.bits, "secagg/scale_bits": self.scale_bits,
                # The largest |w * delta| entry (or weight) a client may send when all m sampled report.
                "secagg/max_abs_entry": representable(self.bits, self.scale_bits, self.per_round)}
