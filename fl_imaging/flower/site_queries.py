"""Every query a site answers besides training and evaluation, by action: the ClientApp
registers each as ``query.<action>`` in one loop.

A handler takes ``(message, context, config, site)`` and returns the reply. Secure aggregation's
stages (:mod:`fl_imaging.flower.secagg_site`) need only the message and the context; cross-site
evaluation and contribution scoring (:mod:`fl_imaging.flower.site_scoring`) also the site's
config and folder.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message

from fl_imaging.config import RunConfig
from fl_imaging.flower.secagg_site import SECAGG_STAGES
from fl_imaging.flower.site_scoring import (
    FINETUNE_ACTION,
    SCORE_ACTION,
    finetuned_model,
    score_models,
)
from fl_imaging.site_training import SiteRef

__all__ = ["SITE_QUERIES", "SiteQuery"]

#: A site's query handler: (message, context, config, site) -> reply.
SiteQuery = Callable[[Message, Context, RunConfig, SiteRef], Message]


def _stage(stage: Callable[[Message, Context], Message]) -> SiteQuery:
    """A secure aggregation stage as a :data:`SiteQuery` (config and site unused)."""
    return lambda msg, context, _cfg, _site: stage(msg, context)


#: Action -> handler of every ``query.<action>`` message a site answers.
SITE_QUERIES: dict[str, SiteQuery] = {
    **{action: _stage(stage) for action, stage in SECAGG_STAGES.items()},
    FINETUNE_ACTION: finetuned_model,
    SCORE_ACTION: score_models,
}
