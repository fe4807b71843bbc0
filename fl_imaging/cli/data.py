"""The ``fl-imaging-data`` command: check a hospital's site folder before it joins.

    fl-imaging-data inspect DIR [--task segmentation|classification] [--num-classes N] [--json]

Prints one line per case (id, format, shape, spacing, orientation, dtype, intensity range, label
values), then a summary and every problem, each naming its file. Exits 0 when the folder is
ready, 1 when anything is wrong, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fl_imaging.config import TaskName
from fl_imaging.data.inspect import SiteReport, inspect_site

__all__ = ["format_report", "main"]


def format_report(report: SiteReport) -> str:
    """Return the human-readable report: a table of cases, a summary and the problems."""
    header = ["case", "format", "shape", "spacing (mm)", "orient", "dtype", "range", "labels"]
    rows = [header]
    for case in report.cases:
        rows.append(
            [
                case.case_id,
                case.format,
                "x".join(map(str, case.shape)) or "?",
                "x".join(f"{s:g}" for s in case.spacing) or "?",
                case.orientation or "?",
                case.dtype or "?",
                f"{case.min:.4g}..{case.max:.4g}" if case.shape else "?",
                ",".join(map(str, case.label_values)) or "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    formats = sorted({c.format for c in report.cases})
    problems = report.all_problems
    lines.append("")
    lines.append(
        f"site {report.site} ({report.root}): {len(report.cases)} case(s), task {report.task}, "
        f"formats {', '.join(formats) or '-'}; {len(problems)} problem(s)"
    )
    lines += [f"  PROBLEM {p}" for p in problems]
    lines.append("ready to join" if report.ok else "NOT ready: fix the problems above")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fl-imaging-data``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="fl-imaging-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="decode and check every case of a site folder")
    inspect.add_argument("folder", type=Path, help="the site folder (images/, labels/ ...)")
    inspect.add_argument(
        "--task", choices=["segmentation", "classification"], default="segmentation"
    )
    inspect.add_argument(
        "--num-classes", type=int, default=2, help="label values must lie in 0..N-1 (default 2)"
    )
    inspect.add_argument(
        "--class-names",
        default="",
        help="classification with class sub-folders: the class names in index order, "
        "comma-separated (default: the folder names, sorted)",
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.class_names.split(",") if n.strip()] or None
    report = inspect_site(
        args.folder, TaskName(args.task), num_classes=args.num_classes, class_names=names
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


def entry() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
