"""Checks on the model a config builds, done before any site's data is read.

Some settings only make sense for some models: FedBN needs normalisation layers with parameters
to keep at the sites, client-level DP clips and noises batch-norm running statistics with the
weights, and DP-SGD needs a per-case gradient for every parameter. All are known from the model
alone, so ``fl-imaging`` and ``fl-imaging-bench`` check them first, building the model once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from fl_imaging.config import ConfigError, DPMode, RunConfig
from tasks import build_task

__all__ = [
    "build_network",
    "check_configured_parts",
    "check_dp_sgd_model",
    "check_fedbn",
    "check_model",
    "norm_state_keys",
    "warn_dp_running_statistics",
]

log = logging.getLogger("fl_imaging")

_NORM_LAYERS = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_state_keys(model: nn.Module) -> list[str]:
    """Names of ``model``'s state-dict entries that belong to normalisation layers (batch,
    instance, group and layer norm: weight, bias, running mean and variance, batch counter).
    Empty for a model whose normalisation layers have no parameters (MONAI's default U-Net)."""
    keys: list[str] = []
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            prefix = f"{module_name}." if module_name else ""
            keys.extend(prefix + k for k in module.state_dict())
    return keys


def _model_settings(cfg: RunConfig) -> str:
    """The ``task.model`` keys that make ``cfg``'s network, as ``key=value`` pairs."""
    model = cfg.task.model
    if model._target_:
        return f"task.model._target_={model._target_}, task.model.args={dict(model.args)}"
    return (
        f"task.model.name={model.name.value}, task.model.channels={list(model.channels)}, "
        f"task.model.norm={model.norm or 'null'}, task.model.num_res_units="
        f"{model.num_res_units}, task.model.dropout={model.dropout}"
    )


def _innermost(err: BaseException) -> BaseException:
    """The first cause of ``err`` (MONAI's config parser wraps a constructor's error)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def build_network(cfg: RunConfig) -> nn.Module:
    """Build ``cfg``'s network once, as every site will (:meth:`tasks.base.MonaiTask.build_model`)
    and return it (on the CPU). Raises :class:`ConfigError` naming the ``task.model`` keys and
    the constructor's own reason when the network cannot be built from them (e.g. SegResNet's
    group norm with ``task.model.channels[0]`` not a multiple of 8)."""
    try:
        return build_task(cfg.task).build_model()
    except ConfigError:
        raise
    except Exception as err:  # any constructor may refuse its arguments: name the keys
        cause = _innermost(err)
        raise ConfigError(
            f"the network cannot be built from {_model_settings(cfg)} "
            f"(task.in_channels={cfg.task.in_channels}, task.num_classes="
            f"{cfg.task.num_classes}): {type(cause).__name__}: {cause}; change these "
            "task.model settings (e.g. task.model.channels or task.model.norm)"
        ) from None


def check_model(cfg: RunConfig) -> None:
    """Build ``cfg``'s model once (:func:`build_network`) and run every check on it:
    :func:`check_configured_parts`, :func:`check_fedbn` (with FedBN on),
    :func:`warn_dp_running_statistics` and :func:`check_dp_sgd_model`. Raises
    :class:`ConfigError` as they do."""
    dp_sgd = cfg.task.dp_sgd.enabled
    model = build_network(cfg)
    check_configured_parts(cfg)
    if not cfg.strategy.fedbn and cfg.strategy.dp.mode == DPMode.none and not dp_sgd:
        return
    if cfg.strategy.fedbn:
        check_fedbn(cfg, model)
    warn_dp_running_statistics(cfg, model)
    if dp_sgd:
        check_dp_sgd_model(cfg)


def check_configured_parts(cfg: RunConfig) -> None:
    """With a ``_target_`` network, loss or optimizer, or extra transforms in the config: build
    them all (:mod:`tasks.targets` checks what each names) and pass one random image of
    ``task.roi_size`` through the network and the loss, so that a network that does not fit
    the task (a size it cannot take, the wrong output) stops the run before any site's data is
    read. Nothing is done for the built-in parts. Raises :class:`ConfigError` saying what to
    change."""
    task_cfg = cfg.task
    parts = task_cfg.transforms
    if not (
        task_cfg.model._target_
        or task_cfg.loss._target_
        or task_cfg.optimizer._target_
        or parts.preprocessing
        or parts.augmentation
    ):
        return
    from tasks.base import build_optimizer

    task = build_task(task_cfg)
    task.inference_transforms()
    task.train_transforms()
    model = task.network()
    build_optimizer(model, task_cfg)
    loss_fn = task.loss_function()
    sample = torch.randn(1, task_cfg.in_channels, *task_cfg.roi_size)
    what = task_cfg.model._target_ or f"the {task_cfg.model.name.value}"
    try:
        with torch.no_grad():
            logits = model.eval()(sample)
    except ImportError as err:  # MONAI's optional imports fail only when a layer runs
        raise ConfigError(
            f"{what} needs a package that is not installed: {err}; install it into this "
            "environment (pip install NAME) on the coordinator and on every site"
        ) from None
    except Exception as err:  # any layer may refuse the input: say which network and size
        raise ConfigError(
            f"{what} cannot take an image of task.roi_size={list(task_cfg.roi_size)} with "
            f"task.in_channels={task_cfg.in_channels}: {type(err).__name__}: {err}; change "
            "task.roi_size (many networks need multiples of 16 or 32) or task.model.args"
        ) from None
    if not isinstance(logits, torch.Tensor) or logits.shape[:2] != (1, task_cfg.num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(
            f"{what} gives {shape} for one image; the task needs logits with "
            f"task.num_classes={task_cfg.num_classes} channels first, (1, "
            f"{task_cfg.num_classes}, ...): check task.model.args"
        )
    target = (
        torch.zeros(1, 1, *logits.shape[2:], dtype=torch.long)
        if logits.dim() > 2
        else torch.zeros(1, dtype=torch.long)
    )
    try:
        loss_fn(logits, target)
    except Exception as err:  # a loss that does not fit logits and class indices
        raise ConfigError(
            f"task.loss._target_={task_cfg.loss._target_ or 'the task default'} cannot score "
            f"logits {tuple(logits.shape)} against class indices {tuple(target.shape)}: "
            f"{type(err).__name__}: {err}; check task.loss.args"
        ) from None


def check_dp_sgd_model(cfg: RunConfig) -> None:
    """With ``task.dp_sgd``: log which layers the network's conversion for DP-SGD changed (batch
    norm to GroupNorm, in-place activations) and try one per-case backward pass through Opacus
    on one random input of ``task.roi_size`` (a Poisson batch may hold a single case). Raises
    :class:`ConfigError` naming a layer Opacus cannot train."""
    from tasks.private_model import check_per_sample_gradients, private_network

    task = build_task(cfg.task)
    model, conversion = private_network(task.network())
    if conversion.message():
        log.info("%s", conversion.message())
    sample = torch.randn(1, cfg.task.in_channels, *cfg.task.roi_size)
    check_per_sample_gradients(model, sample)


def check_fedbn(cfg: RunConfig, model: nn.Module | None = None) -> None:
    """Refuse FedBN for a model without normalisation parameters (nothing to keep local).

    ``model`` is ``cfg``'s model when already built (else it is built here)."""
    model = model or build_task(cfg.task).build_model()
    if not norm_state_keys(model):
        raise ConfigError(
            f"strategy.fedbn=true, but the {cfg.task.model.name.value} with "
            f"task.model.norm={cfg.task.model.norm or 'null'} has no normalisation parameters to "
            "keep at the sites (MONAI's U-Net uses instance norm without any): set "
            "task.model.norm=batch"
        )


def warn_dp_running_statistics(cfg: RunConfig, model: nn.Module | None = None) -> bool:
    """Warn when DP-FedAvg would clip and noise batch-norm running statistics with the weights.

    Flower's DP wrappers clip each site's whole update, running means and variances included, so
    the global model's statistics move by the clipped fraction of their change each round and
    stay near their initial values; evaluated with them, the model fails (measured on
    hippocampus_shift, 6 rounds, noise 0.01: test Dice 0.036, against 0.729 on hippocampus_iid
    with instance norm). ``model`` is ``cfg``'s model when already built. Returns True when it
    warned (DP on and the model has running statistics).
    """
    if cfg.strategy.dp.mode == DPMode.none:
        return False
    model = model or build_task(cfg.task).build_model()
    stats = [name for name, _ in model.named_buffers() if name.endswith("running_var")]
    if not stats:
        return False
    log.warning(
        "strategy.dp.mode=%s with a model that has %d batch-norm layers "
        "(task.model.norm=%s): their running statistics are clipped and noised with the "
        "weights, lag the data and can ruin the global model's predictions; prefer "
        "task.model.norm=instance (or null) with DP",
        cfg.strategy.dp.mode.value,
        len(stats),
        cfg.task.model.norm,
    )
    return True
