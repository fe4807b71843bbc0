"""Update compression: what a site sends up instead of its trained weights, and how the
coordinator gets the weights back (``strategy.compression``).

A site's **update** is its trained weights minus the global weights it received. With
compression on, a training reply carries that update encoded (:func:`compress_arrays`, called
at the site by :mod:`fl_imaging.compression.site`), and the coordinator turns it back
into weights, global + decoded update (:func:`decompress_arrays`, called by
:class:`strategies.decoding.DecodingStrategy` before any strategy sees the reply). The global
model sent down is not compressed.

Modes (:class:`~fl_imaging.config.schema.CompressionMode`), for ``D`` floating entries in ``T``
tensors:

- ``fp16``: every entry in half precision (2 bytes instead of 4); relative error at most 2**-11,
  absolute at most 2**-25 below fp16's normal range (6.1e-5); an entry beyond +-65504 becomes
  Inf, which the coordinator's update checks reject;
- ``int8``: per tensor, symmetric linear quantisation: ``scale = max |entry| / 127`` (float32),
  ``q = round(entry / scale)`` in [-127, 127] (round to nearest: error at most ``scale / 2`` per
  entry; no random generator, so a run stays reproducible from its seed; the bias of rounding is
  carried into the next round by error feedback);
- ``topk``: per tensor, the ``k = topk_count(size, fraction)`` entries of largest magnitude, as
  their positions in the tensor (uint16 when every tensor has at most 65536 entries, else
  uint32) and their float32 values, exact.

Error feedback (every lossy mode): the site adds what it did not send so far (its **residual**)
to the new update, sends the encoded sum, and keeps ``sum - decoded`` as the next residual, so
that over the rounds everything is sent, late. With a bound (client-side DP clipping), the sum
is scaled down until its decoded form is within the bound, and the part scaled away stays in the
residual too.

Wire format: an ``ArrayRecord`` under :data:`COMPRESSED` holding one array per kind for the
whole model (Flower frames every array with about 128 bytes: one per tensor would cost more than
int8 saves on a small model): ``values`` (fp16: float16 (D,); int8: int8 (D,); topk: float32
(K,)), ``scales`` (int8: float32 (T,)), ``indices`` (topk: (K,)), plus the non-floating arrays
(batch norm's counters) as they are, named ``raw/<name>``; and a ``ConfigRecord`` under
:data:`COMPRESSION` naming the mode and the top-k fraction. The floating arrays are flattened in
the global model's order (C order) and concatenated: the ``(D,)`` vector of this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_imaging.config.schema import CompressionMode, StrategyConfig

__all__ = [
    "COMPRESSED",
    "COMPRESSION",
    "Codec",
    "Compressed",
    "compress",
    "compress_arrays",
    "decode",
    "decompress_arrays",
    "encode",
    "floating_sizes",
    "topk_count",
]

#: Key of the reply's ArrayRecord that holds the encoded update (instead of ``arrays``).
COMPRESSED = "compressed-update"
#: Key of the reply's ConfigRecord that names the encoding (``mode``, ``topk``).
COMPRESSION = "compression"
#: Prefix of the non-floating arrays (integer counters), sent as they are.
RAW = "raw/"
#: The decoded update is shrunk at most this many times to fit a bound, then nothing is sent.
_SHRINK_TRIES = 30
#: Each shrink aims this far below the bound (above fp16's relative rounding of 2**-11).
_SHRINK_MARGIN = 2.0**-9

Payload = dict[str, np.ndarray]


@dataclass(frozen=True)
class Codec:
    """An encoding of updates: ``mode`` and, for top-k, ``topk``, the fraction of each tensor's
    entries sent (in (0, 1])."""

    mode: CompressionMode
    topk: float = 0.1

    @classmethod
    def of(cls, cfg: StrategyConfig) -> Codec:
        """The codec ``strategy.compression`` / ``strategy.compression_topk`` ask for."""
        return cls(CompressionMode(cfg.compression), float(cfg.compression_topk))

    @property
    def active(self) -> bool:
        """Whether replies are compressed at all (mode other than ``none``)."""
        return self.mode != CompressionMode.none

    def record(self) -> ConfigRecord:
        """The ``ConfigRecord`` a compressed reply carries under :data:`COMPRESSION`."""
        return ConfigRecord({"mode": self.mode.value, "topk": self.topk})

    def describe(self) -> str:
        """The codec in words, e.g. ``topk (0.1 of each tensor)``."""
        if self.mode == CompressionMode.topk:
            return f"topk ({self.topk:g} of each tensor)"
        return self.mode.value


def topk_count(size: int, fraction: float) -> int:
    """Entries a tensor of ``size`` entries sends with top-k ``fraction``: ``round(fraction x
    size)``, at least 1 and at most ``size`` (0 for an empty tensor). Both ends compute it, so
    the counts never travel."""
    if size <= 0:
        return 0
    return min(size, max(1, round(fraction * size)))


def _segments(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of each tensor in the ``(D,)`` vector."""
    ends = np.cumsum([0, *sizes]).tolist()
    return list(zip(ends[:-1], ends[1:], strict=True))


def _index_dtype(sizes: Sequence[int]) -> type[np.unsignedinteger]:
    return np.uint16 if max(sizes, default=0) <= 2**16 else np.uint32


def encode(update: np.ndarray, sizes: Sequence[int], codec: Codec) -> Payload:
    """Encode a flat update.

    Args:
        update: shape ``(D,)``, any float dtype, the tensors' entries concatenated.
        sizes: the ``T`` tensors' sizes (entries), summing to ``D``.
        codec: a lossy mode (``fp16``, ``int8``, ``topk``).

    Returns:
        The payload, name -> array (see the module docstring): fp16 ``values`` float16
        ``(D,)``; int8 ``values`` int8 ``(D,)`` and ``scales`` float32 ``(T,)`` (NaN for a
        tensor holding NaN or Inf, whose values are then 0); topk ``indices`` uint16/uint32
        ``(K,)`` and ``values`` float32 ``(K,)``, tensor by tensor, indices ascending.

    Raises:
        ValueError: for ``mode=none`` or sizes that do not add up to ``D``.
    """
    vector = np.asarray(update, dtype=np.float64).ravel()
    if sum(sizes) != vector.size:
        raise ValueError(f"the update has {vector.size} entries, the tensors {sum(sizes)}")
    if codec.mode == CompressionMode.fp16:
        return {"values": vector.astype(np.float16)}
    if codec.mode == CompressionMode.int8:
        values = np.zeros(vector.size, np.int8)
        scales = np.zeros(len(sizes), np.float32)
        for t, (start, end) in enumerate(_segments(sizes)):
            part = vector[start:end]
            peak = float(np.max(np.abs(part))) if part.size else 0.0
            scale = np.float32(peak / 127.0) if math.isfinite(peak) else np.float32(np.nan)
            scales[t] = scale
            if math.isfinite(scale) and scale > 0:
                values[start:end] = np.clip(np.rint(part / float(scale)), -127, 127)
        return {"values": values, "scales": scales}
    if codec.mode == CompressionMode.topk:
        indices, kept = [], []
        for start, end in _segments(sizes):
            part = vector[start:end]
            k = topk_count(part.size, codec.topk)
            chosen = np.zeros(0, np.int64)
            if k:
                chosen = np.sort(np.argpartition(np.abs(part), part.size - k)[part.size - k :])
            indices.append(chosen)
            kept.append(part[chosen])
        return {
            "indices": np.concatenate([np.zeros(0, np.int64), *indices]).astype(
                _index_dtype(sizes)
            ),
            "values": np.concatenate([np.zeros(0), *kept]).astype(np.float32),
        }
    raise ValueError(f"compression mode {codec.mode.value} encodes nothing")


def _expect(payload: Mapping[str, np.ndarray], name: str, size: int, kinds: str) -> np.ndarray:
    """``payload[name]`` as a flat array, checked: present, ``size`` entries, dtype kind in
    ``kinds`` (NumPy's ``f``, ``i``, ``u``)."""
    if name not in payload:
        raise ValueError(f"the compressed update has no '{name}' array")
    array = np.asarray(payload[name])
    if array.dtype.kind not in kinds or array.ndim != 1 or array.size != size:
        raise ValueError(
            f"the compressed update's '{name}' is {array.dtype} of shape {array.shape}, "
            f"expected {size} entries"
        )
    return array


def decode(payload: Mapping[str, np.ndarray], sizes: Sequence[int], codec: Codec) -> np.ndarray:
    """Decode what :func:`encode` made.

    Args:
        payload: name -> array, as :func:`encode` returns it (other names are ignored).
        sizes: the ``T`` tensors' sizes, as given to :func:`encode`.
        codec: the codec it was encoded with.

    Returns:
        The decoded update, float64 of shape ``(D,)``: fp16 values widened; int8 ``q x scale``;
        topk the kept values at their positions, 0 elsewhere.

    Raises:
        ValueError: naming what is wrong, for arrays missing, of another size or dtype, or
            top-k positions outside their tensor or repeated.
    """
    total = int(sum(sizes))
    if codec.mode == CompressionMode.fp16:
        return _expect(payload, "values", total, "f").astype(np.float64)
    if codec.mode == CompressionMode.int8:
        values = _expect(payload, "values", total, "i").astype(np.float64)
        scales = _expect(payload, "scales", len(sizes), "f").astype(np.float64)
        return values * np.repeat(scales, sizes)
    if codec.mode == CompressionMode.topk:
        counts = [topk_count(size, codec.topk) for size in sizes]
        indices = _expect(payload, "indices", sum(counts), "u").astype(np.int64)
        values = _expect(payload, "values", sum(counts), "f").astype(np.float64)
        out = np.zeros(total)
        offset = 0
        for (start, end), count in zip(_segments(sizes), counts, strict=True):
            chosen = indices[offset : offset + count]
            if chosen.size and (chosen[-1] >= end - start or np.any(np.diff(chosen) <= 0)):
                raise ValueError(
                    "the compressed update's top-k positions are not ascending positions "
                    "inside their tensor"
                )
            out[start + chosen] = values[offset : offset + count]
            offset += count
        return out
    raise ValueError(f"compression mode {codec.mode.value} decodes nothing")


@dataclass(frozen=True)
class Compressed:
    """One round's compression at a site: the ``payload`` sent, what the coordinator will decode
    from it (``sent``, float64 ``(D,)``) and what stays at the site (``residual``, float64
    ``(D,)``: the update plus the previous residual, minus ``sent``)."""

    payload: Payload
    sent: np.ndarray
    residual: np.ndarray


def compress(
    update: np.ndarray,
    sizes: Sequence[int],
    codec: Codec,
    residual: np.ndarray | None = None,
    bound: float | None = None,
) -> Compressed:
    """Encode ``update + residual`` with error feedback.

    Args:
        update: float ``(D,)``, this round's update.
        sizes: the tensors' sizes (see :func:`encode`).
        codec: a lossy mode.
        residual: float ``(D,)`` kept from earlier rounds, or None (zeros).
        bound: an L2 bound the decoded update must keep (client-side DP clipping), or None.
            The sum is scaled down until its decoded form's norm is at most ``bound``; if that
            fails (never seen), an all-zero update is sent. A sum holding NaN or Inf is encoded
            as it is (the coordinator rejects it) and the residual starts again from zero.

    Returns:
        A :class:`Compressed`: payload, decoded update, new residual.
    """
    wanted = np.asarray(update, dtype=np.float64).ravel()
    if residual is not None:
        wanted = wanted + np.asarray(residual, dtype=np.float64).ravel()
    factor = 1.0
    for _ in range(_SHRINK_TRIES):
        payload = encode(wanted * factor, sizes, codec)
        sent = decode(payload, sizes, codec)
        norm = float(np.linalg.norm(sent))
        if not math.isfinite(norm):  # sent as it is, for the coordinator to reject; no residual
            return Compressed(payload, sent, np.zeros_like(wanted))
        if bound is None or norm <= bound:
            return Compressed(payload, sent, wanted - sent)
        factor *= bound / norm * (1.0 - _SHRINK_MARGIN)
    payload = encode(np.zeros_like(wanted), sizes, codec)
    return Compressed(payload, np.zeros_like(wanted), wanted)


def floating_sizes(arrays: Mapping[str, np.ndarray]) -> tuple[list[str], list[int]]:
    """The floating arrays of a model (its weights; integer counters left out), in order, and
    their sizes (entries)."""
    keys = [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
    return keys, [int(np.asarray(arrays[k]).size) for k in keys]


def compress_arrays(
    received: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    codec: Codec,
    residual: np.ndarray | None = None,
    bound: float | None = None,
) -> tuple[ArrayRecord, np.ndarray]:
    """A site's compressed update, ready to send.

    Args:
        received: the global model received, name -> array.
        trained: the site's model after training, same names, shapes and dtypes.
        codec: a lossy mode.
        residual: float ``(D,)`` kept from the site's earlier rounds, or None; one of another
            size (the model changed) is dropped.
        bound: the L2 bound on the whole decoded update (the non-floating arrays' change
            included), or None: see :func:`compress`.

    Returns:
        The ``ArrayRecord`` to send under :data:`COMPRESSED` (the payload and the non-floating
        arrays as ``raw/<name>``) and the new residual, float32 ``(D,)``.

    Raises:
        ValueError: when ``trained`` and ``received`` differ in names or shapes.
    """
    if list(trained) != list(received):
        raise ValueError("compression: the trained model's arrays differ from the global model's")
    keys, sizes = floating_sizes(received)
    for key in received:
        if np.shape(trained[key]) != np.shape(received[key]):
            raise ValueError(f"compression: array '{key}' changed shape in training")
    update = np.concatenate(
        [np.zeros(0)]
        + [
            (np.asarray(trained[k], np.float64) - np.asarray(received[k], np.float64)).ravel()
            for k in keys
        ]
    )
    raw = {k: np.asarray(trained[k]) for k in received if k not in keys}
    if bound is not None:
        moved = sum(
            float(np.sum((v.astype(np.float64) - np.asarray(received[k], np.float64)) ** 2))
            for k, v in raw.items()
        )
        bound = math.sqrt(max(bound**2 - moved, 0.0))
    if residual is not None and np.size(residual) != update.size:
        residual = None
    result = compress(update, sizes, codec, residual, bound)
    record = ArrayRecord(
        {
            **{name: Array(array) for name, array in result.payload.items()},
            **{RAW + k: Array(np.array(v)) for k, v in raw.items()},
        }
    )
    return record, result.residual.astype(np.float32)


def decompress_arrays(
    record: ArrayRecord, config: ConfigRecord, received: Mapping[str, np.ndarray], codec: Codec
) -> dict[str, np.ndarray]:
    """The weights a compressed reply stands for: the global model plus the decoded update.

    Args:
        record: the reply's ``ArrayRecord`` under :data:`COMPRESSED`.
        config: the reply's ``ConfigRecord`` under :data:`COMPRESSION` (the site's codec).
        received: the global model sent this round, name -> array.
        codec: this run's codec; a reply encoded otherwise is refused.

    Returns:
        name -> array in ``received``'s order, shapes and dtypes: floating arrays are
        ``received + update`` (computed in float64, then cast), the others the site's
        ``raw/<name>`` arrays as sent.

    Raises:
        ValueError: naming what is wrong: another codec than this run's, arrays missing or
            malformed (see :func:`decode`), a non-floating array missing or of another shape.
    """
    mode, topk = str(config.get("mode", "")), float(config.get("topk", math.nan))
    if mode != codec.mode.value or (
        codec.mode == CompressionMode.topk and not math.isclose(topk, codec.topk)
    ):
        raise ValueError(
            f"the update is compressed as {mode} (topk {topk:g}), this run decodes "
            f"{codec.describe()}: every site must run the coordinator's config"
        )
    payload = {name: array.numpy() for name, array in record.items()}
    keys, sizes = floating_sizes(received)
    update = decode(payload, sizes, codec)
    out: dict[str, np.ndarray] = {}
    offsets = dict(zip(keys, _segments(sizes), strict=True))
    for key, value in received.items():
        reference = np.asarray(value)
        if key in offsets:
            start, end = offsets[key]
            step = update[start:end].reshape(reference.shape)
            out[key] = (reference.astype(np.float64) + step).astype(reference.dtype)
            continue
        if RAW + key not in payload:
            raise ValueError(f"the compressed update lacks the array '{key}' ({RAW}{key})")
        out[key] = payload[RAW + key]
        if out[key].shape != reference.shape:
            raise ValueError(
                f"the compressed update's '{key}' has shape {out[key].shape}, "
                f"expected {reference.shape}"
            )
    return out
