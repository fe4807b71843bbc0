"""Split a pool of cases into simulated sites, reproducibly from a seed.

Each partitioner returns, for every case, the index of the site it goes to; every case goes to
exactly one site. Cases are partitioned within their official split (train/val/test, or none),
so that each site's test cases follow the same distribution as its training cases. The
partitioners are ours: Flower's ``flwr-datasets`` partitioners work on Hugging Face datasets,
not on lists of image files.

- ``iid``: cases shuffled and dealt to the sites in turn (equal sizes, same label mix);
- ``sizes``: cases shuffled and cut into shares proportional to ``sizes``;
- ``dirichlet``: for each stratum (class label, or a quantile bin of the foreground volume for
  segmentation) site shares are drawn from Dirichlet(alpha): small alpha, very unequal sites;
- ``shift`` assigns cases as ``iid`` does; its sites then see their cases through their own
  scanner transform (:mod:`fl_imaging.data.shift`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fl_imaging.config import PartitionConfig, PartitionName

__all__ = ["PartitionError", "assign_sites", "size_strata"]


class PartitionError(ValueError):
    """A partition that cannot be made as configured; the message says what to change."""


def _cut(count: int, shares: np.ndarray) -> np.ndarray:
    """Split ``count`` items into ``len(shares)`` integer parts proportional to ``shares``
    (largest remainders); returns the part sizes, summing to ``count``."""
    exact = shares / shares.sum() * count
    sizes = np.floor(exact).astype(int)
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: count - sizes.sum()]] += 1
    return sizes


def _deal(indices: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``indices`` and cut them into parts proportional to ``shares``."""
    shuffled = rng.permutation(indices)
    return np.split(shuffled, np.cumsum(_cut(len(indices), shares))[:-1])


def size_strata(foreground: Sequence[float], bins: int) -> list[int]:
    """Quantile bin (0..bins-1) of each case's foreground volume (voxels, or any size measure)."""
    values = np.asarray(foreground, dtype=float)
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return [int(b) for b in np.searchsorted(edges, values, side="right")]


def assign_sites(
    splits: Sequence[str | None],
    strata: Sequence[int] | None,
    num_sites: int,
    cfg: PartitionConfig,
) -> list[int]:
    """Assign every case to a site.

    Takes each case's official split (or None), each case's stratum for ``dirichlet`` (class
    label or size bin; None otherwise), the number of sites and the partition config. Returns the
    site index (0..num_sites-1) of each case, in the input order. Raises :class:`PartitionError`
    when a site would hold fewer than ``cfg.min_cases`` cases outside the test split, or no case
    of an official train or val split that the pool has (the site could not train or validate).
    """
    n = len(splits)
    if n < num_sites:
        raise PartitionError(f"{n} case(s) cannot be split into {num_sites} sites")
    rng = np.random.default_rng([cfg.seed, num_sites, 104729])
    groups: dict[str | None, list[int]] = {}
    for index, split in enumerate(splits):
        groups.setdefault(split, []).append(index)
    site = np.full(n, -1)
    if cfg.name == PartitionName.dirichlet:
        if strata is None:
            raise PartitionError("the dirichlet partition needs a stratum (label) for each case")
        _dirichlet(site, splits, groups, np.asarray(strata), num_sites, cfg, rng)
    else:
        shares = np.asarray(
            cfg.sizes if cfg.name == PartitionName.sizes else [1.0] * num_sites, dtype=float
        )
        for split in sorted(groups, key=str):
            for k, part in enumerate(_deal(np.asarray(groups[split]), shares, rng)):
                site[part] = k
        _check_sizes(site, splits, num_sites, cfg)
    return [int(s) for s in site]


def _dirichlet(
    site: np.ndarray,
    splits: Sequence[str | None],
    groups: dict[str | None, list[int]],
    strata: np.ndarray,
    num_sites: int,
    cfg: PartitionConfig,
    rng: np.random.Generator,
) -> None:
    """Fill ``site`` by Dirichlet(alpha) shares per stratum; redraw until every site is big
    enough (at most 200 draws)."""
    labels = np.unique(strata)
    for _ in range(200):
        shares = {label: rng.dirichlet([cfg.alpha] * num_sites) for label in labels}
        for split in sorted(groups, key=str):
            members = np.asarray(groups[split])
            for label in labels:
                chosen = members[strata[members] == label]
                for k, part in enumerate(_deal(chosen, shares[label], rng)):
                    site[part] = k
        try:
            _check_sizes(site, splits, num_sites, cfg)
            return
        except PartitionError:
            continue
    raise PartitionError(
        f"Dirichlet(alpha={cfg.alpha}) could not give each of {num_sites} sites at least "
        f"{cfg.min_cases} cases in 200 draws: raise data.partition.alpha, lower "
        "data.num_sites or data.partition.min_cases"
    )


def _check_sizes(
    site: np.ndarray, splits: Sequence[str | None], num_sites: int, cfg: PartitionConfig
) -> None:
    """Raise :class:`PartitionError` when a site holds under ``cfg.min_cases`` non-test cases."""
    trainable = np.asarray([s != "test" for s in splits])
    counts = np.bincount(site[trainable], minlength=num_sites)
    if counts.min() < cfg.min_cases:
        raise PartitionError(
            f"site {int(counts.argmin()) + 1} would get {int(counts.min())} training/validation "
            f"case(s), fewer than data.partition.min_cases={cfg.min_cases}: use fewer sites or "
            "larger data.partition.sizes"
        )
    # A site's cases keep their official split, so a site can only train and validate when it
    # gets at least one case of each official train / val split the dataset has.
    for split in ("train", "val"):
        members = np.asarray([s == split for s in splits])
        if members.any():
            per_site = np.bincount(site[members], minlength=num_sites)
            if per_site.min() < 1:
                raise PartitionError(
                    f"site {int(per_site.argmin()) + 1} would get no case of the dataset's "
                    f"official {split} split ({int(members.sum())} in all), and each site needs "
                    "one: use fewer sites (data.num_sites) or more cases (data.max_cases)"
                )
