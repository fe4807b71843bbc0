"""A site's side of update compression (``strategy.compression``): its training reply becomes
its compressed update, and what it did not send waits in its Flower context for the next round.

The encoding is :mod:`fl_imaging.compression.codec`'s; the coordinator decodes with
:class:`strategies.decoding.DecodingStrategy`. The residual (error feedback) lives in the site's
``context.state`` (a ``RecordDict`` Flower keeps per site and per run between messages, in
simulation and in deployment), not in process memory: Ray may run a site on another worker in
each round. A resumed run is a new Flower run, so its sites start with no residual.

With client-side DP clipping (``strategy.dp.mode=client_fixed|client_adaptive``) Flower's mod
has clipped the update before this step; the residual is then added and the sum encoded so
that its decoded form, which is what the coordinator aggregates, stays within the clipping
norm the DP wrapper sent (:func:`fl_imaging.compression.codec.compress`).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from fl_imaging.compression.codec import COMPRESSED, COMPRESSION, Codec, compress_arrays
from fl_imaging.flower.internals import KEY_CLIPPING_NORM

__all__ = ["RESIDUAL", "compress_reply", "residual_of"]

log = logging.getLogger("fl_imaging.client")

#: Key of the site's residual (float32, the ``(D,)`` vector of the floating weights) in its
#: ``context.state``.
RESIDUAL = "compression-residual"


def residual_of(context: Context) -> np.ndarray | None:
    """The site's residual kept in ``context.state``: float32 ``(D,)``, or None before its
    first compressed round."""
    if RESIDUAL not in context.state.array_records:
        return None
    return context.state.array_records[RESIDUAL][RESIDUAL].numpy()


def compress_reply(msg: Message, reply: Message, context: Context, codec: Codec) -> Message:
    """Replace the model in ``reply`` (the site's training reply to ``msg``) by its compressed
    update, and keep the new residual in ``context.state``.

    The update is the reply's ``arrays`` minus the global ``arrays`` of ``msg``; when ``msg``'s
    config holds Flower's clipping norm (client-side DP), the decoded update's L2 norm is kept
    within it. Returns a new reply with the same metric and config records, the encoded update
    under :data:`~fl_imaging.compression.codec.COMPRESSED` and the codec under
    :data:`~fl_imaging.compression.codec.COMPRESSION` (no ``arrays``); an error reply is returned as
    it is. Raises ValueError when the trained model's arrays differ from the global model's.
    """
    if reply.has_error():
        return reply
    received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    trained = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    settings = msg.content.config_records.get("config")
    bound = None
    if settings is not None and KEY_CLIPPING_NORM in settings:
        bound = float(settings[KEY_CLIPPING_NORM])  # type: ignore[arg-type]
    record, residual = compress_arrays(received, trained, codec, residual_of(context), bound)
    context.state[RESIDUAL] = ArrayRecord({RESIDUAL: Array(residual)})
    log.debug(
        "compressed update (%s): %d bytes of arrays, residual norm %.4g",
        codec.describe(),
        sum(len(a.data) for a in record.values()),
        float(np.linalg.norm(residual)),
    )
    content = RecordDict(
        {
            **{k: v for k, v in reply.content.items() if k not in reply.content.array_records},
            COMPRESSED: record,
            COMPRESSION: codec.record(),
        }
    )
    return Message(content, reply_to=msg)
