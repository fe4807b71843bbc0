"""Which of a network's parameters a site trains (``task.model.trainable``); the rest are frozen.

The patterns are :mod:`fnmatch` patterns over ``model.named_parameters()`` names (``model.2.*``,
``*.bias``); a frozen parameter gets ``requires_grad = False``, so torch's optimizers, Opacus'
per-case gradients and FedProx's term leave it exactly as it was received. Ours: torch has no
name-pattern freezing; the matching itself is :func:`fnmatch.fnmatchcase`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from fl_imaging.config import ConfigError

__all__ = ["freeze_except", "trainable_names"]

#: How many parameter names a refusal shows.
_SHOWN = 8


def trainable_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The names of ``model``'s parameters matched by any of ``patterns`` (every parameter
    when ``patterns`` is empty), in ``named_parameters()`` order.

    Raises:
        ConfigError: for a pattern that matches no parameter, naming it and a few of the
            network's parameter names.
    """
    names = [name for name, _ in model.named_parameters()]
    if not patterns:
        return names
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
            raise ConfigError(
                f"task.model.trainable: the pattern {pattern!r} matches none of the network's "
                f"{len(names)} parameters ({shown}); give fnmatch patterns over these names, "
                "e.g. 'model.2.*' or '*.bias'"
            )
    return [name for name in names if any(fnmatchcase(name, p) for p in patterns)]


def freeze_except(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze (``requires_grad = False``) every parameter of ``model`` that ``patterns`` do not
    match (:func:`trainable_names`); the matched ones are made trainable. Changes ``model`` in
    place and returns the trained parameters' names. Raises :class:`ConfigError` as
    :func:`trainable_names` does."""
    trained = set(trainable_names(model, patterns))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    return [name for name, _ in model.named_parameters() if name in trained]
