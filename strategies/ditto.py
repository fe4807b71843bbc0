"""Ditto (Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization"): the coordinator's side.

Ours: Flower 1.41 has no Ditto. The global model is FedAvg's, unchanged; what Ditto adds
happens at the sites (:mod:`fl_imaging.flower.site.personal_model`): each keeps a personal
model ``v`` between rounds and trains it, after the global model, for ``personal_epochs``
epochs on ``loss(v) + ditto_lambda / 2 * ||v - w_global||^2`` (``w_global`` the model received
this round). This class only tells the sites ``lambda`` and the epochs in every training
message (:data:`~fl_imaging.flower.protocol.DITTO_LAMBDA`,
:data:`~fl_imaging.flower.protocol.DITTO_EPOCHS`). The personal models never leave the sites;
the test round scores both (``test_<metric>`` and ``personal_<metric>``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_imaging.flower.protocol import DITTO_EPOCHS, DITTO_LAMBDA

__all__ = ["Ditto"]

log = logging.getLogger("fl_imaging.server")


class Ditto(FedAvg):
    """FedAvg that asks every site to train its personal model too (see the module docstring).

    Args:
        ditto_lambda: the regulariser ``lambda`` (>= 0) pulling each personal model towards
            the global one; 0 trains the personal models alone (local training).
        personal_epochs: epochs of personal training per round (>= 1).
        **fedavg: Flower's FedAvg arguments (sampling, weighting key).
    """

    def __init__(
        self, *, ditto_lambda: float = 0.1, personal_epochs: int = 1, **fedavg: object
    ) -> None:
        if not ditto_lambda >= 0:
            raise ValueError(f"ditto_lambda={ditto_lambda}: must be 0 or more")
        if int(personal_epochs) != personal_epochs or personal_epochs < 1:
            raise ValueError(f"personal_epochs={personal_epochs}: must be a whole number >= 1")
        super().__init__(**fedavg)  # type: ignore[arg-type]
        self.ditto_lambda = float(ditto_lambda)
        self.personal_epochs = int(personal_epochs)

    def summary(self) -> None:
        """Log Ditto's settings, then FedAvg's summary."""
        log.info(
            "Ditto: personal models at the sites, lambda %g, %d epoch(s) per round",
            self.ditto_lambda,
            self.personal_epochs,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, their config carrying ``lambda`` and the personal epochs."""
        config[DITTO_LAMBDA] = self.ditto_lambda
        config[DITTO_EPOCHS] = self.personal_epochs
        return super().configure_train(server_round, arrays, config, grid)
