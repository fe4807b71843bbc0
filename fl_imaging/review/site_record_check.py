"""``fl-imaging-audit site``: a coordinator's audit log checked against one site's own record.

The coordinator's log (``audit.jsonl``) holds, per round, the SHA-256 of every reply it received
(site, message type); the site's record (:mod:`fl_imaging.review.site_record`) holds the SHA-256 of
every reply it sent and every request it refused. Checked, for the Flower run the coordinator's
``run_start`` names:

- both chains hold (a record removed or edited afterwards breaks one);
- every reply of the site in the coordinator's log is one the site sent (same round, type and
  digest): a reply the coordinator altered, or made up in the site's name, is found;
- every training and secure aggregation reply the site sent in a round the log covers is in the
  log: a reply the coordinator received and left out of its log is found;
- the patient-level epsilon the site recorded after each round is the one in the run's
  ``metrics.csv``.

Ours: no library has a site-side record of a federated run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fl_imaging.review.audit import verify_chain, verify_run

__all__ = ["RecordCheck", "check_site_record"]

#: Reply types a site's record must find in the coordinator's log, round by round.
LOGGED_TYPES = ("train", "query.secagg_keys", "query.secagg_shares", "query.secagg_unmask")


@dataclass
class RecordCheck:
    """The outcome: ``problems`` (empty: the logs agree), ``notes`` (what was checked)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the coordinator's log and the site's record agree."""
        return not self.problems


def _site_epsilons(run_dir: Path, site: str) -> dict[int, float]:
    from fl_imaging.review.results import read_metrics

    path = run_dir / "metrics.csv"
    if not path.is_file():
        return {}
    return {
        r.round: r.value
        for r in read_metrics(path)
        if r.site == site and r.metric == "patient_epsilon"
    }


def check_site_record(run_dir: Path, record_file: Path) -> RecordCheck:
    """Check the run in ``run_dir`` against the site record ``record_file`` (see the module).
    Raises :class:`~fl_imaging.review.audit.AuditFileMissing` when either file is missing."""
    check = RecordCheck()
    run = verify_run(Path(run_dir), check_resumed=False)
    own = verify_chain(Path(record_file))
    if not run.ok:
        check.problems.append(f"the coordinator's audit log: {run.problem}")
    if not own.ok:
        check.problems.append(f"the site's record {record_file}: {own.problem}")
    if check.problems:
        return check
    start = next((r for r in run.records if r["event"] == "run_start"), None)
    if start is None or not start.get("flower_run"):
        check.problems.append("the audit log names no Flower run (written before site records)")
        return check
    flower_run = int(start["flower_run"])
    mine = [r for r in own.records if r.get("flower_run") == flower_run]
    if not mine:
        check.problems.append(
            f"the site's record holds no message of Flower run {flower_run}: this site did not "
            "take part, or the record is another site's"
        )
        return check
    site = str(mine[0]["site"])
    rounds = [r for r in run.records if r["event"] == "round"]
    logged = {
        (int(rec["round"]), str(reply["type"]), str(reply["sha256"]))
        for rec in rounds
        for reply in rec.get("replies", [])
        if reply.get("site") == site
    }
    sent = {
        (int(r["round"]), str(r["type"]), str(r["reply_sha256"]))
        for r in mine
        if r.get("reply_sha256")
    }
    for rnd, kind, digest in sorted(logged - sent):
        check.problems.append(
            f"round {rnd}: the coordinator's log holds a {kind} reply of site {site} "
            f"(SHA-256 {digest[:16]}...) that the site never sent"
        )
    covered = {int(rec["round"]) for rec in rounds}
    for rnd, kind, digest in sorted(sent - logged):
        if rnd in covered and kind in LOGGED_TYPES:
            check.problems.append(
                f"round {rnd}: site {site} sent a {kind} reply (SHA-256 {digest[:16]}...) that "
                "the coordinator's log leaves out"
            )
    epsilons = _site_epsilons(Path(run_dir), site)
    for r in mine:
        if "patient_epsilon" in r and int(r["round"]) in epsilons:
            reported = epsilons[int(r["round"])]
            if abs(reported - float(r["patient_epsilon"])) > 1e-9 * max(1.0, reported):
                check.problems.append(
                    f"round {r['round']}: metrics.csv says site {site}'s epsilon was "
                    f"{reported:.6g}, the site recorded {float(r['patient_epsilon']):.6g}"
                )
    refusals = [r for r in mine if r.get("refusal")]
    check.notes += [
        f"site {site}, Flower run {flower_run}: {len(mine)} message(s) in its record, "
        f"{len(logged)} of its replies in the coordinator's log ({len(covered)} round(s))",
        *(f"refused in round {r['round']} ({r['type']}): {r['refusal']}" for r in refusals),
    ]
    return check
