"""CKKS encryption of a weighted model vector, the sum of ciphertexts, and its decryption.

The cryptography is TenSEAL's (Microsoft SEAL's CKKS); ours is only the packing: a flat float64
vector cut into ciphertexts of :data:`SLOTS` values each, framed into one byte string, and the
sum of such strings chunk by chunk. TenSEAL is an optional extra (``pip install
fl-imaging[he]``); :func:`tenseal` raises :class:`HEUnavailable` saying so.

Parameters (fixed, one set for every model: a federation of any size and any model up to
``2**31`` values uses them; no multiplication of ciphertexts is ever done, so one data prime
suffices):

- polynomial modulus degree :data:`POLY_MODULUS_DEGREE` = 8192 (:data:`SLOTS` = 4096 values per
  ciphertext), coefficient modulus :data:`COEFF_MOD_BIT_SIZES` = (60, 60) bits (120 bits in
  all, below the 218 bits the HomomorphicEncryption.org standard allows for 128-bit security at
  this degree), global scale ``2**40`` (:data:`SCALE_BITS`);
- precision: a fresh ciphertext decrypts within about ``2e-8`` of its value (measured); a sum
  of ``n`` of them within about ``sqrt(n)`` times that. :data:`MAX_ERROR` = ``1e-6`` is the
  stated bound on the absolute error of every value of a decrypted sum of up to 256
  ciphertexts, checked by the tests; after the division by the summed weight ``W`` the error on
  a model value is at most ``MAX_ERROR / W``;
- range: a value's encoding must stay below ``2**59`` (the data prime's half) after scaling, so
  every entry of a sum must stay below :data:`HEADROOM` = ``2**19`` in magnitude (a site of
  a round of ``n`` sites keeps its own below ``HEADROOM / n``);
- size: 32 bytes per value on the wire (131 kB per ciphertext of 4096 values), 8 times a
  float32 model; the coordinator's public context is about 0.5 MB, sent once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "COEFF_MOD_BIT_SIZES",
    "HEADROOM",
    "MAX_ERROR",
    "POLY_MODULUS_DEGREE",
    "SCALE_BITS",
    "SLOTS",
    "HEError",
    "HEUnavailable",
    "add_encrypted",
    "context_from",
    "decrypt_vector",
    "encrypt_vector",
    "new_secret_context",
    "public_context_bytes",
    "secret_context_bytes",
    "tenseal",
]

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 60)
SCALE_BITS = 40
#: Values per ciphertext (half the polynomial degree).
SLOTS = POLY_MODULUS_DEGREE // 2
#: Largest magnitude an entry of a (summed) vector may have: 2**(60 - 40 - 1).
HEADROOM = float(2 ** (COEFF_MOD_BIT_SIZES[0] - SCALE_BITS - 1))
#: Stated bound on the absolute error of each value of a decrypted sum (of up to 256 vectors).
MAX_ERROR = 1e-6

_LENGTH = struct.Struct("<I")

INSTALL_HINT = (
    "homomorphic encryption (strategy.he.enabled=true) needs TenSEAL, an optional extra: "
    "pip install fl-imaging[he]"
)


class HEUnavailable(ImportError):
    """TenSEAL is not installed; the message says how to install it."""


class HEError(ValueError):
    """Bytes that are not what this module wrote (a truncated or foreign ciphertext, a context
    without a secret key where one is needed); the message says which."""


def tenseal() -> Any:
    """The ``tenseal`` module. Raises :class:`HEUnavailable` naming ``pip install
    fl-imaging[he]`` when it is not installed."""
    try:
        import tenseal as ts
    except ImportError:
        raise HEUnavailable(INSTALL_HINT) from None
    return ts


def new_secret_context() -> Any:
    """A new CKKS context with the module's parameters and a fresh secret key (TenSEAL
    ``Context``): what the sites of one consortium share and nobody else holds."""
    ts = tenseal()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES)
    )
    context.global_scale = 2.0**SCALE_BITS
    return context


def secret_context_bytes(context: Any) -> bytes:
    """``context`` serialised with its secret key (the sites' key file)."""
    if not context.has_secret_key():
        raise HEError("this context holds no secret key")
    return bytes(context.serialize(save_secret_key=True))


def public_context_bytes(context: Any) -> bytes:
    """``context`` serialised without its secret key: what the coordinator may hold (it can
    read ciphertexts and add them, not decrypt them)."""
    return bytes(context.serialize(save_public_key=True, save_secret_key=False))


def context_from(data: bytes) -> Any:
    """The TenSEAL context serialised in ``data`` (with or without its secret key). Raises
    :class:`HEError` for bytes that are not one, or one with other parameters than this
    module's."""
    ts = tenseal()
    try:
        context = ts.context_from(bytes(data))
    except (ValueError, RuntimeError, TypeError) as err:
        raise HEError(f"not a TenSEAL context ({err})") from None
    if context.global_scale != 2.0**SCALE_BITS:
        raise HEError(
            f"the context's scale is {context.global_scale:g}, not 2**{SCALE_BITS}: a key made "
            "with other parameters"
        )
    return context


def encrypt_vector(context: Any, vector: np.ndarray, bound: float = HEADROOM) -> bytes:
    """``vector`` (shape ``(D,)``, real) encrypted under ``context`` in ``ceil(D / SLOTS)``
    CKKS ciphertexts, framed into one byte string (each ciphertext's length, 4 bytes, then its
    bytes). Raises :class:`HEError` when an entry is not finite or not below ``bound`` in
    magnitude (default :data:`HEADROOM`; a site of ``n`` passes ``HEADROOM / n`` so that the
    sum cannot wrap around either)."""
    ts = tenseal()
    values = np.asarray(vector, dtype=np.float64).ravel()
    if values.size and not (np.isfinite(values).all() and np.abs(values).max() < bound):
        raise HEError(
            f"a value to encrypt is not finite or not below {bound:g} in magnitude; "
            "CKKS with these parameters cannot hold it (or the sum of the round's sites)"
        )
    parts = []
    for start in range(0, values.size, SLOTS):
        chunk = ts.ckks_vector(context, values[start : start + SLOTS].tolist())
        data = chunk.serialize()
        parts.append(_LENGTH.pack(len(data)) + data)
    return b"".join(parts)


def _chunks(data: bytes) -> list[bytes]:
    """The ciphertexts framed in ``data`` (see :func:`encrypt_vector`)."""
    chunks, offset = [], 0
    view = memoryview(data)
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            raise HEError("truncated ciphertext frame")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + size > len(data):
            raise HEError("truncated ciphertext")
        chunks.append(bytes(view[offset : offset + size]))
        offset += size
    return chunks


def add_encrypted(context: Any, encrypted: Iterable[bytes]) -> bytes:
    """The sum of the framed vectors ``encrypted`` (each from :func:`encrypt_vector`, all of the
    same length), computed on ciphertexts with ``context`` (the public one suffices), framed
    the same way. Raises :class:`HEError` when they hold different numbers of ciphertexts or
    none is given."""
    ts = tenseal()
    total: list[Any] | None = None
    for data in encrypted:
        chunks = _chunks(data)
        if total is None:
            total = [ts.ckks_vector_from(context, c) for c in chunks]
            continue
        if len(chunks) != len(total):
            raise HEError(
                f"an encrypted update has {len(chunks)} ciphertexts, another {len(total)}"
            )
        for i, c in enumerate(chunks):
            total[i] += ts.ckks_vector_from(context, c)
    if total is None:
        raise HEError("no encrypted update to add")
    return b"".join(_LENGTH.pack(len(d)) + d for d in (c.serialize() for c in total))


def decrypt_vector(context: Any, data: bytes, size: int) -> np.ndarray:
    """The first ``size`` values of the framed vector ``data``, decrypted with ``context``'s
    secret key (float64, shape ``(size,)``). Raises :class:`HEError` when ``context`` holds no
    secret key (the coordinator's) or ``data`` holds fewer values."""
    ts = tenseal()
    if not context.has_secret_key():
        raise HEError("this context holds no secret key: it cannot decrypt")
    values = [np.asarray(ts.ckks_vector_from(context, c).decrypt()) for c in _chunks(data)]
    flat = np.concatenate(values) if values else np.zeros(0)
    if flat.size < size:
        raise HEError(f"the encrypted vector holds {flat.size} values, {size} expected")
    return flat[:size].astype(np.float64)
