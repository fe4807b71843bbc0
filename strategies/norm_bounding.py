"""Norm bounding of site updates, as a wrapper around any strategy: ours, Flower has none.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", arXiv:1911.07963
(2019). Each site's update (its weights minus the global weights sent to it) is scaled down to L2
norm at most ``bound`` before the inner strategy aggregates, which limits what one site can do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.arrays import (
    Arrays,
    floating_keys,
    layout_mismatch,
    reply_arrays,
    to_numpy,
    to_record,
    update_norm,
)
from strategies.wrapper import SentArraysWrapper

__all__ = ["NormBoundedFedAvg", "NormBounding", "bound_update"]

log = logging.getLogger("fl_imaging.server")


def bound_update(model: Arrays, sent: Arrays, bound: float) -> tuple[Arrays, float]:
    """Return ``(sent + s * (model - sent), norm)`` with ``s = min(1, bound / norm)``.

    ``model`` and ``sent`` hold the same names and shapes; ``norm`` is the L2 norm of the update
    over the arrays that are floating in both, taken together. Those keep ``model``'s dtype; the
    others (counters such as ``num_batches_tracked``) are the site's, unchanged.
    """
    keys = floating_keys(sent, model)
    norm = update_norm(model, sent, keys)
    if norm <= bound:
        return model, norm
    scale = bound / norm
    out = dict(model)
    for key in keys:
        out[key] = (sent[key] + scale * (model[key] - sent[key])).astype(model[key].dtype)
    return out, norm


class NormBounding(SentArraysWrapper):
    """Wraps ``inner`` (any Flower ``Strategy``) and bounds each site's update to L2 norm ``bound``.

    Ours (Flower has none); Sun et al. 2019. ``configure_train`` remembers the global arrays sent
    (:class:`~strategies.wrapper.SentArraysWrapper`);
    ``aggregate_train`` rewrites each reply's arrays in place to ``global + clipped update`` and
    hands the replies to ``inner``. A reply whose arrays differ in names or shapes from the sent
    ones cannot be bounded and is left out (with a warning). Evaluation is ``inner``'s.
    """

    def __init__(self, inner: Strategy, bound: float) -> None:
        if not bound > 0:
            raise ValueError(f"norm bound must be positive, got {bound}")
        super().__init__(inner)
        self.bound = float(bound)

    def summary(self) -> None:
        """Log the bound, then the inner strategy's summary."""
        log.info(
            "NormBounding: site updates clipped to L2 norm %g around %s",
            self.bound,
            type(self.inner).__name__,
        )
        self.inner.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Bound every reply's update, then return ``inner.aggregate_train`` of the replies.

        Error replies are passed on untouched. Raises ``RuntimeError`` before ``configure_train``.
        """
        if self.sent is None:
            raise RuntimeError("NormBounding.aggregate_train before configure_train")
        kept: list[Message] = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            try:
                key, record = reply_arrays(msg)
            except ValueError as err:
                reason: str | None = str(err)
            else:
                model = to_numpy(record)
                reason = layout_mismatch(model, self.sent, check_dtype=False)
            if reason:
                log.warning(
                    "round %d: reply of node %d left out, its update cannot be bounded: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    reason,
                )
                continue
            bounded, norm = bound_update(model, self.sent, self.bound)
            if norm > self.bound:
                msg.content[key] = to_record(bounded)
            kept.append(msg)
        return self.inner.aggregate_train(server_round, kept)


class NormBoundedFedAvg(NormBounding):
    """``strategy=normbound``: Flower's FedAvg with each site's update bounded to ``bound``.

    Takes ``bound`` (L2 norm of an update) and, as keywords, FedAvg's parameters (sampling,
    ``weighted_by_key``), which go to the FedAvg it wraps.
    """

    def __init__(self, bound: float = 5.0, **fedavg: Any) -> None:
        super().__init__(FedAvg(**fedavg), bound)
