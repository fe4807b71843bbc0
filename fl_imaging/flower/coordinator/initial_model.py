"""A warm start (``task.model.init``): the weights a run starts from, found, read and checked.

``task.model.init`` names a weights file (a torch ``state_dict`` saved with ``torch.save``, as a
run folder's ``model.pt``), a run folder (its ``model.pt``) or a MONAI bundle folder (its
``models/model.pt``). :func:`load_initial_model` reads it with ``torch.load(weights_only=True)``
(no code runs while loading, :func:`~fl_imaging.review.results.load_weights`), compares it with
the network the config builds (every missing and unexpected key, every shape that differs, in
one message) and loads it into the coordinator's model, once, before the first round; the
sites receive it as round 1's global model. Its SHA-256 goes to the audit log and summary.txt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_imaging.common.atomic import write_atomically
from fl_imaging.config import ConfigError
from fl_imaging.review.results import WeightsFileError, load_weights

__all__ = ["InitialModel", "load_initial_model", "mismatch_message", "weights_file"]

#: Where a weights file lies in a run folder and in a MONAI bundle folder.
RUN_WEIGHTS = "model.pt"
BUNDLE_WEIGHTS = Path("models") / "model.pt"


@dataclass(frozen=True)
class InitialModel:
    """The weights a run started from: the file read (absolute) and its SHA-256 (hex)."""

    path: Path
    sha256: str

    def record(self) -> dict[str, str]:
        """The audit log's ``initial_model`` field: ``{"path": ..., "sha256": ...}``."""
        return {"path": str(self.path), "sha256": self.sha256}

    def copy_to(self, path: Path) -> Path:
        """Write the initial weights file's bytes, unchanged, to ``path`` (atomically): an
        evaluation-only run's ``model.pt`` is the model it scored, byte for byte. Returns
        ``path``; raises ``OSError``."""
        data = self.path.read_bytes()
        return write_atomically(path, lambda handle: handle.write(data))

    def line(self) -> str:
        """summary.txt's line on the warm start."""
        return f"initial model: {self.path} (sha256 {self.sha256}; task.model.init)"


def weights_file(path: Path | str) -> Path:
    """The weights file ``path`` names, absolute: ``path`` itself when it is a file, a run
    folder's ``model.pt``, or a MONAI bundle folder's ``models/model.pt``. Raises
    :class:`ConfigError` naming ``path`` and what was looked for when there is none."""
    path = Path(path).absolute()
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(
            f"task.model.init={path}: no such file or folder; give a weights file (.pt), a run "
            "folder (its model.pt) or a MONAI bundle folder (its models/model.pt)"
        )
    for candidate in (path / RUN_WEIGHTS, path / BUNDLE_WEIGHTS):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"task.model.init={path}: the folder holds neither {RUN_WEIGHTS} (a run folder) nor "
        f"{BUNDLE_WEIGHTS} (a MONAI bundle); give the weights file itself"
    )


def mismatch_message(
    file: Path, checkpoint: Mapping[str, torch.Tensor], network: Mapping[str, torch.Tensor]
) -> str:
    """Why the weights of ``file`` (``checkpoint``) do not fit the configured network (its
    ``state_dict``, ``network``): every key missing from the file, every key the network lacks,
    and every shape that differs (key, the file's shape, the network's), then what to do; an
    empty string when they fit."""
    missing = [k for k in network if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in network]
    shapes = [
        (k, tuple(checkpoint[k].shape), tuple(network[k].shape))
        for k in network
        if k in checkpoint and checkpoint[k].shape != network[k].shape
    ]
    if not (missing or unexpected or shapes):
        return ""
    lines = [f"task.model.init: the weights in {file} do not fit the configured network:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for key, theirs, ours in shapes:
        lines.append(f"  shape mismatch: {key}: checkpoint {list(theirs)}, network {list(ours)}")
    lines.append(
        "  configure the network the weights were trained with (task.model.*, task.in_channels, "
        "task.num_classes, task.dp_sgd.enabled changes batch norm to group norm), or give "
        "weights of this network"
    )
    return "\n".join(lines)


def load_initial_model(model: torch.nn.Module, init: Path | str) -> InitialModel:
    """Load the weights ``init`` names (:func:`weights_file`) into ``model`` in place, after
    checking that they fit it exactly. Returns the file and its SHA-256.

    Raises:
        ConfigError: when ``init`` names no weights file, the file is not a readable torch
            weights file, or its keys or shapes differ from ``model``'s
            (:func:`mismatch_message`).
    """
    file = weights_file(init)
    try:
        state = load_weights(file)
    except WeightsFileError as err:
        raise ConfigError(
            f"task.model.init: {err}; give a torch state_dict saved with torch.save "
            "(a run folder's model.pt, a MONAI bundle's models/model.pt)"
        ) from None
    why = mismatch_message(file, state, model.state_dict())
    if why:
        raise ConfigError(why)
    model.load_state_dict(state, strict=True)
    return InitialModel(file, hashlib.sha256(file.read_bytes()).hexdigest())
