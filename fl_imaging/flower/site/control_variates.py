"""A site's side of SCAFFOLD (``strategy=scaffold``): its control variate ``c_i`` kept in its
Flower context between rounds, the gradient correction of its training, and the ``c_i+ - c_i``
it sends back.

``c_i`` lives in ``context.state`` (a ``RecordDict`` Flower keeps per site and per run between
messages, in simulation and in deployment, as compression's residual does:
:mod:`fl_imaging.compression.site`), not in process memory: Ray may run a site on another
worker in each round. A resumed run is a new Flower run: its sites start from ``c_i = 0``, as
its coordinator starts from ``c = 0``. The math is :mod:`fl_imaging.training.control_variates`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from torch import nn

from fl_imaging.flower.protocol import CONTROL
from fl_imaging.training.control_variates import (
    ControlCorrection,
    Controls,
    trainable_names,
    updated_site_control,
)

__all__ = ["SITE_CONTROL", "SiteControl"]

log = logging.getLogger("fl_imaging.client")

#: Key of the site's control variate ``c_i`` (an ArrayRecord, one array per trainable
#: parameter) in its ``context.state``.
SITE_CONTROL = "scaffold-site-control"


def _controls(record: ArrayRecord | None) -> Controls:
    if record is None:
        return {}
    return {
        name: torch.from_numpy(np.array(a.numpy(), dtype=np.float32)) for name, a in record.items()
    }


def _record(controls: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(
        {name: Array(value.numpy().astype(np.float32)) for name, value in controls.items()}
    )


class SiteControl:
    """SCAFFOLD at one site for one training round.

    Built by :meth:`of` from the coordinator's message; :attr:`correction` goes to the site's
    training as its extra loss; :meth:`finish` then stores ``c_i+`` and returns the record of
    ``c_i+ - c_i`` for the reply (:data:`~fl_imaging.flower.protocol.CONTROL_DELTA`).
    """

    def __init__(self, model: nn.Module, global_control: Controls, site_control: Controls) -> None:
        self.names = trainable_names(model)
        self.global_control = global_control
        self.site_control = site_control
        self.correction = ControlCorrection(model, global_control, site_control)

    @classmethod
    def of(cls, msg: Message, context: Context, model: nn.Module) -> SiteControl | None:
        """The round's SCAFFOLD state when ``msg`` carries the global control variate
        (:data:`~fl_imaging.flower.protocol.CONTROL`), with the site's ``c_i`` from
        ``context.state`` (zeros in its first round); None when ``msg`` carries none. Raises
        ValueError when a control variate does not fit ``model``'s parameters."""
        if CONTROL not in msg.content.array_records:
            return None
        global_control = _controls(msg.content.array_records[CONTROL])
        site_control = _controls(context.state.array_records.get(SITE_CONTROL))
        unknown = sorted(set(global_control) - set(trainable_names(model)))
        if unknown:
            raise ValueError(
                f"the coordinator's SCAFFOLD control variate names {', '.join(unknown[:3])}, "
                "which are no trainable parameters of this site's model"
            )
        return cls(model, global_control, site_control)

    def finish(
        self,
        context: Context,
        received: Mapping[str, torch.Tensor],
        trained: Mapping[str, torch.Tensor],
        lr: float,
    ) -> ArrayRecord:
        """Compute ``c_i+`` (option II, with ``K`` the steps :attr:`correction` counted and
        ``lr`` the local learning rate) from the global model ``received`` and the site's
        ``trained`` model (state dicts), keep it in ``context.state`` and return ``c_i+ - c_i``
        as an ArrayRecord (float32, one array per trainable parameter)."""
        steps = self.correction.steps
        updated = updated_site_control(
            self.site_control, self.global_control, received, trained, self.names, steps, lr
        )
        previous = {
            name: self.site_control.get(name, torch.zeros_like(value))
            for name, value in updated.items()
        }
        context.state[SITE_CONTROL] = _record(updated)
        delta = {name: updated[name] - previous[name] for name in self.names}
        log.debug(
            "SCAFFOLD: %d local steps, |c_i+ - c_i| = %.4g",
            steps,
            float(sum(float((d**2).sum()) for d in delta.values()) ** 0.5),
        )
        return _record(delta)
