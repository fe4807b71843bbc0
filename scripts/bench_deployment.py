"""Benchmark: what a real deployment costs over the simulation engine, per round, before and
after fl-imaging's speed work.

Runs the same experiment (3 demo sites, 3 rounds, ``experiment=quick`` sizes) on the same site
folders in simulation and in a local deployment, with the same overrides on both engines, for
two settings:

* ``before``: Flower's defaults as the toolkit first used them: a new ``flwr-clientapp`` process
  per message (``--isolation subprocess``), two messages per round (train, then evaluate:
  ``engine.evaluate_in_train=false``), the SuperLink's state in a SQLite file;
* ``after``: the toolkit's defaults: one long-lived ClientApp process per SuperNode
  (``--isolation process``, :mod:`fl_imaging.deploy.warm_clientapp`), one message per round
  (``engine.evaluate_in_train=true``), the SuperLink's state in memory.

Simulation: ``fl-imaging data=folders ...`` on Flower's simulation engine (Ray), in-process.
Deployment: a local federation on loopback (``fl_imaging.deploy.local``: SuperLink with TLS and
SuperNode authentication, one SuperNode per site), then ``fl-imaging engine=deployment ...``
submitted with ``flwr run``; its clock runs from submission to the end of the run (starting the
SuperLink and SuperNodes, until every site's ClientApp process can take a message, is timed
apart: "setup"). Both are whole ``fl-imaging`` processes.

Per run it prints the wall times, the overhead per round ``(deploy - sim) / rounds``, each
round's ``round_seconds`` (metrics.csv) on both sides, the overhead per round after round 1
(mean of rounds 2.. deploy minus sim: start-up excluded) and the seconds spent outside rounds
(submission, start-up, results: a cost per run, not per round).

    python scripts/bench_deployment.py                      # before and after, once each
    python scripts/bench_deployment.py --skip-before --repeats 3
    python scripts/bench_deployment.py task.local_epochs=1  # any fl-imaging override (both)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _bench import Step, fl_imaging_command, run_timed

from fl_imaging.data.demo import make_demo_data
from fl_imaging.deploy.local import start_local
from fl_imaging.review.results import AGGREGATE_SITE, read_metrics


@dataclass(frozen=True)
class Setting:
    """How the deployment runs: ClientApp isolation, one message per round or two, and the
    SuperLink's database file (None: in memory)."""

    label: str
    isolation: str
    evaluate_in_train: bool
    database: Path | None


BEFORE = Setting("before", "subprocess", False, Path("superlink.db"))
AFTER = Setting("after", "process", True, None)


@dataclass
class Result:
    """One repeat of one setting: wall times (s) and each round's ``round_seconds``."""

    setting: Setting
    repeat: int
    sim_seconds: float
    deploy_seconds: float
    setup_seconds: float
    sim_rounds: list[float]
    deploy_rounds: list[float]

    @property
    def overhead(self) -> float:
        """``(deploy - sim) / rounds``: the overhead per round, start-up included."""
        return (self.deploy_seconds - self.sim_seconds) / max(len(self.deploy_rounds), 1)

    @property
    def later_overhead(self) -> float:
        """Mean ``round_seconds`` of rounds 2.. in deployment minus the same in simulation."""
        return _mean(self.deploy_rounds[1:]) - _mean(self.sim_rounds[1:])

    def outside_rounds(self, simulation: bool) -> float:
        """Wall time not spent in rounds (submission, start-up, results), one engine."""
        if simulation:
            return self.sim_seconds - math.fsum(self.sim_rounds)
        return self.deploy_seconds - math.fsum(self.deploy_rounds)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def round_seconds(run_dir: Path) -> list[float]:
    """``round_seconds`` of each round of a finished run, in round order."""
    if not (run_dir / "metrics.csv").is_file():
        return []
    rows = read_metrics(run_dir / "metrics.csv")
    found = {
        r.round: r.value for r in rows if r.site == AGGREGATE_SITE and r.metric == "round_seconds"
    }
    return [found[k] for k in sorted(found)]


def _checked(step: Step, run_dir: Path) -> Step:
    """Keep the run's output in ``run_dir/output.log``; exit with it when the run failed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "output.log").write_text(step.output)
    if step.returncode != 0:
        sys.exit(step.failure())
    return step


def run_setting(
    setting: Setting,
    repeat: int,
    sites: list[Path],
    common: list[str],
    work: Path,
    simulation: bool,
) -> Result:
    """Run the experiment once in simulation (unless not ``simulation``) and once in a local
    deployment with ``setting``; files go to ``work/LABEL-REPEAT``."""
    folder = work / f"{setting.label}-{repeat}"
    overrides = [*common, f"engine.evaluate_in_train={str(setting.evaluate_in_train).lower()}"]
    sim_seconds = float("nan")
    if simulation:
        names = ",".join(str(s) for s in sites)
        sim_dir = folder / "sim"
        cmd = fl_imaging_command([*overrides, "data=folders", f"data.sites=[{names}]"], sim_dir)
        sim_seconds = _checked(run_timed(cmd), sim_dir).seconds
    start = time.perf_counter()
    with start_local(
        sites,
        folder / "federation",
        isolation=setting.isolation,
        check=False,
        database=setting.database,
    ) as fed:
        setup = time.perf_counter() - start
        deploy_dir = folder / "deploy"
        cmd = fl_imaging_command(fed.fl_imaging_args(*overrides), deploy_dir)
        deploy = _checked(run_timed(cmd), deploy_dir)
    return Result(
        setting,
        repeat,
        sim_seconds,
        deploy.seconds,
        setup,
        round_seconds(folder / "sim"),
        round_seconds(deploy_dir),
    )


def _rounds(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values) or "-"


def print_table(results: list[Result]) -> None:
    """One line per run, then each setting's range."""
    header = (
        f"{'setting':8}{'run':>4}{'sim wall':>10}{'deploy wall':>13}{'setup':>7}"
        f"{'overhead/round':>16}{'rounds 2+ overhead':>20}{'outside rounds sim/dep':>24}"
        "   round seconds sim | deploy"
    )
    print(header)
    for r in results:
        outside = f"{r.outside_rounds(True):.1f} / {r.outside_rounds(False):.1f}"
        print(
            f"{r.setting.label:8}{r.repeat:>4}{r.sim_seconds:>10.1f}{r.deploy_seconds:>13.1f}"
            f"{r.setup_seconds:>7.1f}{r.overhead:>16.1f}{r.later_overhead:>20.1f}{outside:>24}"
            f"   {_rounds(r.sim_rounds)} | {_rounds(r.deploy_rounds)}"
        )
    for label in dict.fromkeys(r.setting.label for r in results):
        mine = [r for r in results if r.setting.label == label]
        over = [r.overhead for r in mine]
        later = [r.later_overhead for r in mine]
        print(
            f"{label}: overhead per round {min(over):.1f}-{max(over):.1f} s, after round 1 "
            f"{min(later):.1f}-{max(later):.1f} s ({len(mine)} run(s))"
        )


def main() -> None:
    """Run both engines for each setting and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", type=int, default=6, help="cases per demo site")
    parser.add_argument("--shape", type=int, default=24, help="edge of the demo volumes (voxels)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting")
    parser.add_argument(
        "--skip-before",
        action="store_true",
        help="only the 'after' setting (the slow one is 'before': about 25 s per round)",
    )
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    args, overrides = parser.parse_known_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    sites = make_demo_data(
        work / "data",
        num_sites=args.sites,
        cases_per_site=args.cases,
        shape=(args.shape,) * 3,
        dicom_sites=(),
    )
    common = [
        "experiment=quick",
        f"engine.rounds={args.rounds}",
        f"task.roi_size=[{args.shape},{args.shape},{args.shape}]",
        *overrides,
    ]
    settings = [AFTER] if args.skip_before else [BEFORE, AFTER]
    results: list[Result] = []
    for repeat in range(1, args.repeats + 1):
        for setting in settings:
            result = run_setting(setting, repeat, sites, common, work, not args.skip_simulation)
            print(
                f"{setting.label} run {repeat}: sim {result.sim_seconds:.1f} s, deploy "
                f"{result.deploy_seconds:.1f} s",
                flush=True,
            )
            results.append(result)
    print(f"\n{args.sites} sites x {args.rounds} rounds, overrides (both engines): {common}")
    for s in settings:
        print(
            f"  {s.label}: --isolation {s.isolation}, engine.evaluate_in_train="
            f"{str(s.evaluate_in_train).lower()}, SuperLink database "
            f"{s.database or 'in memory'}"
        )
    print()
    print_table(results)
    print(f"files in {work}")


if __name__ == "__main__":
    main()
