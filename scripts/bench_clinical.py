"""Benchmark: a federation at clinical size, and where its rounds go.

A synthetic multi-modal 3D segmentation task (the demo data at 128^3 voxels, 4 MR contrasts
stacked as channels: ``data.modalities=[t1,t1c,t2,flair]``), MONAI's SegResNet with the BraTS
layout (``blocks_down=[1,2,2,5]``, 16 initial filters: 5.6M parameters at 4 channels), 3 sites
on Flower's simulation engine, training at the same time (Ray gets 3 x ``--cpus-per-site``
CPUs, each site's worker ``--cpus-per-site`` of them, or a share of a GPU). Three runs
with the same data, seed and overrides: plain, ``strategy.compression=int8`` and
``strategy.secagg.enabled=true``.

Per run, from its metrics.csv (the mean of rounds 2.. when there are several: round 1 carries
the sites' start-up): seconds per round split into training (the slowest site's
``fit_seconds``: the round waits for it), evaluation (the slowest ``evaluate_seconds``:
sliding-window inference on the validation cases), aggregation (the coordinator's
``aggregation_seconds``: decoding, update checks, unmasking and the mean) and messaging
(everything else: the weights' way out and back, loading them at the sites, Flower and Ray);
the federation's overhead (aggregation + messaging) as a share of the round; each site's peak
RSS (``peak_rss_bytes``; a Ray worker's, see docs/reference/run-folder.md); bytes each site sent
and received per round (``bytes_up``, ``bytes_down_*``, ``bytes_secagg``); the final validation
Dice (mean over sites). Then the ratios of int8 and secure aggregation against plain. Targets:
overhead at most 5 % of a round; secure aggregation at most 1.2x plain's seconds per round.

    python scripts/bench_clinical.py                            # 128^3, 4 channels, 3 rounds
    python scripts/bench_clinical.py --gpus-per-site 0.33       # the 3 sites share one GPU
    python scripts/bench_clinical.py --channels 1 --shape 32 --filters 8 --rounds 1 \\
        --csv /tmp/clinical.csv                                 # a quick check of the script
    python scripts/bench_clinical.py task.local_epochs=2        # any fl-imaging override

The table is written to ``docs/results/clinical_size.csv`` (``--csv``), one row per run with the
command, commit and machine; ``python scripts/results_tables.py`` draws it on
docs/results/clinical-size.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _bench import fl_imaging_command, mean_per_round, run_timed

from fl_imaging.review.results import AGGREGATE_SITE, MetricRow, read_metrics

ROOT = Path(__file__).resolve().parent.parent
#: Where the table goes by default (drawn on docs/results/clinical-size.md).
CSV_PATH = ROOT / "docs" / "results" / "clinical_size.csv"
#: The demo's contrasts, one per channel (``data.modalities``), in channel order.
MODALITIES = ("t1", "t1c", "t2", "flair")
#: The three runs: their name and the overrides that make them.
MODES = {
    "plain": [],
    "int8": ["strategy.compression=int8"],
    "secagg": ["strategy.secagg.enabled=true"],
}
#: What a site sends and receives in a round, per metrics.csv.
TRAFFIC = ("bytes_up", "bytes_down_train", "bytes_down_evaluate", "bytes_secagg")
#: The targets of issue 27: overhead share of a round, secure / plain seconds per round.
MAX_OVERHEAD, MAX_SECAGG_RATIO = 0.05, 1.2
#: The CSV's columns; ``X ratio`` is shown as ``value (ratio)`` by scripts/results_tables.py.
COLUMNS = (
    "run",
    "seconds per round",
    "seconds per round ratio",
    "training (s)",
    "evaluation (s)",
    "aggregation (s)",
    "messaging (s)",
    "overhead share",
    "peak RSS per site (GiB)",
    "MB per site per round",
    "MB per site per round ratio",
    "final Dice",
    "command",
    "commit",
    "machine",
    "notes",
)


@dataclass(frozen=True)
class Split:
    """One run's mean round, in seconds: the whole round and its four parts (the parts add up
    to the round), over ``rounds`` (the round numbers averaged)."""

    rounds: list[int]
    round_s: float
    training_s: float
    evaluation_s: float
    aggregation_s: float

    @property
    def messaging_s(self) -> float:
        """Everything of the round but training, evaluation and aggregation."""
        return self.round_s - self.training_s - self.evaluation_s - self.aggregation_s

    @property
    def overhead_share(self) -> float:
        """Aggregation and messaging as a share of the round (0..1)."""
        return (self.aggregation_s + self.messaging_s) / self.round_s


@dataclass(frozen=True)
class Run:
    """One finished run: its mode, its mean round, each site's peak RSS (bytes), the bytes each
    site sent and received per round (mean over sites and rounds), the final validation Dice."""

    mode: str
    split: Split
    peak_rss: dict[str, float]
    bytes_per_site_round: float
    dice: float


def _per_round(rows: list[MetricRow], metric: str, site: str | None = None) -> dict[int, float]:
    """Round -> the largest value of ``metric`` among the sites (or at ``site`` only)."""
    out: dict[int, float] = {}
    for r in rows:
        if r.metric == metric and (site is None or r.site == site):
            out[r.round] = max(out.get(r.round, -math.inf), r.value)
    return out


def round_split(rows: list[MetricRow]) -> Split:
    """The mean round of a run's metrics.csv ``rows``: rounds 2.. when there are several (round
    1 carries the sites' start-up: their data decoded and cached, their model built), else
    round 1. Training and evaluation are the slowest site's ``fit_seconds`` and
    ``evaluate_seconds`` of each round (the sites run at the same time, and the round waits
    for the last). Raises SystemExit naming the metric when a run lacks one."""
    round_s = _per_round(rows, "round_seconds", AGGREGATE_SITE)
    parts = {
        name: _per_round(rows, metric, AGGREGATE_SITE if name == "aggregation" else None)
        for name, metric in (
            ("training", "fit_seconds"),
            ("evaluation", "evaluate_seconds"),
            ("aggregation", "aggregation_seconds"),
        )
    }
    rounds = sorted(round_s)
    rounds = rounds[1:] or rounds
    for name, values in {"round": round_s, **parts}.items():
        if not rounds or any(rnd not in values for rnd in rounds):
            sys.exit(f"metrics.csv has no {name} seconds for rounds {rounds}")

    def mean(values: dict[int, float]) -> float:
        return statistics.fmean(values[rnd] for rnd in rounds)

    return Split(
        rounds,
        mean(round_s),
        mean(parts["training"]),
        mean(parts["evaluation"]),
        mean(parts["aggregation"]),
    )


def measure(mode: str, run_dir: Path) -> Run:
    """Read a finished run's figures from ``run_dir/metrics.csv``."""
    rows = read_metrics(run_dir / "metrics.csv")
    peaks: dict[str, float] = {}
    for r in rows:
        if r.metric == "peak_rss_bytes" and r.site != AGGREGATE_SITE:
            peaks[r.site] = max(peaks.get(r.site, 0.0), r.value)
    traffic = [r for r in rows if r.metric in TRAFFIC and r.site != AGGREGATE_SITE]
    pairs = {(r.round, r.site) for r in traffic}
    dice = mean_per_round(rows, "dice")
    return Run(
        mode,
        round_split(rows),
        dict(sorted(peaks.items())),
        math.fsum(r.value for r in traffic) / max(len(pairs), 1),
        dice[max(dice)] if dice else math.nan,
    )


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def _ratio(value: float, plain: float) -> str:
    return f"{value / plain:.2f}x"


def print_table(runs: list[Run]) -> None:
    """Each run's mean round split into its parts, peak memory and bytes, with the ratios
    against the plain run side by side; then the targets."""
    plain = next((r for r in runs if r.mode == "plain"), runs[0])
    print(
        f"{'run':8}{'s/round':>9}{'vs plain':>9}{'train s':>9}{'eval s':>8}{'aggr s':>8}"
        f"{'msg s':>8}{'overhead':>10}{'MB/site/round':>15}{'vs plain':>9}{'final Dice':>11}"
        "  peak RSS per site (GiB)"
    )
    for r in runs:
        s = r.split
        print(
            f"{r.mode:8}{s.round_s:>9.2f}{_ratio(s.round_s, plain.split.round_s):>9}"
            f"{s.training_s:>9.2f}{s.evaluation_s:>8.2f}{s.aggregation_s:>8.3f}"
            f"{s.messaging_s:>8.2f}{s.overhead_share:>10.1%}"
            f"{r.bytes_per_site_round / 1e6:>15.2f}"
            f"{_ratio(r.bytes_per_site_round, plain.bytes_per_site_round):>9}{r.dice:>11.4f}  "
            + ", ".join(f"{site} {_gib(v)}" for site, v in r.peak_rss.items())
        )
    rounds = plain.split.rounds
    print(f"(mean of round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))})")
    for r in runs:
        met = "met" if r.split.overhead_share <= MAX_OVERHEAD else "MISSED"
        print(
            f"target: {r.mode} overhead {r.split.overhead_share:.1%} of a round "
            f"(at most {MAX_OVERHEAD:.0%}): {met}"
        )
    for r in runs:
        if r.mode == "secagg":
            ratio = r.split.round_s / plain.split.round_s
            met = "met" if ratio <= MAX_SECAGG_RATIO else "MISSED"
            limit = f"at most {MAX_SECAGG_RATIO}x"
            print(f"target: secure aggregation {ratio:.2f}x plain ({limit}): {met}")


def commit() -> str:
    """The repository's short commit, ``-dirty`` appended when tracked files have changes."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine(gpus_per_site: float) -> str:
    """This machine in words: CPU cores and model, and the GPU the sites use (or none)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    if gpus_per_site > 0:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.get_device_name(0)}, {gpus_per_site} of it per site"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}"


def write_csv(path: Path, runs: list[Run], command: str, where: str, notes: str) -> None:
    """Write ``runs`` to ``path`` as :data:`COLUMNS` (the file whole, replacing any before)."""
    plain = next((r for r in runs if r.mode == "plain"), runs[0])
    at = commit()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in runs:
            s = r.split
            writer.writerow(
                [
                    r.mode,
                    f"{s.round_s:.2f}",
                    "-" if r is plain else _ratio(s.round_s, plain.split.round_s),
                    f"{s.training_s:.2f}",
                    f"{s.evaluation_s:.2f}",
                    f"{s.aggregation_s:.3f}",
                    f"{s.messaging_s:.2f}",
                    f"{s.overhead_share:.1%}",
                    " / ".join(_gib(v) for v in r.peak_rss.values()),
                    f"{r.bytes_per_site_round / 1e6:.2f}",
                    "-"
                    if r is plain
                    else _ratio(r.bytes_per_site_round, plain.bytes_per_site_round),
                    f"{r.dice:.4f}",
                    command,
                    at,
                    where,
                    notes,
                ]
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="fl-imaging overrides, after the defaults")
    parser.add_argument("--shape", type=int, default=128, help="voxels per side (default 128)")
    parser.add_argument(
        "--channels",
        type=int,
        choices=(1, 4),
        default=4,
        help="4: the demo's t1, t1c, t2 and flair stacked (data.modalities); 1: one image",
    )
    parser.add_argument(
        "--roi",
        type=int,
        default=None,
        help="training crop and window side (default: 3/4 of --shape, a multiple of 8: 96 at 128)",
    )
    parser.add_argument("--filters", type=int, default=16, help="SegResNet's init_filters")
    parser.add_argument("--blocks-down", default="1,2,2,5", help="SegResNet's blocks_down")
    parser.add_argument("--cases", type=int, default=8, help="cases per site (default 8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cpus-per-site",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 3),
        help="CPUs (and torch threads) per site; Ray gets 3 times this (default: cores / 3)",
    )
    parser.add_argument(
        "--gpus-per-site", type=float, default=0.0, help="GPUs per site (0.33: three share one)"
    )
    parser.add_argument("--only", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and runs here")
    parser.add_argument("--csv", type=Path, default=CSV_PATH, help=f"default {CSV_PATH}")
    parser.add_argument("--machine", default=None, help="the machine, in words, for the CSV")
    return parser


def overrides_of(args: argparse.Namespace, work: Path) -> tuple[list[str], list[str]]:
    """The task's overrides (the network, crop, training) and the rest (data, engine), as
    ``args`` ask; the user's own overrides come last, in the rest."""
    roi = args.roi or max(8, (args.shape * 3 // 4) // 8 * 8)
    blocks = [int(b) for b in args.blocks_down.split(",")]
    task = [
        "task.model._target_=monai.networks.nets.SegResNet",
        f"+task.model.args.init_filters={args.filters}",
        f"+task.model.args.blocks_down=[{','.join(map(str, blocks))}]",
        f"+task.model.args.blocks_up=[{','.join(['1'] * (len(blocks) - 1))}]",
        f"task.in_channels={args.channels}",
        f"task.roi_size=[{roi},{roi},{roi}]",
        "task.batch_size=1",
        "task.local_epochs=1",
    ]
    data = [
        "data.num_sites=3",
        f"data.cases_per_site={args.cases}",
        f"data.shape=[{args.shape},{args.shape},{args.shape}]",
        "data.dicom_sites=[]",
        f"data.root={work / 'demo'}",
        f"data.sites_dir={work / 'sites'}",
        f"engine.rounds={args.rounds}",
        f"engine.cpus_per_client={args.cpus_per_site}",
        f"engine.num_cpus={3 * args.cpus_per_site}",
        f"engine.torch_threads={args.cpus_per_site}",
        f"engine.gpus_per_client={args.gpus_per_site}",
    ]
    if args.channels > 1:
        data.insert(0, f"data.modalities=[{','.join(MODALITIES)}]")
    return task, [*data, *args.overrides]


def parameter_count(task_overrides: list[str]) -> int:
    """Parameters of the network that ``task_overrides`` (and the data shape) build: the one
    the sites train."""
    from fl_imaging.config.compose import check_overrides
    from tasks import build_task

    cfg = check_overrides(task_overrides)
    return sum(p.numel() for p in build_task(cfg.task).build_model().parameters())


def main(argv: list[str] | None = None) -> None:
    """Run the three runs and print and write the table."""
    args = _parser().parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-clinical-"))
    work.mkdir(parents=True, exist_ok=True)
    task, rest = overrides_of(args, work)
    params = parameter_count([*task, f"data.shape=[{args.shape},{args.shape},{args.shape}]"])
    print(f"benchmark folder: {work}")
    print(f"network: SegResNet, {params:,} parameters ({params / 1e6:.2f}M; target >= 5M)")
    overrides = [*task, *rest]
    print(f"overrides: {shlex.join(overrides)}", flush=True)

    from fl_imaging.config.compose import check_overrides
    from fl_imaging.data.prepare import prepare_sites

    prepare_sites(check_overrides(overrides))  # the demo data, written before any clock starts
    runs: list[Run] = []
    for mode in args.only:
        run_dir = work / mode
        step = run_timed(fl_imaging_command([*overrides, *MODES[mode]], run_dir), cwd=work)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "output.log").write_text(step.output)
        if step.returncode != 0:
            sys.exit(step.failure())
        runs.append(measure(mode, run_dir))
        print(f"{mode}: {step.seconds:.1f} s", flush=True)
    print()
    print_table(runs)
    typed = shlex.join(sys.argv[1:] if argv is None else argv)
    command = f"python scripts/bench_clinical.py {typed}".strip()
    where = args.machine or machine(args.gpus_per_site)
    notes = (
        f"{args.shape}^3 voxels, {args.channels} channel{'s' if args.channels > 1 else ''}, "
        f"SegResNet {params / 1e6:.2f}M "
        f"parameters, 3 sites x {args.cases} cases, batch 1, 1 local epoch; mean of rounds "
        f"{', '.join(map(str, runs[0].split.rounds))} of {args.rounds}"
    )
    write_csv(args.csv, runs, command, where, notes)
    print(f"table: {args.csv}\nfiles in {work}")


if __name__ == "__main__":
    main()
