"""NumPy views of the model weights carried in Flower messages, shared by our strategies.

A model here is an :data:`Arrays` dict, name -> NumPy array of any shape, in the order of its
``ArrayRecord``. Only floating arrays take part in norms, distances, medians and clipping: integer
or boolean arrays (e.g. BatchNorm's ``num_batches_tracked``, int64 of shape ``()``) are counters,
not weights, and each strategy says where it takes them from.

Shapes: ``(D,)`` is a flat float64 vector of the ``D`` elements of the floating arrays named by a
``keys`` list, concatenated in that order, each array raveled in C order. None of these functions
checks for NaN or Inf: they pass through (``strategies/validation.py`` rejects such replies).
"""

from __future__ import annotations

from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fl_imaging.flower.protocol import CONTROL_DELTA

__all__ = [
    "SIDE_RECORDS",
    "Arrays",
    "cast_like",
    "clip_to_norm",
    "flatten",
    "floating_keys",
    "layout_mismatch",
    "reply_arrays",
    "reply_weight",
    "to_numpy",
    "to_record",
    "unflatten",
    "update_norm",
]

#: A model's arrays: name -> array (any shape, any dtype), in record order.
Arrays = dict[str, np.ndarray]

#: ArrayRecords a training reply may carry beside its model: SCAFFOLD's control variate
#: change (strategies/scaffold.py), which only that strategy reads.
SIDE_RECORDS = (CONTROL_DELTA,)


def to_numpy(record: ArrayRecord) -> Arrays:
    """Return a fresh NumPy copy of every array of ``record`` (name -> array, same shapes).

    Args:
        record: a Flower ``ArrayRecord`` (e.g. a reply's model).

    Returns:
        An :data:`Arrays` dict in the record's order; each array is a new writable copy with the
        shape and dtype stored in the record (changing it leaves ``record`` unchanged).
    """
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: Arrays) -> ArrayRecord:
    """Wrap ``arrays`` (name -> array) into an ``ArrayRecord`` with the same names and order.

    Args:
        arrays: name -> array (any shape and dtype; scalars become 0-d arrays via
            ``np.asarray``).

    Returns:
        A new ``ArrayRecord`` holding serialised copies (same shapes and dtypes): later changes
        to ``arrays`` do not reach it.
    """
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def reply_arrays(msg: Message) -> tuple[str, ArrayRecord]:
    """Return ``(key, record)`` of the one model ``ArrayRecord`` in a reply's content (those of
    :data:`SIDE_RECORDS`, which are no model, left aside).

    Args:
        msg: a reply ``Message`` with content (not an error reply).

    Returns:
        The record's key in ``msg.content`` and the ``ArrayRecord`` itself (not a copy).

    Raises:
        ValueError: when the reply holds none or several (Flower's strategies expect one).
    """
    records = {
        key: record for key, record in msg.content.array_records.items() if key not in SIDE_RECORDS
    }
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord in the reply, found {len(records)}")
    key = next(iter(records))
    return key, cast(ArrayRecord, records[key])


def reply_weight(msg: Message, key: str = "num-examples") -> float:
    """Return the value of ``key`` (e.g. the site's number of training samples) in the reply's
    first MetricRecord, as a float.

    Args:
        msg: a reply ``Message`` with content.
        key: the metric to read; only the first ``MetricRecord`` of the content is looked at.

    Returns:
        ``float(value)`` (not checked: it may be 0, negative, NaN or Inf).

    Raises:
        KeyError: when the reply has no MetricRecord, or its first one lacks ``key``.
    """
    for record in msg.content.metric_records.values():
        return float(cast(float, record[key]))
    raise KeyError(f"the reply has no MetricRecord holding '{key}'")


def _is_floating(value: np.ndarray) -> bool:
    """Whether ``value``'s dtype is a real floating type (float16/32/64...; not complex)."""
    return bool(np.issubdtype(value.dtype, np.floating))


def floating_keys(arrays: Arrays, *others: Arrays) -> list[str]:
    """Names of the floating-point arrays of ``arrays`` (the model's weights), in order; with
    ``others``, only those that are floating in every one of them too.

    Args:
        arrays: the model whose names and order are used.
        others: more models; a name must be present and floating in each of them.

    Returns:
        A list of names of ``arrays`` whose dtype is a real floating type (float16/32/64);
        integer, boolean and complex arrays are left out. Shapes are not compared.
    """
    return [
        name
        for name, value in arrays.items()
        if _is_floating(value) and all(name in o and _is_floating(o[name]) for o in others)
    ]


def layout_mismatch(arrays: Arrays, reference: Arrays, check_dtype: bool = True) -> str | None:
    """Say how ``arrays`` differs from ``reference`` in names, shapes or (if ``check_dtype``)
    dtypes; None if it does not.

    Args:
        arrays: the model to check (e.g. a site's reply).
        reference: the expected layout (e.g. the global model).
        check_dtype: also require each array's dtype to equal the reference's.

    Returns:
        None when names, shapes (and dtypes) all match; the order of names and the values
        (NaN/Inf included) are not checked. Otherwise a short reason: the missing and
        unexpected names (``"missing arrays a; unexpected arrays b"``), or else the first
        array in ``reference``'s order with another shape or dtype, such as
        ``"array 'w' has shape (3,), expected (2,)"``.
    """
    missing = [name for name in reference if name not in arrays]
    extra = [name for name in arrays if name not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing arrays {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected arrays {', '.join(extra)}")
        return "; ".join(parts)
    for name, expected in reference.items():
        got = arrays[name]
        if got.shape != expected.shape:
            return f"array '{name}' has shape {got.shape}, expected {expected.shape}"
        if check_dtype and got.dtype != expected.dtype:
            return f"array '{name}' has dtype {got.dtype}, expected {expected.dtype}"
    return None


def flatten(arrays: Arrays, keys: list[str]) -> np.ndarray:
    """Concatenate the arrays named ``keys`` into one float64 vector of shape ``(D,)``.

    ``D`` is the total number of elements of those arrays.

    Args:
        arrays: the model.
        keys: names of arrays to take, in the order wanted (usually :func:`floating_keys`);
            integer arrays named here are converted to float64 too.

    Returns:
        A new float64 array of shape ``(D,)``: each array raveled in C order, in ``keys``
        order; shape ``(0,)`` when ``keys`` is empty. NaN/Inf are copied as they are.

    Raises:
        KeyError: when a name of ``keys`` is not in ``arrays``.
    """
    if not keys:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


def unflatten(vector: np.ndarray, like: Arrays, keys: list[str]) -> Arrays:
    """Inverse of :func:`flatten`: cut ``vector`` (shape ``(D,)``) back into the arrays ``keys``.

    Each array takes the shape and dtype it has in ``like``; arrays of ``like`` not in ``keys``
    (the non-floating ones) are copied from ``like`` unchanged. Returns a new dict in ``like``'s
    order.

    Args:
        vector: shape ``(D,)``, any float dtype (float64 from :func:`flatten`), ``D`` the total
            size of the arrays ``keys`` in ``like``.
        like: the model giving names, order, shapes and dtypes.
        keys: the names ``vector`` was flattened from, in the same order.

    Returns:
        A new :data:`Arrays` dict in ``like``'s order; every array is a new copy. Values are
        cast to ``like``'s dtypes (float64 -> float32 rounds; NaN/Inf stay NaN/Inf in float
        arrays).

    Raises:
        ValueError: when ``vector`` does not have exactly ``D`` elements (from the check below,
            or from NumPy's reshape when it is too short).
    """
    pieces: Arrays = {}
    offset = 0
    for key in keys:
        size = like[key].size
        pieces[key] = vector[offset : offset + size].reshape(like[key].shape)
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} elements, the arrays {offset}")
    return {
        name: pieces[name].astype(value.dtype) if name in pieces else value.copy()
        for name, value in like.items()
    }


def update_norm(arrays: Arrays, reference: Arrays, keys: list[str]) -> float:
    """L2 norm of ``arrays - reference`` over the arrays named ``keys`` (all taken together).

    Both dicts must hold those names with equal shapes. Returns a float (NaN/Inf propagate).

    Args:
        arrays: the model (e.g. a site's reply).
        reference: the model it is compared with (e.g. the global model sent to the site).
        keys: names of the arrays to include (usually :func:`floating_keys`).

    Returns:
        ``sqrt(sum over keys of ||arrays[k] - reference[k]||^2)`` as a Python float >= 0,
        computed in float64; ``0.0`` when ``keys`` is empty. NaN if any difference is NaN
        (including ``Inf - Inf``), else Inf if any is infinite.

    Raises:
        KeyError: when a name of ``keys`` is missing from either dict.
        ValueError: when the shapes of an array pair do not broadcast.
    """
    total = 0.0
    for key in keys:
        diff = np.asarray(arrays[key], dtype=np.float64) - np.asarray(reference[key], np.float64)
        total += float(np.vdot(diff, diff))
    return float(np.sqrt(total))


def clip_to_norm(vector: np.ndarray, bound: float) -> np.ndarray:
    """Scale ``vector`` (any shape) down to L2 norm ``bound`` if it is longer; else return it.

    Returns an array of the same shape whose L2 norm is ``min(norm, bound)``.

    Args:
        vector: any shape (usually a ``(D,)`` update); its norm is that of all its elements.
        bound: the largest L2 norm allowed, ``>= 0`` (not checked: a negative one flips the
            vector's sign).

    Returns:
        ``vector`` itself (same object, not a copy) when its norm is at most ``bound`` or is
        0; else the new array ``vector * (bound / norm)``, same shape (same float dtype;
        integer input gives float64). A vector holding NaN comes back all NaN; one holding
        Inf comes back with 0 for the finite entries and NaN for the infinite ones.
    """
    norm = float(np.linalg.norm(vector))
    if norm <= bound or norm == 0.0:
        return vector
    return vector * (bound / norm)


def cast_like(arrays: Arrays, reference: Arrays) -> Arrays:
    """Give each array of ``arrays`` the dtype it has in ``reference`` (same names).

    Flower's averaging turns integer counters (int64) into float64; rounding them back keeps the
    global model's dtypes the same from round to round. Names not in ``reference`` are kept.

    Args:
        arrays: the arrays to cast (e.g. an aggregate).
        reference: the model whose dtypes to take (shapes are not checked).

    Returns:
        A new dict in ``arrays``' order. Arrays already of the wanted dtype (or not in
        ``reference``) are the same objects; floating arrays wanted as integers are rounded to
        the nearest integer (halves to even, ``np.rint``) then cast; other casts are plain
        ``astype``. NaN/Inf cast to an integer dtype give undefined values (NumPy warns).
    """
    out: Arrays = {}
    for name, value in arrays.items():
        want = reference[name].dtype if name in reference else value.dtype
        if value.dtype == want:
            out[name] = value
        elif np.issubdtype(want, np.integer) and _is_floating(value):
            out[name] = np.rint(value).astype(want)
        else:
            out[name] = value.astype(want)
    return out
