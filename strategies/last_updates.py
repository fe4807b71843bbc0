"""Keep the last round's site updates and re-aggregate them without one site (leave-one-out).

Ours: Flower's strategies forget a round's replies once aggregated. :class:`LastUpdates` sits
between the update checks and the aggregation (``strategies/chain.py``, only with
``engine.contributions`` or ``engine.cross_site``), so it sees exactly the replies that were
aggregated. Each round it keeps a copy of them and of the aggregation below it (the aggregator's
state before that round: FedAdam's moments, server momentum, centered clipping's centre), so that
after the run :meth:`LastUpdates.aggregate` can give the last round's aggregate of any subset of
the sites, computed by the run's own aggregator on a fresh copy: FedAvg's weighted mean for the
FedAvg family, the median, Krum's pick, the geometric median ... of the other sites for the
robust ones. It also keeps each site's latest model as the site sent it (cross-site evaluation
without fine-tuning scores it, as NVIDIA FLARE scores each client's last local model).

Nothing here is saved in a checkpoint (``checkpointed = False``): a resumed run keeps the
updates of the rounds it runs itself.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fl_imaging.flower.protocol import ReplySites
from strategies.arrays import Arrays, cast_like, reply_arrays, to_numpy, to_record
from strategies.wrapper import SentArraysWrapper

__all__ = ["LastUpdates"]

log = logging.getLogger("fl_imaging.server")


class LastUpdates(SentArraysWrapper):
    """Wraps ``inner`` (the aggregation: DP wrapper, norm bound, aggregator) and passes every
    call on unchanged, keeping the last round's replies (copies), the copy of ``inner`` from
    before that round's aggregation and every site's latest model; ``sites`` names replies.

    Attributes after a round: ``round`` (the last round that reached the aggregation, 0 before
    any), ``replies`` (site name -> a copy of its reply that round), ``latest`` (site name ->
    (round, model as name -> NumPy array)).
    """

    #: The run's bookkeeping, not aggregation state: never checkpointed.
    checkpointed = False

    def __init__(self, inner: Strategy, sites: ReplySites | None = None) -> None:
        super().__init__(inner)
        self.sites = sites or ReplySites()
        self.round = 0
        self.replies: dict[str, Message] = {}
        self.latest: dict[str, tuple[int, Arrays]] = {}
        self._before: Strategy | None = None
        self._sent: Arrays | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep copies of ``replies`` and of ``inner``, then return ``inner``'s aggregate."""
        replies = list(replies)
        kept: dict[str, Message] = {}
        for msg in replies:
            if msg.has_error():
                continue
            site = self.sites(msg)
            kept[site] = copy.deepcopy(msg)
            self.latest[site] = (server_round, to_numpy(reply_arrays(msg)[1]))
        self.round, self.replies, self._sent = server_round, kept, self.sent
        self._before = copy.deepcopy(self.inner)  # before aggregating: stateful aggregators
        return self.inner.aggregate_train(server_round, replies)

    def aggregate(self, without: Iterable[str] = ()) -> Arrays | None:
        """The last round's aggregate of the kept replies less those of the sites ``without``,
        by a fresh copy of the aggregation as it was before that round (the run's own state is
        left alone); arrays cast to the dtypes of the global model sent that round.

        Returns name -> NumPy array (the global model's names and shapes), or None when no
        reply is left or the aggregator gives no aggregate for them (e.g. Bulyan with fewer
        than 4f+3 sites). Raises ``RuntimeError`` before any round.
        """
        if self._before is None or self._sent is None:
            raise RuntimeError("LastUpdates.aggregate before any aggregated round")
        left_out = set(without)
        subset = [copy.deepcopy(m) for site, m in self.replies.items() if site not in left_out]
        if not subset:
            return None
        aggregator = copy.deepcopy(self._before)
        arrays, _ = aggregator.aggregate_train(self.round, subset)
        if arrays is None:
            return None
        return cast_like(to_numpy(arrays), self._sent)

    def aggregate_record(self, without: Iterable[str] = ()) -> ArrayRecord | None:
        """:meth:`aggregate` as an ``ArrayRecord`` (None as there)."""
        arrays = self.aggregate(without)
        return None if arrays is None else to_record(arrays)
