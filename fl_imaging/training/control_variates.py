"""SCAFFOLD's control variates at one site (Karimireddy et al. 2020, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning"), as tensors: the gradient correction of every
local step and option II's update of the site's control variate.

Ours: neither Flower nor MONAI has SCAFFOLD. A control variate is a dict parameter name ->
float32 tensor shaped as the parameter, over the model's trainable parameters
(``requires_grad``); a name missing from a dict counts as zeros (the first round). The Flower
side (where ``c_i`` is kept between rounds) is :mod:`fl_imaging.flower.site.control_variates`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "ControlCorrection",
    "Controls",
    "local_step_size",
    "trainable_names",
    "updated_site_control",
]

#: A control variate: parameter name -> float32 tensor of the parameter's shape.
Controls = dict[str, torch.Tensor]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that training changes (``requires_grad``), in order:
    the ones a control variate covers."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def local_step_size(optimizer: torch.optim.Optimizer) -> tuple[float, str | None]:
    """The learning rate of ``optimizer``'s first parameter group (the ``lr`` of option II),
    and a note when the optimizer is not plain SGD (no momentum): option II then divides the
    mean step, not the mean gradient, by the learning rate, which the paper does not cover
    (None when it is plain SGD)."""
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    plain = type(optimizer) is torch.optim.SGD and not group.get("momentum", 0.0)
    if plain:
        return lr, None
    return lr, (
        f"the local optimizer is {type(optimizer).__name__}"
        + (f" with momentum {group['momentum']}" if group.get("momentum") else "")
        + ", not plain SGD: SCAFFOLD's option II estimates c_i as (x - y_i) / (K * lr), the "
        "mean step per unit learning rate, which equals the mean gradient only for plain SGD "
        "(task.optimizer.name=sgd task.optimizer.momentum=0)"
    )


def _dense(control: Mapping[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    value = control.get(name)
    if value is None:
        return torch.zeros_like(like, dtype=torch.float32)
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(
            f"control variate '{name}' has shape {tuple(value.shape)}, the parameter "
            f"{tuple(like.shape)}"
        )
    return value.detach().to(torch.float32)


class ControlCorrection:
    """The extra loss (:data:`tasks.base.ExtraLoss`) that corrects each local step's gradient
    by ``c - c_i``, and counts the steps taken.

    Its value is ``sum_k <c_k - c_i,k, w_k - stopgrad(w_k)>``: zero, so the training loss a
    site reports is the task's own, while its gradient with respect to each trainable
    parameter ``w_k`` is exactly ``c_k - c_i,k``. The task's loop calls it once per
    optimizer step, so :attr:`steps` ends as ``K``, the local steps of the round.

    Args:
        model: the site's model (its trainable parameters name the control variates).
        global_control: ``c`` from the coordinator (missing names: zeros).
        site_control: the site's ``c_i`` (missing names: zeros).

    Raises:
        ValueError: when a control variate's shape differs from its parameter's.
    """

    def __init__(
        self,
        model: nn.Module,
        global_control: Mapping[str, torch.Tensor],
        site_control: Mapping[str, torch.Tensor],
    ) -> None:
        params = dict(model.named_parameters())
        self.difference: Controls = {
            name: _dense(global_control, name, params[name])
            - _dense(site_control, name, params[name])
            for name in trainable_names(model)
        }
        #: Number of calls so far: the optimizer steps the correction took part in.
        self.steps = 0

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The zero-valued term whose gradient is ``c - c_i`` (a 0-d float32 tensor)."""
        self.steps += 1
        total = torch.zeros((), dtype=torch.float32)
        for name, param in model.named_parameters():
            if name in self.difference:
                diff = self.difference[name]
                if diff.device != param.device:  # moved once, not at every batch
                    diff = self.difference[name] = diff.to(param.device)
                total = total.to(param.device) + (diff * (param - param.detach())).sum()
        return total


def updated_site_control(
    site_control: Mapping[str, torch.Tensor],
    global_control: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    names: list[str],
    steps: int,
    lr: float,
) -> Controls:
    """Option II of SCAFFOLD: ``c_i+ = c_i - c + (x - y_i) / (K * lr)`` for every name in
    ``names``.

    Args:
        site_control: ``c_i`` before the round (missing names: zeros).
        global_control: ``c`` received this round (missing names: zeros).
        received: ``x``, the global model's state dict received this round.
        trained: ``y_i``, the site's model after its ``steps`` local steps.
        names: the trainable parameters' names (:func:`trainable_names`).
        steps: ``K``, local optimizer steps taken; 0 (no training) leaves ``c_i`` unchanged.
        lr: the local learning rate (> 0).

    Returns:
        ``c_i+``: name -> float32 CPU tensor of the parameter's shape.
    """
    updated: Controls = {}
    for name in names:
        x = received[name].detach().cpu().to(torch.float32)
        c_i = _dense(site_control, name, x).cpu()
        if steps <= 0:
            updated[name] = c_i.clone()
            continue
        c = _dense(global_control, name, x).cpu()
        y = trained[name].detach().cpu().to(torch.float32)
        updated[name] = c_i - c + (x - y) / (steps * lr)
    return updated
