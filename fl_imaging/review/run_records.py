"""What the ServerApp keeps for the people who must trust a run: the audit log
(:mod:`fl_imaging.review.audit`), experiment tracking (:mod:`fl_imaging.review.tracking`) and the
run's page (:mod:`fl_imaging.review.report_page`), fed from the recorder at the start, after every
round and at the end. What they read of the run is :class:`RunState` (the ServerApp's
``FederationPlan`` is one), so this module does not import the Flower side.

The audit log records what the coordinator saw, and no more: with secure aggregation on it saw
only the sum of the round's updates, so a round's record names the sites summed and dropped and
holds no site's update norm; otherwise each site's update check (status, norm, reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fl_imaging.common.atomic import reason_of, write_atomically
from fl_imaging.config import TaskName, config_to_yaml
from fl_imaging.review.audit import (
    AUDIT_FILE,
    GENESIS,
    HASHED_FILES,
    AuditLog,
    arrays_sha256,
    code_version,
    file_sha256,
    last_record,
)
from fl_imaging.review.report_page import write_report
from fl_imaging.review.results import AGGREGATE_SITE, RunFolderError
from fl_imaging.review.tracking import RunTracker, open_tracker
from strategies import RecordingStrategy
from strategies.validation import ValidatingStrategy

__all__ = ["RunRecords", "RunState", "round_fields"]

log = logging.getLogger("fl_imaging.server")


class _Resumed(Protocol):
    round: int


class RunState(Protocol):
    """What the records read of a running federation: its config, model, recorder, sites and
    how it ended (``fl_imaging.flower.coordinator.federation.FederationPlan`` has all of it)."""

    cfg: Any
    model: Any
    strategy: RecordingStrategy
    site_names: list[str]
    main_metric: str
    stopped: str
    interrupted: bool
    run_key: str
    flower_run: int
    #: The warm start (``task.model.init``): has ``record()`` (path, sha256); None without.
    initial_model: Any

    @property
    def checkpoint(self) -> _Resumed | None: ...

    @property
    def run_dir(self) -> Path: ...

    def rounds_done(self) -> int: ...

    def absent_sites(self) -> dict[str, str]: ...


#: The tracking backends' run status for the audit log's.
_TRACKING_STATUS = {
    "completed": "FINISHED",
    "stopped": "FINISHED",
    "interrupted": "KILLED",
    "failed": "FAILED",
}


def _numpy(recorder: RecordingStrategy) -> dict[str, np.ndarray]:
    arrays = recorder.global_arrays
    return {} if arrays is None else {k: v.numpy() for k, v in arrays.items()}


def _validating(strategy: Any) -> ValidatingStrategy | None:
    """The update-checking layer of the chain (absent under secure aggregation)."""
    while strategy is not None:
        if isinstance(strategy, ValidatingStrategy):
            return strategy
        strategy = getattr(strategy, "inner", None)
    return None


def _by_site(check: Any) -> str:
    return str(check.site)


def _file_hashes(run_dir: Path) -> dict[str, str]:
    """SHA-256 of each of :data:`~fl_imaging.review.audit.HASHED_FILES` in ``run_dir`` that
    exists."""
    return {n: file_sha256(run_dir / n) for n in HASHED_FILES if (run_dir / n).is_file()}


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float | None:
    """L2 distance over the floating arrays both hold (None when there is nothing to compare)."""
    keys = [k for k in a if k in b and np.issubdtype(a[k].dtype, np.floating)]
    if not keys:
        return None
    squares = (np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2) for k in keys)
    return math.sqrt(float(sum(squares)))


def round_fields(
    plan: RunState, rnd: int, previous: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The fields of round ``rnd``'s audit record, from the recorder of ``plan``: sites asked
    and answering, each update's verdict (or, under secure aggregation, only the sites summed
    and dropped), failures, privacy spent, the new global model's SHA-256 and its distance to
    ``previous`` (the global arrays before the round). Returns the fields and the new arrays."""
    recorder = plan.strategy
    rows = [r for r in recorder.rows if r.round == rnd]
    fields: dict[str, Any] = {
        "round": rnd,
        "asked": sorted({recorder.sites.of_node(n) for n in recorder.asked.get(rnd, [])}),
        "answered": sorted({r.site for r in rows if r.metric == "bytes_up"}),
        "failures": [
            {"site": site, "reason": why}
            for r, site, why in recorder.failures
            if r == rnd and not why.startswith("test round")
        ],
        "aggregated": rnd not in recorder.skipped,
        "replies": recorder.replies_of(rnd),
    }
    if plan.cfg.strategy.secagg.enabled:
        fields["coordinator_saw"] = "only the sum of the summed sites' updates (secure aggregation)"
        fields["secure_sum"] = {
            "summed": sorted(r.site for r in rows if r.metric == "secagg_summed" and r.value > 0),
            "dropped": sorted(r.site for r in rows if r.metric == "secagg_summed" and r.value == 0),
        }
    else:
        fields["coordinator_saw"] = "each site's update"
        checks = _validating(recorder)
        fields["updates"] = [
            {
                "site": check.site,
                "status": check.status,
                "norm": check.update_norm,
                "distance_to_aggregate": check.distance_to_aggregate,
                "reason": check.reason,
            }
            for check in sorted(checks.history.get(rnd, []) if checks else [], key=_by_site)
        ]
    privacy = {
        r.metric if r.site == AGGREGATE_SITE else f"{r.site}/{r.metric}": r.value
        for r in rows
        if "epsilon" in r.metric or r.metric == "delta"
    }
    if privacy:
        fields["privacy"] = privacy
    current = _numpy(recorder)
    fields["model_sha256"] = arrays_sha256(current)
    fields["global_update_norm"] = _distance(current, previous)
    return fields, current


class RunRecords:
    """The audit log and tracker of one run; :meth:`session` opens them around the rounds,
    :meth:`after_round` and :meth:`finish` feed them, :meth:`note` gives summary.txt's lines."""

    def __init__(self) -> None:
        self.audit: AuditLog | None = None
        self.tracker: RunTracker | None = None
        self.previous: dict[str, np.ndarray] = {}
        self.finished = False

    def _append(self, event: str, **fields: Any) -> None:
        if self.audit is None:
            return
        try:
            self.audit.append(event, **fields)
        except OSError as err:
            raise RunFolderError(
                f"could not write the audit log {self.audit.path} ({reason_of(err)}): free space "
                "there or give a folder you can write to"
            ) from None

    @contextlib.contextmanager
    def session(self, plan: RunState) -> Iterator[None]:
        """Open the tracker and the audit log (``resume``, ``run_start``) for ``plan``'s run;
        when the rounds end with an exception before :meth:`finish`, record that the run failed
        (``run_end``) and close the tracked run as failed, then let the exception go on."""
        self.start(plan)
        try:
            yield
        except BaseException as err:
            self.abort(plan, f"{type(err).__name__}: {err}")
            raise

    def start(self, plan: RunState) -> None:
        """Start tracking and the audit log of ``plan``'s run (see :meth:`session`). Raises
        :class:`RunFolderError` when the audit log cannot be written."""
        cfg, recorder = plan.cfg, plan.strategy
        config_sha = hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()
        code = code_version()
        tags = {"config_sha256": config_sha, "package": str(code["package"])}
        if code["commit"]:
            tags["commit"] = str(code["commit"]) + ("-dirty" if code["dirty"] else "")
        self.tracker = open_tracker(cfg, plan.run_dir, tags, plan.main_metric)
        resumed = last_record(Path(cfg.resume)) if cfg.resume else None
        path = plan.run_dir / AUDIT_FILE
        if path.exists():
            log.warning("replacing %s of an earlier run in this folder", path)
        try:
            self.audit = AuditLog.create(path, resumed["hash"] if resumed else GENESIS)
        except OSError as err:
            raise RunFolderError(
                f"could not start the audit log {path}: {reason_of(err)}"
            ) from None
        if cfg.resume:
            self._append(
                "resume",
                resumed_run_dir=str(cfg.resume),
                resumed_round=plan.checkpoint.round if plan.checkpoint else None,
                resumed_last_seq=resumed["seq"] if resumed else None,
                resumed_last_hash=resumed["hash"] if resumed else None,
            )
        self.previous = _numpy(recorder)
        self._append(
            "run_start",
            run_dir=str(plan.run_dir),
            run_key=plan.run_key,
            flower_run=plan.flower_run,
            config_sha256=config_sha,
            code=code,
            engine=cfg.engine.name.value,
            rounds=cfg.engine.rounds,
            first_round=recorder.offset + 1,
            sites=list(plan.site_names),
            expected_sites=cfg.engine.num_sites or len(plan.site_names),
            strategy=cfg.strategy.name,
            secure_aggregation=cfg.strategy.secagg.enabled,
            differential_privacy=cfg.strategy.dp.mode.value,
            update_checks=None if cfg.strategy.secagg.enabled else asdict(cfg.strategy.validation),
            model_sha256=arrays_sha256(self.previous),
            initial_model=plan.initial_model.record() if plan.initial_model else None,
            tracking=self.tracker.info if self.tracker else None,
        )

    def after_round(self, plan: RunState, rnd: int) -> None:
        """Append round ``rnd``'s record and send its new rows to the tracker. Raises
        :class:`RunFolderError` when the audit log cannot be written."""
        fields, self.previous = round_fields(plan, rnd, self.previous)
        self._append("round", **fields)
        if self.tracker is not None:
            self.tracker.log_rows(plan.strategy.rows, rnd)

    def note(self) -> str:
        """summary.txt's lines: where the run is tracked (or why not any more), the audit log."""
        lines = [self.tracker.note()] if self.tracker is not None else []
        if self.audit is not None:
            lines.append(
                f"audit log: {AUDIT_FILE} (each record chained to the one before by SHA-256); "
                f"check it with: fl-imaging-audit verify {self.audit.path.parent}"
            )
        return "\n".join(lines)

    def _outcome(self, plan: RunState) -> tuple[str, str]:
        if plan.interrupted:
            return "interrupted", plan.stopped
        absent = plan.absent_sites()
        if absent and plan.cfg.engine.min_sites is None:
            return "failed", f"site(s) {', '.join(sorted(absent))} took part in no round"
        if plan.stopped:
            return "stopped", plan.stopped
        return "completed", ""

    def finish(self, plan: RunState, evaluations: Sequence[str] = ()) -> None:
        """After the run's files are written: the test round's and ``run_end`` records (the
        SHA-256 of model.pt, metrics.csv, config.yaml and the evaluations' CSV files), with
        ``evaluations`` (the summary lines of cross-site evaluation and contributions) recorded
        before it; report.html, and the tracked run's last
        rows and files. Raises :class:`RunFolderError` when the log or report cannot be
        written."""
        recorder = plan.strategy
        test = sorted({r.site for r in recorder.rows if r.metric.startswith("test_")})
        test_failures = [(s, w) for _, s, w in recorder.failures if w.startswith("test round")]
        if test or test_failures:
            self._append(
                "test_round",
                sites=test,
                failures=[{"site": s, "reason": w} for s, w in test_failures],
            )
        if evaluations:  # cross-site evaluation, contributions: what went where (summary lines)
            self._append("site_evaluations", summary=list(evaluations))
        status, reason = self._outcome(plan)
        model = {k: v.detach().cpu().numpy() for k, v in plan.model.state_dict().items()}
        self._append(
            "run_end",
            status=status,
            reason=reason,
            rounds_done=plan.rounds_done(),
            rounds=plan.cfg.engine.rounds,
            model_sha256=arrays_sha256(model),
            files=_file_hashes(plan.run_dir),
        )
        self.finished = True
        try:
            write_report(plan.run_dir, plan.main_metric)
        except OSError as err:
            raise RunFolderError(
                f"could not write {plan.run_dir / 'report.html'}: {reason_of(err)}"
            ) from None
        self._close_tracker(status, plan, final=True)

    def _close_tracker(self, status: str, plan: RunState, final: bool = False) -> None:
        """Send the rows not sent yet (test round, last evaluation) and the files (with
        ``final``: and the final model, as an MLflow model), close the tracked run; a failure
        here is added to summary.txt, already written."""
        if self.tracker is None:
            return
        failed_before = self.tracker.failed
        self.tracker.log_rows(plan.strategy.rows)
        tags = {"audit_last_hash": self.audit.last_hash} if self.audit else {}
        task = plan.cfg.task
        self.tracker.finish(
            _TRACKING_STATUS[status],
            tags,
            model=plan.model if final else None,
            input_shape=(1, task.in_channels, *task.roi_size),
            any_size=task.name == TaskName.segmentation,
        )
        if self.tracker.failed and not failed_before:  # too late for the summary: add it
            summary = plan.run_dir / "summary.txt"
            text = (summary.read_text() if summary.is_file() else "") + self.tracker.note() + "\n"
            with contextlib.suppress(OSError):
                write_atomically(summary, lambda handle: handle.write(text.encode()))

    def abort(self, plan: RunState, reason: str) -> None:
        """Record that the run failed with ``reason`` before :meth:`finish` (best effort: the
        run's own error is what the user must see)."""
        if self.finished:
            return
        self.finished = True
        try:
            self._append(
                "run_end",
                status="failed",
                reason=reason,
                rounds_done=plan.rounds_done(),
                rounds=plan.cfg.engine.rounds,
                files=_file_hashes(plan.run_dir),
            )
        except (RunFolderError, OSError) as err:
            log.error("could not record the failure in the audit log: %s", err)
        self._close_tracker("failed", plan)
