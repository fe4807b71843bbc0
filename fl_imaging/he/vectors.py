"""A model's encrypted layers as one CKKS vector, both ways: what a site encrypts and what it
gets back from a decrypted sum.

A site packs ``[w, w * x]``: its weight ``w`` (training cases) and its new weights ``x`` of the
encrypted layers, flattened, each multiplied by ``w`` in the clear before encryption. The
coordinator adds the sites' vectors (:func:`~fl_imaging.he.ckks.add_encrypted`); a site
decrypts the sum ``[W, sum w x]`` and divides by ``W``: FedAvg's weighted mean of the models
(the same as the global model plus the weighted mean of the updates, without needing the
previous global model in the clear, which a site joining late does not have).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fl_imaging.he.ckks import HEADROOM, HEError, decrypt_vector, encrypt_vector
from fl_imaging.he.records import HE, HE_SUM, HE_UPDATE
from strategies.arrays import Arrays, flatten, floating_keys, unflatten

__all__ = [
    "HE",
    "HE_SUM",
    "HE_UPDATE",
    "decrypted_mean",
    "encrypt_weighted",
    "encrypted_keys",
    "weighted_vector",
]


def encrypted_keys(arrays: Arrays, layers: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The names of ``arrays`` that travel encrypted, in order: every floating array, or with
    ``layers`` only those named by one of them (the name itself, or a prefix ending at a dot:
    ``"model.0"`` names ``model.0.conv.weight``). Integer arrays (counters) always travel in
    the clear; so do :data:`HE_SUM` and :data:`HE_UPDATE`."""
    keys = [k for k in floating_keys(arrays) if k not in (HE_SUM, HE_UPDATE)]
    if not layers:
        return keys
    return [k for k in keys if any(k == name or k.startswith(name + ".") for name in layers)]


def weighted_vector(arrays: Arrays, keys: list[str], weight: float) -> np.ndarray:
    """``[weight, weight * x]`` with ``x`` the arrays ``keys`` of ``arrays`` flattened: shape
    ``(1 + D,)``, float64."""
    return np.concatenate([[float(weight)], float(weight) * flatten(arrays, keys)])


def encrypt_weighted(
    context: Any, arrays: Arrays, keys: list[str], weight: float, sites: int = 1
) -> bytes:
    """:func:`weighted_vector` encrypted under ``context`` (framed bytes); every entry must
    stay below ``HEADROOM / sites`` (``sites``: how many sites the round's sum adds)."""
    vector = weighted_vector(arrays, keys, weight)
    return encrypt_vector(context, vector, HEADROOM / max(int(sites), 1))


def decrypted_mean(context: Any, data: bytes, like: Arrays, keys: list[str]) -> Arrays:
    """The weighted mean held in the encrypted sum ``data``: decrypted with ``context``'s
    secret key, divided by the summed weight, cut into the arrays ``keys`` with the shapes and
    dtypes of ``like`` (the other arrays of ``like`` copied). Raises
    :class:`~fl_imaging.he.ckks.HEError` when the summed weight is not positive."""
    size = 1 + sum(like[k].size for k in keys)
    vector = decrypt_vector(context, data, size)
    total = vector[0]
    if not total > 0.5:  # weights are case counts: at least 1 when any site trained
        raise HEError(f"the decrypted sum of the weights is {total:g}: no site's update in it")
    return unflatten(vector[1:] / total, like, keys)
