"""The ``fl-imaging-eval`` command: score a given model on every site's test cases, no training.

    fl-imaging-eval MODEL [OVERRIDES ...]     # e.g. fl-imaging-eval runs/public experiment=smoke

MODEL is a weights file (a torch ``state_dict`` .pt), a run folder (its ``model.pt``) or a MONAI
bundle folder (its ``models/model.pt``). The run is ``fl-imaging OVERRIDES engine.rounds=0
engine.test=true task.model.init=MODEL``: the same pipeline, audit log, results folder and
report as a training run (:mod:`fl_imaging.cli.main`), with no training round, so no site is
asked to fit; its ``model.pt`` is MODEL's weights file, byte for byte.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["eval_overrides", "main"]

#: Overrides the command sets itself (a user's own would contradict an evaluation-only run).
_SET_HERE = ("engine.rounds", "task.model.init", "resume")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-imaging-eval",
        description=(
            "An evaluation-only federated run: every site scores MODEL on its test cases (no "
            "training round), with the audit log, results folder and report.html of a training "
            "run. The same as: fl-imaging OVERRIDES engine.rounds=0 engine.test=true "
            "task.model.init=MODEL."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a weights file (.pt, a torch state_dict), a run folder (its model.pt) or a MONAI "
        "bundle folder (its models/model.pt); a relative path is taken from here",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDES",
        help="fl-imaging's Hydra overrides: the task, data and engine the model is scored with "
        "(e.g. experiment=smoke data=folders); the sites need test cases (data.test_fraction)",
    )
    return parser


def eval_overrides(model: str, overrides: list[str], start: Path) -> list[str]:
    """The ``fl-imaging`` overrides of ``fl-imaging-eval MODEL OVERRIDES`` run in ``start``:
    ``overrides`` then ``engine.rounds=0``, ``engine.test=true`` and ``task.model.init`` set to
    MODEL made absolute from ``start``. Raises ``ValueError`` naming an override that sets what
    this command sets itself."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in _SET_HERE:
            raise ValueError(
                f"{override}: fl-imaging-eval sets {key} itself (an evaluation-only run scores "
                "MODEL without training); leave it out"
            )
    path = start / Path(model).expanduser()
    return [*overrides, "engine.rounds=0", "engine.test=true", f"task.model.init={path}"]


def main(argv: list[str] | None = None) -> int:
    """Run ``fl-imaging-eval`` with ``argv`` (default: the command line). Checks MODEL, then
    hands the run to ``fl-imaging`` (:func:`fl_imaging.cli.main.main`, which ends the process
    with its exit code: 0, 2 for a problem the user can fix, 130 when stopped). Returns 2 for
    a MODEL that names no weights file or an override it sets itself."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from fl_imaging.config import ConfigError
    from fl_imaging.flower.coordinator.initial_model import weights_file

    try:
        overrides = eval_overrides(args.model, list(args.overrides), Path.cwd())
        weights_file(overrides[-1].split("=", 1)[1])  # refused here, before Hydra starts
    except (ValueError, ConfigError) as err:
        print(f"fl-imaging-eval: error: {err}", file=sys.stderr)
        return 2
    from fl_imaging.cli.main import main as fl_imaging_main

    sys.argv = ["fl-imaging-eval", *overrides]  # Hydra reads the command line
    fl_imaging_main()
    return 0


def entry() -> None:
    """Console entry point: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
