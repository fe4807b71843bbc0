"""Validation of every site's update before any aggregation, as a wrapper around any strategy.

Ours: Flower's strategies only drop replies that carry an error. :class:`ValidatingStrategy`
rejects replies whose arrays hold NaN/Inf or differ in names, shapes or dtypes from the global
arrays sent this round, flags (or rejects) updates whose L2 norm is far above the round's median,
and reports, per site and round, the update norm and the distance to the new aggregate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fl_imaging.config import NORM_OUTLIER_ACTIONS, UpdateValidationConfig
from fl_imaging.flower.protocol import NUM_EXAMPLES, ReplySites, error_reason
from strategies.arrays import (
    Arrays,
    cast_like,
    floating_keys,
    layout_mismatch,
    reply_arrays,
    to_numpy,
    to_record,
    update_norm,
)
from strategies.wrapper import SentArraysWrapper

__all__ = ["ACCEPTED", "FLAGGED", "IDLE", "REJECTED", "UpdateCheck", "ValidatingStrategy"]

log = logging.getLogger("fl_imaging.server")

ACCEPTED, FLAGGED, REJECTED = "accepted", "flagged", "rejected"
#: A well-formed reply of a site that trained on no case this round (``num-examples`` 0: a site
#: whose patient-level DP budget is spent): it holds no update, so no aggregator may count it.
IDLE = "idle"


@dataclass(frozen=True)
class UpdateCheck:
    """The outcome of validating one site's training reply in one round.

    ``update_norm`` is the L2 norm of (site weights - global weights sent) over the floating
    arrays, NaN when it cannot be computed (error reply, arrays unlike the global ones);
    ``distance_to_aggregate`` the L2 distance of the site's weights to the round's new aggregate,
    NaN for rejected replies or when no aggregate was produced. ``status`` is ``accepted``,
    ``flagged`` (aggregated, but an outlier) or ``rejected`` (left out); ``reason`` says why,
    naming the site, and is empty for accepted replies.
    """

    site: str
    node_id: int
    update_norm: float
    distance_to_aggregate: float
    status: str
    reason: str


@dataclass
class _Reply:
    msg: Message
    site: str
    model: Arrays | None
    norm: float
    status: str
    reason: str


class ValidatingStrategy(SentArraysWrapper):
    """Wraps ``inner`` (any Flower ``Strategy``) and validates every training reply first.

    ``configure_train`` remembers the global arrays sent
    (:class:`~strategies.wrapper.SentArraysWrapper`). In ``aggregate_train`` a reply is always
    rejected when it carries an error, has not exactly one ArrayRecord, has array names, shapes or
    dtypes other than those sent, or holds NaN/Inf in a floating array. Of the others, an update
    whose L2 norm exceeds ``cfg.norm_factor`` times the median norm of those replies is an
    outlier, flagged or rejected per ``cfg.norm_outliers`` (no outliers when that median is 0).
    A reply with ``num-examples`` 0 trained on no case (a site whose DP-SGD budget is spent) and
    is ``idle``: left out, so that no aggregator averages it in or counts it as a site's vote
    (a run with client-level DP stops before any site sits out: its noise and accountant assume
    every site, see :class:`~fl_imaging.flower.coordinator.federation.FederationPlan`).
    Flagged and accepted replies go to ``inner``; when none is left, ``(None, None)`` is returned
    and Flower's ``Strategy.start`` keeps the previous global model for the next round. The
    aggregate's arrays are cast back to the sent dtypes (Flower's mean turns int64 counters such
    as ``num_batches_tracked`` into float64, which the next round's check would refuse).

    Each round logs one INFO line per site on ``fl_imaging.server`` and calls
    ``on_checks(round, checks)`` with one :class:`UpdateCheck` per reply. ``sites`` names a
    reply's site (:class:`~fl_imaging.flower.protocol.ReplySites`). Evaluation is ``inner``'s.
    """

    def __init__(
        self,
        inner: Strategy,
        cfg: UpdateValidationConfig | None = None,
        sites: ReplySites | None = None,
        on_checks: Callable[[int, list[UpdateCheck]], None] | None = None,
    ) -> None:
        cfg = cfg or UpdateValidationConfig()
        if cfg.norm_outliers not in NORM_OUTLIER_ACTIONS:
            raise ValueError(
                f"norm_outliers={cfg.norm_outliers!r}: allowed values are "
                f"{', '.join(NORM_OUTLIER_ACTIONS)}"
            )
        if not cfg.norm_factor > 1.0:
            raise ValueError(f"norm_factor={cfg.norm_factor}: must be greater than 1")
        super().__init__(inner)
        self.cfg = cfg
        self.sites = sites or ReplySites()
        self.on_checks = on_checks
        #: Every round's checks: round -> one UpdateCheck per reply.
        self.history: dict[int, list[UpdateCheck]] = {}

    def summary(self) -> None:
        """Log the validation settings, then the inner strategy's summary."""
        log.info(
            "Update validation: NaN/Inf and layout checks; norm outliers (> %g x median) %s",
            self.cfg.norm_factor,
            "rejected" if self.cfg.norm_outliers == "reject" else "flagged",
        )
        self.inner.summary()

    def _inspect(self, msg: Message, site: str, sent: Arrays) -> _Reply:
        if msg.has_error():
            reason = f"site {site} replied with an error: {error_reason(msg)}"
            return _Reply(msg, site, None, math.nan, REJECTED, reason)
        try:
            _, record = reply_arrays(msg)
        except ValueError as err:
            return _Reply(msg, site, None, math.nan, REJECTED, f"site {site}: {err}")
        model = to_numpy(record)
        mismatch = layout_mismatch(model, sent)
        if mismatch:
            reason = f"site {site}: {mismatch} (as sent this round)"
            return _Reply(msg, site, None, math.nan, REJECTED, reason)
        keys = floating_keys(sent)
        norm = update_norm(model, sent, keys)
        for key in keys:
            for what, count in (
                ("NaN", int(np.isnan(model[key]).sum())),
                ("Inf", int(np.isinf(model[key]).sum())),
            ):
                if count:
                    reason = f"site {site}: array '{key}' holds {count} {what} value(s)"
                    return _Reply(msg, site, model, norm, REJECTED, reason)
        return _Reply(msg, site, model, norm, ACCEPTED, "")

    def _mark_outliers(self, entries: list[_Reply]) -> None:
        norms = [e.norm for e in entries if e.status == ACCEPTED]
        median = float(np.median(norms)) if norms else 0.0
        if median <= 0.0:
            return
        status = REJECTED if self.cfg.norm_outliers == "reject" else FLAGGED
        for e in entries:
            if e.status == ACCEPTED and e.norm > self.cfg.norm_factor * median:
                e.status = status
                e.reason = (
                    f"site {e.site}: update norm {e.norm:.4g} is {e.norm / median:.1f}x the "
                    f"round's median {median:.4g} (limit {self.cfg.norm_factor:g}x)"
                )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, aggregate the ones kept with ``inner``, report the checks.

        Returns ``inner``'s ``(arrays, metrics)`` (arrays cast to the sent dtypes), or
        ``(None, None)`` when every reply is rejected. Raises ``RuntimeError`` before
        ``configure_train``.
        """
        if self.sent is None:
            raise RuntimeError("ValidatingStrategy.aggregate_train before configure_train")
        sent = self.sent
        entries = [self._inspect(msg, self.sites(msg), sent) for msg in replies]
        for e in entries:
            if e.status == ACCEPTED and _trained_nothing(e.msg):
                e.status, e.reason = IDLE, f"site {e.site} trained on no case (num-examples 0)"
        self._mark_outliers(entries)
        kept = [e for e in entries if e.status in (ACCEPTED, FLAGGED)]
        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        if kept:
            arrays, metrics = self.inner.aggregate_train(server_round, [e.msg for e in kept])
        else:
            log.warning(
                "round %d: no update to aggregate (every reply rejected or idle); the global "
                "model stays as it was",
                server_round,
            )
        aggregate = to_numpy(arrays) if arrays is not None else None
        if aggregate is not None and any(
            name in sent and value.dtype != sent[name].dtype for name, value in aggregate.items()
        ):
            aggregate = cast_like(aggregate, sent)
            arrays = to_record(aggregate)
        checks = [self._check_of(e, aggregate) for e in entries]
        for check in checks:
            log.info(
                "round %d: site %s: update norm %.4g, distance to aggregate %.4g, %s%s",
                server_round,
                check.site,
                check.update_norm,
                check.distance_to_aggregate,
                check.status,
                f" ({check.reason})" if check.reason else "",
            )
        self.history[server_round] = checks
        if self.on_checks is not None:
            self.on_checks(server_round, checks)
        return arrays, metrics

    @staticmethod
    def _check_of(entry: _Reply, aggregate: Arrays | None) -> UpdateCheck:
        distance = math.nan
        if entry.status != REJECTED and entry.model is not None and aggregate is not None:
            keys = floating_keys(entry.model, aggregate)
            distance = update_norm(entry.model, aggregate, keys)
        return UpdateCheck(
            site=entry.site,
            node_id=int(entry.msg.metadata.src_node_id),
            update_norm=entry.norm,
            distance_to_aggregate=distance,
            status=entry.status,
            reason=entry.reason,
        )


def _trained_nothing(msg: Message) -> bool:
    """Whether a reply says it trained on no case (``num-examples`` 0)."""
    metrics = next(iter(msg.content.metric_records.values()), None)
    return metrics is not None and metrics.get(NUM_EXAMPLES, 1) == 0
