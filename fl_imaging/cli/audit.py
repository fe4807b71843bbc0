"""The ``fl-imaging-audit`` command: check a run's audit log.

    fl-imaging-audit verify RUN_DIR                     # the chain and the result files
    fl-imaging-audit verify RUN_DIR --expect-last HASH  # ... and its last record, kept elsewhere
    fl-imaging-audit site RUN_DIR --record FILE         # ... against one site's own record

Exit 0: the chain holds and ``model.pt``, ``metrics.csv`` and ``config.yaml`` are the files the
run recorded; 1: the first record (seq and line) or file that does not match, and why; 2: no
such folder or no audit log in it. The checks are :func:`fl_imaging.review.audit.verify_run` and,
for
``site``, :func:`fl_imaging.review.site_record_check.check_site_record`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl_imaging.review.audit import AUDIT_FILE, AuditFileMissing, verify_run

__all__ = ["entry", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-imaging-audit",
        description="Check the audit log (audit.jsonl) a fl-imaging run wrote.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify",
        help="recompute the chain of records and the result files' SHA-256",
        description=(
            "Recompute every record's SHA-256 and its link to the record before it, check that "
            "model.pt, metrics.csv and config.yaml are the files the run_end record names, and "
            "that a resumed run links to the run it resumed. Exit 0 when all holds, 1 naming "
            "the first record or file that does not, 2 when there is no log."
        ),
    )
    verify.add_argument("run_dir", type=Path, help="the run folder (holds audit.jsonl)")
    verify.add_argument(
        "--expect-last",
        metavar="HASH",
        help="the last record's hash as kept elsewhere (MLflow's audit_last_hash tag, a "
        "message to the ethics board): records removed at the end or a rebuilt chain are found",
    )
    site = commands.add_parser(
        "site",
        help="check the coordinator's audit log against a site's own record",
        description=(
            "Check that every reply of the site in the run's audit log is one the site sent "
            "(its own site-record.jsonl, in its state folder), that no reply it sent is left "
            "out, and that its recorded epsilons are the run's. Exit 0 when they agree, 1 "
            "naming each difference, 2 when a file is missing."
        ),
    )
    site.add_argument("run_dir", type=Path, help="the run folder (holds audit.jsonl)")
    site.add_argument("--record", type=Path, required=True, help="the site's site-record.jsonl")
    return parser


def _check_site(args: argparse.Namespace) -> int:
    from fl_imaging.review.site_record_check import check_site_record

    result = check_site_record(args.run_dir, args.record)
    for note in result.notes:
        print(f"  {note}")
    if result.problems:
        print(f"{args.run_dir / AUDIT_FILE} against {args.record}: FAILED")
        for problem in result.problems:
            print(f"  {problem}")
        return 1
    print(f"{args.run_dir / AUDIT_FILE} against {args.record}: they agree")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``fl-imaging-audit`` with ``argv`` (default: the command line); returns the exit
    code (0 verified, 1 a mismatch, 2 no such folder or log)."""
    args = _parser().parse_args(argv)
    if args.command == "site":
        try:
            return _check_site(args)
        except AuditFileMissing as err:
            print(f"fl-imaging-audit: error: {err}", file=sys.stderr)
            return 2
    try:
        result = verify_run(args.run_dir, expect_last=args.expect_last)
    except AuditFileMissing as err:
        print(f"fl-imaging-audit: error: {err}", file=sys.stderr)
        return 2
    log = args.run_dir / AUDIT_FILE
    if not result.ok:
        print(f"{log}: FAILED\n  {result.problem}")
        good = len(result.records)
        if good:
            print(f"  the {good} record(s) before it hold (last good hash {result.last_hash})")
        return 1
    print(f"{log}: verified")
    for note in result.notes:
        print(f"  {note}")
    end = result.records[-1]
    reason = f" ({end['reason']})" if end.get("reason") else ""
    print(
        f"  run {end.get('status')} after round {end.get('rounds_done')} of "
        f"{end.get('rounds')}{reason}"
    )
    return 0


def entry() -> None:
    """Console entry point: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
