"""Download a MedNIST-style 2D classification set and lay it out for fl-imaging.

Fetches the archive, checks its MD5, unpacks it and moves its class folders up so that they sit
directly in OUT (macOS junk is deleted)::

    OUT/<ClassName>/*.jpg

Sources:

* ``rsna-64x64-500`` (default): the RSNA / MIDL-C ``MedNIST_64x64_500.zip`` (6 classes x 500
  64x64 JPEGs: CTAbd, CTChest, CTHead, CXR, MRBrain, MRBreast), GitHub slowvak/MIDL-C at
  commit e178a53; the repository is Apache-2.0.
* ``monai``: MONAI's ``MedNIST.tar.gz`` (AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT).

    python scripts/download_mednist.py --out data/mednist
    python scripts/download_mednist.py --out data/mednist-monai --source monai
    python scripts/download_mednist.py --check data/mednist

Exit status 0 when the layout is right, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from fl_imaging.data.datasets.class_folders_download import (
    MEDNIST_SOURCES,
    class_folder_layout_problems,
    class_folder_summary,
    fetch_mednist,
)
from fl_imaging.data.fetch import report_layout, require_out_or_check, script_main, script_parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of this script."""
    parser = script_parser(
        "download_mednist.py",
        "Download MedNIST-style class folders (checked by MD5) into OUT/, or check.",
        out_help="folder to put the class folders in",
        check_help="only check DIR's class folders and count them",
    )
    parser.add_argument(
        "--source",
        choices=list(MEDNIST_SOURCES),
        default="rsna-64x64-500",
        help="which archive (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-archive", action="store_true", help="keep the downloaded archive after unpacking"
    )
    return parser


@script_main
def main(argv: list[str] | None = None) -> int:
    """Run the script with ``argv`` (default: the command line); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    require_out_or_check(parser, args)
    if args.check is not None:
        root = args.check
    else:
        fetched = fetch_mednist(
            args.source, args.out, keep_archive=args.keep_archive, quiet=args.quiet
        )
        root = fetched.path
        if fetched.downloaded:
            print(f"removed {fetched.junk_removed} macOS junk file(s) after extraction")
    problems = class_folder_layout_problems(root)
    return report_layout(class_folder_summary(root), problems, root)


if __name__ == "__main__":
    sys.exit(main())
