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

from fl_imaging.data import download as dl


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of this script."""
    parser = dl.script_parser(
        "download_mednist.py",
        "Download MedNIST-style class folders (checked by MD5) into OUT/, or check.",
        out_help="folder to put the class folders in",
        check_help="only check DIR's class folders and count them",
    )
    parser.add_argument(
        "--source",
        choices=list(dl.MEDNIST_SOURCES),
        default="rsna-64x64-500",
        help="which archive (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-archive", action="store_true", help="keep the downloaded archive after unpacking"
    )
    return parser


@dl.script_main
def main(argv: list[str] | None = None) -> int:
    """Run the script with ``argv`` (default: the command line); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    dl.require_out_or_check(parser, args)
    if args.check is not None:
        root = args.check
    else:
        fetched = dl.fetch_mednist(
            args.source, args.out, keep_archive=args.keep_archive, quiet=args.quiet
        )
        root = fetched.path
        if fetched.downloaded:
            print(f"removed {fetched.junk_removed} macOS junk file(s) after extraction")
    problems = dl.class_folder_layout_problems(root)
    return dl.report_layout(dl.class_folder_summary(root), problems, root)


if __name__ == "__main__":
    sys.exit(main())
