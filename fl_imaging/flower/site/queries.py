"""Every query a site answers besides training and evaluation, by action: the ClientApp
registers each as ``query.<action>`` in one loop.

A handler takes ``(message, context, config, site)`` and returns the reply. Secure aggregation's
stages (:mod:`fl_imaging.secagg.site`) need the message, the context and the site's
guard (its identity and policy, :func:`secagg_guard`); cross-site evaluation and contribution
scoring (:mod:`fl_imaging.evaluation.site_scoring`) and the site's statistics
(:mod:`fl_imaging.statistics.site_query`) the site's config and folder.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message

from fl_imaging.config import RunConfig
from fl_imaging.evaluation.site_scoring import (
    FINETUNE_ACTION,
    SCORE_ACTION,
    finetuned_model,
    score_models,
)
from fl_imaging.secagg.site import SECAGG_STAGES, SecAggGuard
from fl_imaging.site.setup import SiteSetup
from fl_imaging.statistics.request import STATS_ACTION
from fl_imaging.statistics.site_query import statistics_reply
from fl_imaging.training.site_training import SiteRef

__all__ = ["SITE_QUERIES", "SiteQuery", "secagg_guard"]

#: A site's query handler: (message, context, config, site) -> reply.
SiteQuery = Callable[[Message, Context, RunConfig, SiteRef], Message]


def secagg_guard(context: Context, cfg: RunConfig, site: SiteRef) -> SecAggGuard:
    """``site``'s guard in secure aggregation: its identity and roster, and its policy's
    ``secure_aggregation.min_sites`` (:class:`~fl_imaging.site.setup.SiteSetup`)."""
    setup = SiteSetup.of(dict(context.node_config), cfg, site)
    return SecAggGuard(setup.identity(), setup.policy.secure_aggregation.min_sites)


def _stage(stage: Callable[[Message, Context, SecAggGuard], Message]) -> SiteQuery:
    """A secure aggregation stage as a :data:`SiteQuery`, with the site's guard."""
    return lambda msg, context, cfg, site: stage(msg, context, secagg_guard(context, cfg, site))


#: Action -> handler of every ``query.<action>`` message a site answers.
SITE_QUERIES: dict[str, SiteQuery] = {
    **{action: _stage(stage) for action, stage in SECAGG_STAGES.items()},
    FINETUNE_ACTION: finetuned_model,
    SCORE_ACTION: score_models,
    STATS_ACTION: statistics_reply,
}
