"""Checkpoints of a federated run: after every round, the global model, the strategy's state and
the metrics so far, so that an interrupted run can go on from the next round (``resume=RUN_DIR``).

Ours: Flower's strategies keep their state (server momentum, Adam moments, the privacy
accountant's history, ...) as plain attributes and offer no save/load. Kept: every attribute of
every layer of the wrapper chain (``inner`` / ``strategy`` attributes) but the run's bookkeeping
layers (``checkpointed = False``: recording and site availability, whose rows and failures the
checkpoint holds itself); plain values and NumPy arrays as they are
(:mod:`fl_imaging.flower.coordinator.checkpoint_codec`), objects with ``state_dict()`` (Flower's RDP
accountant) by that state. Not kept, rebuilt from the config: the links between the layers,
callables (metric aggregation, hooks), the shared :class:`~fl_imaging.flower.protocol.ReplySites`
(node
ids differ in a resumed run), and what :data:`LEFT_OUT` lists. A value of any other type stops
the save with :class:`~fl_imaging.flower.coordinator.checkpoint_codec.UnencodableValue` rather than
being
dropped unnoticed (the tests save the chain of every strategy). Restoring sets only attributes
a freshly built chain itself would save.

On disk (:mod:`fl_imaging.flower.coordinator.checkpoint_files`): ``checkpoint.json`` and one NPZ of
arrays,
with a format version and SHA-256 checksums, written atomically; nothing in them is executed
when they are read (no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from omegaconf import OmegaConf

from fl_imaging.common.atomic import reason_of
from fl_imaging.config import ConfigError, RunConfig, config_from_yaml, config_to_yaml
from fl_imaging.flower.coordinator.checkpoint_codec import StateDictOf, decode, encode
from fl_imaging.flower.coordinator.checkpoint_files import (
    CHECKPOINT_FILE,
    read_checkpoint_files,
    write_checkpoint_files,
)
from fl_imaging.flower.protocol import ReplySites
from fl_imaging.review.results import Failure, MetricRow, RunFolderError
from strategies.centered_clipping import CenteredClipping
from strategies.validation import ValidatingStrategy
from strategies.wrapper import SentArraysWrapper, wrapper_chain

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "LEFT_OUT",
    "check_resumable",
    "check_same_model",
    "load_checkpoint",
    "restore_strategy_state",
    "save_checkpoint",
    "strategy_state",
]

#: Config keys that may differ between a run and the run resuming it.
#: (``task.model.init`` too: a resumed run starts from its checkpoint, whatever init says.)
RESUMABLE_CHANGES = (
    "engine.rounds",
    "run_dir",
    "resume",
    "engine.verbose",
    "engine.round_timeout",
    "task.model.init",
)
#: Sections a resumed run may set differently: where it is tracked changes nothing it computes.
RESUMABLE_SECTIONS = ("tracking.", "site.")

#: Attributes a checkpoint does not keep, by the class that has them, and why.
LEFT_OUT: dict[type, dict[str, str]] = {
    SentArraysWrapper: {
        "sent": "the global arrays of the finished round: every round sets them before use",
    },
    CenteredClipping: {
        "sent": "the global arrays of the finished round: every round sets them before use",
    },
    ValidatingStrategy: {
        "history": "a log of every update check, which the checkpoint's metric rows and "
        "failures already hold",
        "cfg": "the update-check settings, rebuilt from the (unchanged) config",
    },
    DifferentialPrivacyServerSideFixedClipping: {
        "_pending_events": "the privacy event of a round whose aggregation is to come; between "
        "rounds it has been composed into the accountant, or stays unused (no aggregate)",
    },
    DifferentialPrivacyClientSideFixedClipping: {
        "_pending_events": "the privacy event of a round whose aggregation is to come; between "
        "rounds it has been composed into the accountant, or stays unused (no aggregate)",
    },
}


@dataclass
class Checkpoint:
    """What a run had after round ``round``: the global weights (name -> NumPy array), the
    strategy chain's state (see :func:`strategy_state`), the metric rows and site failures so
    far, and the config (YAML)."""

    round: int
    arrays: dict[str, Any]
    strategy: dict[str, dict[str, Any]]
    rows: list[MetricRow]
    failures: list[Failure] = field(default_factory=list)
    config: str = ""
    #: The run's key (:data:`fl_imaging.flower.protocol.RUN_KEY`): a resumed run goes on with it.
    run_key: str = ""


def _aggregation_chain(strategy: Strategy) -> list[Any]:
    """The layers of ``strategy``'s wrapper chain whose state a checkpoint keeps."""
    return [node for node in wrapper_chain(strategy) if getattr(node, "checkpointed", True)]


def _left_out(node: Any) -> set[str]:
    return {name for cls, names in LEFT_OUT.items() if isinstance(node, cls) for name in names}


def strategy_state(strategy: Strategy) -> dict[str, dict[str, Any]]:
    """The saveable state of each aggregation layer in ``strategy``'s wrapper chain, keyed
    ``<depth>:<class name>``: attribute name -> value, a :class:`StateDictOf` for objects
    restored through ``load_state_dict`` (see the module docstring for what is left out)."""
    state: dict[str, dict[str, Any]] = {}
    for depth, node in enumerate(_aggregation_chain(strategy)):
        fields: dict[str, Any] = {}
        skip = _left_out(node)
        for name, value in vars(node).items():
            if name in skip or isinstance(value, Strategy | ReplySites) or callable(value):
                continue
            if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
                fields[name] = StateDictOf(value.state_dict())
            else:
                fields[name] = value
        state[f"{depth}:{type(node).__name__}"] = fields
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, Any]]) -> None:
    """Put ``state`` (from :func:`strategy_state`) back into a freshly built strategy chain of
    the same classes. Raises :class:`ConfigError` when the chains differ or ``state`` holds an
    attribute the fresh chain would not save (nothing else is ever set)."""
    chain = _aggregation_chain(strategy)
    names = [f"{d}:{type(n).__name__}" for d, n in enumerate(chain)]
    if names != list(state):
        raise ConfigError(
            f"the checkpoint's strategy ({' > '.join(state)}) is not this run's "
            f"({' > '.join(names)}): resume with the same strategy settings"
        )
    fresh = strategy_state(strategy)
    unknown = [f"{layer}.{n}" for layer in names for n in state[layer] if n not in fresh[layer]]
    if unknown:  # only what this chain itself would save is ever set
        raise ConfigError(
            f"the checkpoint holds {', '.join(unknown)}, which this run's strategy does not "
            "keep: resume with the fl-imaging and the strategy settings of the checkpointed run"
        )
    for layer, node, fields in zip(names, chain, state.values(), strict=True):
        for name, value in fields.items():
            if not isinstance(value, StateDictOf):
                setattr(node, name, value)
                continue
            target = getattr(node, name, None)
            if not hasattr(target, "load_state_dict"):
                raise ConfigError(
                    f"the checkpoint holds a state for {layer}.{name}, which this run's "
                    "strategy does not have: resume with the same strategy settings"
                )
            try:
                target.load_state_dict(value.state)
            except (ValueError, TypeError, KeyError) as err:
                raise ConfigError(
                    f"the checkpoint's {layer}.{name} does not fit this run's: {err}"
                ) from None


def save_checkpoint(
    run_dir: Path,
    *,
    server_round: int,
    arrays: ArrayRecord,
    strategy: Strategy,
    rows: list[MetricRow],
    failures: list[Failure],
    cfg: RunConfig,
    run_key: str = "",
) -> Path:
    """Write the checkpoint after ``server_round`` into ``run_dir`` (see
    :mod:`fl_imaging.flower.coordinator.checkpoint_files`: a reader never sees half of one);
    returns the
    path of its ``checkpoint.json``.

    Raises :class:`~fl_imaging.review.results.RunFolderError` naming the folder and the reason (``No
    space left on device``) when it cannot be written; the previous checkpoint there is kept.
    """
    npz: dict[str, np.ndarray] = {}
    content = {
        "round": server_round,
        "config": config_to_yaml(cfg),
        "global_arrays": encode({k: v.numpy() for k, v in arrays.items()}, npz, "arrays"),
        "strategy": encode(strategy_state(strategy), npz, "strategy"),
        "rows": [[r.round, r.site, r.metric, r.value] for r in rows],
        "failures": [list(f) for f in failures],
        "run_key": run_key,
    }
    try:
        return write_checkpoint_files(run_dir, f"{server_round:04d}", content, npz)
    except OSError as err:
        kept = _saved_round(run_dir)
        raise RunFolderError(
            f"could not write the checkpoint of round {server_round} into {run_dir}: "
            f"{reason_of(err)}. "
            + (
                f"The checkpoint of round {kept} there is kept: free space (or make the folder "
                f"writable), then go on from it with resume={run_dir}"
                if kept is not None
                else "No checkpoint of this run is there yet"
            )
        ) from None


def _saved_round(run_dir: Path) -> int | None:
    """The round of the checkpoint in ``run_dir`` (None: none that can be read)."""
    try:
        return int(read_checkpoint_files(run_dir)[0]["round"])
    except (ConfigError, KeyError, TypeError, ValueError, OSError):
        return None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the checkpoint in ``run_dir``. Raises :class:`ConfigError`, one line naming the
    file and what to do, when it is missing, truncated, altered, of another format version or
    not an fl-imaging checkpoint."""
    content, npz = read_checkpoint_files(run_dir)
    try:
        arrays = decode(content["global_arrays"], npz)
        strategy = decode(content["strategy"], npz)
        if not isinstance(arrays, dict) or not isinstance(strategy, dict):
            raise TypeError("global arrays or strategy state is not a mapping")
        return Checkpoint(
            round=int(content["round"]),
            arrays=arrays,
            strategy=strategy,
            rows=[MetricRow(int(r), str(s), str(m), float(v)) for r, s, m, v in content["rows"]],
            failures=[(int(r), str(s), str(why)) for r, s, why in content["failures"]],
            config=str(content["config"]),
            run_key=str(content.get("run_key", "")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"the checkpoint file {run_dir / CHECKPOINT_FILE} is damaged (its content does not "
            f"read back: {err}): resume from an earlier copy of the run folder or start the run "
            "again"
        ) from None


def _flat(cfg: RunConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)

    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(walk(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    return walk(plain, "")


#: The keys that make the network, besides every ``task.model.*`` but the warm start and the
#: trainable parameters: a checkpoint's weights fit only a network built from the same values.
MODEL_KEYS = (
    "task.name",
    "task.spatial_dims",
    "task.in_channels",
    "task.num_classes",
    "task.bundle_sha256",
)


#: ``task.model`` keys that do not change the network's weights (checked by
#: :func:`check_resumable` with the rest of the config).
_NOT_THE_NETWORK = ("task.model.init", "task.model.trainable")


def check_same_model(checkpoint: Checkpoint, cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` naming every key of the network (``task.model.*`` but
    ``task.model.init`` and ``task.model.trainable``, and :data:`MODEL_KEYS`) in which ``cfg``
    differs from the run that wrote ``checkpoint`` (its resolved config), with both values;
    nothing when they agree.
    Checked before ``cfg``'s own network is built, so a run folder of another model is named
    as such, not as the constructor's error."""
    before, now = _flat(config_from_yaml(checkpoint.config)), _flat(cfg)
    changed = sorted(
        k
        for k in set(before) | set(now)
        if (k in MODEL_KEYS or (k.startswith("task.model.") and k not in _NOT_THE_NETWORK))
        and before.get(k) != now.get(k)
    )
    if changed:
        shown = "; ".join(f"{k} is {before.get(k)!r} there, {now.get(k)!r} here" for k in changed)
        raise ConfigError(
            f"resume={cfg.resume}: that run folder holds another model ({shown}): its "
            "weights fit only the network it was trained with; resume with the same model "
            "settings (its config.yaml), or start a new run without resume="
        )


def check_resumable(checkpoint: Checkpoint, cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` naming the keys in which ``cfg`` differs from the checkpointed
    run (other than the rounds and output settings), or when nothing is left to run."""
    before, now = _flat(config_from_yaml(checkpoint.config)), _flat(cfg)
    changed = sorted(
        k
        for k in set(before) | set(now)
        if k not in RESUMABLE_CHANGES
        and not k.startswith(RESUMABLE_SECTIONS)
        and before.get(k) != now.get(k)
    )
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise ConfigError(
            f"cannot resume: the config differs from the checkpointed run in {shown}; only "
            "engine.rounds may change"
        )
    if cfg.engine.rounds <= checkpoint.round:
        raise ConfigError(
            f"cannot resume: the checkpoint already holds round {checkpoint.round} of "
            f"engine.rounds={cfg.engine.rounds}; raise engine.rounds to train further"
        )
