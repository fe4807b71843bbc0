"""Centered clipping aggregation: ours, because Flower has no such strategy.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021.
The aggregate update is found by clipping every site's update around a center that starts at the
previous round's aggregate update, so that no single site can move the model far.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.arrays import (
    Arrays,
    clip_to_norm,
    flatten,
    floating_keys,
    layout_mismatch,
    reply_arrays,
    to_numpy,
    to_record,
    unflatten,
)

__all__ = ["CenteredClipping", "centered_clip"]


def centered_clip(
    updates: np.ndarray, center: np.ndarray, tau: float, iterations: int
) -> np.ndarray:
    """Run ``iterations`` steps of ``v <- v + mean_i clip(u_i - v, tau)`` from ``v = center``.

    ``updates`` has shape ``(n, D)`` (one site's update per row), ``center`` shape ``(D,)``;
    ``clip`` scales a vector down to L2 norm ``tau`` when it is longer. Returns ``v``, ``(D,)``.
    """
    v = np.asarray(center, dtype=np.float64).copy()
    for _ in range(iterations):
        v = v + np.mean([clip_to_norm(u - v, tau) for u in updates], axis=0)
    return v


class CenteredClipping(FedAvg):
    """Flower strategy aggregating the sites' updates by centered clipping.

    Ours (Flower has none); Karimireddy, He, Jaggi 2021. ``configure_train`` remembers the global
    arrays it sends; in ``aggregate_train`` each site's update ``u_i`` is its floating arrays minus
    those, flattened to shape ``(D,)``. The center ``v`` starts at the previous round's aggregate
    update (zeros in round 1), then ``iterations`` times ``v <- v + mean_i clip(u_i - v, tau)``;
    the new global model is ``global + v``, with the global arrays' shapes and dtypes.
    Non-floating arrays (e.g. int64 ``num_batches_tracked``) are taken from the first valid reply.
    Other keyword parameters (sampling, ``weighted_by_key``) are FedAvg's and go to it.
    """

    def __init__(self, tau: float = 5.0, iterations: int = 3, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        if tau <= 0 or iterations < 1:
            raise ValueError("CenteredClipping needs tau > 0 and iterations >= 1")
        self.tau = tau
        self.iterations = iterations
        self.sent: Arrays | None = None
        self.center: np.ndarray | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global ``arrays`` sent this round, then sample sites as FedAvg does."""
        self.sent = to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Return ``global + v`` (see the class) and FedAvg's metric average.

        Returns ``(None, None)`` without valid replies (the center is then kept for next round).
        Raises ``ValueError`` when a reply's arrays differ in names, shapes or dtypes from the sent
        ones, ``RuntimeError`` when called before ``configure_train``.
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self.sent is None:
            raise RuntimeError("CenteredClipping.aggregate_train before configure_train")
        sent = self.sent
        models = [to_numpy(reply_arrays(msg)[1]) for msg in valid]
        for msg, model in zip(valid, models, strict=True):
            reason = layout_mismatch(model, sent)
            if reason:
                raise ValueError(f"reply from node {msg.metadata.src_node_id}: {reason}")
        keys = floating_keys(sent)
        base = flatten(sent, keys)
        updates = np.stack([flatten(model, keys) - base for model in models])
        center = self.center
        if center is None or center.shape != base.shape:
            center = np.zeros_like(base)
        self.center = centered_clip(updates, center, self.tau, self.iterations)
        new = unflatten(base + self.center, sent, keys)
        for key, value in models[0].items():
            if key not in keys:
                new[key] = value
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return to_record(new), metrics
