"""One array per model on the wire: a message's arrays packed before it travels.

Flower 1.41 moves a message as a tree of objects (the message, its record dict, each record,
each array and each 5 MB chunk of an array), and in a deployment every object is one request on
each hop (ServerApp → SuperLink → SuperNode → ClientApp and back): a model of N arrays makes
about 2N + 5 objects per message (45-58 for the demo's U-Net). Flower has no option to send a
record as one object, so this is ours: :func:`pack_content` replaces every ArrayRecord of two or
more NumPy arrays by one ``uint8`` array holding their bytes one after the other, and a
ConfigRecord (``<key>.layout``) with their names, dtypes and shapes; :func:`unpack_content`
restores the record exactly (same keys in the same order, same dtypes, shapes and bytes).

The coordinator packs what it sends and unpacks what it receives in its Grid
(:class:`~fl_imaging.flower.coordinator.polling.QuickPollGrid`); each site does the same in a
ClientApp mod
(:func:`packed_arrays_mod`), and packs its reply only when what it received was packed. Nothing
else sees a packed record, so strategies, secure aggregation and compression are unchanged.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

__all__ = [
    "LAYOUT_SUFFIX",
    "PackCache",
    "is_packed",
    "pack_content",
    "packed_arrays_mod",
    "unpack_content",
]

#: Suffix of the ConfigRecord that says how the ArrayRecord of the same key was packed.
LAYOUT_SUFFIX = ".layout"
_PACKED = "packed"
_NUMPY = "numpy.ndarray"


#: Records already packed, by ``id`` of the original (kept alive beside its packed form, so that
#: the id cannot be reused): a round's messages share one model, packed once.
PackCache = dict[int, tuple[ArrayRecord, ArrayRecord, ConfigRecord]]


def pack_content(content: RecordDict, cache: PackCache | None = None) -> RecordDict:
    """``content`` with each ArrayRecord of two or more NumPy arrays packed into one ``uint8``
    array (key ``packed``) plus a ConfigRecord ``<key>.layout`` (JSON: ``[name, dtype, shape]``
    per array, in order). A record found in ``cache`` is not packed again (the packed records are
    shared, as Flower shares one model between a round's messages). Returns ``content`` itself
    when nothing is packed; never changes it."""
    packed: dict[str, object] = {}
    changed = False
    for key, record in content.items():
        if _packable(content, key, record):
            entry = None if cache is None else cache.get(id(record))
            if entry is None or entry[0] is not record:
                entry = (record, *_packed_record(record))  # type: ignore[arg-type]
                if cache is not None:
                    cache[id(record)] = entry
            packed[key], packed[key + LAYOUT_SUFFIX] = entry[1], entry[2]
            changed = True
        else:
            packed[key] = record
    return RecordDict(packed) if changed else content  # type: ignore[arg-type]


def _packed_record(record: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord]:
    """``record``'s arrays as one ``uint8`` array, and the layout that cuts it back apart."""
    arrays = [(name, array.numpy()) for name, array in record.items()]
    layout = [[name, a.dtype.str, list(a.shape)] for name, a in arrays]
    data = b"".join(np.ascontiguousarray(a).tobytes() for _, a in arrays)
    one = ArrayRecord({_PACKED: Array.from_numpy_ndarray(np.frombuffer(data, dtype=np.uint8))})
    return one, ConfigRecord({"layout": json.dumps(layout)})


def unpack_content(content: RecordDict) -> RecordDict:
    """The inverse of :func:`pack_content`: every packed ArrayRecord back as it was, the layout
    records removed. Returns ``content`` itself when nothing in it is packed."""
    layouts = {k[: -len(LAYOUT_SUFFIX)] for k in content if k.endswith(LAYOUT_SUFFIX)}
    if not layouts:
        return content
    restored: dict[str, object] = {}
    for key, record in content.items():
        if key.endswith(LAYOUT_SUFFIX) and key[: -len(LAYOUT_SUFFIX)] in layouts:
            continue
        if key in layouts and isinstance(record, ArrayRecord):
            layout = json.loads(content[key + LAYOUT_SUFFIX]["layout"])  # type: ignore[index]
            restored[key] = _unpacked(record[_PACKED].numpy(), layout, key)
        else:
            restored[key] = record
    return RecordDict(restored)  # type: ignore[arg-type]


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` holds a packed ArrayRecord (see :func:`pack_content`)."""
    return any(key.endswith(LAYOUT_SUFFIX) for key in content)


def packed_arrays_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: unpack what the coordinator packed, let the app handle the message, and
    pack the reply when the message came packed."""
    packed = msg.has_content() and is_packed(msg.content)
    if packed:
        msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if packed and reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


def _packable(content: RecordDict, key: str, record: object) -> bool:
    return (
        isinstance(record, ArrayRecord)
        and len(record) > 1
        and key + LAYOUT_SUFFIX not in content
        and all(array.stype == _NUMPY for array in record.values())
    )


def _unpacked(data: np.ndarray, layout: list, key: str) -> ArrayRecord:
    """The arrays of ``layout`` cut from ``data`` (the packed bytes of record ``key``)."""
    buffer = data.tobytes()
    arrays: dict[str, Array] = {}
    offset = 0
    for name, dtype, shape in layout:
        kind = np.dtype(dtype)
        size = kind.itemsize * int(np.prod(shape, dtype=np.int64))
        if offset + size > len(buffer):
            raise ValueError(f"packed record {key!r}: {len(buffer)} bytes, its layout needs more")
        part = np.frombuffer(buffer, dtype=kind, count=size // kind.itemsize, offset=offset)
        arrays[name] = Array.from_numpy_ndarray(part.reshape(shape))
        offset += size
    if offset != len(buffer):
        raise ValueError(f"packed record {key!r}: {len(buffer) - offset} bytes left over")
    return ArrayRecord(arrays)
