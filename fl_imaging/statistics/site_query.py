"""The Flower side of a site's statistics: the ``query.stats`` message, answered in the
ClientApp (:data:`fl_imaging.flower.site.queries.SITE_QUERIES`) in both engines, through the
gate every message passes (the site's policy, its record).

The message's ``config`` record is the :class:`~fl_imaging.statistics.request.StatsRequest`.
The reply carries ``statistics`` (a ``ConfigRecord``: ``NAME|KEY`` -> the released values),
``withheld`` (``NAME|KEY`` -> the reason), ``applied`` (``min_count``: the minimum the site
applied) and the record naming the site. A site whose policy says ``statistics.allow: false``
refuses the query (:func:`~fl_imaging.site.policy.check_statistics`).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_imaging.config import RunConfig
from fl_imaging.flower.protocol import SITE_NAME, SITE_RECORD
from fl_imaging.site.policy import check_statistics
from fl_imaging.site.setup import SiteSetup
from fl_imaging.statistics.request import StatsRequest
from fl_imaging.statistics.site import Release, release, site_statistics
from fl_imaging.training.site_training import SiteRef

__all__ = ["SEPARATOR", "release_of_reply", "statistics_reply"]

#: Between a statistic's name and its key in the reply's records.
SEPARATOR = "|"


def statistics_reply(msg: Message, context: Context, cfg: RunConfig, site: SiteRef) -> Message:
    """``site``'s reply to a ``query.stats`` message of the run ``cfg``: its statistics as
    its own policy releases them (:func:`~fl_imaging.statistics.site.release`). Raises
    :class:`~fl_imaging.site.policy.PolicyRefusal` when the policy allows no statistics, and
    :class:`~fl_imaging.statistics.request.StatsRequestError` for an unusable request."""
    policy = SiteSetup.of(dict(context.node_config), cfg, site).policy
    check_statistics(policy)
    request = StatsRequest.from_record(msg.content.config_records["config"])
    task = cfg.task
    private = site_statistics(
        site.folder,
        task.name,
        request,
        site=site.name,
        num_classes=task.num_classes,
        class_names=task.class_names,
        modalities=cfg.data.modalities,
    )
    released = release(private, policy.statistics.min_count, request.min_count)
    content = RecordDict(
        {
            "statistics": ConfigRecord(
                {f"{n}{SEPARATOR}{k}": v for (n, k), v in released.values.items()}
            ),
            "withheld": ConfigRecord(
                {f"{n}{SEPARATOR}{k}": why for (n, k), why in released.withheld.items()}
            ),
            "applied": ConfigRecord({"min_count": released.min_count}),
            SITE_RECORD: ConfigRecord({SITE_NAME: site.name}),
        }
    )
    return Message(content=content, reply_to=msg)


def release_of_reply(content: RecordDict) -> Release:
    """The :class:`~fl_imaging.statistics.site.Release` a ``query.stats`` reply carries."""

    def split(key: str) -> tuple[str, str]:
        name, _, rest = key.partition(SEPARATOR)
        return name, rest

    values = content.config_records["statistics"]
    withheld = content.config_records["withheld"]
    return Release(
        int(content.config_records["applied"]["min_count"]),  # type: ignore[arg-type]
        {split(k): [float(x) for x in v] for k, v in values.items()},  # type: ignore[union-attr]
        {split(k): str(v) for k, v in withheld.items()},
    )
