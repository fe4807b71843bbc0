"""Download a Medical Segmentation Decathlon (MSD) task and lay it out for fl-imaging.

Fetches the task tar from MONAI's AWS mirror, checks its MD5 (MONAI's published value),
unpacks it, deletes the macOS ``._*`` files the official tars carry, and checks the layout::

    OUT/Task04_Hippocampus/dataset.json, imagesTr/*.nii.gz, labelsTr/*.nii.gz

    python scripts/download_msd.py --out data/msd                       # Task04_Hippocampus
    python scripts/download_msd.py --out data/msd --task Task09_Spleen
    python scripts/download_msd.py --check data/msd/Task04_Hippocampus  # check only

Exit status 0 when the layout is right, 1 otherwise. The data are CC-BY-SA 4.0
(http://medicaldecathlon.com/).
"""

from __future__ import annotations

import argparse
import sys

from fl_imaging.data.datasets.msd_download import (
    MSD_MD5,
    fetch_msd_task,
    msd_layout_problems,
    msd_summary,
)
from fl_imaging.data.fetch import report_layout, require_out_or_check, script_main, script_parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of this script."""
    parser = script_parser(
        "download_msd.py",
        "Download an MSD task (checked by MD5) into OUT/<task>/, or check one.",
        out_help="folder to put the task folder in",
        check_help="only check an existing task folder (or the folder holding it) and say what "
        "it has",
    )
    parser.add_argument(
        "--task",
        choices=list(MSD_MD5),
        default="Task04_Hippocampus",
        help="which task (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-archive", action="store_true", help="keep the downloaded .tar after unpacking"
    )
    return parser


@script_main
def main(argv: list[str] | None = None) -> int:
    """Run the script with ``argv`` (default: the command line); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    require_out_or_check(parser, args, " a task folder")
    if args.check is not None:
        root = args.check
        if not (root / "dataset.json").exists() and (root / args.task).is_dir():
            root = root / args.task
    else:
        fetched = fetch_msd_task(
            args.task, args.out, keep_archive=args.keep_archive, quiet=args.quiet
        )
        root = fetched.path
        if fetched.downloaded:
            print(f"removed {fetched.junk_removed} macOS '._' junk file(s) after extraction")
    return report_layout(msd_summary(root), msd_layout_problems(root), root)


if __name__ == "__main__":
    sys.exit(main())
