"""Download MedMNIST v2 / MedMNIST+ ``.npz`` files and lay them out for fl-imaging.

Fetches ``{flag}.npz`` (28 px) or ``{flag}_{size}.npz`` from Zenodo record 10519652, checks
its MD5 against the published one, and checks the arrays inside (train/val/test images and
labels)::

    OUT/adrenalmnist3d.npz, OUT/adrenalmnist3d_64.npz, ...

    python scripts/download_medmnist.py --out data/medmnist --flag adrenalmnist3d --size 28 64
    python scripts/download_medmnist.py --check data/medmnist --flag adrenalmnist3d --size 64
    python scripts/download_medmnist.py --list                 # flags and sizes with known MD5

A flag or size whose MD5 is not listed here is downloaded only with ``--md5 VALUE`` (from the
Zenodo record page). Exit status 0 when every file is right, 1 otherwise. MedMNIST is
CC BY 4.0, except DermaMNIST (CC BY-NC 4.0): see https://medmnist.com/.
"""

from __future__ import annotations

import argparse
import sys

from fl_imaging.data.datasets.medmnist_download import (
    MEDMNIST_MD5,
    fetch_medmnist,
    medmnist_layout_problems,
    medmnist_summary,
)
from fl_imaging.data.fetch import report_layout, require_out_or_check, script_main, script_parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of this script."""
    parser = script_parser(
        "download_medmnist.py",
        "Download MedMNIST .npz files (checked by MD5) into OUT/, or check them.",
        out_help="folder to put the .npz files in",
        check_help="only check the files in DIR and say what they hold",
    )
    parser.add_argument(
        "--flag",
        help="dataset flag, e.g. adrenalmnist3d, organmnist3d, pathmnist (see --list)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[28],
        choices=[28, 64, 128, 224],
        help="image size(s): 28 (default), 64; 128 and 224 for 2D flags only",
    )
    parser.add_argument(
        "--md5", help="expected MD5 of the file (needed for a flag/size not listed by --list)"
    )
    parser.add_argument(
        "--list", action="store_true", help="list the flags and sizes with a known MD5"
    )
    return parser


@script_main
def main(argv: list[str] | None = None) -> int:
    """Run the script with ``argv`` (default: the command line); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for flag, sizes in MEDMNIST_MD5.items():
            print(f"{flag:16s} {', '.join(map(str, sorted(sizes)))}")
        return 0
    if not args.flag:
        parser.error("give --flag (see --list)")
    require_out_or_check(parser, args)
    if args.md5 and len(args.size) > 1:
        parser.error("--md5 belongs to one file: give a single --size with it")
    root = args.check if args.check is not None else args.out
    if args.check is None:
        for size in args.size:
            fetch_medmnist(args.flag, size, args.out, md5=args.md5, quiet=args.quiet)
    status = 0
    for size in args.size:
        summary = medmnist_summary(root, args.flag, size)
        problems = medmnist_layout_problems(root, args.flag, size)
        status = max(status, report_layout(summary, problems, root))
    return status


if __name__ == "__main__":
    sys.exit(main())
