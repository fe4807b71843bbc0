"""A strategy wrapper that records every site's reply, per round, and shows progress.

Flower's strategies aggregate replies but keep no per-site record; this wrapper (ours, Flower has
none) sits around any strategy, hands it the replies unchanged, and keeps one
:class:`~fl_imaging.results.MetricRow` per (round, site, metric), plus the aggregate as site
``all``. It also notes sites that failed to answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_imaging.flower.protocol import NUM_EXAMPLES, SITE_NAME, SITE_RECORD
from fl_imaging.results import AGGREGATE_SITE, MetricRow

__all__ = ["RecordingStrategy"]

log = logging.getLogger("fl_imaging.server")


def _site_name(msg: Message) -> str:
    if not msg.has_error() and SITE_RECORD in msg.content.config_records:
        return str(msg.content.config_records[SITE_RECORD][SITE_NAME])
    return f"node-{msg.metadata.src_node_id}"


class RecordingStrategy(Strategy):
    """Wraps ``inner`` and records per-site metrics of every train and evaluate reply.

    ``on_round_end(round, rows_of_that_round)`` is called after each round's evaluation, e.g. to
    print a progress line. ``rows`` holds everything recorded so far.
    """

    def __init__(
        self,
        inner: Strategy,
        on_round_end: Callable[[int, list[MetricRow]], None] | None = None,
    ) -> None:
        self.inner = inner
        self.on_round_end = on_round_end
        self.rows: list[MetricRow] = []
        self.failures: list[tuple[int, str, str]] = []
        self._round_start = time.perf_counter()

    def _record(self, server_round: int, replies: list[Message], phase: str) -> None:
        for msg in replies:
            site = _site_name(msg)
            if msg.has_error():
                self.failures.append((server_round, site, msg.error.reason))
                log.warning(
                    "round %d: site %s failed in %s: %s",
                    server_round,
                    site,
                    phase,
                    msg.error.reason,
                )
                continue
            for record in msg.content.metric_records.values():
                for key, value in record.items():
                    if isinstance(value, int | float):
                        name = "num_train" if key == NUM_EXAMPLES and phase == "train" else key
                        name = "num_val" if key == NUM_EXAMPLES and phase == "evaluate" else name
                        self.rows.append(MetricRow(server_round, site, name, float(value)))

    def _record_aggregate(self, server_round: int, metrics: MetricRecord | None) -> None:
        for key, value in (metrics or {}).items():
            if isinstance(value, int | float):
                self.rows.append(MetricRow(server_round, AGGREGATE_SITE, key, float(value)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record(server_round, replies, "train")
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        self._record_aggregate(server_round, metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, replies, "evaluate")
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        self._record_aggregate(server_round, metrics)
        self.rows.append(
            MetricRow(
                server_round,
                AGGREGATE_SITE,
                "round_seconds",
                time.perf_counter() - self._round_start,
            )
        )
        if self.on_round_end is not None:
            self.on_round_end(server_round, [r for r in self.rows if r.round == server_round])
        return metrics

    def summary(self) -> None:
        self.inner.summary()
