"""Benchmark: what homomorphic encryption costs, side by side with plain FedAvg and secure
aggregation on the same data, seed and overrides.

* ``simulation``: ``hippocampus_iid``'s model and 4 sites (MSD Task04 Hippocampus, IID split;
  needs the dataset: ``$FL_IMAGING_SHARED_DATA`` or ``../shared/data``), three runs on Flower's
  simulation engine: plain, ``strategy.secagg.enabled=true``, ``strategy.he.enabled=true``;
* ``cost``: the HE aggregation alone at the clinical benchmark's model size (5.6M floats by
  default), 3 sites: each site's encryption, the coordinator's addition, one site's decryption
  (seconds), the bytes each site sends, and the largest error against the plain weighted mean.

Per run: wall time, mean ``round_seconds`` (all rounds, and rounds 2.. without start-up), bytes
each site sent and received per round (``bytes_up`` holds the ciphertext, ``bytes_down_*`` the
model with its encrypted sum, ``bytes_secagg`` secure aggregation's keys and shares) and the
final validation Dice (mean over sites); then each protection's ratios to plain.

    python scripts/bench_he.py                            # both, 3 rounds
    python scripts/bench_he.py --only cost --floats 5600000 --sites 3
    python scripts/bench_he.py --only simulation --rounds 2 task.local_epochs=1   # any override
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _bench import fl_imaging_command, mean_per_round, run_timed

from fl_imaging.review.results import AGGREGATE_SITE, read_metrics

VARIANTS = {
    "plain": [],
    "secagg": ["strategy.secagg.enabled=true"],
    "he": ["strategy.he.enabled=true"],
}
TRAFFIC = ("bytes_up", "bytes_down_train", "bytes_down_evaluate", "bytes_secagg")


@dataclass(frozen=True)
class Run:
    """One finished run: its variant, wall time, round seconds, mean bytes per site and round,
    and the final validation Dice (mean over sites)."""

    variant: str
    seconds: float
    rounds: list[float]
    bytes_per_site_round: float
    dice: float

    @property
    def later_round(self) -> float:
        """Mean ``round_seconds`` of rounds 2.. (round 1 carries start-up)."""
        later = self.rounds[1:] or self.rounds
        return statistics.fmean(later) if later else math.nan


def measure(run_dir: Path, variant: str, seconds: float) -> Run:
    """Read a finished run's figures from its metrics.csv."""
    rows = read_metrics(run_dir / "metrics.csv")
    rounds = [
        r.value
        for r in sorted(rows, key=lambda r: r.round)
        if r.site == AGGREGATE_SITE and r.metric == "round_seconds"
    ]
    traffic = [r for r in rows if r.metric in TRAFFIC and r.site != AGGREGATE_SITE]
    pairs = {(r.round, r.site) for r in traffic}
    dice = mean_per_round(rows, "dice")
    return Run(
        variant,
        seconds,
        rounds,
        math.fsum(r.value for r in traffic) / max(len(pairs), 1),
        dice[max(dice)] if dice else math.nan,
    )


def run_variants(overrides: list[str], work: Path, variants: list[str]) -> list[Run]:
    """Run ``overrides`` once per variant on the simulation engine."""
    runs = []
    for variant in variants:
        run_dir = work / variant
        step = run_timed(fl_imaging_command([*overrides, *VARIANTS[variant]], run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "output.log").write_text(step.output)
        if step.returncode != 0:
            sys.exit(step.failure())
        runs.append(measure(run_dir, variant, step.seconds))
        print(f"{variant}: {step.seconds:.1f} s", flush=True)
    return runs


def print_table(runs: list[Run]) -> None:
    """Each run, then each protection's ratios to plain."""
    print(
        f"{'run':>8}{'wall s':>9}{'s/round':>9}{'s/round 2+':>11}"
        f"{'MB/site/round':>15}{'final Dice':>12}"
    )
    for r in runs:
        print(
            f"{r.variant:>8}{r.seconds:>9.1f}{statistics.fmean(r.rounds):>9.2f}"
            f"{r.later_round:>11.2f}{r.bytes_per_site_round / 1e6:>15.3f}{r.dice:>12.4f}"
        )
    plain = next((r for r in runs if r.variant == "plain"), None)
    if plain is None:
        return
    for r in runs:
        if r is plain:
            continue
        print(
            f"{r.variant} / plain: wall {r.seconds / plain.seconds:.2f}x, per round "
            f"{statistics.fmean(r.rounds) / statistics.fmean(plain.rounds):.2f}x (rounds 2+: "
            f"{r.later_round / plain.later_round:.2f}x), bytes "
            f"{r.bytes_per_site_round / plain.bytes_per_site_round:.2f}x, final Dice "
            f"{r.dice - plain.dice:+.4f}"
        )


def print_cost(floats: int, sites: int, seed: int = 0) -> None:
    """The HE aggregation of ``floats`` values across ``sites`` sites, timed stage by stage."""
    from fl_imaging.he.ckks import (
        add_encrypted,
        context_from,
        decrypt_vector,
        encrypt_vector,
        new_secret_context,
        public_context_bytes,
    )

    secret = new_secret_context()
    public = context_from(public_context_bytes(secret))
    rng = np.random.default_rng(seed)
    weights = rng.integers(5, 60, sites).astype(float)
    vectors = [w * rng.normal(0, 0.05, floats) for w in weights]
    encrypted, encrypt_s = [], []
    for vector in vectors:
        start = time.perf_counter()
        encrypted.append(encrypt_vector(secret, vector))
        encrypt_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    total = add_encrypted(public, encrypted)
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    summed = decrypt_vector(secret, total, floats)
    decrypt_s = time.perf_counter() - start
    error = float(np.abs(summed - sum(vectors)).max())
    print(f"HE aggregation of {floats} floats across {sites} sites (one process, one core):")
    print(
        f"  encrypt per site {statistics.fmean(encrypt_s):.2f} s, add (coordinator) {add_s:.2f} "
        f"s, decrypt per site {decrypt_s:.2f} s; {len(encrypted[0]) / 1e6:.1f} MB sent per site "
        f"({len(encrypted[0]) / (4 * floats):.1f}x float32), sum back {len(total) / 1e6:.1f} MB; "
        f"largest error of the sum {error:.2e} (of the mean: {error / weights.sum():.2e})",
        flush=True,
    )


def main() -> None:
    """Run the settings and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["simulation", "cost"], default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floats", type=int, default=5_600_000)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--variants", default="plain,secagg,he", help="comma-separated")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    args, overrides = parser.parse_known_args()
    if args.only in (None, "cost"):
        print_cost(args.floats, args.sites)
    if args.only == "cost":
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-he-"))
    work.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("FL_IMAGING_SHARED_DATA"):  # conf/data/hippocampus.yaml reads it
        print("FL_IMAGING_SHARED_DATA unset: the dataset is looked for in ../shared/data")
    common = [
        "experiment=hippocampus_iid",
        f"engine.rounds={args.rounds}",
        f"data.sites_dir={work / 'sites'}",
        f"site.state_dir={work / 'site-state'}",
        *overrides,
    ]
    runs = run_variants(common, work, args.variants.split(","))
    print()
    print_table(runs)
    print(f"files in {work}")


if __name__ == "__main__":
    main()
