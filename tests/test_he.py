"""Homomorphic aggregation (TenSEAL CKKS): the server adds ciphertexts it cannot decrypt, and the
key holder reads back the exact sum up to CKKS's approximation error."""
import numpy as np
import pytest

from fedsim.privacy import he


def test_the_encrypted_sum_decrypts_to_the_sum_and_the_server_cannot_read_it():
    secret, public = he.make_keys(8192, 40)
    S, P = he.load(secret), he.load(public)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=9000) * 1e-3 * (k + 1) for k in range(3)]  # 3 chunks of 4096 slots
    uploads = [he.encrypt(S, x, 4096) for x in xs]
    assert all(len(u) == 3 for u in uploads)
    assert all(len(c) > 4096 * 8 for c in uploads[0])  # ciphertexts, bigger than the float64 plaintext
    total = he.encrypted_sum(P, uploads)
    with pytest.raises(ValueError, match="secret_key"):
        he.decrypt(P, total, 9000)  # the server's public context holds no secret key
    assert np.abs(he.decrypt(S, total, 9000) - sum(xs)).max() < 1e-7


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="poly_modulus_degree 4096"):
        he.make_keys(4096)
    secret, public = he.make_keys()
    S = he.load(secret)
    a, b = he.encrypt(S, np.ones(5000), 4096), he.encrypt(S, np.ones(10), 4096)
    with pytest.raises(ValueError, match="different chunk counts"):
        he.encrypted_sum(he.load(public), [a, b])
