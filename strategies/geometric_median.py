"""Geometric median aggregation (RFA): ours, because Flower has no such strategy.

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE Transactions on
Signal Processing 70 (2022). The global model is the point minimising the (weighted) sum of
Euclidean distances to the sites' models, found with the smoothed Weiszfeld algorithm.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from strategies.arrays import (
    flatten,
    floating_keys,
    layout_mismatch,
    reply_arrays,
    reply_weight,
    to_numpy,
    to_record,
    unflatten,
)

__all__ = ["GeometricMedian", "geometric_median"]


def geometric_median(
    points: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    eps: float = 1e-6,
) -> np.ndarray:
    """Smoothed Weiszfeld estimate of the weighted geometric median of ``points``.

    ``points`` has shape ``(n, D)`` (one row per site); ``weights`` shape ``(n,)``, non-negative
    (None: equal). Starting from the weighted mean, each step is
    ``z <- sum_i b_i x_i / sum_i b_i`` with ``b_i = w_i / max(eps, ||z - x_i||)``, which lowers
    ``sum_i w_i ||z - x_i||``; it stops after ``max_iter`` steps or once a step moves ``z`` by at
    most ``tol * (1 + ||z||)`` (a test on the objective stops far too early: it is flat near the
    minimum). Returns the median, shape ``(D,)``, float64.
    """
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"points must have shape (n, D) with n >= 1, got {x.shape}")
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (x.shape[0],) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per point, not all zero")
    w = w / w.sum()
    z = w @ x
    for _ in range(max_iter):
        beta = w / np.maximum(eps, np.linalg.norm(x - z, axis=1))
        z_next = (beta @ x) / beta.sum()
        step = float(np.linalg.norm(z_next - z))
        z = z_next
        if step <= tol * (1.0 + float(np.linalg.norm(z))):
            break
    return z


class GeometricMedian(FedAvg):
    """Flower strategy whose ``aggregate_train`` returns the geometric median of the sites' models.

    Ours (Flower has none); Pillutla et al. 2022 (RFA). Each reply's floating arrays are
    concatenated into one vector of shape ``(D,)``; the median of the ``n`` vectors (optionally
    weighted by ``num-examples``) is cut back into the model's arrays with their shapes and dtypes.
    Non-floating arrays (e.g. int64 ``num_batches_tracked``) are taken from the first valid reply.
    Other keyword parameters (sampling, ``weighted_by_key``) are FedAvg's and go to it.
    """

    def __init__(
        self,
        weighted: bool = True,
        max_iter: int = 100,
        tol: float = 1e-6,
        eps: float = 1e-6,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        if max_iter < 1 or tol < 0 or eps <= 0:
            raise ValueError("GeometricMedian needs max_iter >= 1, tol >= 0 and eps > 0")
        self.weighted = weighted
        self.max_iter = max_iter
        self.tol = tol
        self.eps = eps

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Return the geometric median of the valid replies' arrays and FedAvg's metric average.

        Takes the round number and the train replies; returns ``(None, None)`` without valid
        replies. Raises ``ValueError`` when replies differ in array names, shapes or dtypes.
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        models = [to_numpy(reply_arrays(msg)[1]) for msg in valid]
        for msg, model in zip(valid, models, strict=True):
            reason = layout_mismatch(model, models[0])
            if reason:
                raise ValueError(f"reply from node {msg.metadata.src_node_id}: {reason}")
        keys = floating_keys(models[0])
        points = np.stack([flatten(model, keys) for model in models])
        weights = None
        if self.weighted:
            weights = np.array([reply_weight(msg, self.weighted_by_key) for msg in valid])
        median = geometric_median(
            points, weights, max_iter=self.max_iter, tol=self.tol, eps=self.eps
        )
        arrays = to_record(unflatten(median, models[0], keys))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return arrays, metrics
