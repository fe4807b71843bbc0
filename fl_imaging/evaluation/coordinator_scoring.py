"""The coordinator's side of scoring models at the sites: send models to every connected site
over the Grid (simulation or deployment), collect the scores; and ask every site for its
fine-tuned copy of the final model. The sites' side is :mod:`fl_imaging.evaluation.site_scoring`.

Only scores come back from scoring (metric values and the number of cases); the models travel
to the sites.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl_imaging.evaluation.site_scoring import (
    FINETUNE_ACTION,
    MODEL_PREFIX,
    SCORE_ACTION,
    SCORES_PREFIX,
    SITE_NORMS,
)
from fl_imaging.flower.protocol import (
    EVAL_SPLIT,
    FINETUNE_EPOCHS,
    NUM_EXAMPLES,
    ReplySites,
    error_reason,
)

__all__ = ["SiteScores", "finetuned_models", "score_at_sites"]

log = logging.getLogger("fl_imaging.server")


@dataclass
class SiteScores:
    """What the sites sent back for the models ``labels``: ``values[label][site]`` (metric name
    -> value) for every model a site scored, ``cases[site]`` the cases it scored on (0: it has
    none of that split) and ``failures`` as (site, reason)."""

    labels: list[str]
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    cases: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def scored_sites(self) -> list[str]:
        """The sites that scored every model, in name order."""
        return sorted(
            site
            for site, n in self.cases.items()
            if n > 0 and all(site in self.values.get(label, {}) for label in self.labels)
        )


def _query(
    grid: Grid, action: str, content: RecordDict, timeout: float, sites: ReplySites, what: str
) -> tuple[list[Message], list[tuple[str, str]]]:
    """Send ``query.<action>`` with ``content`` to every connected node; returns the good
    replies and the failures (site, reason), each failure logged with ``what``."""
    messages = [
        Message(
            content=RecordDict(dict(content.items())),  # one content per message
            message_type=f"query.{action}",
            dst_node_id=node,
        )
        for node in grid.get_node_ids()
    ]
    good: list[Message] = []
    failures: list[tuple[str, str]] = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        site = sites(reply)
        if reply.has_error():
            failures.append((site, f"{what}: {error_reason(reply)}"))
            log.warning("%s: site %s failed: %s", what, site, error_reason(reply))
        else:
            good.append(reply)
    return good, failures


def score_at_sites(
    grid: Grid,
    models: Mapping[str, ArrayRecord],
    split: str,
    *,
    site_norms: list[str],
    timeout: float,
    sites: ReplySites,
) -> SiteScores:
    """Send every model of ``models`` (label -> weights) to every connected site, to be scored on
    its ``split`` cases (``test`` or ``val``); ``site_norms`` names the global models (a FedBN
    site puts its own normalisation layers into them). Waits up to ``timeout`` seconds.
    Returns the :class:`SiteScores`."""
    content = RecordDict(
        {
            **{MODEL_PREFIX + label: arrays for label, arrays in models.items()},
            "config": ConfigRecord({EVAL_SPLIT: split, SITE_NORMS: list(site_norms)}),
        }
    )
    replies, failures = _query(grid, SCORE_ACTION, content, timeout, sites, f"scoring ({split})")
    scores = SiteScores(list(models), failures=failures)
    for reply in replies:
        site = sites(reply)
        scores.cases[site] = int(reply.content["metrics"][NUM_EXAMPLES])
        for key, record in reply.content.metric_records.items():
            if key.startswith(SCORES_PREFIX):
                values = {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
                scores.values.setdefault(key.removeprefix(SCORES_PREFIX), {})[site] = values
    return scores


def finetuned_models(
    grid: Grid, arrays: ArrayRecord, epochs: int, *, timeout: float, sites: ReplySites
) -> tuple[dict[str, ArrayRecord], list[tuple[str, str]]]:
    """Ask every connected site for ``arrays`` (the final global model) fine-tuned ``epochs``
    epochs on its training cases, as its test round fine-tunes it. Returns site name -> its
    fine-tuned weights, and the failures (site, reason)."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({FINETUNE_EPOCHS: epochs})})
    replies, failures = _query(grid, FINETUNE_ACTION, content, timeout, sites, "fine-tuning")
    return {sites(reply): reply.content["arrays"] for reply in replies}, failures
