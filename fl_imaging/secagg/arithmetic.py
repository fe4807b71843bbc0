"""Secure aggregation's arithmetic and message keys, shared by the coordinator and the sites.

The protocol is SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) over Flower's Message API, with
new keys every round; the coordinator's side is
:class:`fl_imaging.secagg.coordinator.SecureAggregation`, the sites' side
:mod:`fl_imaging.secagg.site` (which also says which attack each of its checks closes). A
site sends ``q = quantize([f, f * update])`` (``f`` its weight: 1 with equal weights, else its
training cases over ``max_weight``) plus its self-mask and one pairwise mask per other site,
modulo ``modulus``; the pairwise masks cancel in the sum, the self-masks are removed with the
seeds the other sites reveal, so the coordinator learns only the sum over the round's sites.

Flower's (``flwr.common.secure_aggregation``, ``flwr.supercore.primitives.asymmetric``): Shamir
secret sharing, ECDH key agreement with HKDF, authenticated encryption of the shares (Fernet),
the layout of a share's plaintext, stochastic quantisation, key pairs and their serialisation.
From the ``cryptography`` package (which Flower's own encryption uses): HKDF to derive a pair's
mask seed from its key, the ChaCha20 keystream as the mask generator, and a private key rebuilt
from its scalar. Ours: the layout of the stages, the packing of weight and update, and the
dequantisation of a sum. Flower's ``pseudo_rand_gen`` is not used: it folds its seed to 32 bits
(NumPy's ``RandomState``), few enough for a coordinator to search one pairwise seed
exhaustively when two sites take part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.quantization import quantize

__all__ = [
    "KEYS_ACTION",
    "MASKED",
    "SHARES_ACTION",
    "SECAGG",
    "UNMASK_ACTION",
    "SecAggSettings",
    "config_bytes",
    "dequantize_sum",
    "key_from_scalar",
    "keystream_mask",
    "pack",
    "pair_seed",
    "pairwise_sign",
    "private_scalar",
    "threshold_of",
    "weight_factor",
]

#: Query actions of the stages (message types ``query.<action>``).
KEYS_ACTION = "secagg_keys"
SHARES_ACTION = "secagg_shares"
UNMASK_ACTION = "secagg_unmask"
#: ConfigRecord of every stage's message and reply; in a training message it asks the site to
#: mask its reply (the round, the sites that shared their keys, this site's shares from them,
#: the settings).
SECAGG = "secagg"
#: The masked vector in a site's training reply (an ArrayRecord of one uint32 array).
MASKED = "secagg-masked"
#: How the sites' updates are weighted in the secure sum: by training cases, or equally (what
#: client-level DP needs, and what hides a site's number of cases from the coordinator).
WEIGHTINGS = ("auto", "cases", "equal")


@dataclass(frozen=True)
class SecAggSettings:
    """The numbers both sides must agree on: ``clipping_range`` (values of the packed vector
    are clipped to [-c, c] before quantisation), ``quantization_range`` (Q: a value becomes an
    integer in [0, Q]), ``modulus`` (M, a power of two up to 2**32: masks and sums live in
    [0, M)), ``max_weight`` (a site's weight, its number of training cases, is packed as
    ``weight / max_weight`` <= 1)."""

    clipping_range: float = 8.0
    quantization_range: int = 2**24
    modulus: int = 2**32
    max_weight: float = 1000.0


def config_bytes(values: object) -> int:
    """Bytes a ConfigRecord's values take in a message, roughly: bytes and strings by length,
    numbers 8 each, lists by their items (framing left out)."""
    if isinstance(values, bytes | str):
        return len(values)
    if isinstance(values, int | float | bool):
        return 8
    if isinstance(values, dict) or hasattr(values, "values"):
        return sum(config_bytes(v) for v in values.values())  # type: ignore[union-attr]
    if isinstance(values, list | tuple):
        return sum(config_bytes(v) for v in values)
    return 0


def threshold_of(fraction_or_count: float, sites: int) -> int:
    """Shares needed to rebuild a secret among ``sites``: a count (> 1) or a fraction of the
    sites (<= 1), at least 2, more than half of ``sites`` (the sites refuse less: with half or
    fewer, two disjoint groups could each rebuild one of a site's two secrets) and at most
    ``sites``."""
    wanted = fraction_or_count if fraction_or_count > 1 else np.ceil(fraction_or_count * sites)
    return int(min(sites, max(2, sites // 2 + 1, wanted)))


def pairwise_sign(me: int, other: int) -> int:
    """+1 for the site with the smaller node id of a pair, -1 for the other: the pair's masks
    cancel in the sum."""
    return 1 if me < other else -1


def pair_seed(shared_key: bytes, server_round: int) -> bytes:
    """The 32-byte seed of a pair's mask in ``server_round``: HKDF-SHA256 of the pair's ECDH key
    (Flower's ``generate_shared_key``, from keys made for that round) with the round in its
    info."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"fl-imaging secure aggregation, pairwise mask of round %d" % server_round,
    ).derive(shared_key)


def keystream_mask(seed: bytes, size: int, modulus: int) -> np.ndarray:
    """``size`` uniform integers in [0, ``modulus``) (int64, shape ``(size,)``) from the
    ChaCha20 keystream under the 32-byte ``seed`` (``modulus`` a power of two <= 2**32)."""
    cipher = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    words = np.frombuffer(cipher.update(b"\0" * (4 * size)), dtype="<u4")
    return (words.astype(np.int64)) % modulus


def weight_factor(cases: float, weighting: str, settings: SecAggSettings) -> float:
    """A site's factor ``f`` in the secure sum: 0 when it trained on no case (a DP-SGD site whose
    budget is spent adds nothing), else 1 with ``weighting="equal"`` or ``cases / max_weight``
    with ``"cases"``. Raises ValueError naming the limit when the cases exceed ``max_weight``."""
    if cases <= 0:
        return 0.0
    if weighting == "equal":
        return 1.0
    factor = cases / settings.max_weight
    if factor > 1:
        raise ValueError(
            f"weight {cases:g} (training cases) is outside 0..strategy.secagg.max_weight="
            f"{settings.max_weight:g}: raise max_weight"
        )
    return factor


def pack(factor: float, update: np.ndarray, settings: SecAggSettings) -> np.ndarray:
    """The quantised vector a site masks: ``[f, f * update]`` (``f`` from
    :func:`weight_factor`), clipped to the clipping range and quantised (Flower's stochastic
    rounding) to integers in [0, Q]. ``update`` is flat (float, shape ``(D,)``); returns int64
    of shape ``(D + 1,)``. Raises ValueError naming the limit when ``f`` is outside [0, 1] or a
    value outside the clipping range (clipping would change the update without a word)."""
    if not 0 <= factor <= 1:
        raise ValueError(f"weight factor {factor:g} is outside 0..1")
    vector = np.concatenate([[factor], factor * np.asarray(update, dtype=np.float64)])
    largest = float(np.abs(vector).max())
    if not np.isfinite(largest) or largest > settings.clipping_range:
        raise ValueError(
            f"a value of the weighted update is {largest:.4g}, outside strategy.secagg."
            f"clipping_range={settings.clipping_range:g}: raise the range, or clip updates "
            "at the sites (strategy.dp.mode=client_fixed)"
        )
    (quantized,) = quantize([vector], settings.clipping_range, settings.quantization_range)
    return quantized.astype(np.int64)


def dequantize_sum(total: np.ndarray, sites: int, settings: SecAggSettings) -> np.ndarray:
    """The float sum over ``sites`` packed vectors from the sum of their quantised values
    (``total``, int64 in [0, M), shape ``(D + 1,)``): each value was ``(v + c) * Q / 2c``, so the
    sum of the ``v`` is ``total * 2c / Q - sites * c``. Returns float64, shape ``(D + 1,)``."""
    step = 2 * settings.clipping_range / settings.quantization_range
    return total.astype(np.float64) * step - sites * settings.clipping_range


def private_scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private value of an EC key as big-endian bytes (48 for P-384): what a site splits into
    Shamir shares (its PEM form is six times longer)."""
    size = (key.curve.key_size + 7) // 8
    return key.private_numbers().private_value.to_bytes(size, "big")


def key_from_scalar(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """The P-384 private key of :func:`private_scalar`'s bytes (``cryptography`` derives the
    public point)."""
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1())
