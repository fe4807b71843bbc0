"""Benchmark: what federating costs over the same training done centrally.

Runs the same total training twice on the same demo data (4 sites, same epochs, batch size,
model, evaluation after every round) and prints both wall times and their ratio:

* federated: the ``fl-imaging`` command on Flower's simulation engine, one virtual site per folder;
* centralised: plain MONAI training of one model on the pooled cases, in one process, using all
  cores for torch.

Both are whole processes started the same way, so imports count on both sides; the demo data is
written before either clock starts; both end without Python's teardown. The target ratio is
1.05 or less.

    python scripts/bench_overhead.py                 # default size
    python scripts/bench_overhead.py engine.rounds=5 # any fl-imaging override
    python scripts/bench_overhead.py --pairs 4       # 4 pairs, the median ratio of the pairs

On a shared or noisy machine one pair's ratio moves by 0.1 and more: ``--pairs N`` runs the two
sides in turn N times (centralised, federated, centralised, ...) and prints each pair's ratio
and their median; the table shows the last pair.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _bench import fl_imaging_command, main_metric, mean_per_round, run_timed

from fl_imaging.common.process_exit import end_process
from fl_imaging.review.results import read_metrics

DEFAULTS = [
    "data.num_sites=4",
    "data.cases_per_site=24",
    "data.shape=[48,48,48]",
    "task.roi_size=[32,32,32]",
    "task.local_epochs=4",
    "engine.rounds=6",
]


def centralised(overrides: list[str], out: Path) -> None:
    """Train the pooled baseline for the config given by ``overrides``; write metrics to ``out``."""
    import torch

    from fl_imaging.config.compose import check_overrides
    from fl_imaging.data.prepare import prepare_sites
    from fl_imaging.review.results import write_metrics
    from fl_imaging.training.baselines import train_pooled

    cfg = check_overrides(overrides)
    torch.set_num_threads(cfg.engine.num_cpus or os.cpu_count() or 1)
    cfg, sites, _ = prepare_sites(cfg)
    rows, _ = train_pooled(cfg, sites)
    write_metrics(rows, out)


def _timed(cmd: list[str], cwd: Path) -> float:
    step = run_timed(cmd, cwd)
    if step.returncode != 0:
        sys.exit(step.failure())
    return step.seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="fl-imaging overrides, after the defaults")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and runs here")
    parser.add_argument("--pairs", type=int, default=1, help="run both sides N times, in turn")
    parser.add_argument("--centralised-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.centralised_only is not None:
        centralised(args.overrides, args.centralised_only)
        end_process(
            0
        )  # as fl-imaging ends: without Python's teardown (fl_imaging.common.process_exit)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = [*DEFAULTS, f"data.root={work / 'demo'}", *args.overrides]
    print(f"benchmark folder: {work}\noverrides: {' '.join(overrides)}")

    from fl_imaging.config.compose import check_overrides
    from fl_imaging.data.prepare import prepare_sites

    prepare_sites(check_overrides(overrides))  # write the demo data before any clock starts

    central_csv = work / "centralised.csv"
    ratios = []
    for pair in range(1, max(1, args.pairs) + 1):
        fed_dir = work / ("federated" if args.pairs <= 1 else f"federated-{pair}")
        t_central = _timed(
            [sys.executable, __file__, "--centralised-only", str(central_csv), *overrides], work
        )
        t_fed = _timed(fl_imaging_command(overrides, fed_dir), work)
        ratios.append(t_fed / t_central)
        if args.pairs > 1:
            print(
                f"pair {pair}/{args.pairs}: centralised {t_central:.1f} s, federated "
                f"{t_fed:.1f} s, ratio {ratios[-1]:.2f}",
                flush=True,
            )
    fed = read_metrics(fed_dir / "metrics.csv")
    central = read_metrics(central_csv)
    metric = main_metric(fed)

    def final(rows: list) -> float:
        return list(mean_per_round(rows, metric).values())[-1]

    fed_rounds = sorted((r.round, r.value) for r in fed if r.metric == "round_seconds")
    central_rounds = sorted((r.round, r.value) for r in central if r.metric == "round_seconds")
    print()
    print(f"{'':24}{'centralised':>14}{'federated':>14}")
    print(f"{'wall time (s)':24}{t_central:14.1f}{t_fed:14.1f}")
    for (rnd, c), (_, f) in zip(central_rounds, fed_rounds, strict=True):
        print(f"{f'round {rnd} (s)':24}{c:14.1f}{f:14.1f}")
    print(f"{f'final mean {metric}':24}{final(central):14.3f}{final(fed):14.3f}")
    print(f"\nratio federated / centralised: {t_fed / t_central:.2f}  (target <= 1.05)")
    if len(ratios) > 1:
        print(
            f"median over {len(ratios)} pairs: {statistics.median(ratios):.2f} "
            f"(range {min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
