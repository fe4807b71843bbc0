"""Benchmark: what secure aggregation costs, side by side with the same run without it.

Two settings, each run twice (plain FedAvg, then ``strategy.secagg.enabled=true``) with the same
data, seed and overrides:

* ``simulation``: ``hippocampus_iid``'s model and 4 sites (MSD Task04 Hippocampus, IID split;
  needs the dataset: ``../shared/data`` or ``data.root=``), on Flower's simulation engine;
* ``deployment``: 3 demo sites (``experiment=quick`` sizes) on a local federation on loopback
  (TLS, SuperNode authentication, one long-lived ClientApp per SuperNode);
* ``keys``: the protocol's own cost per round (new keys, shares, masking, unmasking; no
  training) for 3, 10 and 50 sites and a model of 100k floats, every site's real handlers in
  this process (``scripts/_secagg_rounds.py``).

Per run: wall time, mean ``round_seconds`` (all rounds, and rounds 2.. without start-up), bytes
each site sent and received per round (model arrays both ways, plus secure aggregation's keys,
shares and unmasking: ``bytes_up``, ``bytes_down_*``, ``bytes_secagg`` in metrics.csv) and the
final validation Dice (mean over sites); then the ratios secure / plain.

    python scripts/bench_secagg.py                          # both settings, 3 rounds
    python scripts/bench_secagg.py --only simulation --rounds 6 --repeats 2
    python scripts/bench_secagg.py --only deployment task.local_epochs=1   # any override
    python scripts/bench_secagg.py --only keys
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _bench import fl_imaging_command, mean_per_round, run_timed
from _secagg_rounds import stage_seconds

from fl_imaging.data.demo import make_demo_data
from fl_imaging.deploy.local import start_local
from fl_imaging.review.results import AGGREGATE_SITE, read_metrics

SECURE = "strategy.secagg.enabled=true"
TRAFFIC = ("bytes_up", "bytes_down_train", "bytes_down_evaluate", "bytes_secagg")


@dataclass(frozen=True)
class Run:
    """One finished run: its setting, whether secure, wall time, round seconds, mean bytes per
    site and round, and the final validation Dice (mean over sites)."""

    setting: str
    secure: bool
    seconds: float
    rounds: list[float]
    bytes_per_site_round: float
    dice: float

    @property
    def later_round(self) -> float:
        """Mean ``round_seconds`` of rounds 2.. (round 1 carries start-up)."""
        later = self.rounds[1:] or self.rounds
        return statistics.fmean(later) if later else math.nan


def measure(run_dir: Path, setting: str, secure: bool, seconds: float) -> Run:
    """Read a finished run's figures from its metrics.csv."""
    rows = read_metrics(run_dir / "metrics.csv")
    rounds = [
        r.value
        for r in sorted(rows, key=lambda r: r.round)
        if r.site == AGGREGATE_SITE and r.metric == "round_seconds"
    ]
    traffic = [r for r in rows if r.metric in TRAFFIC and r.site != AGGREGATE_SITE]
    pairs = {(r.round, r.site) for r in traffic}
    total = math.fsum(r.value for r in traffic)
    dice = mean_per_round(rows, "dice")
    return Run(
        setting,
        secure,
        seconds,
        rounds,
        total / max(len(pairs), 1),
        dice[max(dice)] if dice else math.nan,
    )


def run_pair(
    setting: str, overrides: list[str], work: Path, deploy_sites: list[Path] | None
) -> list[Run]:
    """Run ``overrides`` plain, then secure; in a local deployment of ``deploy_sites`` when
    given, else on the simulation engine."""
    runs = []
    for secure in (False, True):
        run_dir = work / f"{setting}-{'secure' if secure else 'plain'}"
        extra = [SECURE] if secure else []
        if deploy_sites is None:
            step = run_timed(fl_imaging_command([*overrides, *extra], run_dir))
        else:
            with start_local(deploy_sites, run_dir / "federation", check=False) as fed:
                step = run_timed(
                    fl_imaging_command(fed.fl_imaging_args(*overrides, *extra), run_dir)
                )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "output.log").write_text(step.output)
        if step.returncode != 0:
            sys.exit(step.failure())
        runs.append(measure(run_dir, setting, secure, step.seconds))
        print(f"{setting} {'secure' if secure else 'plain'}: {step.seconds:.1f} s", flush=True)
    return runs


def print_table(runs: list[Run]) -> None:
    """Each run, then each setting's ratios secure / plain (mean over repeats)."""
    print(
        f"{'setting':12}{'run':>8}{'wall s':>9}{'s/round':>9}{'s/round 2+':>11}"
        f"{'MB/site/round':>15}{'final Dice':>12}"
    )
    for r in runs:
        print(
            f"{r.setting:12}{'secure' if r.secure else 'plain':>8}{r.seconds:>9.1f}"
            f"{statistics.fmean(r.rounds):>9.2f}{r.later_round:>11.2f}"
            f"{r.bytes_per_site_round / 1e6:>15.3f}{r.dice:>12.4f}"
        )
    for setting in dict.fromkeys(r.setting for r in runs):
        plain = [r for r in runs if r.setting == setting and not r.secure]
        secure = [r for r in runs if r.setting == setting and r.secure]
        ratios = {
            name: statistics.fmean(map(value, secure)) / statistics.fmean(map(value, plain))
            for name, value in (
                ("wall", lambda r: r.seconds),
                ("round", lambda r: statistics.fmean(r.rounds)),
                ("later", lambda r: r.later_round),
                ("bytes", lambda r: r.bytes_per_site_round),
            )
        }
        dice = statistics.fmean(r.dice for r in secure) - statistics.fmean(r.dice for r in plain)
        print(
            f"{setting}: secure / plain: wall {ratios['wall']:.2f}x, per round "
            f"{ratios['round']:.2f}x (rounds 2+: {ratios['later']:.2f}x), bytes "
            f"{ratios['bytes']:.2f}x, final Dice {dice:+.4f}"
        )


def print_key_setup(size: int = 100_000) -> None:
    """Secure aggregation's seconds per round by stage, for 3, 10 and 50 sites."""
    stages = ("secagg_keys", "secagg_shares", "masking", "secagg_unmask")
    print(f"secure aggregation per round, {size} floats, no training (seconds):")
    print(
        f"{'sites':>6}{'keys/site':>11}{'shares/site':>13}{'mask/site':>11}"
        f"{'unmask/site':>13}{'coordinator':>13}{'site total':>12}"
    )
    for sites in (3, 10, 50):
        s = stage_seconds(sites, size)
        per_site = [s.get(k, 0.0) / sites for k in stages]
        print(
            f"{sites:>6}"
            + "".join(f"{v:>{w}.4f}" for v, w in zip(per_site, (11, 13, 11, 13), strict=True))
            + f"{s['coordinator']:>13.3f}{sum(per_site):>12.4f}",
            flush=True,
        )


def main() -> None:
    """Run the settings and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["simulation", "deployment", "keys"], default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    args, overrides = parser.parse_known_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "keys"):
        print_key_setup()
    if args.only == "keys":
        return
    runs: list[Run] = []
    for repeat in range(1, args.repeats + 1):
        if args.only in (None, "simulation"):
            common = [
                "experiment=hippocampus_iid",
                f"engine.rounds={args.rounds}",
                f"data.sites_dir={work / 'sites'}",
                *overrides,
            ]
            runs += run_pair("simulation", common, work / f"{repeat}", None)
        if args.only in (None, "deployment"):
            sites = make_demo_data(
                work / "demo", num_sites=3, cases_per_site=6, shape=(24, 24, 24), dicom_sites=()
            )
            common = [
                "experiment=quick",
                f"engine.rounds={args.rounds}",
                "engine.evaluate_in_train=true",
                "task.roi_size=[24,24,24]",
                *overrides,
            ]
            runs += run_pair("deployment", common, work / f"{repeat}", sites)
    print()
    print_table(runs)
    print(f"files in {work}")


if __name__ == "__main__":
    main()
