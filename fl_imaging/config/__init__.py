"""fl-imaging's configuration: the front door every module imports it from.

Hydra composes ``conf/`` into a plain ``DictConfig``; :func:`validate_config` checks it against the
typed schema (:mod:`fl_imaging.config.schema`, whose names this module hands on) and the value rules
(:mod:`fl_imaging.config.checks`), and turns OmegaConf's errors into messages that name the key,
the expected type and the allowed keys or values. Every other module receives a validated
:class:`RunConfig`.
"""

from __future__ import annotations

import enum
import importlib.resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fl_imaging.config.checks import config_problems
from fl_imaging.config.errors import ConfigError
from fl_imaging.config.schema import (
    MODEL_NORMS,
    NORM_OUTLIER_ACTIONS,
    AttackConfig,
    AttackName,
    BenchConfig,
    CompressionMode,
    DataConfig,
    DataName,
    DPConfig,
    DPMode,
    DPSGDAccountant,
    DPSGDConfig,
    EngineConfig,
    EngineName,
    HEConfig,
    IntensityPreset,
    LossConfig,
    ModelConfig,
    ModelName,
    OptimizerConfig,
    OptimizerName,
    PartitionBy,
    PartitionConfig,
    PartitionName,
    RunConfig,
    SecAggConfig,
    SiteConfig,
    StrategyConfig,
    TaskConfig,
    TaskName,
    TrackingBackend,
    TrackingConfig,
    TransformsConfig,
    UpdateValidationConfig,
    model_label,
)

__all__ = [
    "MODEL_NORMS",
    "NORM_OUTLIER_ACTIONS",
    "AttackConfig",
    "AttackName",
    "BenchConfig",
    "CompressionMode",
    "ConfigError",
    "DPConfig",
    "DPMode",
    "DPSGDAccountant",
    "DPSGDConfig",
    "DataConfig",
    "DataName",
    "EngineConfig",
    "EngineName",
    "LossConfig",
    "IntensityPreset",
    "ModelConfig",
    "ModelName",
    "OptimizerConfig",
    "OptimizerName",
    "PartitionBy",
    "PartitionConfig",
    "PartitionName",
    "RunConfig",
    "HEConfig",
    "SecAggConfig",
    "SiteConfig",
    "StrategyConfig",
    "TaskConfig",
    "TaskName",
    "TrackingBackend",
    "TrackingConfig",
    "TransformsConfig",
    "UpdateValidationConfig",
    "model_label",
    "config_dir",
    "config_from_yaml",
    "config_to_yaml",
    "validate_config",
]


def config_dir() -> Path:
    """Return the folder of the shipped Hydra config tree (``conf/``), installed or editable."""
    return Path(str(importlib.resources.files("conf")))


def _allowed_keys(schema: Any, full_key: str) -> list[str]:
    """Keys of the schema node that holds ``full_key`` (e.g. ``task.model.chanels``)."""
    node: Any = schema
    for part in full_key.split(".")[:-1]:
        if not hasattr(node, part):
            break
        node = getattr(node, part)
    if isinstance(node, DictConfig):
        return sorted(str(k) for k in node.keys())
    return []


def _enum_values(schema: Any, full_key: str) -> list[str]:
    node: Any = schema
    for part in full_key.split("."):
        if not hasattr(node, part):
            return []
        node = getattr(node, part)
    return [e.value for e in type(node)] if isinstance(node, enum.Enum) else []


def validate_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Check a composed config against the schema and return it typed.

    Takes the DictConfig Hydra composed (or a plain nested dict) and returns a :class:`RunConfig`
    (an OmegaConf structured object behaving like the dataclass). Raises :class:`ConfigError` naming
    the offending key with the allowed keys (for an unknown key) or the expected type and allowed
    values (for a wrong value), and checks value ranges OmegaConf cannot express.
    """
    schema = OmegaConf.structured(RunConfig)
    plain = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(schema, plain)
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        allowed = ", ".join(_allowed_keys(schema, key))
        raise ConfigError(
            f"Unknown config key '{key}'. Allowed keys here: {allowed}. "
            "Check the spelling of your override or YAML file."
        ) from None
    except ValidationError as err:
        key = err.full_key or str(err.key)
        values = _enum_values(schema, key)
        expected = f"one of: {', '.join(values)}" if values else _type_name(schema, key)
        raise ConfigError(
            f"Invalid value {err.value!r} for config key '{key}': expected {expected}."
        ) from None
    except OmegaConfBaseException as err:  # pragma: no cover - other OmegaConf failures
        raise ConfigError(f"Invalid configuration: {err}") from None
    run = OmegaConf.to_object(merged)
    assert isinstance(run, RunConfig)
    problems = config_problems(run)
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    return run


def _type_name(schema: Any, full_key: str) -> str:
    node: Any = schema
    parts = full_key.split(".")
    for part in parts[:-1]:
        node = getattr(node, part)
    ref = OmegaConf.get_type(node, parts[-1]) if isinstance(node, DictConfig) else None
    return f"a value of type {getattr(ref, '__name__', ref)}" if ref else "another type"


def config_to_yaml(run: RunConfig) -> str:
    """Serialise a validated config to YAML text (enums as plain strings)."""
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def config_from_yaml(text: str) -> RunConfig:
    """Parse YAML written by :func:`config_to_yaml` back into a validated :class:`RunConfig`."""
    loaded = OmegaConf.create(text)
    if not isinstance(loaded, DictConfig):
        raise ConfigError("The configuration text is not a YAML mapping.")
    return validate_config(loaded)
