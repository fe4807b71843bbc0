"""The typed schema of fl-imaging's Hydra configuration, and its validation.

Hydra composes ``conf/`` into a plain ``DictConfig``; :func:`validate_config` checks it against the
dataclasses below and turns OmegaConf's errors into messages that name the key, the expected type
and the allowed keys or values. Every other module receives a validated :class:`RunConfig`.
"""

from __future__ import annotations

import enum
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    "AttackConfig",
    "BenchConfig",
    "ConfigError",
    "DPConfig",
    "DataConfig",
    "EngineConfig",
    "EngineName",
    "ModelConfig",
    "NORM_OUTLIER_ACTIONS",
    "OptimizerConfig",
    "PartitionConfig",
    "RunConfig",
    "StrategyConfig",
    "TaskConfig",
    "UpdateValidationConfig",
    "config_dir",
    "config_from_yaml",
    "config_to_yaml",
    "validate_config",
]


class ConfigError(ValueError):
    """A configuration value a user must change before anything runs."""


class TaskName(enum.StrEnum):
    segmentation = "segmentation"
    classification = "classification"


class ModelName(enum.StrEnum):
    unet = "unet"
    segresnet = "segresnet"
    densenet = "densenet"
    resnet = "resnet"


class DataName(enum.StrEnum):
    """Where the sites' cases come from (see ``fl_imaging/data/``)."""

    demo = "demo"  # synthetic demo, written on first use
    folders = "folders"  # one folder per hospital, used as they are
    msd = "msd"  # a Medical Segmentation Decathlon task, split into simulated sites
    class_folders = "class_folders"  # 2D/3D images in one sub-folder per class, split into sites
    medmnist = "medmnist"  # a MedMNIST .npz file (official train/val/test), split into sites


class PartitionName(enum.StrEnum):
    """How a public dataset is split into simulated sites (see ``fl_imaging/data/partition.py``)."""

    iid = "iid"
    dirichlet = "dirichlet"
    sizes = "sizes"
    shift = "shift"


class PartitionBy(enum.StrEnum):
    label = "label"  # classification: the class; segmentation: not available
    size = "size"  # segmentation: foreground volume of the label (quantile bins)


class DPMode(enum.StrEnum):
    """Client-level differential privacy: Flower's wrappers around FedAvg."""

    none = "none"
    server_fixed = "server_fixed"  # server clips each update and adds noise (central DP)
    client_fixed = "client_fixed"  # each site clips its own update; the server adds noise
    server_adaptive = "server_adaptive"  # clipping norm learnt from a noisy quantile
    client_adaptive = "client_adaptive"


class AttackName(enum.StrEnum):
    """Simulated malicious sites, for benchmarking robust strategies (simulation only)."""

    none = "none"
    signflip = "signflip"  # sends -scale x its honest update
    scale = "scale"  # sends scale x its honest update
    noise = "noise"  # sends Gaussian noise with the norm of scale x its honest update
    labelflip = "labelflip"  # trains on permuted labels
    collusion = "collusion"  # every malicious site sends the same crafted update


class OptimizerName(enum.StrEnum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


@dataclass
class ModelConfig:
    name: ModelName = ModelName.unet
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    num_res_units: int = 1
    dropout: float = 0.0
    #: Normalisation layers: None = the MONAI network's own default (instance norm without
    #: parameters in the U-Net, batch norm in the DenseNet); "batch" or "instance".
    norm: str | None = None


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass
class TaskConfig:
    name: TaskName = TaskName.segmentation
    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 2
    class_names: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    local_epochs: int = 1
    batch_size: int = 4
    roi_size: list[int] = field(default_factory=lambda: [32, 32, 32])
    spacing: list[float] | None = None
    sw_batch_size: int = 4
    sw_overlap: float = 0.25


@dataclass
class PartitionConfig:
    name: PartitionName = PartitionName.iid
    seed: int = 0
    alpha: float = 0.5
    by: PartitionBy = PartitionBy.label
    size_bins: int = 4
    sizes: list[float] = field(default_factory=list)
    min_cases: int = 2
    shift_strength: float = 1.0


@dataclass
class DataConfig:
    name: DataName = DataName.demo
    root: str | None = None
    sites: list[str] = field(default_factory=list)
    num_sites: int = 3
    cases_per_site: int = 16
    shape: list[int] = field(default_factory=lambda: [32, 32, 32])
    dicom_sites: list[int] = field(default_factory=lambda: [0])
    flag: str | None = None
    size: int = 28
    max_cases: int | None = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    sites_dir: str = "data-sites"
    val_fraction: float = 0.25
    test_fraction: float = 0.0
    cache: bool = True
    exclude_bad_cases: bool = False


@dataclass
class UpdateValidationConfig:
    """Checks on every site's update before aggregation (see ``strategies/validation.py``).

    Replies holding NaN/Inf or arrays unlike the global model's are always rejected. An update
    whose L2 norm exceeds ``norm_factor`` times the round's median update norm is an outlier;
    ``norm_outliers`` says whether it is only flagged in the log (``flag``) or left out
    (``reject``). The default only flags, so undefended strategies stay undefended.
    """

    norm_outliers: str = "flag"
    norm_factor: float = 5.0


@dataclass
class DPConfig:
    mode: DPMode = DPMode.none
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    initial_clipping_norm: float = 0.1
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    target_delta: float = 1e-5
    max_epsilon: float | None = None
    account: bool = True


@dataclass
class AttackConfig:
    name: AttackName = AttackName.none
    fraction: float = 0.25
    sites: list[int] = field(default_factory=list)
    scale: float = 10.0
    norm: float = 10.0


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    #: L2 bound on each site's update, applied on top of any strategy (None: no bound).
    norm_bound: float | None = None
    validation: UpdateValidationConfig = field(default_factory=UpdateValidationConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    #: FedBN (Li et al. 2021): each site keeps its own normalisation layers (weights and running
    #: statistics) and uses the global model's other weights.
    fedbn: bool = False


class EngineName(enum.StrEnum):
    simulation = "simulation"  # Flower's simulation engine on this machine (Ray)
    deployment = "deployment"  # a running SuperLink with one SuperNode per hospital


@dataclass
class EngineConfig:
    name: EngineName = EngineName.simulation
    rounds: int = 3
    clients_per_round: int | None = None
    cpus_per_client: int = 1
    num_cpus: int | None = None
    torch_threads: int | None = None
    round_timeout: float = 3600.0
    verbose: bool = False
    #: Each site evaluates the global model it receives inside the training message (one
    #: message per round; a last evaluation round scores the final model).
    evaluate_in_train: bool = False
    #: A round goes on once this many sites answered (None: every sampled site).
    min_sites: int | None = None
    #: Seconds to wait for enough sites to be connected before a round; then the run stops.
    wait_timeout: float = 600.0
    #: Deployment: the SuperLink's address (host:port) and the CA certificate that signed its
    #: TLS certificate (None: plain text, for trying on loopback only).
    superlink: str = "127.0.0.1:9093"
    root_certificates: str | None = None
    #: Deployment: the SuperLink's sites (number of SuperNodes expected), for the round table.
    num_sites: int | None = None
    #: After the last round, each site scores the final global model on its test cases
    #: (``test_<metric>`` rows) and, with ``finetune_epochs`` > 0, again after fine-tuning a
    #: copy of it on its own training cases for that many epochs (``finetuned_<metric>``).
    test: bool = False
    finetune_epochs: int = 0


@dataclass
class BenchConfig:
    """A named benchmark (``fl-imaging-bench``): setups x strategies x seeds, and baselines.

    ``setups`` and ``strategies`` map a label to the overrides that make it (e.g.
    ``{dp_low: [strategy=dpfedavg, strategy.dp.noise_multiplier=0.3]}``); ``baselines`` are
    ``pooled`` and/or ``local``; ``metrics`` are the task's metrics to report, the first one
    the main one (best round, worst site, fairness gap).
    """

    name: str | None = None
    out_dir: str = "benchmarks"
    seeds: list[int] = field(default_factory=lambda: [0])
    setups: dict[str, list[str]] = field(default_factory=dict)
    strategies: dict[str, list[str]] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=lambda: ["pooled", "local"])
    metrics: list[str] = field(default_factory=list)
    finetune_epochs: int = 1


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    seed: int = 0
    run_dir: str = "runs/latest"
    #: A previous run's folder to resume from (its checkpoint.json), or None.
    resume: str | None = None


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
    _check_ranges(run)
    return run


def _type_name(schema: Any, full_key: str) -> str:
    node: Any = schema
    parts = full_key.split(".")
    for part in parts[:-1]:
        node = getattr(node, part)
    ref = OmegaConf.get_type(node, parts[-1]) if isinstance(node, DictConfig) else None
    return f"a value of type {getattr(ref, '__name__', ref)}" if ref else "another type"


def _check_ranges(run: RunConfig) -> None:
    problems: list[str] = []
    task, data, engine = run.task, run.data, run.engine
    if task.spatial_dims not in (2, 3):
        problems.append(f"task.spatial_dims={task.spatial_dims}: allowed values are 2 and 3")
    if len(task.roi_size) != task.spatial_dims:
        problems.append(
            f"task.roi_size={task.roi_size} has {len(task.roi_size)} entries but "
            f"task.spatial_dims={task.spatial_dims}: give one size per spatial axis"
        )
    if task.spacing is not None and len(task.spacing) != task.spatial_dims:
        problems.append(f"task.spacing={task.spacing}: give one spacing (mm) per spatial axis")
    if task.num_classes < 2:
        problems.append(f"task.num_classes={task.num_classes}: must be 2 or more")
    if not task.model.channels or min(task.model.channels) < 1:
        problems.append(f"task.model.channels={task.model.channels}: give positive widths")
    seg_models, cls_models = (
        {ModelName.unet, ModelName.segresnet},
        {
            ModelName.densenet,
            ModelName.resnet,
        },
    )
    allowed_models = seg_models if task.name == TaskName.segmentation else cls_models
    if task.model.name not in allowed_models:
        problems.append(
            f"task.model.name={task.model.name.value} does not fit task {task.name.value}: "
            f"allowed values are {', '.join(sorted(m.value for m in allowed_models))}"
        )
    if task.model.name == ModelName.unet and len(task.model.channels) < 2:
        problems.append("task.model.channels: the U-Net needs at least 2 levels, e.g. [8,16,32]")
    if task.model.name == ModelName.resnet and len(task.model.channels) != 4:
        problems.append(
            f"task.model.channels={task.model.channels}: the ResNet needs exactly 4 widths, "
            "e.g. [8,16,32,64]"
        )
    for name, value in (
        ("task.local_epochs", task.local_epochs),
        ("task.batch_size", task.batch_size),
        ("engine.rounds", engine.rounds),
        ("engine.cpus_per_client", engine.cpus_per_client),
    ):
        if value < 1:
            problems.append(f"{name}={value}: must be 1 or more")
    if task.optimizer.lr <= 0:
        problems.append(f"task.optimizer.lr={task.optimizer.lr}: must be positive")
    if not 0.0 < data.val_fraction < 1.0:
        problems.append(f"data.val_fraction={data.val_fraction}: must be between 0 and 1")
    if not 0.0 <= data.test_fraction < 1.0 or data.val_fraction + data.test_fraction >= 1.0:
        problems.append(
            f"data.test_fraction={data.test_fraction}: must be in [0, 1) and leave training "
            f"cases next to data.val_fraction={data.val_fraction}"
        )
    if data.num_sites < 1:
        problems.append(f"data.num_sites={data.num_sites}: must be 1 or more")
    if data.max_cases is not None and data.max_cases < data.num_sites:
        problems.append(f"data.max_cases={data.max_cases}: must be at least data.num_sites")
    dp = run.strategy.dp
    if dp.mode != DPMode.none and (
        dp.noise_multiplier < 0 or dp.clipping_norm <= 0 or not 0 < dp.target_delta < 1
    ):
        problems.append(
            "strategy.dp: noise_multiplier must be >= 0, clipping_norm > 0 and target_delta in "
            "(0, 1)"
        )
    if dp.max_epsilon is not None and dp.max_epsilon <= 0:
        problems.append(f"strategy.dp.max_epsilon={dp.max_epsilon}: must be positive")
    attack = run.attack
    if not 0.0 <= attack.fraction < 1.0 or attack.scale <= 0 or attack.norm <= 0:
        problems.append("attack: fraction must be in [0, 1), scale and norm positive")
    part = data.partition
    if part.alpha <= 0:
        problems.append(f"data.partition.alpha={part.alpha}: must be positive (e.g. 0.5)")
    if part.name == PartitionName.sizes and (
        len(part.sizes) != data.num_sites or min(part.sizes, default=0) <= 0
    ):
        problems.append(
            f"data.partition.sizes={part.sizes}: give one positive size (cases or share) per "
            f"site, {data.num_sites} in all (data.num_sites)"
        )
    if part.min_cases < 1 or part.size_bins < 2 or part.shift_strength < 0:
        problems.append(
            "data.partition: min_cases must be >= 1, size_bins >= 2 and shift_strength >= 0"
        )
    if task.model.norm is not None and task.model.norm not in MODEL_NORMS:
        problems.append(
            f"task.model.norm={task.model.norm}: allowed values are null (the network's "
            f"default), {', '.join(MODEL_NORMS)}"
        )
    if engine.finetune_epochs < 0:
        problems.append(f"engine.finetune_epochs={engine.finetune_epochs}: must be 0 or more")
    if engine.clients_per_round is not None and engine.clients_per_round < 1:
        problems.append(f"engine.clients_per_round={engine.clients_per_round}: must be 1 or more")
    problems.extend(_strategy_problems(run.strategy))
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))


#: Allowed values of ``task.model.norm`` (MONAI's names of normalisation layers).
MODEL_NORMS = ("batch", "instance")

#: Allowed values of ``strategy.validation.norm_outliers``.
NORM_OUTLIER_ACTIONS = ("flag", "reject")


def _strategy_problems(strategy: StrategyConfig) -> list[str]:
    problems: list[str] = []
    checks = strategy.validation
    if checks.norm_outliers not in NORM_OUTLIER_ACTIONS:
        problems.append(
            f"strategy.validation.norm_outliers={checks.norm_outliers}: allowed values are "
            f"{', '.join(NORM_OUTLIER_ACTIONS)}"
        )
    if not checks.norm_factor > 1.0:
        problems.append(
            f"strategy.validation.norm_factor={checks.norm_factor}: must be greater than 1"
        )
    if strategy.norm_bound is not None and not strategy.norm_bound > 0:
        problems.append(f"strategy.norm_bound={strategy.norm_bound}: must be positive")
    return problems


def config_to_yaml(run: RunConfig) -> str:
    """Serialise a validated config to YAML text (enums as plain strings)."""
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def config_from_yaml(text: str) -> RunConfig:
    """Parse YAML written by :func:`config_to_yaml` back into a validated :class:`RunConfig`."""
    loaded = OmegaConf.create(text)
    if not isinstance(loaded, DictConfig):
        raise ConfigError("The configuration text is not a YAML mapping.")
    return validate_config(loaded)
