"""The run's final global model as a MONAI bundle, ``<run>/bundle/``, that MONAI loads and runs
without fl-imaging.

MONAI's bundle layout (``monai.bundle``, the model zoo's format)::

    bundle/
      configs/metadata.json    MONAI's metadata fields, and ``fl_imaging``: the run's provenance
                               (name, code version, strategy, rounds, sites, config SHA-256) and
                               its privacy guarantees (DP mode, epsilon, delta; secure aggregation)
      configs/inference.json   network_def, preprocessing, inferer, postprocessing, dataset_dir,
                               output_dir: what ``monai.bundle.ConfigParser`` reads
      models/model.pt          the final weights (a ``state_dict`` of ``network_def``)
      docs/ README.md          what the model is and how to run it with MONAI alone

``network_def`` and ``preprocessing`` are the task's own bundle config items
(:meth:`tasks.base.ImagingTask.network_definition`,
:meth:`~tasks.base.ImagingTask.inference_preprocessing_definition`), so MONAI rebuilds the
layers and transforms the run trained with. A network made fit for DP-SGD
(:func:`tasks.private_model.private_network`: batch norm as Opacus' ``GroupNorm``) is exported
as that same conversion, ``opacus.validators.ModuleValidator.fix`` around the network, so its
``state_dict`` matches the weights; before anything is written the definition is built with
MONAI's ``ConfigParser`` and the weights loaded into it strictly.

A run of a MONAI bundle as its task (``task=bundle``, :mod:`tasks.bundle_task`) exports that
bundle fine-tuned instead: its own ``configs/inference.json`` (or, when it has none, its
training config, whose ``network_def`` is the network) and ``configs/train.json``, its metadata
with ``fl_imaging`` added (the provenance above and the source bundle's name, version and
SHA-256) and a changelog entry, and the run's weights as ``models/model.pt``; the README then
shows how MONAI builds the bundle's own network. Its other files (further configs, scripts,
other weight formats) are not copied: they describe the source bundle's weights.

The configs are written with MONAI's ``ConfigParser.export_config_file``; the bundle is made in
a temporary folder beside ``bundle/`` and put in place whole (a reader never sees half a
bundle).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import os
import shutil
import textwrap
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fl_imaging.common.atomic import fsync_folder
from fl_imaging.config import DPMode, RunConfig, TaskName, config_to_yaml
from fl_imaging.privacy.report import privacy_lines
from fl_imaging.review.run_name import run_name, run_overrides

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUNDLE_FILES",
    "BUNDLE_FOLDER",
    "NETWORK_SNIPPET",
    "RUN_SNIPPET",
    "BundleExportError",
    "bundle_metadata",
    "export_bundle",
    "inference_config",
]

#: The bundle's folder inside the run folder.
BUNDLE_FOLDER = "bundle"
#: The bundle's README, in its ``docs/`` folder.
README = "README.md"
#: The bundle's files, relative to the run folder (what the audit hashes and a deployment sends);
#: ``configs/train.json`` only when the run's task was a bundle (the source bundle's training
#: config).
BUNDLE_FILES = (
    f"{BUNDLE_FOLDER}/configs/metadata.json",
    f"{BUNDLE_FOLDER}/configs/inference.json",
    f"{BUNDLE_FOLDER}/configs/train.json",
    f"{BUNDLE_FOLDER}/models/model.pt",
    f"{BUNDLE_FOLDER}/docs/{README}",
)
#: The JSON schema MONAI's model zoo checks ``metadata.json`` against
#: (``monai.bundle.verify_metadata`` downloads it).
METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)
#: The bundle's own version: each run exports one model, its first and only version.
BUNDLE_VERSION = "1.0.0"
AGGREGATE = "all"
#: Python that runs the bundle with MONAI alone, from the bundle's folder, on the NIfTI images
#: in its ``images/`` folder (the bundle's README and docs/how-to/monai-bundles.md hold it; a
#: test runs it verbatim where fl-imaging cannot be imported).
RUN_SNIPPET = """\
import torch
from monai.bundle import ConfigParser

parser = ConfigParser()
parser.read_config("configs/inference.json")
parser["bundle_root"] = "."
parser["dataset_dir"] = "images"  # a folder of NIfTI images
parser["output_dir"] = "predictions"
device = parser.get_parsed_content("device")
net = parser.get_parsed_content("network")
net.load_state_dict(torch.load("models/model.pt", map_location=device, weights_only=True))
net.eval()
preprocess = parser.get_parsed_content("preprocessing")
inferer = parser.get_parsed_content("inferer")
postprocess = parser.get_parsed_content("postprocessing")
with torch.no_grad():
    for path in parser.get_parsed_content("datalist"):
        sample = preprocess({"image": path})
        pred = inferer(sample["image"][None].to(device), net)[0].cpu()
        postprocess({**sample, "pred": pred})
"""
#: Python that builds a fine-tuned bundle's own network with MONAI alone and loads the run's
#: weights, from the bundle's folder (the README of a bundle run as the task holds it).
NETWORK_SNIPPET = """\
import torch
from monai.bundle import ConfigParser

parser = ConfigParser()
parser.read_config("configs/inference.json")
parser.read_meta("configs/metadata.json")
parser["bundle_root"] = "."
net = parser.get_parsed_content("network_def")
net.load_state_dict(torch.load("models/model.pt", map_location="cpu", weights_only=True))
net.eval()
"""


class _Row(Protocol):
    round: int
    site: str
    metric: str
    value: float


class BundleExportError(RuntimeError):
    """The run's model cannot be written as a MONAI bundle (its network definition does not
    rebuild the trained layers); the message names the run folder and the cause."""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _network_definition(cfg: RunConfig, definition: Any = None) -> Any:
    """The task's ``network_def`` (or ``definition``, another config's for the same network);
    with DP-SGD on a network holding batch norm, wrapped in Opacus' ``ModuleValidator.fix`` as
    :func:`tasks.private_model.private_network` converts it (in-place activations, also
    switched there, have no weights and compute the same)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from tasks import build_task

    task = build_task(cfg.task)
    if definition is None:
        definition = task.network_definition()
    if not cfg.task.dp_sgd.enabled:
        return definition
    if not any(isinstance(m, _BatchNorm) for m in task.network().modules()):
        return definition
    return {"_target_": "opacus.validators.ModuleValidator.fix", "module": definition}


def inference_config(cfg: RunConfig) -> dict[str, Any]:
    """The content of ``configs/inference.json`` for ``cfg``'s task, in MONAI's bundle syntax.

    Args:
        cfg: the run's config (``task`` decides the network, transforms and inferer).

    Returns:
        A JSON-serialisable dict: ``imports``, ``bundle_root``, ``dataset_dir``, ``output_dir``
        and ``device`` placeholders (override them when parsing), ``network_def``, ``network``
        (on ``device``), ``preprocessing`` (a ``Compose`` mapping ``{"image": path}`` to an
        ``image`` ``(C_in, *spatial)`` float32 ``MetaTensor``), ``inferer`` (segmentation:
        ``SlidingWindowInferer`` with the task's ``roi_size``, ``sw_batch_size``,
        ``sw_overlap``; classification: ``SimpleInferer``), ``postprocessing`` (segmentation:
        logits ``(K, *spatial)`` inverted to the file's grid, arg-max ``(1, *grid)``, saved as
        ``<case>_seg.nii.gz`` in ``output_dir``; classification: softmax over ``(K,)``) and
        ``datalist`` (every NIfTI file of ``dataset_dir``).
    """
    from tasks import build_task

    task = build_task(cfg.task)
    tc = cfg.task
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": _network_definition(cfg),
        "network": "$@network_def.to(@device)",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": copy.deepcopy(task.inference_preprocessing_definition()),
        },
    }
    if tc.name == TaskName.segmentation:
        config["inferer"] = {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(tc.roi_size),
            "sw_batch_size": tc.sw_batch_size,
            "overlap": tc.sw_overlap,
        }
        config["postprocessing"] = {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "output_dtype": "$numpy.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "print_log": False,
                },
            ],
        }
    else:
        config["inferer"] = {"_target_": "SimpleInferer"}
        config["postprocessing"] = {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        }
    return config


def _latest_by_site(rows: Sequence[_Row], metric: str) -> dict[str, float]:
    latest: dict[str, tuple[int, float]] = {}
    for row in rows:
        if row.metric == metric and row.site != AGGREGATE:
            if row.site not in latest or row.round >= latest[row.site][0]:
                latest[row.site] = (row.round, row.value)
    return {site: value for site, (_, value) in sorted(latest.items())}


def _privacy(rows: Sequence[_Row], cfg: RunConfig) -> dict[str, Any]:
    """The run's privacy guarantees as :mod:`fl_imaging.privacy.report` states them: client-level
    DP (mode, noise, clipping, epsilon at delta after its last accounted round), patient-level
    DP-SGD (each site's epsilon and delta), secure aggregation, and the summary's lines."""
    dp = cfg.strategy.dp
    spent = [r for r in rows if r.site == AGGREGATE and r.metric == "epsilon"]
    last = max(spent, key=lambda r: r.round) if spent else None
    client: dict[str, Any] = {"mode": dp.mode.value}
    if dp.mode != DPMode.none:
        client.update(
            noise_multiplier=dp.noise_multiplier,
            clipping_norm=dp.clipping_norm,
            delta=dp.target_delta,
            epsilon=last.value if last else None,
            epsilon_after_round=last.round if last else None,
        )
    sgd = cfg.task.dp_sgd
    patient: dict[str, Any] = {"enabled": sgd.enabled}
    if sgd.enabled:
        epsilons = _latest_by_site(rows, "patient_epsilon")
        deltas = _latest_by_site(rows, "patient_delta")
        patient.update(
            accountant=sgd.accountant.value,
            max_grad_norm=sgd.max_grad_norm,
            target_epsilon=sgd.target_epsilon,
            delta=sgd.delta,
            epsilon_per_site=epsilons,
            delta_per_site=deltas,
            epsilon=max(epsilons.values()) if epsilons else None,
        )
    return {
        "client_level_dp": client,
        "patient_level_dp": patient,
        "secure_aggregation": bool(cfg.strategy.secagg.enabled),
        "statement": privacy_lines(rows, cfg),
    }


def _value_range(cfg: RunConfig) -> list[float] | None:
    """The preprocessed image's value range where the intensity preset bounds it (CT: [0, 1])."""
    if cfg.task.transforms.intensity.value == "ct":
        return [0.0, 1.0]
    return None


def bundle_metadata(
    cfg: RunConfig, rows: Sequence[_Row], run_dir: Path, site_names: Sequence[str]
) -> dict[str, Any]:
    """The content of ``configs/metadata.json``: MONAI's metadata fields (``version``,
    ``changelog``, ``monai_version``, ``pytorch_version``, ``numpy_version``,
    ``required_packages_version``, ``task``, ``description``, ``authors``,
    ``network_data_format`` with the inputs' and outputs' shapes, channels, value ranges and
    label names) and ``fl_imaging``: the run's name, fl-imaging's version, strategy, rounds done
    of ``engine.rounds``, ``site_names``, the config's SHA-256 (of ``config.yaml``'s text, as
    the audit log's ``run_start`` records it) and its privacy guarantees (:func:`_privacy`).

    Args:
        cfg: the run's config.
        rows: the run's metric rows (``round``, ``site``, ``metric``, ``value``).
        run_dir: the run folder (its recorded overrides name the run).
        site_names: the federation's sites.
    """
    from fl_imaging import __version__

    tc = cfg.task
    segmentation = tc.name == TaskName.segmentation
    names = list(tc.class_names) or [
        ("background" if segmentation and k == 0 else f"class {k}") for k in range(tc.num_classes)
    ]
    spatial = "*" if segmentation else list(tc.roi_size)
    packages = {"nibabel": _version("nibabel")}
    if cfg.task.dp_sgd.enabled:
        packages["opacus"] = _version("opacus")  # network_def may use its conversion
    rounds = max((r.round for r in rows if r.metric == "train_loss"), default=0)
    name = run_name(cfg, run_overrides(run_dir))
    channels = {str(c): f"image channel {c}" for c in range(tc.in_channels)}
    image_format = "hounsfield" if tc.transforms.intensity.value == "ct" else "magnitude"
    what = (
        f"{tc.spatial_dims}D segmentation of {tc.num_classes} classes"
        if segmentation
        else f"{tc.spatial_dims}D classification into {tc.num_classes} classes"
    )
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by fl-imaging {__version__} from run {name}"},
        "monai_version": _version("monai"),
        "pytorch_version": _version("torch"),
        "numpy_version": _version("numpy"),
        "required_packages_version": {k: v for k, v in packages.items() if v},
        "name": f"fl-imaging {tc.name.value} model",
        "task": what,
        "description": (
            f"The final global model of a federated run ({cfg.strategy.name}, "
            f"{len(site_names)} sites, {rounds} of {cfg.engine.rounds} rounds) trained with "
            f"fl-imaging: {name}"
        ),
        "authors": "the sites and coordinator of the fl-imaging run named in fl_imaging.run",
        "copyright": "as agreed by the sites of the run",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": image_format,
                    "modality": "any",
                    "num_channels": tc.in_channels,
                    "spatial_shape": spatial,
                    "dtype": "float32",
                    "value_range": _value_range(cfg),
                    "is_patch_data": segmentation,
                    "channel_def": channels,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image" if segmentation else "probabilities",
                    "format": "segmentation" if segmentation else "classes",
                    "num_channels": tc.num_classes,
                    "spatial_shape": spatial if segmentation else [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": segmentation,
                    "channel_def": {str(k): n for k, n in enumerate(names)},
                }
            },
        },
        "fl_imaging": {
            "run": name,
            "version": __version__,
            "strategy": cfg.strategy.name,
            "fedbn": bool(cfg.strategy.fedbn),
            "rounds": rounds,
            "rounds_configured": cfg.engine.rounds,
            "num_sites": len(site_names),
            "sites": list(site_names),
            "config_sha256": hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest(),
            "privacy": _privacy(rows, cfg),
        },
    }


def _readme(cfg: RunConfig, metadata: dict[str, Any]) -> str:
    """The bundle's ``docs/`` :data:`README`: what the bundle holds and the Python that runs
    it with MONAI."""
    info = metadata["fl_imaging"]
    privacy = "\n".join(f"- {line.strip()}" for line in info["privacy"]["statement"])
    if "source_bundle" in info:
        return _fine_tuned_readme(metadata, privacy)
    segmentation = cfg.task.name == TaskName.segmentation
    result = (
        "a mask `<case>_seg.nii.gz` (class indices, the input's grid) per image in `output_dir`"
        if segmentation
        else "`pred`: the class probabilities `(K,)`"
    )
    return textwrap.dedent(
        """\
        # {name}

        {description}

        - task: {task}
        - fl-imaging {version}, strategy {strategy}, {rounds} round(s), {sites} site(s)
        - config SHA-256: {sha}

        ## Privacy

        {privacy}

        ## Files

        - `configs/metadata.json`: MONAI's metadata, and `fl_imaging`: the run's provenance
        - `configs/inference.json`: `network_def`, `preprocessing`, `inferer`, `postprocessing`
        - `models/model.pt`: the weights (`torch.load(..., weights_only=True)`)

        ## Run it with MONAI

        MONAI {monai} and PyTorch are enough{extra}; fl-imaging is not needed. Run this from
        the bundle's folder, with NIfTI images in `images/`; each image gives {result}:

        ```python
        {snippet}```
        """
    ).format(
        name=metadata["name"],
        description=metadata["description"],
        task=metadata["task"],
        version=info["version"],
        strategy=info["strategy"],
        rounds=info["rounds"],
        sites=info["num_sites"],
        sha=info["config_sha256"],
        privacy=privacy,
        monai=metadata["monai_version"],
        extra=(
            " (and Opacus: the network's batch norm became GroupNorm for DP-SGD)"
            if "opacus" in metadata["required_packages_version"]
            else ""
        ),
        result=result,
        snippet=RUN_SNIPPET,
    )


def _fine_tuned_readme(metadata: dict[str, Any], privacy: str) -> str:
    """The README of a bundle run as the task, fine-tuned: its provenance and the Python that
    builds its network with MONAI (:data:`NETWORK_SNIPPET`)."""
    info = metadata["fl_imaging"]
    source = info["source_bundle"]
    return textwrap.dedent(
        """\
        # {name}

        {description}

        - fine-tuned from bundle {source} (version {source_version}, SHA-256 {sha})
        - fl-imaging {version}, strategy {strategy}, {rounds} round(s), {sites} site(s)

        ## Privacy

        {privacy}

        ## Files

        - `configs/metadata.json`: the source bundle's metadata, and `fl_imaging`: the run's
          provenance
        - `configs/inference.json`: {inference}
        - `configs/train.json`: the source bundle's training config
        - `models/model.pt`: the federated weights (`torch.load(..., weights_only=True)`)

        ## Run it with MONAI

        MONAI {monai} and PyTorch are enough; fl-imaging is not needed. From the bundle's
        folder, this builds the bundle's network with the federated weights; the rest of
        `configs/inference.json` runs as the source bundle documents it:

        ```python
        {snippet}```
        """
    ).format(
        name=metadata.get("name", source["name"]),
        description=metadata["description"],
        source=source["name"],
        source_version=source["version"],
        sha=source["sha256"],
        version=info["version"],
        strategy=info["strategy"],
        rounds=info["rounds"],
        sites=info["num_sites"],
        privacy=privacy,
        inference=(
            "the source bundle's inference config"
            if source["had_inference_config"]
            else "the source bundle's training config (it had no inference config)"
        ),
        monai=metadata["monai_version"],
        snippet=NETWORK_SNIPPET,
    )


def _check_weights(
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    where: Path,
    meta: dict[str, Any],
    bundle_root: Path | None = None,
) -> None:
    """Build ``config``'s ``network_def`` with MONAI's ``ConfigParser``, as a bundle's reader
    does (``meta`` as its metadata, ``bundle_root`` set when given), and load ``weights`` into
    it strictly; raise :class:`BundleExportError` when they do not fit."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(copy.deepcopy(config))
    parser.read_meta(copy.deepcopy(meta))
    if bundle_root is not None:
        parser["bundle_root"] = str(bundle_root)
    network = parser.get_parsed_content("network_def")
    definition = config["network_def"]
    target = definition.get("_target_") if isinstance(definition, dict) else definition
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = (str(err).splitlines() or [""])[0]
        raise BundleExportError(
            f"{where}: the bundle's network_def ({target}) does not take the run's weights "
            f"({first}); the model is in model.pt beside it"
        ) from None


def _fine_tuned_bundle(
    cfg: RunConfig, metadata: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], Path]:
    """For a run whose task was the bundle ``cfg.task.bundle``: its configs to export (file
    name -> content: ``inference.json``, its own or its training config, and ``train.json``;
    each ``network_def`` converted as :func:`_network_definition` does), its metadata with the run's
    ``metadata["fl_imaging"]`` added (and ``source_bundle``: name, version, SHA-256, whether
    it had an inference config), the run's package versions, description and a changelog
    entry; and the source bundle's folder."""
    from tasks.bundle_files import bundle_digest, bundle_files

    assert cfg.task.bundle is not None
    files = bundle_files(cfg.task.bundle)
    train = copy.deepcopy(files.config)
    inference = copy.deepcopy(files.inference if files.inference is not None else files.config)
    if "network_def" not in inference:
        raise BundleExportError(
            f"bundle {files.root}: its inference config has no network_def, so the fine-tuned "
            "bundle would not rebuild the network; the model is in model.pt in the run folder"
        )
    for config in (train, inference):  # each its own network_def: its references are its own
        config["network_def"] = _network_definition(cfg, config["network_def"])
    source = copy.deepcopy(files.metadata)
    source_version = str(source.get("version", "0.0.0"))
    name = str(source.get("name", files.root.name))
    version = f"{source_version}+fl-imaging"
    info = {
        **metadata["fl_imaging"],
        "source_bundle": {
            "name": name,
            "version": source_version,
            "sha256": cfg.task.bundle_sha256 or bundle_digest(files.root),
            "had_inference_config": files.inference is not None,
        },
    }
    merged = {
        **source,
        "version": version,
        "changelog": {
            version: f"federated fine-tuning: {metadata['changelog'][BUNDLE_VERSION]}",
            **source.get("changelog", {}),
        },
        "monai_version": metadata["monai_version"],
        "pytorch_version": metadata["pytorch_version"],
        "numpy_version": metadata["numpy_version"],
        "name": name,
        "description": f"{metadata['description']}. Fine-tuned from bundle {name} "
        f"{source_version}: {source.get('description', '')}".rstrip(": "),
        "fl_imaging": info,
    }
    return {"inference.json": inference, "train.json": train}, merged, files.root


def export_bundle(
    run_dir: Path,
    cfg: RunConfig,
    rows: Sequence[_Row],
    model: torch.nn.Module,
    site_names: Sequence[str],
) -> Path:
    """Write ``run_dir/bundle/`` (:data:`BUNDLE_FILES`) for ``model``, the run's final global
    model (a network as ``cfg.task``'s ``build_model`` makes it), with the provenance and
    privacy of ``rows`` and ``site_names``; for a bundle run as the task, that bundle
    fine-tuned (see the module). An earlier ``bundle/`` (a resumed run's) is replaced whole.
    Returns the bundle's folder.

    Raises:
        BundleExportError: the task's network definition does not take ``model``'s weights.
        OSError: the folder cannot be written (disk full, no permission).
    """
    import torch
    from monai.bundle import ConfigParser

    run_dir = Path(run_dir)
    target = run_dir / BUNDLE_FOLDER
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metadata = bundle_metadata(cfg, rows, run_dir, site_names)
    source: Path | None = None
    if cfg.task.bundle:
        configs, metadata, source = _fine_tuned_bundle(cfg, metadata)
    else:
        configs = {"inference.json": inference_config(cfg)}
    _check_weights(configs["inference.json"], weights, target, metadata, source)
    staging = run_dir / f".{BUNDLE_FOLDER}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        for sub in ("configs", "models", "docs"):
            (staging / sub).mkdir(parents=True)
        ConfigParser.export_config_file(metadata, staging / "configs" / "metadata.json", indent=2)
        for name, content in configs.items():
            ConfigParser.export_config_file(content, staging / "configs" / name, indent=2)
        torch.save(weights, staging / "models" / "model.pt")
        (staging / "docs" / README).write_text(_readme(cfg, metadata))
        for path in staging.rglob("*"):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        old = run_dir / f".{BUNDLE_FOLDER}.{uuid.uuid4().hex[:12]}.old"
        if target.exists():
            target.rename(old)
        staging.rename(target)
        fsync_folder(run_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
