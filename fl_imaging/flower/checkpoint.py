"""Checkpoints of a federated run: after every round, the global model, the strategy's state and
the metrics so far, so that an interrupted run can go on from the next round (``resume=RUN_DIR``).

Ours: Flower's strategies keep their state (server momentum, Adam moments, the privacy
accountant's history, ...) as plain attributes and offer no save/load. The state of every object
in the wrapper chain (``inner`` / ``strategy`` attributes) is kept, but for the run's
bookkeeping layers (``checkpointed = False``: recording, site availability, whose rows and
failures the checkpoint holds itself): values that pickle are stored as they are, objects with
``state_dict()`` (Flower's RDP accountant) by that state; callables and the shared
:class:`~fl_imaging.protocol.ReplySites` (node ids differ in a resumed run) are rebuilt
instead. A checkpoint is a pickle: resume only from run folders you made.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf

from fl_imaging.config import ConfigError, RunConfig, config_from_yaml, config_to_yaml
from fl_imaging.protocol import ReplySites
from fl_imaging.results import Failure, MetricRow
from strategies.wrapper import wrapper_chain

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "check_resumable",
    "load_checkpoint",
    "restore_strategy_state",
    "save_checkpoint",
    "strategy_state",
]

CHECKPOINT_FILE = "checkpoint.pkl"
#: Config keys that may differ between a run and the run resuming it.
RESUMABLE_CHANGES = ("engine.rounds", "run_dir", "resume", "engine.verbose", "engine.round_timeout")


@dataclass
class Checkpoint:
    """What a run had after round ``round``: the global weights (name -> NumPy array), the
    strategy chain's state, the metric rows and site failures so far, and the config (YAML)."""

    round: int
    arrays: dict[str, Any]
    strategy: dict[str, dict[str, Any]]
    rows: list[MetricRow]
    failures: list[Failure] = field(default_factory=list)
    config: str = ""


def _aggregation_chain(strategy: Strategy) -> list[Any]:
    """The layers of ``strategy``'s wrapper chain whose state a checkpoint keeps."""
    return [node for node in wrapper_chain(strategy) if getattr(node, "checkpointed", True)]


def strategy_state(strategy: Strategy) -> dict[str, dict[str, Any]]:
    """The saveable state of each aggregation layer in ``strategy``'s wrapper chain, keyed
    ``<depth>:<class name>``."""
    state: dict[str, dict[str, Any]] = {}
    for depth, node in enumerate(_aggregation_chain(strategy)):
        fields: dict[str, Any] = {}
        for name, value in vars(node).items():
            if isinstance(value, Strategy | ReplySites) or callable(value):
                continue
            if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
                fields[name] = {"__state_dict__": value.state_dict()}
                continue
            try:
                pickle.dumps(value)
            except Exception:  # not saveable (locks, modules, ...): rebuilt from the config
                continue
            fields[name] = value
        state[f"{depth}:{type(node).__name__}"] = fields
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, Any]]) -> None:
    """Put ``state`` (from :func:`strategy_state`) back into a freshly built strategy chain of
    the same classes. Raises :class:`ConfigError` when the chains differ."""
    chain = _aggregation_chain(strategy)
    names = [f"{d}:{type(n).__name__}" for d, n in enumerate(chain)]
    if names != list(state):
        raise ConfigError(
            f"the checkpoint's strategy ({' > '.join(state)}) is not this run's "
            f"({' > '.join(names)}): resume with the same strategy settings"
        )
    for node, fields in zip(chain, state.values(), strict=True):
        for name, value in fields.items():
            if isinstance(value, dict) and "__state_dict__" in value:
                getattr(node, name).load_state_dict(value["__state_dict__"])
            else:
                setattr(node, name, value)


def save_checkpoint(
    path: Path,
    *,
    server_round: int,
    arrays: ArrayRecord,
    strategy: Strategy,
    rows: list[MetricRow],
    failures: list[Failure],
    cfg: RunConfig,
) -> Path:
    """Write the checkpoint after ``server_round`` to ``path`` atomically (a reader never sees
    half a file); returns ``path``."""
    checkpoint = Checkpoint(
        round=server_round,
        arrays={k: v.numpy() for k, v in arrays.items()},
        strategy=strategy_state(strategy),
        rows=list(rows),
        failures=list(failures),
        config=config_to_yaml(cfg),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("wb") as handle:
        pickle.dump(checkpoint, handle)
    os.replace(partial, path)
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read ``run_dir/checkpoint.pkl``; raises :class:`ConfigError` when it is missing."""
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"resume={run_dir}: no {CHECKPOINT_FILE} there; give the folder of a run that "
            "finished at least one round"
        )
    with path.open("rb") as handle:
        checkpoint = pickle.load(handle)  # our own file, written by save_checkpoint
    if not isinstance(checkpoint, Checkpoint):
        raise ConfigError(f"{path} is not an fl-imaging checkpoint")
    return checkpoint


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


def check_resumable(checkpoint: Checkpoint, cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` naming the keys in which ``cfg`` differs from the checkpointed
    run (other than the rounds and output settings), or when nothing is left to run."""
    before, now = _flat(config_from_yaml(checkpoint.config)), _flat(cfg)
    changed = sorted(
        k
        for k in set(before) | set(now)
        if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)
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
