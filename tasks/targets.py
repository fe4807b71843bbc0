"""MONAI and PyTorch classes named by ``_target_`` in the ``task`` config: networks, losses,
optimizers and transforms, with the checks a site applies before it builds any of them.

``task.model._target_=monai.networks.nets.SwinUNETR`` (with ``task.model.args``) replaces the
built-in network, ``task.loss._target_`` the loss, ``task.optimizer._target_`` the optimizer,
and ``task.transforms.preprocessing`` / ``augmentation`` add transforms, all as Hydra and MONAI
bundles write them. The config a site trains with comes from the coordinator, so a ``_target_``
is a request, not an authority: the site builds only classes of the packages in
:data:`ALLOWED_PACKAGES` that are what the key says (a network is an ``nn.Module``, an
optimizer a ``torch.optim.Optimizer``, a transform a MONAI ``Transform``), and never evaluates
the expressions (``$...``), references (``@...``) or macros (``%...``) of MONAI's bundle syntax
in arguments, nor its ``_requires_`` / ``_mode_`` keys, which would run code of the coordinator's
choice. The checks are our own (neither Hydra nor MONAI restricts what a ``_target_`` may name);
building is MONAI's ``ConfigParser`` (:mod:`tasks.definitions`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from monai.transforms import Transform
from torch import nn

from fl_imaging.config import ConfigError

__all__ = [
    "ALLOWED_PACKAGES",
    "check_arguments",
    "filled_arguments",
    "resolve_class",
    "target_definition",
    "transform_definitions",
]

#: Top-level packages whose classes a ``_target_`` may name.
ALLOWED_PACKAGES = ("monai", "torch")

#: What each config key's class must be.
_KINDS: dict[str, tuple[type, str]] = {
    "network": (nn.Module, "a torch.nn.Module (e.g. monai.networks.nets.SwinUNETR)"),
    "loss": (nn.Module, "a loss module (e.g. monai.losses.DiceFocalLoss)"),
    "optimizer": (torch.optim.Optimizer, "a torch.optim.Optimizer (e.g. torch.optim.SGD)"),
    "transform": (Transform, "a MONAI transform (e.g. monai.transforms.RandGaussianNoised)"),
}

#: First characters of MONAI bundle syntax that would be evaluated or looked up.
_BUNDLE_SYNTAX = ("$", "@", "%")


def resolve_class(path: str, kind: str, key: str) -> type:
    """Import the class ``path`` names and check it is of ``kind``.

    Args:
        path: dotted path, e.g. ``monai.networks.nets.SwinUNETR``; a bare MONAI transform name
            (``RandGaussianNoised``) is looked up in ``monai.transforms`` for ``kind``
            ``transform``, as MONAI bundles allow.
        kind: ``network``, ``loss``, ``optimizer`` or ``transform``.
        key: the config key, for messages (``task.model._target_``).

    Returns:
        The class.

    Raises:
        ConfigError: for a path outside :data:`ALLOWED_PACKAGES`, one that does not import, or
            a class of the wrong kind, naming the key, the path and what to give.
    """
    base, what = _KINDS[kind]
    if kind == "transform" and "." not in path:
        path = f"monai.transforms.{path}"
    if path.split(".")[0] not in ALLOWED_PACKAGES:
        raise ConfigError(
            f"{key}={path}: only classes of {' and '.join(ALLOWED_PACKAGES)} can be built by a "
            f"site (a _target_ comes with the coordinator's request); give {what}"
        )
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(
            f"{key}={path}: no class {name!r} in {module_name or path!r}; give the full import "
            f"path of {what}"
        ) from None
    if not (inspect.isclass(found) and issubclass(found, base)):
        raise ConfigError(f"{key}={path} is not {what}")
    return found


def check_arguments(args: Mapping[str, Any], key: str) -> None:
    """Refuse arguments that MONAI's bundle parser would evaluate or treat as instructions.

    Args:
        args: the keyword arguments of a ``_target_`` (nested lists and dicts are searched).
        key: the config key holding them, for messages (``task.model.args``).

    Raises:
        ConfigError: for a string starting with ``$``, ``@`` or ``%``, or a key starting with
            ``_``, naming it.
    """

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str) and value.startswith(_BUNDLE_SYNTAX):
            raise ConfigError(
                f"{where}={value!r}: expressions, references and macros of MONAI's bundle "
                "syntax are not run by a site; give a plain value (number, string, list)"
            )
        if isinstance(value, Mapping):
            for k, v in value.items():
                if str(k).startswith("_"):
                    raise ConfigError(
                        f"{where}.{k}: bundle keys such as _target_, _requires_ or _mode_ are "
                        "not accepted inside arguments; give plain keyword arguments"
                    )
                walk(v, f"{where}.{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    walk(dict(args), key)


def filled_arguments(
    cls: type, args: Mapping[str, Any], defaults: Mapping[str, Any], key: str
) -> dict[str, Any]:
    """``args``, plus those of ``defaults`` that ``cls``'s constructor takes and ``args``
    leaves out; a name ``cls`` does not take is refused.

    Args:
        cls: the class to build.
        args: the user's keyword arguments (win over ``defaults``).
        defaults: what the task knows (e.g. ``spatial_dims``, ``in_channels``,
            ``out_channels``, ``lr``); only the names in ``cls``'s signature are used.
        key: the config key of ``args``, for messages.

    Returns:
        The keyword arguments to build ``cls`` with.

    Raises:
        ConfigError: naming an argument ``cls`` does not take, with the ones it does.
    """
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n in params if n != "self"]
    unknown = [n for n in args if n not in params]
    if unknown and not takes_any:
        raise ConfigError(
            f"{key}: {cls.__module__}.{cls.__qualname__} takes no argument "
            f"{', '.join(unknown)}; it takes {', '.join(names)}"
        )
    filled = {n: v for n, v in defaults.items() if n in params and n not in args}
    return {**filled, **dict(args)}


def target_definition(
    path: str, kind: str, args: Mapping[str, Any], defaults: Mapping[str, Any], key: str
) -> dict[str, Any]:
    """A bundle config item ``{"_target_": path, **arguments}`` for a checked ``_target_``.

    Args:
        path: the ``_target_`` (see :func:`resolve_class`).
        kind: ``network``, ``loss``, ``optimizer`` or ``transform``.
        args: the user's keyword arguments (checked with :func:`check_arguments`).
        defaults: what the task fills in where the class takes it (see
            :func:`filled_arguments`).
        key: the config key of the ``_target_``, for messages.

    Returns:
        A JSON-serialisable definition that :func:`tasks.definitions.instantiate` builds.

    Raises:
        ConfigError: as :func:`resolve_class`, :func:`check_arguments` and
            :func:`filled_arguments` do.
    """
    args_key = key.removesuffix("._target_") + (".args" if kind != "transform" else "")
    check_arguments(args, args_key)
    cls = resolve_class(path, kind, key)
    return {
        "_target_": f"{cls.__module__}.{cls.__qualname__}",
        **filled_arguments(cls, args, defaults, args_key),
    }


def transform_definitions(
    items: list[Mapping[str, Any]], key: str, defaults: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Checked definitions of the MONAI dict transforms a config lists.

    Args:
        items: ``[{_target_: RandGaussianNoised, keys: image, prob: 0.2}, ...]`` as in
            ``task.transforms.preprocessing``; ``_target_`` may be a bare MONAI transform name.
        key: the config key of the list, for messages.
        defaults: arguments each transform gets where it takes them and the item leaves them
            out (e.g. ``allow_missing_keys=True`` where there is no label, at inference).

    Returns:
        One definition per item, in order, with its ``_target_`` as a full import path.

    Raises:
        ConfigError: for an item without ``_target_``, or as :func:`target_definition` does.
    """
    definitions = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        args = {k: v for k, v in dict(item).items() if k != "_target_"}
        target = item.get("_target_")
        if not isinstance(target, str):
            raise ConfigError(
                f"{where}={dict(item)}: each transform needs a _target_, e.g. "
                "{_target_: RandGaussianNoised, keys: image, prob: 0.2}"
            )
        definitions.append(
            target_definition(target, "transform", args, defaults or {}, f"{where}._target_")
        )
    return definitions
