"""What the coordinator asks every site for in ``fl-imaging-data stats``: the shared bin edges
and the smallest count it wants behind a number, carried as one ``ConfigRecord``.

The request is a request: each site checks the edges, applies the larger of the requested and
its own ``statistics.min_count`` (:mod:`fl_imaging.statistics.site`), and never releases more
than its policy allows.

Histograms are over the edges ``e_0 < e_1 < ... < e_n`` (n bins); the first and last bins are
open (they also hold what lies below ``e_0`` or from ``e_n`` on), so that every value is counted
somewhere and no bin's count follows from the others and a total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord

__all__ = [
    "DEFAULT_SHAPE_EDGES",
    "DEFAULT_SPACING_EDGES",
    "STATS_ACTION",
    "StatsRequest",
    "StatsRequestError",
    "even_edges",
]

#: The ``query.<action>`` a site answers with its statistics.
STATS_ACTION = "stats"

#: Voxel spacing bins (mm), per axis.
DEFAULT_SPACING_EDGES = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
#: Volume size bins (voxels), per axis.
DEFAULT_SHAPE_EDGES = (0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)


class StatsRequestError(ValueError):
    """A request whose edges or counts cannot be used; the message names the key."""


def even_edges(low: float, high: float, bins: int) -> list[float]:
    """``bins`` equal bins from ``low`` to ``high``: ``bins + 1`` edges. Raises
    :class:`StatsRequestError` for ``bins < 1`` or ``high <= low``."""
    if bins < 1 or not high > low:
        raise StatsRequestError(
            f"intensity bins: need at least 1 bin and high > low, got {bins} bin(s) over "
            f"[{low}, {high}]"
        )
    return [low + (high - low) * i / bins for i in range(bins + 1)]


@dataclass(frozen=True)
class StatsRequest:
    """The coordinator's request: ``intensity_edges`` (stored intensity, before any
    normalisation; one histogram per modality), ``spacing_edges`` (mm, one histogram per axis),
    ``shape_edges`` (voxels, one histogram per axis) and ``min_count``, the smallest count the
    coordinator wants behind a released number (a site applies at least its own)."""

    intensity_edges: tuple[float, ...]
    spacing_edges: tuple[float, ...] = DEFAULT_SPACING_EDGES
    shape_edges: tuple[float, ...] = DEFAULT_SHAPE_EDGES
    min_count: int = 1

    def problems(self) -> list[str]:
        """What makes the request unusable, one sentence per key (empty: fine)."""
        found = []
        for key, edges in self.edges().items():
            if len(edges) < 2:
                found.append(f"{key}: needs at least 2 edges (1 bin), got {len(edges)}")
            elif any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
                found.append(f"{key}: edges must increase strictly, got {list(edges)}")
        if self.min_count < 1:
            found.append(f"min_count: must be at least 1, got {self.min_count}")
        return found

    def edges(self) -> dict[str, tuple[float, ...]]:
        """The bin edges by request key."""
        return {
            "intensity_edges": self.intensity_edges,
            "spacing_edges": self.spacing_edges,
            "shape_edges": self.shape_edges,
        }

    def to_record(self) -> ConfigRecord:
        """The request as the ``config`` record of a ``query.stats`` message."""
        return ConfigRecord(
            {
                **{key: [float(e) for e in edges] for key, edges in self.edges().items()},
                "min_count": int(self.min_count),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> StatsRequest:
        """The request in a ``query.stats`` message's ``config`` record. Raises
        :class:`StatsRequestError` naming a missing key or unusable edges."""
        try:
            request = cls(
                intensity_edges=_floats(record["intensity_edges"]),
                spacing_edges=_floats(record["spacing_edges"]),
                shape_edges=_floats(record["shape_edges"]),
                min_count=int(record["min_count"]),  # type: ignore[arg-type]
            )
        except KeyError as err:
            raise StatsRequestError(f"statistics request: no {err.args[0]!r}") from None
        problems = request.problems()
        if problems:
            raise StatsRequestError("statistics request: " + "; ".join(problems))
        return request


def _floats(values: object) -> tuple[float, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise StatsRequestError(f"statistics request: edges must be a list, got {values!r}")
    return tuple(float(v) for v in values)
