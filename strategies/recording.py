"""A strategy wrapper that records every site's reply, per round, and shows progress.

Flower's strategies aggregate replies but keep no per-site record; this wrapper (ours, Flower has
none) sits around any strategy, hands it the replies unchanged, and keeps one
:class:`~fl_imaging.review.results.MetricRow` per (round, site, metric), plus the aggregate as site
``all``: the sites' metrics, the update checks (norm, distance to the aggregate, accepted), the
privacy spent (``epsilon``), the round's duration and its aggregation's seconds. It also notes
sites that failed to answer, keeps the latest global weights, and numbers rounds from
``offset + 1`` when a run is resumed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_imaging.config.devices import SITE_ONLY_METRICS
from fl_imaging.flower.protocol import (
    GLOBAL_EVAL,
    NUM_EXAMPLES,
    UNIT_WEIGHT,
    ReplySites,
    content_sha256,
    error_reason,
    raise_if_refused,
)
from fl_imaging.review.results import AGGREGATE_SITE, Failure, MetricRow
from fl_imaging.training.site_costs import SITE_COST_METRICS
from strategies.privacy import privacy_spent
from strategies.validation import ACCEPTED, FLAGGED, IDLE, UpdateCheck
from strategies.wrapper import StrategyWrapper

__all__ = ["RecordingStrategy", "array_bytes"]

log = logging.getLogger("fl_imaging.server")

#: Reply metrics with no aggregate row: the weight, and what describes one site only.
_NOT_AGGREGATED = (UNIT_WEIGHT, *SITE_ONLY_METRICS, *SITE_COST_METRICS)


def array_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays' data in ``record`` (what a message carries, framing left out)."""
    return sum(len(array.data) for array in record.values())


class RecordingStrategy(StrategyWrapper):
    """Wraps ``inner`` and records per-site metrics of every train and evaluate reply.

    ``on_round_end(round, rows)`` is called at the end of each round with every row recorded so
    far, e.g. to print a progress line and save a checkpoint. ``sites`` names the site behind
    each reply (shared with the other layers of the chain).
    """

    #: Run bookkeeping, not aggregation state: a checkpoint keeps its rows and failures itself.
    checkpointed = False

    def __init__(
        self,
        inner: Strategy,
        on_round_end: Callable[[int, list[MetricRow]], None] | None = None,
        *,
        global_arrays: ArrayRecord | None = None,
        offset: int = 0,
        evaluate_until: int | None = None,
        sites: ReplySites | None = None,
    ) -> None:
        super().__init__(inner)
        self.sites = sites or ReplySites()
        self.on_round_end = on_round_end
        self.rows: list[MetricRow] = []
        self.failures: list[Failure] = []
        #: Per round, the SHA-256 of every reply received (site, message type, digest), as
        #: each site's own record holds it (``fl-imaging-audit site``).
        self.reply_digests: dict[int, list[dict]] = {}
        #: The global weights after the last round that produced an aggregate.
        self.global_arrays = global_arrays
        self.offset = offset
        #: One message per round: no evaluate messages before this round, whose global model
        #: the sites evaluate inside the next training message instead (None: every round).
        self.evaluate_until = evaluate_until
        #: Rounds that produced no aggregate (every reply rejected or failed).
        self.skipped: list[int] = []
        self._round_start = time.perf_counter()
        #: Bytes of the model arrays in this round's messages to the sites (train, evaluate).
        self._sent: dict[str, int] = {}
        #: The nodes asked to train, per round (the audit log names them).
        self.asked: dict[int, list[int]] = {}

    def record_checks(self, server_round: int, checks: list[UpdateCheck]) -> None:
        """Record each site's update check (``on_checks`` of the validating strategy):
        ``update_norm``, ``update_distance`` (to the new aggregate), ``update_accepted`` (1 when
        aggregated, flagged or not) and ``update_flagged``; a rejection is also a failure."""
        for check in checks:
            values = {
                "update_norm": check.update_norm,
                "update_distance": check.distance_to_aggregate,
                "update_accepted": float(check.status in (ACCEPTED, FLAGGED)),
                "update_flagged": float(check.status == FLAGGED),
            }
            for name, value in values.items():
                self.rows.append(MetricRow(server_round, check.site, name, value))
            if check.status not in (ACCEPTED, FLAGGED, IDLE):  # idle: trained on no case
                self.failures.append((server_round, check.site, f"update rejected: {check.reason}"))

    def record_secure_sum(
        self,
        server_round: int,
        summed: list[str],
        dropped: list[str],
        failure: str,
        traffic: dict[str, int],
    ) -> None:
        """Record a securely aggregated round (``on_round`` of
        :class:`~fl_imaging.secagg.coordinator.SecureAggregation`): ``secagg_summed`` per site
        (1: its masked update is in the sum; 0: it dropped out and its masks were removed with
        the others' shares), ``bytes_secagg`` per site (keys, shares and unmasking, both ways)
        and, for the aggregate, ``secagg_sites``; a failed round is a failure with the reason."""
        for site, size in traffic.items():
            self.rows.append(MetricRow(server_round, site, "bytes_secagg", float(size)))
        for site in summed:
            self.rows.append(MetricRow(server_round, site, "secagg_summed", 1.0))
        for site in dropped:
            self.rows.append(MetricRow(server_round, site, "secagg_summed", 0.0))
        self.rows.append(
            MetricRow(server_round, AGGREGATE_SITE, "secagg_sites", float(len(summed)))
        )
        if failure:
            self.failures.append((server_round, AGGREGATE_SITE, f"secure aggregation: {failure}"))

    def record_encrypted_sum(
        self,
        server_round: int,
        added: list[str],
        left_out: dict[str, str],
        traffic: dict[str, int],
    ) -> None:
        """Record a round aggregated under homomorphic encryption (``on_round`` of
        :class:`~fl_imaging.he.coordinator.HomomorphicAggregation`): ``he_summed`` per site (1:
        its ciphertext is in the sum, 0: left out, a failure with the reason), ``bytes_he`` per
        site (its ciphertext) and, for the aggregate, ``he_sites``."""
        for site, size in traffic.items():
            self.rows.append(MetricRow(server_round, site, "bytes_he", float(size)))
        for site in added:
            self.rows.append(MetricRow(server_round, site, "he_summed", 1.0))
        for site, why in left_out.items():
            self.rows.append(MetricRow(server_round, site, "he_summed", 0.0))
            self.failures.append((server_round, site, f"homomorphic encryption: {why}"))
        self.rows.append(MetricRow(server_round, AGGREGATE_SITE, "he_sites", float(len(added))))

    def record_reply(self, server_round: int, kind: str, msg: Message) -> None:
        """Keep the digest of ``msg``, a good reply of ``kind`` in ``server_round``, with its
        node (named when the round is recorded: a site's name is learnt from its replies)."""
        entry = {"node": int(msg.metadata.src_node_id), "type": kind}
        entry["sha256"] = content_sha256(msg.content)
        self.reply_digests.setdefault(server_round, []).append(entry)

    def replies_of(self, server_round: int) -> list[dict[str, str]]:
        """Round ``server_round``'s reply digests: site, message type, SHA-256, sorted."""
        named = [
            {"site": self.sites.of_node(int(e["node"])), "type": e["type"], "sha256": e["sha256"]}
            for e in self.reply_digests.get(server_round, [])
        ]
        return sorted(named, key=lambda r: (r["site"], r["type"]))

    def _record(self, server_round: int, replies: list[Message], phase: str) -> None:
        evaluated: list[tuple[str, dict]] = []
        for msg in replies:
            site = self.sites(msg)
            if not msg.has_error():
                self.record_reply(server_round, phase, msg)
            if msg.has_error():
                self.failures.append((server_round, site, error_reason(msg)))
                raise_if_refused(msg, site, server_round)  # a site's refusal stops the run
                log.warning(
                    "round %d: site %s failed in %s: %s",
                    server_round,
                    site,
                    phase,
                    error_reason(msg),
                )
                continue
            if phase == "train":
                up = sum(array_bytes(r) for r in msg.content.array_records.values())
                self.rows.append(MetricRow(server_round, site, "bytes_up", float(up)))
            self.rows.append(
                MetricRow(server_round, site, f"bytes_down_{phase}", float(self._sent[phase]))
            )
            for record in msg.content.metric_records.values():
                for key, value in record.items():
                    if isinstance(value, int | float) and key != UNIT_WEIGHT:
                        name = "num_train" if key == NUM_EXAMPLES and phase == "train" else key
                        name = "num_val" if key == NUM_EXAMPLES and phase == "evaluate" else name
                        self.rows.append(MetricRow(server_round, site, name, float(value)))
            if GLOBAL_EVAL in msg.content.config_records:
                evaluated.append((site, dict(msg.content.config_records[GLOBAL_EVAL])))
        if evaluated:
            self._record_global_eval(server_round - 1, evaluated)

    def _record_global_eval(self, rnd: int, evaluated: list[tuple[str, dict]]) -> None:
        """Record the sites' evaluation of round ``rnd``'s global model, sent with the next
        round's training replies, and its aggregate (weighted by validation cases) as ``all``."""
        totals: dict[str, float] = {}
        weight = 0.0
        for site, values in evaluated:
            cases = float(values.get(NUM_EXAMPLES, 1))
            weight += cases
            for key, value in values.items():
                if not isinstance(value, int | float):
                    continue
                name = "num_val" if key == NUM_EXAMPLES else key
                self.rows.append(MetricRow(rnd, site, name, float(value)))
                if key != NUM_EXAMPLES and not math.isnan(float(value)):
                    totals[name] = totals.get(name, 0.0) + cases * float(value)
        for name, total in totals.items():
            self.rows.append(MetricRow(rnd, AGGREGATE_SITE, name, total / max(weight, 1.0)))

    def _record_aggregate(self, server_round: int, metrics: MetricRecord | None) -> None:
        for key, value in (metrics or {}).items():
            if isinstance(value, int | float) and key not in _NOT_AGGREGATED:
                self.rows.append(MetricRow(server_round, AGGREGATE_SITE, key, float(value)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        self._sent["train"] = array_bytes(arrays)
        rnd = server_round + self.offset
        messages = list(self.inner.configure_train(rnd, arrays, config, grid))
        self.asked[rnd] = [int(m.metadata.dst_node_id) for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.offset
        replies = list(replies)
        self._record(rnd, replies, "train")
        start = time.perf_counter()
        arrays, metrics = self.inner.aggregate_train(rnd, replies)
        seconds = time.perf_counter() - start  # the chain: decoding, checks, unmasking, the mean
        self.rows.append(MetricRow(rnd, AGGREGATE_SITE, "aggregation_seconds", seconds))
        self._record_aggregate(rnd, metrics)
        if arrays is None:
            self.skipped.append(rnd)
            log.warning("round %d: no aggregate (no usable update); the global model is kept", rnd)
        else:
            self.global_arrays = arrays
        spent = privacy_spent(self.inner)
        if spent is not None:
            self.rows.append(MetricRow(rnd, AGGREGATE_SITE, "epsilon", spent[0]))
            self.rows.append(MetricRow(rnd, AGGREGATE_SITE, "delta", spent[1]))
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = server_round + self.offset
        if self.evaluate_until is not None and rnd < self.evaluate_until:
            return []
        self._sent["evaluate"] = array_bytes(arrays)
        return self.inner.configure_evaluate(rnd, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = server_round + self.offset
        replies = list(replies)
        self._record(rnd, replies, "evaluate")
        metrics = self.inner.aggregate_evaluate(rnd, replies) if replies else None
        self._record_aggregate(rnd, metrics)
        self.rows.append(
            MetricRow(rnd, AGGREGATE_SITE, "round_seconds", time.perf_counter() - self._round_start)
        )
        if self.on_round_end is not None:
            self.on_round_end(rnd, self.rows)
        return metrics
