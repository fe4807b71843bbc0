"""Benchmark: what a real deployment costs over the simulation engine, per round.

Runs the same experiment (3 demo sites, 3 rounds, ``experiment=quick`` sizes) twice on the same
site folders and prints both wall times and the overhead per round, ``(deploy - sim) / rounds``:

* simulation: ``fl-imaging data=folders ...`` on Flower's simulation engine (Ray), in-process;
* deployment: a local federation on loopback (``fl_imaging.deploy.local``: SuperLink with TLS and
  SuperNode authentication, one SuperNode per site), then ``fl-imaging engine=deployment ...``
  submitted with ``flwr run``. Its clock runs from submission to the end of the run; starting
  the SuperLink and SuperNodes is timed apart ("setup").

Both are whole ``fl-imaging`` processes (imports count on both sides); the demo data is written
before either clock starts. ``round_seconds`` of each run's metrics.csv shows where rounds go.

    python scripts/bench_deployment.py                                  # default
    python scripts/bench_deployment.py --isolation process              # long-lived ClientApps
    python scripts/bench_deployment.py engine.evaluate_in_train=true    # any fl-imaging override
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _bench import fl_imaging_command, run_timed

from fl_imaging.data.demo import make_demo_data
from fl_imaging.deploy.local import start_local
from fl_imaging.results import AGGREGATE_SITE, read_metrics


def round_seconds(run_dir: Path) -> list[float]:
    """``round_seconds`` of each round of a finished run, in round order."""
    rows = read_metrics(run_dir / "metrics.csv")
    found = {
        r.round: r.value for r in rows if r.site == AGGREGATE_SITE and r.metric == "round_seconds"
    }
    return [found[k] for k in sorted(found)]


def main() -> None:
    """Run both engines and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", type=int, default=6, help="cases per demo site")
    parser.add_argument("--shape", type=int, default=24, help="edge of the demo volumes (voxels)")
    parser.add_argument(
        "--isolation",
        choices=["subprocess", "process"],
        default="subprocess",
        help="how each SuperNode runs its ClientApp: a new process per message (Flower's "
        "default) or fl-imaging's long-lived ClientApp process",
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
    sim_seconds = float("nan")
    if not args.skip_simulation:
        folders = ",".join(str(s) for s in sites)
        sim = run_timed(
            fl_imaging_command([*common, "data=folders", f"data.sites=[{folders}]"], work / "sim")
        )
        if sim.returncode != 0:
            sys.exit(sim.failure())
        sim_seconds = sim.seconds
    start = time.perf_counter()
    with start_local(sites, work / "federation", isolation=args.isolation, check=False) as fed:
        setup = time.perf_counter() - start
        deploy = run_timed(fl_imaging_command(fed.fl_imaging_args(*common), work / "deploy"))
    if deploy.returncode != 0:
        sys.exit(deploy.failure())
    rounds = args.rounds
    print(
        f"\n{args.sites} sites x {rounds} rounds, isolation={args.isolation}, overrides: "
        f"{' '.join(common)}"
    )
    print(f"{'':28}{'simulation':>12}{'deployment':>12}")
    print(f"{'wall time (s)':28}{sim_seconds:12.1f}{deploy.seconds:12.1f}")
    sim_rounds = round_seconds(work / "sim") if not args.skip_simulation else []
    dep_rounds = round_seconds(work / "deploy")
    for k in range(rounds):
        sim_k = sim_rounds[k] if k < len(sim_rounds) else float("nan")
        dep_k = dep_rounds[k] if k < len(dep_rounds) else float("nan")
        print(f"{f'round {k + 1} (s)':28}{sim_k:12.1f}{dep_k:12.1f}")
    print(f"{'setup of the federation (s)':28}{'':12}{setup:12.1f}")
    overhead = (deploy.seconds - sim_seconds) / rounds
    print(f"\noverhead per round (deploy - sim) / rounds: {overhead:.1f} s")
    print(f"files in {work}")


if __name__ == "__main__":
    main()
