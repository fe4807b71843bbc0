"""Client-level differential privacy (DP-FedAvg) from Flower's wrappers and RDP accountant.

Nothing here is ours but the checks: the clipping and noise are Flower's
``DifferentialPrivacy{ServerSide,ClientSide}{Fixed,Adaptive}Clipping`` wrappers around FedAvg,
and epsilon comes from Flower's ``RdpAccountant`` (Google's ``dp-accounting``). Before a run
starts, :func:`check_accountable` refuses the settings that accountant cannot account, rather
than let a run report a wrong epsilon: sampling a subset of sites per round (no amplification is
accounted), adaptive clipping, an inner strategy other than plain FedAvg, a norm bound on top.
Accounted runs weight sites equally (each site sends ``unit-weight`` = 1), as client-level
DP-FedAvg requires.
"""

from __future__ import annotations

from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fl_imaging.config import DPConfig, DPMode, StrategyConfig
from strategies.wrapper import wrapper_chain

__all__ = ["DPSetupError", "check_accountable", "privacy_spent", "wrap_with_dp"]

FIXED = (DPMode.server_fixed, DPMode.client_fixed)
ADAPTIVE = (DPMode.server_adaptive, DPMode.client_adaptive)


class DPSetupError(ValueError):
    """A DP setting that cannot run or cannot be accounted; the message says why."""


def check_accountable(cfg: StrategyConfig, num_sites: int, per_round: int) -> None:
    """Raise :class:`DPSetupError` when ``cfg.dp`` asks for something Flower's accountant cannot
    account (or Flower's wrappers cannot do); pass silently for ``dp.mode=none``.

    ``num_sites`` is the federation's size, ``per_round`` the sites sampled per round.
    """
    dp = cfg.dp
    if dp.mode == DPMode.none:
        return
    if cfg.name != "fedavg" or cfg.norm_bound is not None:
        raise DPSetupError(
            f"strategy.dp.mode={dp.mode.value} wraps FedAvg only (strategy=fedavg or "
            f"strategy=dpfedavg, no strategy.norm_bound): Flower's DP wrappers clip and add noise "
            f"around FedAvg's aggregation, and its accountant assumes exactly that; got "
            f"strategy={cfg.name}"
            + (f" with norm_bound={cfg.norm_bound}" if cfg.norm_bound is not None else "")
        )
    if not dp.account:
        return
    if dp.mode in ADAPTIVE:
        raise DPSetupError(
            f"strategy.dp.mode={dp.mode.value}: Flower's RDP accountant does not account "
            "adaptive clipping (the clipping norm is itself learnt from noisy site counts), so no "
            "epsilon could be reported. Use a fixed mode (server_fixed, client_fixed) or set "
            "strategy.dp.account=false to run without an epsilon."
        )
    if per_round != num_sites:
        raise DPSetupError(
            f"engine.clients_per_round={per_round} of {num_sites} sites: Flower's accountant "
            "accounts no sampling amplification, and an epsilon computed as if every site took "
            "part would be wrong. Let every site take part (engine.clients_per_round=null) or set "
            "strategy.dp.account=false."
        )
    if dp.noise_multiplier <= 0:
        raise DPSetupError(
            "strategy.dp.noise_multiplier must be positive for an epsilon to exist "
            "(0 gives no privacy); or set strategy.dp.account=false"
        )


def wrap_with_dp(inner: Strategy, dp: DPConfig, *, num_sites: int, per_round: int) -> Strategy:
    """Wrap ``inner`` (FedAvg) in the Flower DP strategy named by ``dp.mode``.

    Fixed modes get an :class:`RdpAccountant` when ``dp.account`` is set (population
    ``num_sites``, add-or-remove-one neighbours, no amplification, budget ``dp.max_epsilon``).
    Returns ``inner`` itself for ``dp.mode=none``.
    """
    if dp.mode == DPMode.none:
        return inner
    if dp.mode in FIXED:
        accountant = None
        if dp.account:
            accountant = RdpAccountant(
                PrivacyConfig(
                    target_delta=dp.target_delta,
                    population_size=num_sites,
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                    max_epsilon=dp.max_epsilon,
                )
            )
        cls = (
            DifferentialPrivacyServerSideFixedClipping
            if dp.mode == DPMode.server_fixed
            else DifferentialPrivacyClientSideFixedClipping
        )
        return cls(
            inner,
            noise_multiplier=dp.noise_multiplier,
            clipping_norm=dp.clipping_norm,
            num_sampled_clients=per_round,
            accountant=accountant,
        )
    adaptive = (
        DifferentialPrivacyServerSideAdaptiveClipping
        if dp.mode == DPMode.server_adaptive
        else DifferentialPrivacyClientSideAdaptiveClipping
    )
    return adaptive(
        inner,
        noise_multiplier=dp.noise_multiplier,
        num_sampled_clients=per_round,
        initial_clipping_norm=dp.initial_clipping_norm,
        target_clipped_quantile=dp.target_clipped_quantile,
        clip_norm_lr=dp.clip_norm_lr,
        clipped_count_stddev=dp.clipped_count_stddev,
    )


def privacy_spent(strategy: Strategy) -> tuple[float, float] | None:
    """(epsilon, delta) spent so far by the accounted DP wrapper inside ``strategy`` (found by
    following ``inner`` / ``strategy`` attributes), or None when there is none."""
    for node in wrapper_chain(strategy):
        spent = getattr(node, "privacy_spent", None)
        if callable(spent):
            result = spent()
            return None if result is None else (float(result.epsilon), float(result.delta))
    return None
