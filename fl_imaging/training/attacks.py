"""Simulated malicious sites, for benchmarking robust aggregation (simulation engine only).

Ours: neither Flower nor MONAI simulates attackers. A malicious site trains like the others and
then replaces its update ``delta = local - global`` (floating tensors only; integer buffers such
as BatchNorm's step counter are sent as trained):

- ``signflip``: ``-scale * delta``;      - ``scale``: ``scale * delta``;
- ``noise``: Gaussian noise with the L2 norm of ``scale * delta``;
- ``collusion``: every malicious site sends the same crafted update, a direction drawn from the
  round number (so all of them agree without talking) with L2 norm ``norm``;
- ``labelflip``: no update change; the site trains on permuted labels (class k -> K-1-k) through
  MONAI's ``MapLabelValued``;
- ``dropout`` (a fault, not an attack): the site's training fails in ``attack.rounds``
  (:meth:`SimulatedAttack.drops_out`), as a site whose link goes down mid-round.

The ClientApp asks :func:`site_attack` whether its site is malicious; the
:class:`SimulatedAttack` it gets wraps the site's training (label transforms) and its reply
(:meth:`SimulatedAttack.poison`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.transforms import MapLabelValued

from fl_imaging.config import AttackConfig, AttackName, RunConfig

__all__ = [
    "SimulatedAttack",
    "flipped_labels",
    "malicious_sites",
    "poison_state",
    "site_attack",
]

log = logging.getLogger("fl_imaging.client")


def malicious_sites(num_sites: int, cfg: AttackConfig) -> set[int]:
    """Indices (0-based) of the malicious sites: ``cfg.sites`` when given, else the last
    ``floor(fraction * num_sites)`` sites (at least one when ``fraction > 0``); empty for
    ``attack=none``."""
    if cfg.name == AttackName.none:
        return set()
    if cfg.sites:
        return {int(s) for s in cfg.sites}
    count = max(1, math.floor(cfg.fraction * num_sites)) if cfg.fraction > 0 else 0
    return set(range(num_sites - count, num_sites))


def poison_state(
    global_state: dict[str, torch.Tensor],
    local_state: dict[str, torch.Tensor],
    cfg: AttackConfig,
    server_round: int,
    seed: int,
    *,
    site: int = 0,
) -> dict[str, torch.Tensor]:
    """Return the weights a malicious site sends instead of ``local_state``.

    Both states map parameter names to tensors of equal shapes. ``seed`` (the run's seed) and
    ``server_round`` make the ``noise`` and ``collusion`` draws reproducible; ``noise`` also
    depends on ``site`` (the site's index), so that noisy sites draw independent directions;
    ``collusion`` does not, so every colluder sends the same update.
    """
    if cfg.name in (AttackName.none, AttackName.labelflip, AttackName.dropout):
        return local_state
    keys = [k for k, v in global_state.items() if torch.is_floating_point(v)]
    delta = {k: local_state[k].float() - global_state[k].float() for k in keys}
    honest_norm = math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
    draw = seed * 1_000_003 + server_round
    if cfg.name == AttackName.noise:
        draw = draw * 10_007 + site
    generator = torch.Generator().manual_seed(draw)
    if cfg.name == AttackName.signflip:
        bad = {k: -cfg.scale * d for k, d in delta.items()}
    elif cfg.name == AttackName.scale:
        bad = {k: cfg.scale * d for k, d in delta.items()}
    else:
        noise = {k: torch.randn(d.shape, generator=generator) for k, d in delta.items()}
        length = math.sqrt(sum(float((n**2).sum()) for n in noise.values())) or 1.0
        target = cfg.norm if cfg.name == AttackName.collusion else cfg.scale * honest_norm
        bad = {k: n * (target / length) for k, n in noise.items()}
    poisoned = dict(local_state)
    for key in keys:
        poisoned[key] = (global_state[key].float() + bad[key]).to(global_state[key].dtype)
    return poisoned


def flipped_labels(num_classes: int) -> MapLabelValued:
    """MONAI transform mapping class k to ``num_classes - 1 - k`` in the sample's ``label``."""
    classes = list(range(num_classes))
    return MapLabelValued(keys="label", orig_labels=classes, target_labels=classes[::-1])


@dataclass(frozen=True)
class SimulatedAttack:
    """The attack one malicious site plays: ``cfg`` (``attack.*``), the run's ``seed``, the
    site's ``index`` and the number of classes of the task."""

    cfg: AttackConfig
    seed: int
    index: int
    num_classes: int

    def label_transforms(self) -> list[Callable]:
        """Transforms for the site's training labels: the label flip of ``labelflip``, else
        none."""
        return [flipped_labels(self.num_classes)] if self.cfg.name == AttackName.labelflip else []

    def drops_out(self, server_round: int) -> bool:
        """Whether the site fails its training in ``server_round`` (``attack=dropout``)."""
        return self.cfg.name == AttackName.dropout and server_round in self.cfg.rounds

    def poison(
        self,
        global_state: dict[str, torch.Tensor],
        local_state: dict[str, torch.Tensor],
        server_round: int,
        site_name: str,
    ) -> dict[str, torch.Tensor]:
        """The weights site ``site_name`` sends in ``server_round`` instead of ``local_state``
        (see :func:`poison_state`; ``dropout`` sends ``local_state``); logs that it does."""
        if self.cfg.name == AttackName.dropout:
            return local_state
        log.info(
            "[site %s] round %d: sends a %s update (simulated attack)",
            site_name,
            server_round,
            self.cfg.name.value,
        )
        return poison_state(
            global_state, local_state, self.cfg, server_round, self.seed, site=self.index
        )


def site_attack(cfg: RunConfig, index: int, simulated: bool) -> SimulatedAttack | None:
    """The attack site ``index`` of ``cfg``'s federation plays, or None: only simulated sites
    attack (``attack=...`` is for benchmarks on Flower's simulation engine), and only those
    :func:`malicious_sites` names."""
    if not simulated or index not in malicious_sites(len(cfg.data.sites), cfg.attack):
        return None
    return SimulatedAttack(cfg.attack, cfg.seed, index, cfg.task.num_classes)
