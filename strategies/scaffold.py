"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"): the coordinator's side, with option II's control variates.

Ours: Flower 1.41 has no SCAFFOLD. The coordinator keeps the global control variate ``c``
(name -> float32 array per trainable parameter; empty, i.e. zeros, before the first round) and
sends it beside the global weights in every training message
(:data:`~fl_imaging.flower.protocol.CONTROL`). Each site corrects its local steps by
``c - c_i`` and replies with its trained weights and ``c_i+ - c_i``
(:data:`~fl_imaging.flower.protocol.CONTROL_DELTA`; the site's side is
:mod:`fl_imaging.flower.site.control_variates`). The coordinator then sets

- ``x <- x + eta_g * (avg_i(y_i) - x)``, with ``avg`` FedAvg's mean weighted by training cases
  (the paper's mean is unweighted: with equal case counts the two agree) and ``eta_g``
  ``server_learning_rate`` (1.0: FedAvg's model);
- ``c <- c + (|S| / N) * mean_i(c_i+ - c_i)``, over the ``|S|`` replies aggregated this round
  and ``N`` the federation's sites.

A resumed run starts again from ``c = 0`` (its sites too: a new Flower run has fresh contexts).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_imaging.flower.protocol import CONTROL, CONTROL_DELTA, ReplySites
from strategies.arrays import Arrays, to_numpy, to_record

__all__ = ["Scaffold"]

log = logging.getLogger("fl_imaging.server")


class Scaffold(FedAvg):
    """SCAFFOLD on top of Flower's FedAvg (see the module docstring).

    Args:
        server_learning_rate: ``eta_g``, the global step size (> 0); 1.0 takes FedAvg's mean.
        num_sites: ``N``, the federation's sites (set from the engine, not the config).
        **fedavg: Flower's FedAvg arguments (sampling, weighting key).

    Attributes:
        control: the global control variate ``c`` (name -> float32 array).
    """

    def __init__(
        self, *, server_learning_rate: float = 1.0, num_sites: int = 1, **fedavg: object
    ) -> None:
        if not server_learning_rate > 0:
            raise ValueError(f"server_learning_rate={server_learning_rate}: must be positive")
        if num_sites < 1:
            raise ValueError(f"num_sites={num_sites}: must be 1 or more")
        super().__init__(**fedavg)  # type: ignore[arg-type]
        self.server_learning_rate = float(server_learning_rate)
        self.num_sites = int(num_sites)
        self.control: Arrays = {}
        self._sent: Arrays | None = None
        self._sites = ReplySites()

    def summary(self) -> None:
        """Log SCAFFOLD's settings, then FedAvg's summary."""
        log.info(
            "SCAFFOLD: server learning rate %g, %d site(s) in the federation",
            self.server_learning_rate,
            self.num_sites,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, each carrying the global control variate ``c`` too (one
        record shared by all messages); remembers the global ``arrays`` sent."""
        self._sent = to_numpy(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = to_record(self.control)
        for msg in messages:
            msg.content[CONTROL] = control
        return messages

    def _delta_problem(self, msg: Message) -> str | None:
        """Why the control variate delta of ``msg`` cannot be used (None: it can)."""
        record = msg.content.array_records.get(CONTROL_DELTA)
        if record is None:
            return "its reply holds no SCAFFOLD control variate delta"
        sent = self._sent or {}
        for name, array in record.items():
            value = array.numpy()
            if name not in sent or value.shape != sent[name].shape:
                return f"its control variate delta '{name}' matches no model parameter"
            if not np.all(np.isfinite(value)):
                return f"its control variate delta '{name}' holds NaN or Inf"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' weights (FedAvg's mean, then the server step) and update
        ``c`` from their control variate deltas. A reply whose delta is missing or malformed
        is left out of both, with a warning. Each delta record is taken out of its reply
        before FedAvg sees it (FedAvg takes exactly one ArrayRecord). Returns the new global
        arrays and FedAvg's metrics, or ``(None, None)`` when no reply is left."""
        kept: list[Message] = []
        deltas: list[Arrays] = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)  # FedAvg counts and logs the failure
                continue
            problem = self._delta_problem(msg)
            if problem is not None:
                log.warning(
                    "round %d: site %s left out of SCAFFOLD's aggregation: %s",
                    server_round,
                    self._sites(msg),
                    problem,
                )
                continue
            deltas.append(to_numpy(msg.content.array_records[CONTROL_DELTA]))
            del msg.content[CONTROL_DELTA]
            kept.append(msg)
        if not deltas:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, kept)
        if arrays is None:
            return None, metrics
        mean, sent = to_numpy(arrays), self._sent or {}
        stepped = {
            name: (
                (sent[name] + self.server_learning_rate * (value - sent[name])).astype(
                    sent[name].dtype
                )
                if name in sent and np.issubdtype(value.dtype, np.floating)
                else value
            )
            for name, value in mean.items()
        }
        share = len(deltas) / self.num_sites
        for name in dict.fromkeys(k for d in deltas for k in d):  # a missing name: zeros
            zeros = np.zeros(sent[name].shape, dtype=np.float64)
            step = np.mean([d.get(name, zeros).astype(np.float64) for d in deltas], axis=0)
            previous = self.control.get(name, zeros)
            self.control[name] = (previous + share * step).astype(np.float32)
        return to_record(stepped), metrics
