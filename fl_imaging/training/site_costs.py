"""What a site's work costs it, as reply metrics: the seconds of its training and evaluation,
and its process's peak memory.

A site measures these itself (the coordinator only sees when a reply arrives, messaging
included), so that a round's seconds can be split into training, evaluation, aggregation and
the rest (``scripts/bench_clinical.py``). The peak memory is the largest resident set size of
the process that ran the message, since it started (``resource.getrusage``): in simulation one
Ray worker process may serve several sites in turn, and its peak is then theirs together.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "EVALUATE_SECONDS",
    "FIT_SECONDS",
    "PEAK_RSS_BYTES",
    "SITE_COST_METRICS",
    "peak_rss_bytes",
    "timed_metrics",
]

#: Training-reply metric: seconds the site spent in local training (the epochs only: loading
#: the received weights and encoding the reply are not in it).
FIT_SECONDS = "fit_seconds"
#: Evaluate-reply metric: seconds the site spent scoring the model (sliding-window inference
#: and the metrics) on its validation cases.
EVALUATE_SECONDS = "evaluate_seconds"
#: Reply metric (training and evaluate replies): the peak resident set size of the site's
#: process so far, in bytes.
PEAK_RSS_BYTES = "peak_rss_bytes"
#: Reply metrics that describe one site only: no aggregate (site ``all``) is recorded for them.
SITE_COST_METRICS = (FIT_SECONDS, EVALUATE_SECONDS, PEAK_RSS_BYTES)


def peak_rss_bytes() -> float:
    """The peak resident set size of this process since it started, in bytes: ``ru_maxrss``
    of ``resource.getrusage(RUSAGE_SELF)`` (kibibytes on Linux, bytes on macOS). NaN where the
    ``resource`` module does not exist (Windows), so that the metric says "not measured" rather
    than a wrong number."""
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return math.nan
    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024.0


@contextmanager
def timed_metrics(seconds_metric: str) -> Iterator[dict[str, float]]:
    """Time the block inside; on leaving it, the dict it yields holds ``seconds_metric`` (the
    block's wall seconds, ``time.perf_counter``) and :data:`PEAK_RSS_BYTES` (after the block),
    ready to be merged into a reply's metrics. Nothing is filled when the block raises."""
    costs: dict[str, float] = {}
    start = time.perf_counter()
    yield costs
    costs[seconds_metric] = time.perf_counter() - start
    costs[PEAK_RSS_BYTES] = peak_rss_bytes()
