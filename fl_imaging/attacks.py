"""Simulated malicious sites, for benchmarking robust aggregation (simulation engine only).

Ours: neither Flower nor MONAI simulates attackers. A malicious site trains like the others and
then replaces its update ``delta = local - global`` (floating tensors only; integer buffers such
as BatchNorm's step counter are sent as trained):

- ``signflip``: ``-scale * delta``;      - ``scale``: ``scale * delta``;
- ``noise``: Gaussian noise with the L2 norm of ``scale * delta``;
- ``collusion``: every malicious site sends the same crafted update, a direction drawn from the
  round number (so all of them agree without talking) with L2 norm ``norm``;
- ``labelflip``: no update change; the site trains on permuted labels (class k -> K-1-k) through
  MONAI's ``MapLabelValued``.
"""

from __future__ import annotations

import math

import torch
from monai.transforms import MapLabelValued

from fl_imaging.config import AttackConfig, AttackName

__all__ = ["flipped_labels", "malicious_sites", "poison_state"]


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
    if cfg.name in (AttackName.none, AttackName.labelflip):
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
