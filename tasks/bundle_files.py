"""A MONAI bundle folder as files: its digest, its metadata and what fl-imaging takes from it,
read without running any of it.

A bundle's configs hold MONAI bundle syntax (``$`` expressions, ``@`` references): code. So
everything here only reads bytes, JSON and YAML; nothing is parsed by MONAI's
``ConfigParser`` until a site's policy has accepted the bundle's digest
(:func:`fl_imaging.site.policy.check_request`), and the building is :mod:`tasks.bundle_task`.

The layout is MONAI's (``monai.bundle``): ``configs/train.json`` (or ``.yaml`` / ``.yml``) with
``network_def`` and, where the bundle has them, ``train#preprocessing``, ``loss`` and
``optimizer``; ``configs/metadata.json`` with ``network_data_format``; ``models/model.pt``
(optional start weights).

``fl-imaging-deploy check-policy POLICY task=bundle task.bundle=BUNDLE`` prints the digest a
site lists in its policy's ``accept.bundles``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from fl_imaging.config import ConfigError, TaskConfig, TaskName

__all__ = [
    "CONFIG_SUFFIXES",
    "BundleFiles",
    "bundle_digest",
    "bundle_files",
    "with_bundle_settings",
]

log = logging.getLogger("fl_imaging")

#: Suffixes of bundle config files, in the order a training config is looked for.
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

#: Chunk size (bytes) in which files are hashed.
_CHUNK = 1 << 20


def _configs_folder(root: Path) -> Path:
    """``root/configs``; ConfigError saying what a bundle is when there is none."""
    configs = root / "configs"
    if not configs.is_dir():
        raise ConfigError(
            f"bundle {root}: no configs/ folder; give the folder of a MONAI bundle "
            "(configs/train.json, configs/metadata.json, models/model.pt)"
        )
    return configs


def bundle_digest(bundle: Path | str) -> str:
    """The SHA-256 (hex) of a bundle: what a site's ``accept.bundles`` lists.

    The hash runs over every file under ``configs/`` (recursively) and ``models/model.pt``
    when it exists, in the order of their paths relative to the bundle (POSIX form, sorted);
    for each file it takes the relative path, a NUL byte, the size in bytes as decimal
    digits, a NUL byte, then the file's bytes. Any change to a config, the metadata or the
    weights, a renamed or added config file, changes the digest; files elsewhere in the folder
    (``docs/``, ``scripts/``) do not count: fl-imaging runs no bundle script. Hashing is
    ``hashlib``'s.

    Args:
        bundle: the bundle folder.

    Returns:
        64 lower-case hex digits.

    Raises:
        ConfigError: when ``bundle`` has no ``configs/`` folder.
    """
    root = Path(bundle)
    files = [p for p in _configs_folder(root).rglob("*") if p.is_file()]
    weights = root / "models" / "model.pt"
    if weights.is_file():
        files.append(weights)
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0" + str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class BundleFiles:
    """What a bundle folder holds, read as data (no expression evaluated).

    Attributes:
        root: the bundle folder.
        train_config: its training config file (``configs/train.json|yaml|yml``), None when
            it has none.
        config: the training config's content (``{}`` without one).
        metadata: ``configs/metadata.json``'s content (``{}`` without one).
        weights: ``models/model.pt``, None when it has none.
        inference: its inference config's content (``configs/inference.json|yaml|yml``),
            None when it has none.
    """

    root: Path
    train_config: Path | None
    config: dict[str, Any]
    metadata: dict[str, Any]
    weights: Path | None
    inference: dict[str, Any] | None = None

    def has(self, item: str) -> bool:
        """Whether the training config defines ``item``, a MONAI config id (``train#loss``:
        ``#`` separates nested keys)."""
        node: Any = self.config
        for key in item.split("#"):
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True


def _read(path: Path, root: Path) -> dict[str, Any]:
    """The JSON or YAML mapping in ``path``; ConfigError naming the file otherwise."""
    try:
        with path.open() as handle:
            content = json.load(handle) if path.suffix == ".json" else yaml.safe_load(handle)
    except (OSError, ValueError, yaml.YAMLError) as err:
        name = path.relative_to(root)
        raise ConfigError(f"bundle {root}: {name} cannot be read: {err}") from None
    if not isinstance(content, dict):
        name = path.relative_to(root)
        raise ConfigError(f"bundle {root}: {name} holds no mapping of config items")
    return content


def bundle_files(bundle: Path | str) -> BundleFiles:
    """Read the bundle folder ``bundle``: its training config and metadata as data.

    Returns:
        A :class:`BundleFiles`.

    Raises:
        ConfigError: for a folder without ``configs/``, or a config that is not a JSON / YAML
            mapping, naming the file.
    """
    root = Path(bundle)
    _configs_folder(root)
    train = _config_file(root, "train")
    inference = _config_file(root, "inference")
    meta = root / "configs" / "metadata.json"
    weights = root / "models" / "model.pt"
    return BundleFiles(
        root=root,
        train_config=train,
        config=_read(train, root) if train else {},
        metadata=_read(meta, root) if meta.is_file() else {},
        weights=weights if weights.is_file() else None,
        inference=_read(inference, root) if inference else None,
    )


def _config_file(root: Path, stem: str) -> Path | None:
    """``root/configs/STEM`` with the first of :data:`CONFIG_SUFFIXES` that exists; None."""
    return next(
        (p for s in CONFIG_SUFFIXES if (p := root / "configs" / f"{stem}{s}").is_file()), None
    )


def _format_entry(metadata: dict[str, Any], *keys: str) -> Any:
    """``metadata[keys[0]][keys[1]]...``, None where a key is missing."""
    node: Any = metadata
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def with_bundle_settings(task: TaskConfig) -> TaskConfig:
    """``task`` with what the bundle at ``task.bundle`` defines, read without running it.

    From ``configs/metadata.json``'s ``network_data_format``: the kind
    (``outputs.pred.format``: ``segmentation`` or ``classification``) as ``task.name``,
    ``inputs.image.num_channels`` as ``task.in_channels``, ``outputs.pred.num_channels`` as
    ``task.num_classes``, ``inputs.image.spatial_shape`` as ``task.spatial_dims`` and (when
    its entries are numbers, not MONAI's ``"16*n"``) ``task.roi_size``, the sliding-window
    and crop size. Each task setting the bundle replaces is logged. ``task.bundle_sha256``
    is set to the bundle's digest when None.

    Args:
        task: a validated task config with ``task.bundle`` set.

    Returns:
        The task config to run (unchanged when ``task.bundle`` is None).

    Raises:
        ConfigError: naming the bundle's files and every key fl-imaging needs and the bundle
            lacks (``network_def``, and the metadata entries above), with what to add, in one
            message; or naming both digests when ``task.bundle_sha256`` is not this copy's.
    """
    if task.bundle is None:
        return task
    files = bundle_files(task.bundle)
    digest = bundle_digest(files.root)
    if task.bundle_sha256 and task.bundle_sha256 != digest:
        raise ConfigError(
            f"bundle {files.root} has SHA-256 {digest}, but task.bundle_sha256 names "
            f"{task.bundle_sha256}: give the bundle of that digest, or leave "
            "task.bundle_sha256 out to use this copy"
        )
    meta = files.metadata
    image = _format_entry(meta, "network_data_format", "inputs", "image") or {}
    pred = _format_entry(meta, "network_data_format", "outputs", "pred") or {}
    kind, in_channels = pred.get("format"), image.get("num_channels")
    num_classes, shape = pred.get("num_channels"), image.get("spatial_shape")
    train_name = files.train_config.name if files.train_config else "train.json"
    lacking: list[str] = []
    if not files.has("network_def"):
        lacking.append(
            f"configs/{train_name}: network_def (the network as a MONAI config item, e.g. "
            '{"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, ...})'
        )
    where = "configs/metadata.json: network_data_format."
    if kind not in (TaskName.segmentation.value, TaskName.classification.value):
        lacking.append(f'{where}outputs.pred.format ("segmentation" or "classification")')
    if not isinstance(in_channels, int):
        lacking.append(f"{where}inputs.image.num_channels (channels of an input image)")
    if not isinstance(num_classes, int):
        lacking.append(
            f"{where}outputs.pred.num_channels (classes, background included for segmentation)"
        )
    if not (isinstance(shape, list) and len(shape) in (2, 3)):
        lacking.append(
            f"{where}inputs.image.spatial_shape (the network's input patch, e.g. [96, 96, 96])"
        )
    if lacking:
        raise ConfigError(
            f"bundle {files.root} lacks what fl-imaging needs to run it as a task: "
            + "; ".join(lacking)
            + ". Add these to the bundle (its SHA-256 changes: the sites list the new one)"
        )
    assert isinstance(shape, list)
    settings: dict[str, Any] = {
        "name": TaskName(kind),
        "in_channels": in_channels,
        "num_classes": num_classes,
        "spatial_dims": len(shape),
    }
    if all(isinstance(s, int) for s in shape):
        settings["roi_size"] = list(shape)
    elif len(task.roi_size) != len(shape):
        raise ConfigError(
            f"bundle {files.root}: configs/metadata.json gives no fixed input size "
            f"(network_data_format.inputs.image.spatial_shape={shape}): set task.roi_size "
            f"to {len(shape)} sizes that fit it"
        )
    changed = [
        f"task.{key}={getattr(task, key)} -> {value}"
        for key, value in settings.items()
        if getattr(task, key) != value
    ]
    used = [
        f"{item} replaces {setting}"
        for item, setting in (
            ("network_def", "task.model"),
            ("train#preprocessing", "task.transforms"),
            ("loss", "task.loss"),
            ("optimizer", "task.optimizer"),
        )
        if files.has(item)
    ]
    log.info(
        "bundle %s (SHA-256 %s): the bundle's settings win: %s",
        files.root,
        digest,
        "; ".join(changed + used) or "none differs",
    )
    return replace(task, bundle_sha256=digest, **settings)
