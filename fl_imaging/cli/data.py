"""The ``fl-imaging-data`` command: check a hospital's site folder before it joins, and see how
the sites of a run differ before training.

    fl-imaging-data inspect DIR [--task segmentation|classification] [--num-classes N]
                                [--spatial-dims 2|3] [--in-channels C] [--class-names A,B]
                                [--modalities T1,T2,...] [--images-only] [--json]
    fl-imaging-data stats [--out DIR] [--bins N] [--intensity-range LOW HIGH]
                          [--min-count N] [OVERRIDES ...]

DIR is a site folder (images/, labels/ or labels.csv, split.csv), a folder of images to predict
on (with --images-only: no labels needed), or a public dataset in its download layout (an MSD
task folder, a MedMNIST .npz or a folder of them, class folders), checked through the adapter
that reads it, with the task, classes and dimensionality taken from the dataset unless given. With
--modalities (the run's data.modalities), cases are read from images/MODALITY/CASE_ID.nii.gz
(or DICOM series folders), one folder per modality, and checked stacked as channels.

Prints one line per case (id, format, shape, spacing, orientation, dtype, intensity range, label
values), then a summary, every problem, each naming its file, and every note (what was skipped:
hidden files such as .DS_Store in a DICOM series folder). A site is checked with the rules
training applies (at least one training and one validation case). A folder or file that cannot
be read (permission denied, a file where a folder belongs) is named as a problem. Exits 0 when
the folder is ready, 1 when anything is wrong, 2 for a usage error.

``stats`` asks every site of the run that ``fl-imaging OVERRIDES`` would start (the same Hydra
overrides, e.g. ``experiment=quick``) for its data statistics, on the simulation engine through
the run's own Flower apps: intensity histograms per modality over shared bins, intensity means
and standard deviations, voxel spacing and volume size histograms, label volume per class or
class counts, missing values; each site releases only what its own policy allows
(``statistics.min_count`` of its site policy). Writes stats.csv, stats_withheld.csv, a PNG per
statistic and statistics.html into DIR (default runs/stats-DATE_TIME; a run folder there gets
the section in its report.html too) and prints DIR. Exits 0, or 2 for a problem to fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fl_imaging.config import TaskName
from fl_imaging.data.inspect import SiteReport, inspect_images, inspect_site
from fl_imaging.data.inspect_datasets import dataset_layout, inspect_dataset
from fl_imaging.data.sites import SiteDataError
from fl_imaging.data.user_paths import named_os_errors

__all__ = ["format_report", "main"]

#: What a site is checked against when the options are not given (the default task's values).
DEFAULT_TASK, DEFAULT_CLASSES, DEFAULT_DIMS, DEFAULT_CHANNELS = "segmentation", 2, 3, 1


def format_report(report: SiteReport) -> str:
    """Return the human-readable report: a table of cases, a summary and the problems."""
    header = ["case", "format", "shape", "spacing (mm)", "orient", "dtype", "range", "labels"]
    rows = [header]
    for case in report.cases:
        shape = "x".join(map(str, case.shape)) or "?"
        if case.channels > 1:
            shape += f" ({case.channels} ch)"
        rows.append(
            [
                case.case_id,
                case.format,
                shape,
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
    what = (
        "images only (no labels)"
        if report.images_only
        else f"dataset {report.dataset}"
        if report.dataset
        else f"task {report.task}"
    )
    kind = "folder" if report.images_only else "dataset" if report.dataset else "site"
    lines.append("")
    lines.append(
        f"{kind} {report.site} ({report.root}): {len(report.cases)} case(s), {what}, "
        f"formats {', '.join(formats) or '-'}; {len(problems)} problem(s)"
    )
    lines += [f"  PROBLEM {p}" for p in problems]
    lines += [f"  NOTE {n}" for n in report.all_notes]
    ready = (
        "ready to predict on"
        if report.images_only
        else "ready to train on"
        if report.dataset
        else "ready to join"
    )
    lines.append(ready if report.ok else "NOT ready: fix the problems above")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-imaging-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="decode and check every case of a site folder")
    inspect.add_argument(
        "folder", type=Path, help="site folder, folder of images, or public dataset folder"
    )
    inspect.add_argument(
        "--task",
        choices=["segmentation", "classification"],
        default=None,
        help=f"default {DEFAULT_TASK} (a public dataset: its own)",
    )
    inspect.add_argument(
        "--num-classes",
        type=_at_least(2),
        default=None,
        help=f"label values must lie in 0..N-1 (default {DEFAULT_CLASSES}; a dataset: its own)",
    )
    inspect.add_argument(
        "--spatial-dims",
        type=int,
        choices=[2, 3],
        default=None,
        help=f"the task's task.spatial_dims (default {DEFAULT_DIMS}; a dataset: its own)",
    )
    inspect.add_argument(
        "--in-channels",
        type=_at_least(1),
        default=None,
        help=f"the task's task.in_channels (default {DEFAULT_CHANNELS})",
    )
    inspect.add_argument(
        "--class-names",
        default="",
        help="classification with class sub-folders: the class names in index order, "
        "comma-separated (default: the folder names, sorted)",
    )
    inspect.add_argument(
        "--modalities",
        default="",
        help="multi-modal cases: the modality folders of images/ in channel order, "
        "comma-separated, as data.modalities (e.g. t1,t1c,t2,flair; default: one file per "
        "case); --in-channels defaults to their number",
    )
    inspect.add_argument(
        "--images-only",
        action="store_true",
        help="check the images of a folder without labels (a folder to predict on)",
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    stats = sub.add_parser(
        "stats",
        help="federated statistics of the sites of a run, before training",
        description="Every site of the run fl-imaging OVERRIDES would start computes its data "
        "statistics and releases what its own site policy allows (statistics.min_count).",
    )
    stats.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/stats-DATE_TIME; a run folder: its report.html gets "
        "the statistics section)",
    )
    stats.add_argument(
        "--bins", type=_at_least(1), default=20, help="intensity histogram bins (default 20)"
    )
    stats.add_argument(
        "--intensity-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=(0.0, 1000.0),
        help="stored intensities binned from LOW to HIGH; the first and last bins are open "
        "(default 0 1000; CT: -1024 3072)",
    )
    stats.add_argument(
        "--min-count",
        type=_at_least(1),
        default=1,
        help="the smallest count asked for behind a released number; each site applies at "
        "least its own statistics.min_count (default 1: the sites' own)",
    )
    stats.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDES",
        help="fl-imaging's Hydra overrides: the run whose sites are asked (e.g. experiment=quick)",
    )
    return parser


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low`` (argparse names the option if not)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value

    parse.__name__ = "integer"  # argparse's "invalid integer value" for a non-number
    return parse


def _stats(args: argparse.Namespace) -> int:
    """``fl-imaging-data stats``: ask the run's sites, write the files, print the folder."""
    from dataclasses import replace

    from fl_imaging.config.compose import check_overrides
    from fl_imaging.run import USER_ERRORS
    from fl_imaging.statistics.request import StatsRequest, StatsRequestError, even_edges

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("fl_imaging").setLevel(logging.INFO)
    out = args.out or Path("runs") / time.strftime("stats-%Y-%m-%d_%H-%M-%S")
    try:
        request = StatsRequest(
            intensity_edges=tuple(even_edges(*args.intensity_range, args.bins)),
            min_count=args.min_count,
        )
        cfg = replace(check_overrides(list(args.overrides)), run_dir=str(out))
        from fl_imaging.statistics.federation import run_statistics

        collected = run_statistics(cfg, request)
    except (StatsRequestError, *USER_ERRORS) as err:
        print(f"fl-imaging-data stats: error: {err}", file=sys.stderr)
        return 2
    from fl_imaging.statistics.files import write_statistics

    try:
        written = write_statistics(out, request, collected)
        if (out / "report.html").is_file():  # a run folder: its report gets the section
            from fl_imaging.review.report_page import write_report

            written.append(write_report(out))
    except OSError as err:
        print(f"fl-imaging-data stats: error: cannot write into {out}: {err}", file=sys.stderr)
        return 2
    for site, why in collected.failures:
        print(f"site {site}: no statistics: {why}", file=sys.stderr)
    for site, released in sorted(collected.releases.items()):
        print(
            f"site {site}: {len(released.values)} statistic(s) released, "
            f"{len(released.withheld)} withheld (min_count {released.min_count})"
        )
    print(f"statistics in {out}: {', '.join(p.name for p in written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fl-imaging-data``; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "stats":
        return _stats(args)
    names = [n.strip() for n in args.class_names.split(",") if n.strip()] or None
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    dims = DEFAULT_DIMS if args.spatial_dims is None else args.spatial_dims
    default_channels = len(modalities) or DEFAULT_CHANNELS
    channels = default_channels if args.in_channels is None else args.in_channels
    task = TaskName(args.task or DEFAULT_TASK)
    try:
        with named_os_errors():
            report = _report(args, task, names, modalities, dims, channels)
    except SiteDataError as err:  # a path that could not be read outside the site's checks
        print(f"fl-imaging-data: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


def _report(
    args: argparse.Namespace,
    task: TaskName,
    names: list[str] | None,
    modalities: list[str],
    dims: int,
    channels: int,
) -> SiteReport:
    """The report ``inspect`` prints for the parsed ``args``: a folder of images, a public
    dataset in its own layout, or a site folder."""
    if args.images_only:
        return inspect_images(
            args.folder, spatial_dims=dims, in_channels=channels, task=task, modalities=modalities
        )
    if dataset_layout(args.folder) is not None and not modalities:
        return inspect_dataset(
            args.folder,
            task=TaskName(args.task) if args.task else None,
            num_classes=args.num_classes,
            spatial_dims=args.spatial_dims,
            in_channels=args.in_channels,
            class_names=names,
        )
    return inspect_site(
        args.folder,
        task,
        num_classes=DEFAULT_CLASSES if args.num_classes is None else args.num_classes,
        class_names=names,
        spatial_dims=dims,
        in_channels=channels,
        modalities=modalities,
    )


def entry() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
