"""The pool of cases a public dataset adapter returns, before it is split into sites."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fl_imaging.data.sites import Case

__all__ = ["DatasetPool"]


@dataclass
class DatasetPool:
    """All cases of one public dataset.

    ``task`` is ``segmentation`` or ``classification``; ``spatial_dims`` 2 or 3; ``num_classes``
    counts background for segmentation; ``class_names[k]`` names class k. Each case's ``split``
    is the dataset's official split (train/val/test) or None.
    """

    name: str
    root: Path
    task: str
    spatial_dims: int
    num_classes: int
    class_names: list[str]
    cases: list[Case] = field(default_factory=list)

    def split_counts(self) -> dict[str, int]:
        """Number of cases per official split (``none`` for cases without one)."""
        counts: dict[str, int] = {}
        for case in self.cases:
            key = case.split or "none"
            counts[key] = counts.get(key, 0) + 1
        return counts
