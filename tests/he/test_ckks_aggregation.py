"""The HE aggregation core: the decrypted sum of the sites' encrypted weighted vectors equals
FedAvg's plain weighted mean within CKKS's stated error, and the coordinator's context cannot
decrypt what it holds."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="the HE tests need the he extra: pip install -e '.[he]'")

from fl_imaging.he.ckks import (  # noqa: E402
    MAX_ERROR,
    SLOTS,
    HEError,
    add_encrypted,
    context_from,
    decrypt_vector,
    encrypt_vector,
    new_secret_context,
    public_context_bytes,
    secret_context_bytes,
)
from fl_imaging.he.vectors import (  # noqa: E402
    decrypted_mean,
    encrypt_weighted,
    encrypted_keys,
)


@pytest.fixture(scope="module")
def keys():
    """The sites' secret context and the coordinator's public copy."""
    secret = new_secret_context()
    return secret, context_from(public_context_bytes(secret))


def _site_models(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` models of one layout (two float layers across several ciphertexts, one counter)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "conv.weight": rng.normal(0, 0.3, (8, 4, 3, 3, 3)).astype(np.float32),
            "conv.bias": rng.normal(0, 0.1, (SLOTS + 7,)).astype(np.float32),
            "norm.num_batches_tracked": np.array(5, dtype=np.int64),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("weights", "seed"), [((3, 17), 0), ((5, 1, 40), 1), ((2, 9, 4, 30, 11), 2)]
)
def test_decrypted_sum_is_the_weighted_mean(keys, weights, seed) -> None:
    secret, public = keys
    models = _site_models(len(weights), seed)
    names = encrypted_keys(models[0])
    assert names == ["conv.weight", "conv.bias"]
    pairs = zip(models, weights, strict=True)
    encrypted = [encrypt_weighted(secret, m, names, w) for m, w in pairs]
    total = add_encrypted(public, encrypted)  # the coordinator's work, with the public context
    mean = decrypted_mean(secret, total, models[0], names)
    for name in names:
        plain = sum(w * m[name].astype(np.float64) for m, w in zip(models, weights, strict=True))
        plain /= sum(weights)
        error = np.abs(mean[name].astype(np.float64) - plain).max()
        # float32 rounding of the result adds up to half an ulp of the values (~1e-8 here)
        assert error < MAX_ERROR / sum(weights) + 1e-7, (name, error)
        assert mean[name].dtype == np.float32 and mean[name].shape == plain.shape
    assert int(mean["norm.num_batches_tracked"]) == 5  # counters are not encrypted


def test_raw_sum_error_is_below_the_stated_bound(keys) -> None:
    secret, public = keys
    rng = np.random.default_rng(3)
    vectors = [rng.normal(0, 50, 2 * SLOTS) for _ in range(5)]
    total = add_encrypted(public, [encrypt_vector(secret, v) for v in vectors])
    error = np.abs(decrypt_vector(secret, total, 2 * SLOTS) - sum(vectors)).max()
    assert error < MAX_ERROR


def test_a_dropout_leaves_a_sum_of_the_rest_that_decrypts(keys) -> None:
    secret, public = keys
    models, weights = _site_models(3, 4), (6, 2, 12)
    names = encrypted_keys(models[0])
    pairs = zip(models, weights, strict=True)
    encrypted = [encrypt_weighted(secret, m, names, w) for m, w in pairs]
    total = add_encrypted(public, [encrypted[0], encrypted[2]])  # site 2 did not answer
    mean = decrypted_mean(secret, total, models[0], names)
    plain = (6 * models[0]["conv.bias"].astype(np.float64) + 12 * models[2]["conv.bias"]) / 18
    assert np.abs(mean["conv.bias"] - plain).max() < 1e-6


def test_the_coordinators_context_cannot_decrypt(keys) -> None:
    secret, public = keys
    assert not public.has_secret_key() and secret.has_secret_key()
    data = encrypt_vector(secret, np.arange(10.0))
    total = add_encrypted(public, [data, data])
    with pytest.raises(HEError, match="no secret key"):
        decrypt_vector(public, total, 10)
    with pytest.raises(HEError, match="no secret key"):
        secret_context_bytes(public)
    # the raw TenSEAL call refuses too, not only our check
    import tenseal as ts

    from fl_imaging.he.ckks import _chunks

    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(public, _chunks(total)[0]).decrypt()
    assert np.allclose(decrypt_vector(secret, total, 10), 2 * np.arange(10.0), atol=1e-6)


def test_layer_selection_and_bad_input(keys) -> None:
    secret, public = keys
    model = _site_models(1, 5)[0]
    assert encrypted_keys(model, ["conv.bias"]) == ["conv.bias"]
    assert encrypted_keys(model, ["conv"]) == ["conv.weight", "conv.bias"]
    assert encrypted_keys(model, ["con"]) == []
    with pytest.raises(HEError, match="not finite"):
        encrypt_vector(secret, np.array([1.0, np.nan]))
    with pytest.raises(HEError, match="magnitude"):
        encrypt_vector(secret, np.array([1e7]))
    with pytest.raises(HEError, match="below 104858 in magnitude"):  # 2**19 / 5 sites
        encrypt_weighted(secret, {"w": np.array([2e4])}, ["w"], 10.0, sites=5)
    one = encrypt_vector(secret, np.zeros(SLOTS + 1))
    two = encrypt_vector(secret, np.zeros(1))
    with pytest.raises(HEError, match="ciphertexts"):
        add_encrypted(public, [one, two])
    with pytest.raises(HEError, match="truncated"):
        decrypt_vector(secret, one[:-10], 1)
    with pytest.raises(HEError, match="not a TenSEAL context"):
        context_from(b"not a context")
