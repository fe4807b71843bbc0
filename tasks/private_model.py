"""A task's network made fit for DP-SGD (``task.dp_sgd.enabled``): per-sample gradients must exist.

Nothing here computes gradients: Opacus does (its ``GradSampleModule`` hooks for Conv, GroupNorm,
InstanceNorm, ..., and functorch for other layers with parameters, e.g. MONAI's PReLU). This
module only prepares a network for it, with Opacus' own tools, and names what it changes:

- batch norm mixes the cases of a batch (no per-case gradient exists): Opacus'
  ``ModuleValidator.fix`` replaces each batch-norm layer by a ``GroupNorm`` over the same
  channels (its weight and bias, no running statistics);
- an in-place activation (``nn.ReLU(inplace=True)``, as in MONAI's DenseNet and ResNet) breaks
  the backward hooks per-sample gradients need: it is switched to out-of-place (same function);
- any other layer Opacus' ``ModuleValidator`` refuses stops the run, naming the layer.

:meth:`tasks.base.ImagingTask.build_model` applies :func:`private_network` whenever DP-SGD is on,
so that the coordinator and every site build the same converted network and their state dicts
match. :func:`check_per_sample_gradients` tries one backward pass through Opacus before a run.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fl_imaging.config import ConfigError

__all__ = ["ModelConversion", "check_per_sample_gradients", "private_network"]

log = logging.getLogger("fl_imaging")


@dataclass
class ModelConversion:
    """What :func:`private_network` changed: the batch-norm layers that became ``GroupNorm`` and
    the activations switched from in-place to out-of-place, by module name."""

    group_norm: list[str] = field(default_factory=list)
    out_of_place: list[str] = field(default_factory=list)

    def message(self) -> str:
        """One line for the log (empty when nothing changed)."""
        parts = []
        if self.group_norm:
            parts.append(
                f"{len(self.group_norm)} batch-norm layer(s) became GroupNorm (Opacus "
                f"ModuleValidator.fix: batch norm has no per-case gradient): "
                f"{', '.join(self.group_norm)}"
            )
        if self.out_of_place:
            parts.append(
                f"{len(self.out_of_place)} in-place activation(s) made out-of-place (per-sample "
                f"gradient hooks need it): {', '.join(self.out_of_place)}"
            )
        return "task.dp_sgd: " + "; ".join(parts) if parts else ""


def private_network(model: nn.Module) -> tuple[nn.Module, ModelConversion]:
    """Return ``model`` made fit for Opacus' per-sample gradients, and what was changed.

    ``model`` is a freshly built network in training mode (left unchanged when nothing needs
    fixing; otherwise Opacus returns a converted copy). Raises :class:`ConfigError` naming
    every layer Opacus cannot train with DP-SGD after the fixes.
    """
    conversion = ModelConversion()
    for name, module in model.named_modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            conversion.out_of_place.append(name)
    conversion.group_norm = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if conversion.group_norm:
        model = ModuleValidator.fix(model)
    refused = [
        f"{name} ({type(module).__name__}: {error})"
        for name, module in model.named_modules()
        if type(module) in ModuleValidator.VALIDATORS
        for error in ModuleValidator.VALIDATORS[type(module)](module)
    ]
    if refused:
        raise ConfigError(
            "task.dp_sgd.enabled=true, but Opacus cannot compute per-case gradients for: "
            + "; ".join(refused)
            + ". Choose another task.model.name or task.model.norm"
        )
    return model, conversion


def check_per_sample_gradients(model: nn.Module, sample: torch.Tensor) -> None:
    """Run one backward pass of ``model`` through Opacus' ``GradSampleModule`` on ``sample``
    (a batch ``(B, C_in, *spatial)`` float32; ``B = 1`` also tries a Poisson batch of one case)
    and check that every trainable
    parameter got a per-case gradient of shape ``(B, *param.shape)``. ``model`` is a copy the
    caller may discard (hooks are removed afterwards). Raises :class:`ConfigError` naming the
    parameters without one (or the layer's error)."""
    wrapped = None
    try:
        wrapped = GradSampleModule(model)
        with warnings.catch_warnings():  # Opacus' hooks on an input without gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            wrapped(sample).float().sum().backward()
    except (RuntimeError, NotImplementedError, ValueError) as err:
        raise ConfigError(
            f"task.dp_sgd.enabled=true, but training one case at a time fails on this network "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). Choose another task.model.name "
            "or task.model.norm, or a larger task.roi_size (a normalisation layer that sees one "
            "value per group cannot normalise a single case)"
        ) from None
    finally:
        if wrapped is not None:
            wrapped.remove_hooks()
    batch = sample.shape[0]
    missing = [
        name
        for name, param in model.named_parameters()
        if param.requires_grad
        and (
            getattr(param, "grad_sample", None) is None
            or tuple(param.grad_sample.shape) != (batch, *param.shape)
        )
    ]
    if missing:
        raise ConfigError(
            "task.dp_sgd.enabled=true, but Opacus computes no per-case gradient for: "
            + ", ".join(missing)
            + ". Choose another task.model.name or task.model.norm"
        )
