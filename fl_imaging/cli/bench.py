"""The ``fl-imaging-bench`` command: run a named benchmark, resumably, and write its tables.

    fl-imaging-bench experiment=hippocampus_iid            # every cell, then the tables
    fl-imaging-bench experiment=smoke --list               # the cells and whether they ran
    fl-imaging-bench experiment=smoke --only pooled,fedavg # some methods only
    fl-imaging-bench experiment=mednist_dirichlet bench.seeds=[0] engine.rounds=2   # any override

What a benchmark is and what it writes: :mod:`fl_imaging.benchmark.runner`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fl_imaging.benchmark.runner import PRESETS, run_benchmark
from fl_imaging.engines.interrupts import INTERRUPTED_EXIT_CODE, RunInterrupted

__all__ = ["entry", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark named by the overrides in ``argv``; returns the exit code (0: every
    cell done, 1: some cell failed, 2: a configuration error)."""
    parser = argparse.ArgumentParser(
        prog="fl-imaging-bench",
        description=__doc__.split("\n\n")[0],
        epilog=f"Presets: {', '.join(PRESETS)} (conf/experiment/).",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke")
    parser.add_argument(
        "--list", action="store_true", help="print the cells and their state, run nothing"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated methods (strategy labels, pooled, local) to run; the tables "
        "still show every cell done so far. Default: all",
    )
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return run_benchmark(args.overrides, args.only, args.list)
    except (RunInterrupted, KeyboardInterrupt):
        logging.getLogger("fl_imaging.bench").warning(
            "benchmark interrupted: the cells done so far are kept; run the same command again "
            "to go on (done cells are reused, the interrupted one runs again)"
        )
        return INTERRUPTED_EXIT_CODE


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
