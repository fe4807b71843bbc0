"""The gate every message a site answers passes: its own policy before, its own record after.

Before the handler runs, the site checks the request against its policy
(:func:`fl_imaging.site.policy.check_request`: accepted tasks, strategies, models and config
hashes, DP-SGD required, case counts kept, secure aggregation or homomorphic encryption
required for a training reply; a statistics query is decided by the policy's ``statistics``
section instead, :mod:`fl_imaging.statistics.site_query`)
and, for training, the rounds it took part in this Flower run, counted from its own record
(:func:`~fl_imaging.site.policy.check_rounds`). After it, the reply's metrics are cut to what
the policy releases (:func:`~fl_imaging.site.policy.release_metrics`) and one record is
appended to the site's record: the request's summary and the SHA-256 of the reply's content,
or the refusal; the metrics the reply carries go to the site's CSV of the run
(:mod:`fl_imaging.review.site_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Message, MetricRecord, RecordDict

from fl_imaging.config import RunConfig
from fl_imaging.flower.protocol import SERVER_ROUND, SiteRefusal, content_sha256
from fl_imaging.he.records import HE
from fl_imaging.review.site_metrics import append_sent_metrics, sent_metrics_path
from fl_imaging.review.site_record import request_summary
from fl_imaging.secagg.arithmetic import SECAGG
from fl_imaging.site.policy import check_request, check_rounds, release_metrics
from fl_imaging.site.setup import SiteSetup
from fl_imaging.statistics.request import STATS_ACTION

__all__ = ["gated_reply"]

log = logging.getLogger("fl_imaging.client")

#: The statistics query (``fl-imaging-data stats``): no model is trained or scored, so the
#: policy's ``statistics`` section decides it, not the run's task, strategy or rounds.
STATS_MESSAGE = f"query.{STATS_ACTION}"


def _round_of(msg: Message) -> int:
    content = msg.content
    for name in (SECAGG, "config"):
        record = content.config_records.get(name)
        if record is not None:
            for key in ("round", SERVER_ROUND):
                if key in record:
                    return int(record[key])  # type: ignore[arg-type]
    return 0


def _released(setup: SiteSetup, reply: Message) -> Message:
    if not reply.has_content() or "metrics" not in reply.content.metric_records:
        return reply
    metrics = release_metrics(setup.policy, dict(reply.content["metrics"]))
    records = {k: v for k, v in reply.content.items() if k != "metrics"}
    reply.content = RecordDict({**records, "metrics": MetricRecord(metrics)})
    return reply


def _note_sent_metrics(
    setup: SiteSetup, flower_run: int, rnd: int, kind: str, reply: Message
) -> None:
    """Append the numbers of ``reply``'s metrics to the site's CSV of ``flower_run``; a file
    that cannot be written is logged, the reply still goes."""
    if not reply.has_content() or "metrics" not in reply.content.metric_records:
        return
    numbers = {
        k: v
        for k, v in reply.content["metrics"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    path = sent_metrics_path(setup.folder, flower_run)
    try:
        append_sent_metrics(path, rnd, kind, numbers)
    except OSError as err:
        log.warning("[site %s] cannot write what it sent to %s: %s", setup.name, path, err)


def gated_reply(
    setup: SiteSetup, msg: Message, cfg: RunConfig, handler: Callable[[], Message]
) -> Message:
    """``handler``'s reply to ``msg``, within ``setup``'s policy and recorded (see the module).
    Raises :class:`~fl_imaging.flower.protocol.SiteRefusal` (recorded and logged) for a request the
    policy or the secure aggregation checks refuse."""
    kind = msg.metadata.message_type
    training = kind == "train"
    flower_run = int(msg.metadata.run_id)
    record = setup.record()
    config = msg.content.config_records.get(SECAGG) or msg.content.config_records.get("config")
    fields = {
        "flower_run": flower_run,
        "round": _round_of(msg),
        "type": kind,
        "asked": request_summary(config or {}),
    }
    try:
        if kind != STATS_MESSAGE:  # statistics: the policy's statistics section (site_query)
            check_request(
                setup.policy,
                cfg,
                training=training,
                masked=SECAGG in msg.content.config_records,
                encrypted=HE in msg.content.config_records,
                simulated=setup.simulated,
            )
        if training:
            check_rounds(setup.policy, record.rounds_trained(flower_run))
        reply = _released(setup, handler())
    except SiteRefusal as err:
        log.warning("[site %s] refused %s of round %d: %s", setup.name, kind, fields["round"], err)
        record.append(**fields, refusal=str(err))
        raise
    metrics = reply.content.metric_records.get("metrics") if reply.has_content() else None
    epsilon = metrics.get("patient_epsilon") if metrics is not None else None
    record.append(
        **fields,
        reply_sha256=content_sha256(reply.content) if reply.has_content() else None,
        **({"patient_epsilon": float(epsilon)} if epsilon is not None else {}),
    )
    _note_sent_metrics(setup, flower_run, int(fields["round"]), kind, reply)
    return reply
