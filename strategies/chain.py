"""Everything between the sites' replies and the new global model, assembled in one place.

A reply travels through the chain from the outside in; the aggregate comes back out:

1. :class:`~strategies.recording.RecordingStrategy`: records every site's metrics, update checks,
   bytes and epsilon per round, keeps the latest global model, calls the end-of-round hook;
2. :class:`~strategies.availability.SiteAvailability`: waits for enough connected sites, names
   the ones that dropped, skips a round with too few usable replies;
3. with ``strategy.compression``, :class:`~strategies.decoding.DecodingStrategy`: turns every
   site's compressed update back into weights (the recorder above counts the bytes as sent;
   every layer below sees weights, as without compression);
4. :class:`~strategies.validation.ValidatingStrategy`: rejects NaN/Inf and wrong layouts, flags
   or rejects norm outliers; or, with ``strategy.secagg.enabled``,
   :class:`~fl_imaging.secagg.coordinator.SecureAggregation`, which unmasks the sum of the
   round's updates (the sites check their own update before masking it; what needs single
   updates is refused); or, with ``strategy.he.enabled``,
   :class:`~fl_imaging.he.coordinator.HomomorphicAggregation`, which adds the sites' encrypted
   updates without reading them (the sites decrypt the sum); with ``engine.contributions`` or
   ``engine.cross_site``, :class:`~strategies.last_updates.LastUpdates` inside it keeps the
   updates that passed;
5. Flower's DP wrapper (``strategy.dp.mode``, :mod:`strategies.privacy`);
6. :class:`~strategies.norm_bounding.NormBounding` (``strategy.norm_bound``);
7. the aggregator itself (``strategy=NAME``, :mod:`strategies.registry`).

Layers 1-2 belong to a real run (``federation`` given): checks and tests build layers 3-7 only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fl_imaging.compression.codec import Codec
from fl_imaging.config import StrategyConfig
from fl_imaging.flower.protocol import ReplySites
from fl_imaging.review.results import MetricRow
from fl_imaging.secagg.arithmetic import SecAggSettings
from fl_imaging.secagg.coordinator import (
    SecureAggregation,
    check_secure_aggregation,
    secure_weighting,
)
from strategies.availability import SiteAvailability
from strategies.decoding import DecodingStrategy
from strategies.last_updates import LastUpdates
from strategies.norm_bounding import NormBounding
from strategies.privacy import check_accountable, wrap_with_dp
from strategies.recording import RecordingStrategy
from strategies.registry import StrategyError, build_aggregator, sites_needed
from strategies.validation import UpdateCheck, ValidatingStrategy

__all__ = ["Federation", "build_strategy"]


@dataclass
class Federation:
    """What a run adds around the aggregation (layers 1-2 of the chain).

    ``site_names`` orders the table's columns and grows with every site first seen in a reply;
    ``wait_timeout`` / ``round_timeout`` are the engine's (seconds); ``on_round_end(round, rows)``
    runs after every round; ``global_arrays`` is the model the run starts from and ``offset`` the
    rounds done before (a resumed run); with ``evaluate_until`` set, no evaluate messages are sent
    before that round (one message per round).
    """

    site_names: list[str]
    wait_timeout: float
    round_timeout: float
    on_round_end: Callable[[int, list[MetricRow]], None] | None = None
    global_arrays: ArrayRecord | None = None
    offset: int = 0
    evaluate_until: int | None = None
    sites: ReplySites = field(default_factory=ReplySites)


def build_strategy(
    cfg: StrategyConfig,
    *,
    num_sites: int,
    clients_per_round: int | None = None,
    min_sites: int | None = None,
    on_checks: Callable[[int, list[UpdateCheck]], None] | None = None,
    sites: ReplySites | None = None,
    federation: Federation | None = None,
    keep_updates: bool = False,
) -> Strategy:
    """Assemble the chain of the module docstring for ``cfg`` and return its outermost layer.

    ``num_sites`` is the federation's size, ``clients_per_round`` the sites sampled per round
    (None: all), ``min_sites`` how few may answer (None: all sampled; see
    :func:`~strategies.registry.build_aggregator`). ``on_checks(round, checks)`` receives each
    round's update checks; ``sites`` names replies (default: a new
    :class:`~fl_imaging.flower.protocol.ReplySites`). Without ``federation`` the result is the
    :class:`~strategies.validation.ValidatingStrategy` (layers 4-7; with compression, the
    :class:`~strategies.decoding.DecodingStrategy` around it); with it, the
    :class:`~strategies.recording.RecordingStrategy` (layers 1-7), whose update checks it
    records. With ``keep_updates`` (cross-site evaluation, contributions), a
    :class:`~strategies.last_updates.LastUpdates` between the update checks and the DP wrapper
    keeps the last round's accepted updates (decoded, with compression). Raises
    :class:`~strategies.registry.StrategyError` for an unknown name or parameter,
    a federation too small for the strategy, or a DP setting that cannot be accounted.
    """
    # imported here: fl_imaging.he.coordinator builds on strategies.arrays and .wrapper
    from fl_imaging.he.coordinator import HomomorphicAggregation, check_homomorphic

    per_round = num_sites if clients_per_round is None else clients_per_round
    sites = federation.sites if federation is not None else sites or ReplySites()
    secure: SecureAggregation | None = None
    encrypted: HomomorphicAggregation | None = None  # strategy.he
    try:
        check_secure_aggregation(cfg, per_round)
        check_homomorphic(cfg)
        strategy = build_aggregator(
            cfg, num_sites=num_sites, clients_per_round=clients_per_round, min_sites=min_sites
        )
        check_accountable(cfg, num_sites, per_round)
        if cfg.norm_bound is not None:
            strategy = NormBounding(strategy, cfg.norm_bound)
        strategy = wrap_with_dp(strategy, cfg.dp, num_sites=num_sites, per_round=per_round)
        validating: Strategy | None = None
        if cfg.secagg.enabled:
            strategy = secure = SecureAggregation(
                strategy,
                SecAggSettings(
                    clipping_range=cfg.secagg.clipping_range,
                    quantization_range=cfg.secagg.quantization_range,
                    modulus=cfg.secagg.modulus,
                    max_weight=cfg.secagg.max_weight,
                ),
                threshold=cfg.secagg.threshold,
                round_timeout=federation.round_timeout if federation else 3600.0,
                weighting=secure_weighting(cfg),
                sites=sites,
            )
        elif cfg.he.enabled:  # the coordinator adds ciphertexts: no update to check
            strategy = encrypted = HomomorphicAggregation(strategy, cfg.he.layers, sites=sites)
        else:
            if keep_updates:  # engine.contributions, engine.cross_site: single updates kept
                strategy = LastUpdates(strategy, sites=sites)
            strategy = validating = ValidatingStrategy(
                strategy, cfg.validation, sites=sites, on_checks=on_checks
            )
        codec = Codec.of(cfg)
        if codec.active:  # refused with secure aggregation (fl_imaging/config/checks.py)
            strategy = DecodingStrategy(strategy, codec, sites=sites)
    except ValueError as err:
        if isinstance(err, StrategyError):
            raise
        raise StrategyError(f"strategy '{cfg.name}': {err}") from None
    if federation is None:
        return strategy
    recorder: RecordingStrategy | None = None
    availability = SiteAvailability(
        strategy,
        min_sites=sites_needed(num_sites, clients_per_round, min_sites),
        min_replies=min_sites or 1,
        wait_timeout=federation.wait_timeout,
        round_timeout=federation.round_timeout,
        site_names=federation.site_names,
        failures=lambda: recorder.failures if recorder else [],
        sites=sites,
    )
    recorder = RecordingStrategy(
        availability,
        on_round_end=federation.on_round_end,
        global_arrays=federation.global_arrays,
        offset=federation.offset,
        evaluate_until=federation.evaluate_until,
        sites=sites,
    )
    if isinstance(validating, ValidatingStrategy):
        validating.on_checks = recorder.record_checks
    if secure is not None:
        secure.on_round = recorder.record_secure_sum
        secure.on_reply = recorder.record_reply
    if encrypted is not None:
        encrypted.on_round = recorder.record_encrypted_sum
    return recorder
