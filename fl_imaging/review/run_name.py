"""What a run is, in one line: its name in the report's header, the first line of
``summary.txt``, MLflow (run name, ``description`` tag) and TensorBoard (folder, HParams).

    fedprox · demo segmentation · unet · engine.rounds=5 strategy.params.proximal_mu=0.1
    fedavg + DP server_fixed · msd_task04_hippocampus segmentation · unet · experiment=hippocampus

The strategy (with its layers: differential privacy, secure aggregation, FedBN, compression),
the data (dataset and task), the model, then the overrides the user gave on the command line:
Hydra's task overrides, which Hydra records in the run folder's ``.hydra/overrides.yaml``
(:func:`run_overrides`). The overrides are sorted by key, so the same run gets the same name
however they were typed. Left out: those the first parts already say (:data:`SAID`:
``strategy=``, ``data=``, ``task.model.name=`` ...) and those that only say where files go
(:data:`WHERE`: ``hydra.*``, ``run_dir``, ``tracking.*``, ``data.root`` ...). A long value keeps
its end (``data.sites=…tals/south-east/images]``); past :data:`MAX_LENGTH` characters, the
overrides that still fit are shown in key order and the others counted (``+3 more``).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf.errors import OmegaConfBaseException

from fl_imaging.config import (
    CompressionMode,
    ConfigError,
    DataName,
    DPMode,
    RunConfig,
    config_from_yaml,
    model_label,
)

__all__ = [
    "MAX_LENGTH",
    "OVERRIDES_FILE",
    "SEPARATOR",
    "folder_name",
    "run_folder_name",
    "run_name",
    "run_overrides",
]

#: Between the parts of a name.
SEPARATOR = " · "
#: A name's most characters (strategy, data and model are always there; overrides fit in).
MAX_LENGTH = 120
#: A value (of an override, or a dataset's folder name) longer than this keeps its end.
MAX_VALUE = 24
#: Where Hydra records the task overrides of a run, inside its folder.
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
#: Override keys the name leaves out, as said by the other parts already.
SAID = (
    "strategy",
    "strategy.name",
    "strategy.dp.mode",
    "strategy.secagg.enabled",
    "strategy.fedbn",
    "strategy.compression",
    "task.dp_sgd.enabled",
    "data",
    "data.name",
    "task",
    "task.name",
    "task.model.name",
)
#: Override keys the name leaves out with their sub-keys: they say only where the run's files,
#: data, trackers and servers are.
WHERE = (
    "hydra",
    "run_dir",
    "resume",
    "tracking",
    "site",
    "data.root",
    "data.sites_dir",
    "data.decoded_cache",
    "engine.superlink",
    "engine.root_certificates",
    "engine.ray_address",
    "engine.verbose",
)
#: Characters a folder name cannot hold on some system (Windows' reserved ones, the separator).
_NOT_IN_FOLDERS = set('/\\:*?"<>|')


def _key(override: str) -> str:
    """The config key an override sets (``+a.b=1`` -> ``a.b``; ``~a.b`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def _shown(key: str) -> bool:
    """Whether the name shows an override of ``key`` (not in :data:`SAID` or :data:`WHERE`)."""
    return key not in SAID and not any(key == w or key.startswith(f"{w}.") for w in WHERE)


def _short(text: str) -> str:
    """``text``, or its last :data:`MAX_VALUE` - 1 characters after ``…`` when longer."""
    return text if len(text) <= MAX_VALUE else "…" + text[-(MAX_VALUE - 1) :]


def _override(override: str) -> str:
    key, sep, value = override.partition("=")
    return f"{key}{sep}{_short(value)}"


def _strategy(cfg: RunConfig) -> str:
    """The strategy part: its name and the layers on top of it, e.g. ``fedavg + DP
    server_fixed + secagg`` (client-level DP, DP-SGD, secure aggregation, FedBN, compression),
    so that ``strategy=dpfedavg`` (FedAvg under DP) says what it is."""
    strategy = cfg.strategy
    layers = [
        f"DP {strategy.dp.mode.value}" if strategy.dp.mode != DPMode.none else "",
        "DP-SGD" if cfg.task.dp_sgd.enabled else "",
        "secagg" if strategy.secagg.enabled else "",
        "FedBN" if strategy.fedbn else "",
        f"{strategy.compression.value} compression"
        if strategy.compression != CompressionMode.none
        else "",
    ]
    return " + ".join([strategy.name, *(layer for layer in layers if layer)])


def _data(cfg: RunConfig) -> str:
    """The data part: dataset and task, e.g. ``demo segmentation``, ``adrenalmnist3d
    classification``, ``msd_task04_hippocampus segmentation``, ``folders (3 sites) ...``."""
    data = cfg.data
    if data.name == DataName.demo:
        dataset = "demo"
    elif data.name == DataName.folders:
        dataset = f"folders ({len(data.sites)} sites)"
    elif data.name == DataName.medmnist and data.flag:
        dataset = data.flag
    elif data.root:
        dataset = Path(data.root).name or data.name.value
    else:
        dataset = data.name.value
    return f"{_short(dataset)} {cfg.task.name.value}"


def run_name(cfg: RunConfig, overrides: list[str]) -> str:
    """The name of ``cfg``'s run (module docstring), from its validated config and the
    ``overrides`` given on the command line (Hydra's form: ``key=value``, ``+key=value``,
    ``~key``; e.g. from :func:`run_overrides`). The overrides that would make it longer than
    :data:`MAX_LENGTH` characters are counted, not shown."""
    head = SEPARATOR.join((_strategy(cfg), _data(cfg), model_label(cfg.task.model)))
    chosen = sorted((o for o in overrides if _shown(_key(o))), key=lambda o: (_key(o), o))
    words = [_override(o) for o in chosen]
    room = MAX_LENGTH - len(head) - len(SEPARATOR)
    if not words:
        return head
    if len(" ".join(words)) <= room:
        return SEPARATOR.join((head, " ".join(words)))
    room -= len(f" +{len(words)} more")  # what does not fit is counted
    kept: list[str] = []
    for word in words:  # in key order, each that still fits
        if len(" ".join([*kept, word])) <= room:
            kept.append(word)
    left = len(words) - len(kept)
    tail = [*kept, f"+{left} more"] if kept else [f"{left} overrides"]
    return SEPARATOR.join((head, " ".join(tail)))


def run_overrides(run_dir: Path) -> list[str]:
    """The task overrides Hydra recorded for the run in ``run_dir``
    (``run_dir/.hydra/overrides.yaml``, a YAML list of ``key=value``); empty when the run was
    not started by ``fl-imaging`` (a benchmark's cell, a script, a test) or the file cannot be
    read."""
    path = Path(run_dir) / OVERRIDES_FILE
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    return [str(o) for o in loaded] if isinstance(loaded, list) else []


def run_folder_name(run_dir: Path) -> str | None:
    """The name (:func:`run_name`) of the finished run in ``run_dir``, from its ``config.yaml``
    and recorded overrides; None when there is no ``config.yaml`` or it is no longer a valid
    config (a run of an older version)."""
    path = Path(run_dir) / "config.yaml"
    try:
        cfg = config_from_yaml(path.read_text())
    except (OSError, UnicodeDecodeError, ConfigError, yaml.YAMLError, OmegaConfBaseException):
        return None
    return run_name(cfg, run_overrides(run_dir))


def folder_name(name: str) -> str:
    """``name`` as one folder's name on any system: ``/ \\ : * ? " < > |`` and control
    characters become ``_``, trailing dots and spaces go (Windows drops them)."""
    clean = "".join("_" if c in _NOT_IN_FOLDERS or ord(c) < 32 else c for c in name)
    return clean.rstrip(". ") or "_"
