"""Benchmark: how much of FedAvg's accuracy each robust strategy keeps under simulated attacks.

On MSD Task04 Hippocampus split into 8 simulated sites (``experiment=hippocampus
data.num_sites=8``, split seed 0), runs every strategy under every attack with 25 % malicious
sites (``attack.fraction=0.25``: the last 2 of 8), and FedAvg once without attack, the baseline.
Each cell is one ``fl-imaging`` run in its own folder ``WORK/<strategy>-<attack>/``; a cell whose
``metrics.csv`` exists is reused, so an interrupted benchmark goes on where it stopped.

The figure is the final round's validation Dice averaged (unweighted) over the honest sites only;
the clean baseline is averaged over the same sites. The malicious sites' own validation Dice is
left out of the tables and written to ``robustness.csv`` (column ``malicious_final``). Tables:
final Dice with its ratio to the clean FedAvg figure, and the best round's Dice; both go to
``WORK/robustness.md`` (with command line, git commit and machine) and, one row per cell, to
``WORK/robustness.csv``.

    python scripts/bench_robustness.py                       # 9 strategies x 5 attacks + 1 runs
    python scripts/bench_robustness.py --strategies fedavg,krum --attacks signflip --rounds 1 \\
        --max-cases 40 -- task.model.channels=[4,8,16]     # smoke test, any fl-imaging override
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _bench import fl_imaging_command, main_metric, mean_per_round, run_timed

from fl_imaging.review.results import AGGREGATE_SITE, read_metrics
from fl_imaging.run import USER_ERRORS, check_overrides
from fl_imaging.training.attacks import malicious_sites

STRATEGIES = (
    "fedavg",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "geomedian",
    "centeredclip",
    "normbound",
)
ATTACKS = ("signflip", "scale", "noise", "labelflip", "collusion")
CLEAN = "none"
BASELINE = ("fedavg", CLEAN)
#: The federation every cell shares: data, split, seed and share of malicious sites.
BASE = [
    "experiment=hippocampus",
    "data.num_sites=8",
    "data.partition.seed=0",
    "seed=0",
    "attack.fraction=0.25",
]
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Outcome:
    """One cell's result: figures over the honest sites (NaN when the run failed)."""

    strategy: str
    attack: str
    status: str  # ran | reused | failed
    seconds: float | None
    final: float
    best: float
    best_round: int
    malicious_final: float
    rounds: int


def strategy_overrides(strategy: str, num_sites: int, num_malicious: int) -> list[str]:
    """Parameters that tell a rule how many sites are malicious, where the rule allows it."""
    f = num_malicious
    if strategy == "krum":
        return [f"strategy.params.num_malicious_nodes={f}"]
    if strategy == "multikrum":
        return [
            f"strategy.params.num_malicious_nodes={f}",
            f"strategy.params.num_nodes_to_select={num_sites - f}",
        ]
    if strategy == "bulyan":
        return [f"strategy.params.num_malicious_nodes={max(1, min(f, (num_sites - 3) // 4))}"]
    if strategy == "fedtrimmedavg" and f / num_sites < 0.5:
        return [f"strategy.params.beta={f / num_sites}"]
    return []


def strategy_notes(num_sites: int, num_malicious: int) -> list[str]:
    """What :func:`strategy_overrides` sets, in words, for the report."""
    f, n = num_malicious, num_sites
    bulyan_f = max(1, min(f, (n - 3) // 4))
    bulyan = (
        f"bulyan: num_malicious_nodes={bulyan_f}"
        if bulyan_f == f
        else f"bulyan: needs 4f+3 sites per round, so with {n} sites only f={bulyan_f} fits: "
        f"num_malicious_nodes={bulyan_f} although {f} sites are malicious"
    )
    return [
        f"krum: num_malicious_nodes={f}; multikrum: num_malicious_nodes={f}, "
        f"num_nodes_to_select={n - f} (n - f)",
        bulyan,
        f"fedtrimmedavg: beta={f / n:g} (drops the {f} lowest and {f} highest of the {n} values "
        "of each weight)"
        if f / n < 0.5
        else "fedtrimmedavg: beta 0.2 (its default)",
        "fedmedian, geomedian, centeredclip, normbound: their conf/strategy/*.yaml settings",
    ]


def read_outcome(
    run_dir: Path, strategy: str, attack: str, honest_if_clean: set[str], status: str
) -> Outcome:
    """Read a finished cell: per-round mean validation metric over its honest sites (those that
    did not report ``malicious`` = 1; for a clean run, ``honest_if_clean``)."""
    rows = read_metrics(run_dir / "metrics.csv")
    metric = main_metric(rows)
    sites = {r.site for r in rows if r.metric == metric and r.site != AGGREGATE_SITE}
    bad = {r.site for r in rows if r.metric == "malicious" and r.value == 1} - {AGGREGATE_SITE}
    honest = sites - bad if attack != CLEAN else sites & honest_if_clean
    per_round = mean_per_round(rows, metric, honest)
    if not per_round:
        return failed(strategy, attack, None)
    last = max(per_round)
    finite = {rnd: v for rnd, v in per_round.items() if not math.isnan(v)}
    best_round = max(finite, key=finite.__getitem__) if finite else last
    malicious = mean_per_round(rows, metric, bad) if bad else {}
    seconds = None
    if (run_dir / "bench.json").is_file():
        seconds = json.loads((run_dir / "bench.json").read_text()).get("seconds")
    return Outcome(
        strategy,
        attack,
        status,
        seconds,
        per_round[last],
        per_round[best_round],
        best_round,
        malicious.get(last, math.nan),
        last,
    )


def stale_settings(run_dir: Path, overrides: list[str]) -> str:
    """Why a finished cell in ``run_dir`` cannot be reused for ``overrides`` (it was run with
    others, per its ``bench.json``), or an empty string."""
    record = run_dir / "bench.json"
    if not (run_dir / "metrics.csv").is_file() or not record.is_file():
        return ""
    before = json.loads(record.read_text()).get("overrides")
    if before == overrides:
        return ""
    return (
        f"{run_dir} was run with other settings ({' '.join(before or [])}); use another --work "
        "or delete that folder"
    )


def failed(strategy: str, attack: str, seconds: float | None) -> Outcome:
    """A cell whose run exited with an error or recorded no validation metric."""
    return Outcome(strategy, attack, "failed", seconds, math.nan, math.nan, 0, math.nan, 0)


def grids(
    outcomes: list[Outcome], strategies: list[str], attacks: list[str], baseline: float
) -> tuple[list[list[str]], list[list[str]]]:
    """Two tables (header row first), rows = strategies, columns = ``none`` and the attacks:
    final Dice with its ratio to ``baseline``, and the best round's Dice with that round."""
    by_cell = {(o.strategy, o.attack): o for o in outcomes}
    columns = [CLEAN, *[a for a in attacks if a != CLEAN]]
    final = [["strategy", *columns]]
    best = [["strategy", *columns]]
    for strategy in strategies:
        final.append([strategy])
        best.append([strategy])
        for attack in columns:
            o = by_cell.get((strategy, attack))
            if o is None:
                final[-1].append("-")
                best[-1].append("-")
            elif o.status == "failed":
                final[-1].append("failed")
                best[-1].append("failed")
            else:
                final[-1].append(f"{o.final:.3f} ({o.final / baseline:.2f})")
                best[-1].append(f"{o.best:.3f} r{o.best_round}")
    return final, best


def as_text(grid: list[list[str]]) -> str:
    """A plain-text table, columns right-aligned."""
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = []
    for row in grid:
        cells = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([row[0].ljust(widths[0]), *cells]))
    return "\n".join(lines)


def as_markdown(grid: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(row) + " |" for row in grid]
    lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(grid[0]) - 1)) + "|")
    return "\n".join(lines)


def git_commit() -> str:
    """Short commit of this checkout, ``+dirty`` when tracked files changed; ``unknown`` without
    git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_reports(
    work: Path, outcomes: list[Outcome], header: list[str], tables: list[tuple[str, str]]
) -> None:
    """Write ``robustness.csv`` (one row per cell) and ``robustness.md`` (header lines, then each
    titled Markdown table) into ``work``."""
    with (work / "robustness.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ("strategy", "attack", "status", "seconds", "rounds", "final", "ratio_to_clean")
            + ("best", "best_round", "malicious_final")
        )
        baseline = next((o.final for o in outcomes if (o.strategy, o.attack) == BASELINE), 0)
        for o in outcomes:
            ratio = o.final / baseline if baseline else math.nan
            writer.writerow(
                (o.strategy, o.attack, o.status, f"{o.seconds or math.nan:.1f}", o.rounds)
                + (f"{o.final:.4f}", f"{ratio:.3f}", f"{o.best:.4f}", o.best_round)
                + (f"{o.malicious_final:.4f}",)
            )
    body = "\n\n".join(f"## {title}\n\n{table}" for title, table in tables)
    (work / "robustness.md").write_text(
        "# Robustness benchmark\n\n" + "\n".join(f"- {line}" for line in header) + f"\n\n{body}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="fl-imaging overrides, after the benchmark's")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    parser.add_argument("--local-epochs", type=int, default=None, help="default: experiment's (2)")
    parser.add_argument("--max-cases", type=int, default=None, help="default: all 260 cases")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help="comma-separated; 'none' = clean runs for all"
    )
    parser.add_argument("--work", type=Path, default=Path("bench-runs/robustness"))
    args = parser.parse_intermixed_args()
    strategies = [s for s in args.strategies.split(",") if s]
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = [s for s in strategies if s not in STRATEGIES] + [
        a for a in attacks if a not in (*ATTACKS, CLEAN)
    ]
    if unknown:
        parser.error(f"unknown strategy or attack: {', '.join(unknown)}")

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [*BASE, f"engine.rounds={args.rounds}", f"data.sites_dir={work / 'data-sites'}"]
    if args.local_epochs is not None:
        common.append(f"task.local_epochs={args.local_epochs}")
    if args.max_cases is not None:
        common.append(f"data.max_cases={args.max_cases}")
    try:  # compose once: checks the overrides and tells which sites are malicious
        cfg = check_overrides([*common, f"attack={ATTACKS[0]}", *args.overrides])
    except USER_ERRORS as err:
        sys.exit(f"bench_robustness: error: {err}")
    num_sites = cfg.data.num_sites
    bad = malicious_sites(num_sites, cfg.attack)
    bad_names = sorted(f"site-{k + 1}" for k in bad)
    honest = {f"site-{k + 1}" for k in range(num_sites)} - set(bad_names)

    cells = [BASELINE] + [(s, a) for a in attacks for s in strategies if (s, a) != BASELINE]
    notes = [
        f"{num_sites} sites, {len(bad)} malicious ({', '.join(bad_names)}): the figures are "
        f"final-round validation Dice averaged over the {len(honest)} honest sites (clean run: "
        "the same sites); the malicious sites' own Dice is left out of the tables (robustness.csv, "
        "column malicious_final)",
        *strategy_notes(num_sites, len(bad)),
    ]
    print(f"benchmark folder: {work}\noverrides: {' '.join([*common, *args.overrides])}")
    print("\n".join(f"note: {n}" for n in notes))

    cell_overrides = {
        (strategy, attack): [
            *common,
            f"attack={attack}",
            f"strategy={strategy}",
            *strategy_overrides(strategy, num_sites, len(bad)),
            *args.overrides,
        ]
        for strategy, attack in cells
    }
    for (strategy, attack), overrides in cell_overrides.items():
        stale = stale_settings(work / f"{strategy}-{attack}", overrides)
        if stale:
            sys.exit(f"bench_robustness: error: {stale}")

    outcomes: list[Outcome] = []
    start = time.perf_counter()
    ran: list[float] = []
    for k, ((strategy, attack), overrides) in enumerate(cell_overrides.items(), 1):
        run_dir = work / f"{strategy}-{attack}"
        label = f"cell {k}/{len(cells)}  {strategy:<13} {attack:<9}"
        if (run_dir / "metrics.csv").is_file():
            outcomes.append(read_outcome(run_dir, strategy, attack, honest, "reused"))
            took = outcomes[-1].seconds
            took_text = f" (ran in {took:.0f} s)" if took is not None else ""
            print(f"{label}  reused{took_text}  final dice {outcomes[-1].final:.3f}", flush=True)
            continue
        print(f"{label}  running ...", end="", flush=True)
        step = run_timed(fl_imaging_command(overrides, run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "bench.log").write_text(step.output)
        ran.append(step.seconds)
        left = len(cells) - k
        eta = f", about {left * sum(ran) / len(ran) / 60:.0f} min left" if left else ""
        if step.returncode != 0 or not (run_dir / "metrics.csv").is_file():
            outcomes.append(failed(strategy, attack, step.seconds))
            print(f" FAILED after {step.seconds:.0f} s (exit {step.returncode}){eta}")
            print(step.failure(tail=1500))
            continue
        (run_dir / "bench.json").write_text(
            json.dumps({"seconds": round(step.seconds, 1), "overrides": overrides}, indent=1)
        )
        outcomes.append(read_outcome(run_dir, strategy, attack, honest, "ran"))
        print(f" {step.seconds:.0f} s  final dice {outcomes[-1].final:.3f}{eta}", flush=True)

    base = outcomes[0]
    if base.status == "failed" or not base.final:
        sys.exit("bench_robustness: the clean FedAvg baseline failed: no ratios to show")
    final, best = grids(outcomes, strategies, attacks, base.final)
    title_final = (
        f"final validation Dice, mean over the honest sites (ratio to clean FedAvg "
        f"{base.final:.3f}), round {base.rounds}"
    )
    title_best = "best round: its validation Dice (honest sites) and the round"
    print(f"\n{title_final}\n{as_text(final)}\n\n{title_best}\n{as_text(best)}")
    print("\n".join(f"note: {n}" for n in notes))
    total = time.perf_counter() - start
    header = [
        f"command: `{shlex.join(['python', *sys.argv])}`",
        f"overrides of every cell: `{' '.join(common)}` (+ attack, strategy, its parameters, "
        f"then `{' '.join(args.overrides)}`)",
        f"git commit: {git_commit()}",
        f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.machine()}, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"this invocation: {len(ran)} cells run, {len(cells) - len(ran)} reused, {total:.0f} s",
        *notes,
    ]
    write_reports(
        work, outcomes, header, [(title_final, as_markdown(final)), (title_best, as_markdown(best))]
    )
    print(f"\nwritten: {work / 'robustness.csv'}, {work / 'robustness.md'}")


if __name__ == "__main__":
    main()
