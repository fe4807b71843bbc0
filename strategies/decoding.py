"""Compressed updates turned back into weights before any strategy sees them.

With ``strategy.compression`` on, a site's training reply carries its encoded update
(:mod:`fl_imaging.compression.codec`) instead of its weights. :class:`DecodingStrategy` sits in the
chain (:mod:`strategies.chain`) inside the recording layer, which counts the bytes as they
travelled, and outside the update checks, so that the checks, any DP wrapper, norm bounding and
the aggregator (FedAvg family, median, Krum, trimmed mean, FedBN, ...) work unchanged on the
decoded weights: global model sent this round + decoded update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fl_imaging.compression.codec import COMPRESSED, COMPRESSION, Codec, decompress_arrays
from fl_imaging.flower.internals import ErrorCode
from fl_imaging.flower.protocol import ReplySites
from strategies.arrays import to_record
from strategies.wrapper import SentArraysWrapper

__all__ = ["DecodingStrategy"]

log = logging.getLogger("fl_imaging.server")


class DecodingStrategy(SentArraysWrapper):
    """Wraps ``inner`` and hands it every training reply with its compressed update decoded.

    A reply holding :data:`~fl_imaging.compression.codec.COMPRESSED` comes out as a reply with the
    same metadata, metric and config records and an ``arrays`` record of the weights (the
    global arrays sent this round + the decoded update, in the global model's order and
    dtypes). A reply that cannot be decoded becomes an error reply whose reason names the site
    (``[site NAME] ...``), which the update checks then reject with that reason. Error replies
    and replies without a compressed update pass unchanged. ``codec`` is the run's, ``sites``
    names replies. Evaluation is ``inner``'s.
    """

    #: Nothing kept between rounds: the codec comes from the (unchanged) config.
    checkpointed = False

    def __init__(self, inner: Strategy, codec: Codec, sites: ReplySites | None = None) -> None:
        super().__init__(inner)
        self.codec = codec
        self.sites = sites or ReplySites()

    def summary(self) -> None:
        """Log the codec, then the inner strategy's summary."""
        log.info("Update compression: %s, decoded before aggregation", self.codec.describe())
        self.inner.summary()

    def decoded(self, msg: Message) -> Message:
        """``msg`` with its compressed update replaced by the weights it stands for (see the
        class docstring). Raises RuntimeError before ``configure_train``."""
        if msg.has_error() or COMPRESSED not in msg.content.array_records:
            return msg
        if self.sent is None:
            raise RuntimeError("DecodingStrategy.decoded before configure_train")
        content = msg.content
        try:
            weights = decompress_arrays(
                content.array_records[COMPRESSED],
                content.config_records.get(COMPRESSION, ConfigRecord()),
                self.sent,
                self.codec,
            )
        except ValueError as err:
            reason = f"[site {self.sites(msg)}] compressed update refused: {err}"
            log.warning("%s", reason)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            return Message(metadata=msg.metadata, error=error)  # type: ignore[call-overload]
        kept = {k: v for k, v in content.items() if k not in (COMPRESSED, COMPRESSION)}
        decoded = RecordDict({**kept, "arrays": to_record(weights)})
        return Message(metadata=msg.metadata, content=decoded)  # type: ignore[call-overload]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Return ``inner``'s aggregate of the decoded replies."""
        return self.inner.aggregate_train(server_round, [self.decoded(m) for m in replies])
