"""Turn a strategy's state into JSON plus NumPy arrays and back, exactly, without pickle.

Ours: ``json`` stores plain values and ``np.savez`` / ``np.load(allow_pickle=False)`` arrays,
but neither stores the mix a strategy keeps (dicts of arrays, lists holding arrays and NumPy
scalars, Flower ``ArrayRecord`` objects, the privacy accountant's ``state_dict()``), and pickle,
which does, runs code while loading. :func:`encode` writes every array into the ``arrays`` dict
it is given (names ``a0``, ``a1``, ...) and leaves a reference in the JSON; :func:`decode` puts
them back. Values come back with their types: ``tuple`` stays ``tuple``, ``np.float64`` stays
``np.float64`` (as a 0-d array in the NPZ), an ``ArrayRecord`` keeps its arrays' order and dtypes.

JSON form: ``None``, ``bool``, ``int``, ``float`` (NaN and infinities as Python's ``json`` writes
them), ``str`` and lists as themselves; a dict whose keys are strings not starting with ``__``
as a JSON object; everything else as an object with one tag key: ``__array__`` / ``__scalar__``
(name of an NPZ entry), ``__tuple__`` (list), ``__dict__`` (list of ``[key, value]`` pairs),
``__arrayrecord__`` (list of ``[name, NPZ entry]`` pairs), ``__state_dict__`` (the encoded
``state_dict()`` of an object such as Flower's ``RdpAccountant``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["StateDictOf", "UnencodableValue", "decode", "encode"]

_TAGS = ("__array__", "__scalar__", "__tuple__", "__dict__", "__arrayrecord__", "__state_dict__")


@dataclass(frozen=True)
class StateDictOf:
    """The ``state_dict()`` of an object that is restored with ``load_state_dict()`` (Flower's
    ``RdpAccountant``) rather than replaced."""

    state: dict[str, Any]


class UnencodableValue(TypeError):
    """A value this codec cannot store (an object other than the plain types it knows); the
    message names where it was found. A programming error: a new strategy attribute that needs
    a place in :mod:`fl_imaging.flower.coordinator.checkpoint`'s list of what a checkpoint leaves
    out."""


def _add(arrays: dict[str, np.ndarray], value: np.ndarray, where: str) -> str:
    if value.dtype.hasobject:
        raise UnencodableValue(f"{where}: a NumPy array of Python objects ({value.dtype})")
    name = f"a{len(arrays)}"
    arrays[name] = value
    return name


def encode(value: Any, arrays: dict[str, np.ndarray], where: str = "value") -> Any:
    """Return the JSON form of ``value`` (see the module docstring), adding its NumPy arrays
    to ``arrays``. ``where`` names the value in errors. Raises :class:`UnencodableValue` for
    anything else (objects, callables, sets, NumPy arrays of objects)."""
    if value is None or type(value) in (bool, int, float, str):  # not np.float64, not enums
        return value
    if isinstance(value, np.ndarray):
        return {"__array__": _add(arrays, value, where)}
    if isinstance(value, np.generic):
        return {"__scalar__": _add(arrays, np.asarray(value), where)}
    if isinstance(value, list):
        return [encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, ArrayRecord):
        return {
            "__arrayrecord__": [
                [k, _add(arrays, v.numpy(), f"{where}[{k!r}]")] for k, v in value.items()
            ]
        }
    if isinstance(value, StateDictOf):
        return {"__state_dict__": encode(value.state, arrays, f"{where}.state_dict()")}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v, arrays, f"{where}[{k!r}]") for k, v in value.items()}
        return {
            "__dict__": [
                [encode(k, arrays, f"{where} key"), encode(v, arrays, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    raise UnencodableValue(f"{where}: cannot store a {type(value).__name__} in a checkpoint")


def _array(arrays: dict[str, np.ndarray], name: Any) -> np.ndarray:
    if not isinstance(name, str) or name not in arrays:
        raise ValueError(f"refers to array {name!r}, which the arrays file does not hold")
    return arrays[name]


def decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The value :func:`encode` turned into ``value`` (JSON form), with its arrays taken from
    ``arrays``. Raises ``ValueError`` when ``value`` is not such a form or names a missing
    array."""
    if isinstance(value, list):
        return [decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        tag, inner = next(iter(value.items()))
        if tag == "__array__":
            return _array(arrays, inner)
        if tag == "__scalar__":
            return _array(arrays, inner)[()]
        if tag == "__state_dict__":
            state = decode(inner, arrays)
            if not isinstance(state, dict):
                raise ValueError("__state_dict__ holds no dict")
            return StateDictOf(state)
        if not isinstance(inner, list):
            raise ValueError(f"{tag} holds a {type(inner).__name__}, not a list")
        if tag == "__tuple__":
            return tuple(decode(v, arrays) for v in inner)
        pairs = [(decode(k, arrays), v) for k, v in inner]
        if tag == "__dict__":
            return {k: decode(v, arrays) for k, v in pairs}
        return ArrayRecord({k: Array(_array(arrays, v)) for k, v in pairs})
    return {k: decode(v, arrays) for k, v in value.items()}
