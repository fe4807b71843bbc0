"""The coordinator's side of ``fl-imaging-data stats``: send the request to every connected
site over the Grid (either engine), collect what each released, pool it.

Pooling is summing: every released value is a count or a sum (voxels, intensity sums and sums
of squares, label voxels and ml), so the pooled value of a statistic is the sum over the sites
that released it, and means and standard deviations follow from the pooled sums
(:func:`moments`). The coordinator never sees what a site withheld, only the reason.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fl_imaging.flower.protocol import ReplySites, error_reason
from fl_imaging.statistics.request import STATS_ACTION, StatsRequest
from fl_imaging.statistics.site import Release
from fl_imaging.statistics.site_query import release_of_reply

__all__ = ["Pooled", "SiteReleases", "collect_statistics", "moments", "pool", "wait_for_nodes"]

log = logging.getLogger("fl_imaging.server")


@dataclass
class SiteReleases:
    """What the sites sent: ``releases[site]`` and ``failures`` as (site, reason), a site's
    refusal included."""

    releases: dict[str, Release] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Pooled:
    """A pooled statistic: the elementwise sum ``values`` over ``sites``, the sites that
    released it."""

    values: tuple[float, ...]
    sites: tuple[str, ...]


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """The node ids connected to ``grid`` once ``expected`` of them are, or those connected
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    return nodes


def collect_statistics(
    grid: Grid, request: StatsRequest, nodes: list[int], *, timeout: float, sites: ReplySites
) -> SiteReleases:
    """Send ``query.stats`` with ``request`` to each of ``nodes``; wait up to ``timeout``
    seconds. Returns the :class:`SiteReleases` (a site that refused or failed: its reason)."""
    messages = [
        Message(
            content=RecordDict({"config": request.to_record()}),
            message_type=f"query.{STATS_ACTION}",
            dst_node_id=node,
        )
        for node in nodes
    ]
    out = SiteReleases()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        site = sites(reply)
        if reply.has_error():
            out.failures.append((site, error_reason(reply)))
            log.warning("statistics: site %s failed: %s", site, error_reason(reply))
        else:
            out.releases[site] = release_of_reply(reply.content)
    answered = len(out.releases) + len(out.failures)
    if answered < len(nodes):
        out.failures.append(("?", f"{len(nodes) - answered} site(s) sent no reply in {timeout} s"))
    return out


def pool(releases: Mapping[str, Release]) -> dict[tuple[str, str], Pooled]:
    """Every statistic released by at least one site, summed elementwise over the sites that
    released it (in site name order)."""
    pooled: dict[tuple[str, str], Pooled] = {}
    for site in sorted(releases):
        for ident, values in releases[site].values.items():
            before = pooled.get(ident)
            if before is None:
                pooled[ident] = Pooled(tuple(values), (site,))
            elif len(before.values) == len(values):
                summed = tuple(a + b for a, b in zip(before.values, values, strict=True))
                pooled[ident] = Pooled(summed, (*before.sites, site))
    return pooled


def moments(values: tuple[float, ...] | list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation from ``(count, sum, sum of squares)``."""
    count, total, squares = values
    if count <= 0:
        return math.nan, math.nan
    mean = total / count
    return mean, math.sqrt(max(squares / count - mean * mean, 0.0))
