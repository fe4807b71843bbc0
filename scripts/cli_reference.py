"""Fill the commands reference, ``docs/reference/cli.md``, with each command's own ``--help``.

    python scripts/cli_reference.py            # fill every cli-help marker in the page
    python scripts/cli_reference.py --check    # exit 1 when a block differs from --help now

A block is asked for with a pair of markers naming the command and its subcommand::

    <!-- cli-help: fl-imaging-deploy supernode -->
    <!-- /cli-help -->

and filled with what the command's argparse parser prints for ``--help`` (at 100 columns), so
the page lists every option as the code has it; ``fl-imaging`` itself is Hydra's, and its block is
the help template Hydra prints (``conf/hydra/help/fl_imaging.yaml``).
``tests/docs/test_docs.py`` fails when it is stale.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import sys
from pathlib import Path

import yaml

__all__ = ["COMMANDS", "PAGE", "fill_markers", "help_text"]

ROOT = Path(__file__).resolve().parent.parent
#: Hydra's help template for ``fl-imaging`` (plain text, no interpolation).
HYDRA_HELP = ROOT / "conf" / "hydra" / "help" / "fl_imaging.yaml"
#: The page this script fills.
PAGE = ROOT / "docs" / "reference" / "cli.md"

#: Each sibling command and the module whose ``main(argv)`` parses its arguments.
COMMANDS = {
    "fl-imaging-data": "fl_imaging.cli.data",
    "fl-imaging-predict": "fl_imaging.cli.predict",
    "fl-imaging-deploy": "fl_imaging.cli.deploy",
    "fl-imaging-bench": "fl_imaging.cli.bench",
    "fl-imaging-audit": "fl_imaging.cli.audit",
    "fl-imaging-eval": "fl_imaging.cli.eval",
}

_MARKERS = re.compile(
    r"(<!-- cli-help: (?P<command>[\w-]+)(?: (?P<sub>[\w-]+))? -->\n)"
    r"(?P<body>.*?)(<!-- /cli-help -->)",
    re.S,
)


def help_text(command: str, subcommand: str | None = None) -> str:
    """What ``COMMAND [SUBCOMMAND] --help`` prints, at 100 columns.

    Takes ``fl-imaging`` or a key of :data:`COMMANDS` and an optional subcommand; returns the
    help text. Raises ``KeyError`` for a command that is not listed.
    """
    if command == "fl-imaging":
        return yaml.safe_load(HYDRA_HELP.read_text())["template"] + "\n"
    main = importlib.import_module(COMMANDS[command]).main
    argv = [subcommand, "--help"] if subcommand else ["--help"]
    out = io.StringIO()
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(argv)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return out.getvalue()


def fill_markers(text: str) -> str:
    """The page's text with every ``cli-help`` marker pair filled with that command's help."""

    def block(match: re.Match[str]) -> str:
        body = help_text(match["command"], match["sub"]).rstrip("\n")
        return f"{match[1]}```text\n{body}\n```\n{match[5]}"

    return _MARKERS.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    """Fill (or with ``--check`` compare) the page; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    text = PAGE.read_text()
    filled = fill_markers(text)
    if args.check:
        if filled != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run {__file__}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(filled)
    print(f"filled {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
