"""Benchmark: how a simulation scales with the number of sites.

Runs ``fl-imaging experiment=quick`` (4 training cases of 24³ per site by default) with 10, 100
and 1,000 demo sites and prints, per size: wall time, the time spent checking the sites before
the engine starts, round 1 (Ray's start, imports, first decodes) and the later rounds, seconds
per site per later round, how many times the sites' volumes were decoded (``ready in`` lines of
the ClientApps in the run's main.log, less the cases read back from the run's shared decoded
folder: 1.0 = once per site for the whole run) and the peak memory of the whole process tree
(the run and every process it started: Ray's and its workers), as proportional set size,
so that pages shared between processes are counted once.

The demo data is written before any clock starts (``--workdir`` keeps it for the next time).

    python scripts/bench_scale.py                       # 10, 100, 1000 sites, 2 rounds
    python scripts/bench_scale.py --sites 10 100 --rounds 3 engine.num_cpus=2
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from _bench import fl_imaging_command

from fl_imaging.review.results import AGGREGATE_SITE, read_metrics

READY = re.compile(
    r"\[site (\S+)\] (\d+) training, (\d+) validation and (\d+) test cases from .* ready in "
    r"[\d.]+ s(?:, (\d+) decoded by another worker)?"
)
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process now running (from /proc)."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def tree_pss_bytes(root: int) -> int:
    """Proportional set size, in bytes, of process ``root`` and all its descendants: each
    process's private pages plus its share of the pages it shares (Linux smaps_rollup)."""
    tree, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo += tree.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        found = re.search(r"^Pss:\s+(\d+) kB", rollup, re.MULTILINE)
        total += int(found.group(1)) * 1024 if found else 0
    return total


class PeakMemory(threading.Thread):
    """Samples :func:`tree_pss_bytes` of a process every ``interval`` seconds until stopped;
    ``peak`` holds the largest sample (bytes)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, tree_pss_bytes(self.pid))


def _seconds_between(log: str, first: str, last: str) -> float:
    """Seconds between the lines of ``log`` (main.log) holding ``first`` and ``last``."""
    stamps = {}
    for line in log.splitlines():
        found = STAMP.match(line)
        for key in (first, last):
            if found and key in line and key not in stamps:
                stamps[key] = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
    if len(stamps) < 2:
        return float("nan")
    return (stamps[last] - stamps[first]).total_seconds()


def run_size(sites: int, rounds: int, work: Path, overrides: list[str]) -> dict[str, float]:
    """Run one simulation of ``sites`` demo sites for ``rounds`` rounds in ``work``; return its
    figures (seconds, bytes, decodes per site)."""
    common = [
        "experiment=quick",
        f"data.num_sites={sites}",
        f"engine.rounds={rounds}",
        f"data.root={work / f'demo-{sites}'}",
        *overrides,
    ]
    from fl_imaging.config.compose import check_overrides
    from fl_imaging.data.prepare import site_folders

    site_folders(check_overrides(common))  # the demo data, before the clock
    run_dir = work / f"run-{sites}"
    cmd = fl_imaging_command(common, run_dir)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    memory = PeakMemory(proc.pid)
    memory.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    memory.done.set()
    memory.join()
    output = out.decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output[-4000:]}")
    rows = read_metrics(run_dir / "metrics.csv")
    log = (run_dir / "main.log").read_text(errors="replace")  # every line, the sites' too
    per_round = {
        r.round: r.value for r in rows if r.metric == "round_seconds" and r.site == AGGREGATE_SITE
    }
    later = [v for rnd, v in per_round.items() if rnd > 1]
    # A load decodes its cases, except those another worker already decoded (data.cache's
    # shared folder): counted in cases, as a fraction of the site's cases.
    decoded = 0.0
    for _, train, val, test, reused in READY.findall(log):
        cases = int(train) + int(val) + int(test)
        decoded += (cases - int(reused or 0)) / cases
    return {
        "wall": wall,
        "checks": _seconds_between(log, "checking site 1/", "simulation engine"),
        "round1": per_round.get(1, float("nan")),
        "later": sum(later) / len(later) if later else float("nan"),
        "per_site": (sum(later) / len(later) / sites) if later else float("nan"),
        "decodes": decoded / sites,
        "peak_gb": memory.peak / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="fl-imaging overrides, after the defaults")
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"benchmark folder: {work}")
    header = (
        f"{'sites':>6}{'wall s':>9}{'checks s':>10}{'round 1 s':>11}{'later s':>9}"
        f"{'s/site':>8}{'decodes/site':>14}{'peak GB':>9}"
    )
    print(header, flush=True)
    for sites in args.sites:
        f = run_size(sites, args.rounds, work, args.overrides)
        print(
            f"{sites:>6}{f['wall']:>9.1f}{f['checks']:>10.1f}{f['round1']:>11.1f}"
            f"{f['later']:>9.1f}{f['per_site']:>8.3f}{f['decodes']:>14.2f}{f['peak_gb']:>9.2f}",
            flush=True,
        )
    print("\n(later s: mean of rounds 2+; s/site: later s / sites; peak: PSS of the process tree)")


if __name__ == "__main__":
    main()
