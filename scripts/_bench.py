"""Helpers shared by the benchmarks in ``scripts/``: run a command on a clock, build the
``fl-imaging`` command line of one run, and read a run's validation metric per round from its
``metrics.csv`` rows (:func:`fl_imaging.review.results.read_metrics`).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fl_imaging.review.results import AGGREGATE_SITE, MetricRow

__all__ = ["Step", "fl_imaging_command", "main_metric", "mean_per_round", "run_timed"]


@dataclass(frozen=True)
class Step:
    """One finished command: its wall time, exit status and everything it printed."""

    cmd: list[str]
    seconds: float
    returncode: int
    output: str

    def failure(self, tail: int = 4000) -> str:
        """A message naming the failed command (and its exit status), with its last output."""
        command = " ".join(self.cmd)
        return f"benchmark step failed ({self.returncode}): {command}\n{self.output[-tail:]}"


def run_timed(cmd: list[str], cwd: Path | None = None) -> Step:
    """Run ``cmd`` in ``cwd`` (default: this process's), capturing its output; time it."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return Step(cmd, seconds, proc.returncode, proc.stdout + proc.stderr)


def fl_imaging_command(overrides: list[str], run_dir: Path) -> list[str]:
    """The ``fl-imaging`` command (this interpreter) running ``overrides`` into ``run_dir``."""
    return [sys.executable, "-m", "fl_imaging.cli.main", *overrides, f"hydra.run.dir={run_dir}"]


def main_metric(rows: list[MetricRow]) -> str:
    """The run's main validation metric: ``dice`` (segmentation) or ``accuracy``."""
    return "dice" if any(r.metric == "dice" for r in rows) else "accuracy"


def mean_per_round(
    rows: list[MetricRow], metric: str, sites: set[str] | None = None
) -> dict[int, float]:
    """Round -> unweighted mean of ``metric`` over the sites (``sites`` only, when given; never
    the aggregate site ``all``). A NaN value makes that round's mean NaN."""
    values: dict[int, list[float]] = {}
    for row in rows:
        if row.metric == metric and row.site != AGGREGATE_SITE:
            if sites is None or row.site in sites:
                values.setdefault(row.round, []).append(row.value)
    return {rnd: math.fsum(v) / len(v) for rnd, v in sorted(values.items())}
