"""Each method against the benchmark's reference method, over seeds: the paired difference of
the main metric and its 95 % confidence interval.

A seed is one draw of everything random in a cell (initial weights, batches, augmentation), the
same draw for every method of a setup, so the comparison pairs the seeds: per seed, the
method's mean over sites minus the reference's, then Student's t-interval of the mean of those
differences (``scipy.stats.t``). With one seed there is no interval (NaN): a single draw says
nothing about how much the difference varies. The interval is about the seeds of this split of
this dataset, not about other datasets or other splits.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Difference", "paired_differences"]

#: The interval's coverage.
CONFIDENCE = 0.95


class _Result(Protocol):
    setup: str
    method: str
    seed: int
    test: dict[str, float]


@dataclass(frozen=True)
class Difference:
    """A method's main metric minus the reference's, over the seeds both have: ``mean`` and the
    95 % interval ``low``, ``high`` (NaN with fewer than 2 seeds), ``seeds`` paired."""

    mean: float
    low: float
    high: float
    seeds: int

    def text(self, digits: int = 3) -> str:
        """``+0.010 [+0.004, +0.016]``; ``+0.010 (1 seed)`` without an interval; ``-`` when
        nothing was paired."""
        if self.seeds == 0 or math.isnan(self.mean):
            return "-"
        if math.isnan(self.low):
            return f"{self.mean:+.{digits}f} ({self.seeds} seed)"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _site_means(results: Sequence[_Result], metric: str) -> dict[tuple[str, str, int], float]:
    """(setup, method, seed) -> the unweighted mean over sites of ``metric`` (NaN sites left
    out; cells where no site has it are left out)."""
    values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in results:
        value = r.test.get(metric, math.nan)
        if not math.isnan(value):
            values[(r.setup, r.method, r.seed)].append(value)
    return {key: math.fsum(v) / len(v) for key, v in values.items() if v}


def paired_differences(
    results: Sequence[_Result], metric: str, reference: str
) -> dict[tuple[str, str], Difference]:
    """Every (setup, method) but the reference, against ``reference`` in the same setup.

    Args:
        results: one row per (setup, method, seed, site) with ``test`` metrics
            (:class:`fl_imaging.benchmark.report.SiteResult`).
        metric: the main metric (e.g. ``dice``).
        reference: the method the others are compared with (``bench.reference``).

    Returns:
        (setup, method) -> :class:`Difference` over the seeds both the method and the reference
        have; a setup without the reference gives no entries.
    """
    from scipy.stats import t as student_t

    means = _site_means(results, metric)
    differences: dict[tuple[str, str], Difference] = {}
    for setup, method in dict.fromkeys((s, m) for s, m, _ in means):
        if method == reference:
            continue
        seeds = sorted(k[2] for k in means if k[:2] == (setup, method))
        paired = [
            means[(setup, method, seed)] - means[(setup, reference, seed)]
            for seed in seeds
            if (setup, reference, seed) in means
        ]
        if not paired:
            continue
        mean = math.fsum(paired) / len(paired)
        low = high = math.nan
        if len(paired) > 1:
            spread = statistics.stdev(paired) / math.sqrt(len(paired))
            half = float(student_t.ppf((1 + CONFIDENCE) / 2, len(paired) - 1)) * spread
            low, high = mean - half, mean + half
        differences[(setup, method)] = Difference(mean, low, high, len(paired))
    return differences
