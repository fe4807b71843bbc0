"""The audit log (fl_imaging/review/audit.py, fl_imaging/review/run_records.py) and
``fl-imaging-audit verify``: a run through the real ServerApp code with in-process sites writes a
chain that verifies; one changed byte, a removed record, a cut-off last line, a swapped model.pt
or a rewritten earlier run are named by record and line; the log holds what the coordinator saw
(each update's verdict and norm, or under secure aggregation only who was summed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_runs import run_cli
from fake_runs import evaluate_metrics, fake_run, shift, train_metrics
from flower_fakes import Arrays, FakeGrid

from fl_imaging.cli.audit import main as audit_main
from fl_imaging.review.audit import (
    AUDIT_FILE,
    GENESIS,
    AuditLog,
    arrays_sha256,
    record_hash,
    verify_run,
)
from fl_imaging.review.results import load_weights, save_weights

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 3-round run of 3 sites, made once; tests change copies of it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        run_dir = tmp_path_factory.mktemp("audit") / "run"
        fake_run(run_dir, rounds=3)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    return run_dir


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def _lines(run: Path) -> list[bytes]:
    return (run / AUDIT_FILE).read_bytes().splitlines(keepends=True)


def _verify(run: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = audit_main(["verify", str(run), *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_fresh_run_verifies_and_its_records_tell_what_happened(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _verify(run, capsys=capsys)
    assert code == 0, out
    assert "verified" in out and "chain of 5 records holds" in out
    assert "model.pt: sha256" in out and "run completed after round 3 of 3" in out
    records = [json.loads(line) for line in _lines(run)]
    assert [r["event"] for r in records] == ["run_start", "round", "round", "round", "run_end"]
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS
    for before, after in zip(records, records[1:], strict=False):
        assert after["prev"] == before["hash"] == record_hash(before)
    start = records[0]
    assert start["config_sha256"] == records[-1]["files"]["config.yaml"]
    assert start["code"]["package"] == "0.1.0" and len(start["code"]["commit"]) == 40
    first = records[1]
    assert first["asked"] == first["answered"] == ["site-1", "site-2", "site-3"]
    assert [u["site"] for u in first["updates"]] == ["site-1", "site-2", "site-3"]
    assert {u["status"] for u in first["updates"]} == {"accepted"}
    # site k moves every floating array by 0.01 k: its update norm is 0.01 k sqrt(parameters)
    norms = [u["norm"] for u in first["updates"]]
    assert norms[1] == pytest.approx(2 * norms[0]) and norms[2] == pytest.approx(3 * norms[0])
    # the saved model's arrays are the last round's global model, and model.pt holds them
    weights = {k: v.numpy() for k, v in load_weights(run / "model.pt").items()}
    assert arrays_sha256(weights) == records[3]["model_sha256"] == records[-1]["model_sha256"]
    assert len({r["model_sha256"] for r in records[:4]}) == 4  # every round changed it


def _change_byte_after(line: bytes, marker: bytes) -> bytes:
    """``line`` with the one byte after ``marker`` replaced by another."""
    at = line.index(marker) + len(marker)
    new = b"1" if line[at : at + 1] != b"1" else b"2"
    return line[:at] + new + line[at + 1 :]


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        # a digit of the model hash: still JSON, the record no longer matches its own hash
        (b'"model_sha256":"', "its content does not match its hash"),
        (b'"answered":', "not a JSON record"),  # [ -> 1: no JSON any more
    ],
    ids=["value", "syntax"],
)
def test_one_changed_byte_of_one_record_is_named(
    run: Path, capsys: pytest.CaptureFixture[str], marker: bytes, expected: str
) -> None:
    lines = _lines(run)
    size = len(lines[2])
    lines[2] = _change_byte_after(lines[2], marker)
    assert len(lines[2]) == size
    (run / AUDIT_FILE).write_bytes(b"".join(lines))
    code, out = _verify(run, capsys=capsys)
    assert code == 1
    assert "FAILED" in out and f"record seq 2 (line 3): {expected}" in out
    assert "the 2 record(s) before it hold" in out


def test_a_changed_record_with_its_hash_recomputed_breaks_the_next_link(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _lines(run)
    record = json.loads(lines[1])
    record["updates"][2]["status"] = "rejected"  # rewrite history, hide it in the hash
    record["hash"] = record_hash(record)
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    (run / AUDIT_FILE).write_bytes(b"".join(lines))
    code, out = _verify(run, capsys=capsys)
    assert code == 1 and "record seq 2 (line 3): its prev does not match" in out


@pytest.mark.parametrize(("line", "seq"), [(2, 3), (0, 1)])
def test_a_removed_record_is_named(
    run: Path, capsys: pytest.CaptureFixture[str], line: int, seq: int
) -> None:
    lines = _lines(run)
    del lines[line]
    (run / AUDIT_FILE).write_bytes(b"".join(lines))
    code, out = _verify(run, capsys=capsys)
    assert code == 1
    assert f"record seq {seq} (line {line + 1}): its prev does not match" in out
    assert f"seq {seq - 1} is missing" in out


def test_a_removed_last_record_is_named(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / AUDIT_FILE).write_bytes(b"".join(_lines(run)[:-1]))
    code, out = _verify(run, capsys=capsys)
    assert code == 1 and "record seq 3 (line 4) is the last record, and it is not run_end" in out


def test_a_swapped_model_is_named(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = load_weights(run / "model.pt")
    for tensor in weights.values():
        if tensor.is_floating_point():
            tensor.add_(0.001)
            break
    save_weights(weights, run / "model.pt")
    code, out = _verify(run, capsys=capsys)
    assert code == 1
    assert "model.pt: sha256" in out and "does not match record seq 4 (line 5)" in out


def test_changed_metrics_are_named(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = run / "metrics.csv"
    metrics.write_text(metrics.read_text().replace("0.75", "0.95", 1))
    code, out = _verify(run, capsys=capsys)
    assert code == 1 and "metrics.csv: sha256" in out


def test_a_cut_off_last_line_is_named_as_such(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (run / AUDIT_FILE).read_bytes()
    (run / AUDIT_FILE).write_bytes(data[: len(data) - 40])  # a crash while writing run_end
    code, out = _verify(run, capsys=capsys)
    assert code == 1
    assert "line 5: truncated record, the file ends in the middle of it" in out
    assert "the 4 record(s) before it hold" in out


def test_the_last_hash_kept_elsewhere_finds_a_shortened_or_rebuilt_log(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = json.loads(_lines(run)[-1])["hash"]
    assert _verify(run, "--expect-last", last, capsys=capsys)[0] == 0
    code, out = _verify(run, "--expect-last", "ab" * 32, capsys=capsys)
    assert code == 1 and "is the last record, with hash" in out


def test_no_folder_or_no_log_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _verify(tmp_path / "nothing", capsys=capsys)
    assert code == 2 and "no such run folder" in out
    code, out = _verify(tmp_path, capsys=capsys)
    assert code == 2 and "no audit log in this folder" in out


def test_each_record_is_one_whole_line(tmp_path: Path) -> None:
    log = AuditLog.create(tmp_path / AUDIT_FILE)
    log.append("run_start", value=float("nan"), array=np.float32(1.5), nested={"a": (1, 2)})
    log.append("round", round=1)
    lines = (tmp_path / AUDIT_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    first = json.loads(lines[0])
    assert first["value"] is None and first["array"] == 1.5 and first["nested"] == {"a": [1, 2]}
    second = json.loads(lines[1])
    assert second["prev"] == first["hash"] == record_hash(first)
    assert log.last_hash == second["hash"] and second["seq"] == 1


def test_a_resumed_run_links_to_the_run_it_resumed(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = json.loads(_lines(run)[-1])["hash"]
    resumed = tmp_path / "resumed"
    fake_run(resumed, f"resume={run}", rounds=4)
    records = [json.loads(line) for line in _lines(resumed)]
    assert [r["event"] for r in records] == ["resume", "run_start", "round", "run_end"]
    assert records[0]["prev"] == records[0]["resumed_last_hash"] == last
    assert records[0]["resumed_round"] == 3 and records[2]["round"] == 4
    code, out = _verify(resumed, capsys=capsys)
    assert code == 0 and f"resumed {run}: its chain holds" in out
    # rewriting the earlier run afterwards breaks the link
    lines = _lines(run)
    (run / AUDIT_FILE).write_bytes(b"".join(lines[:-1]))
    code, out = _verify(resumed, capsys=capsys)
    assert code == 1 and "record seq 0 (line 1): the run it resumes" in out


def _outliers(node: int, rnd: int, sent: Arrays) -> Arrays:
    """Site 3 sends NaN in round 1, site 4 a 100x update; the others train."""
    moved = shift(node, rnd, sent)
    if node == 3 and rnd == 1:
        return {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in moved.items()}
    if node == 4:
        return {k: v + 100 * (moved[k] - v) for k, v in sent.items()}
    return moved


def test_rejected_and_flagged_updates_are_recorded_with_their_reasons(tmp_path: Path) -> None:
    grid = FakeGrid(4, _outliers, train_metrics, evaluate_metrics)
    fake_run(tmp_path / "run", sites=4, rounds=1, grid=grid)
    record = json.loads(_lines(tmp_path / "run")[1])
    updates = {u["site"]: u for u in record["updates"]}
    assert updates["site-1"]["status"] == updates["site-2"]["status"] == "accepted"
    assert updates["site-3"]["status"] == "rejected" and "NaN" in updates["site-3"]["reason"]
    assert updates["site-3"]["norm"] is None  # NaN in the log is null
    assert updates["site-4"]["status"] == "flagged" and "median" in updates["site-4"]["reason"]
    assert record["failures"] == [
        {"site": "site-3", "reason": f"update rejected: {updates['site-3']['reason']}"}
    ]
    assert verify_run(tmp_path / "run").ok


def test_under_secure_aggregation_the_log_holds_no_site_s_update(tmp_path: Path) -> None:
    from secagg_fakes import SecureSites, step

    grid = SecureSites(3, step, {1: 10, 2: 20, 3: 30}, fail={"train": {3}})
    fake_run(
        tmp_path / "run",
        "strategy.secagg.enabled=true",
        "strategy.secagg.threshold=2",
        rounds=2,
        grid=grid,
    )
    records = [json.loads(line) for line in _lines(tmp_path / "run")]
    rounds = [r for r in records if r["event"] == "round"]
    assert len(rounds) == 2
    for record in rounds:
        assert record["coordinator_saw"].startswith("only the sum")
        assert record["secure_sum"] == {"summed": ["site-1", "site-2"], "dropped": ["site-3"]}
        assert "updates" not in record
        assert record["asked"] == ["site-1", "site-2", "site-3"]
        assert {f["site"] for f in record["failures"]} == {"site-3"}
        # no per-site norm or distance anywhere; only the global model's own step
        text = json.dumps(record)
        assert text.count("norm") == 1 and "global_update_norm" in text
        assert "distance" not in text
    assert records[0]["secure_aggregation"] is True and records[0]["update_checks"] is None
    assert verify_run(tmp_path / "run").ok


def test_a_run_that_fails_records_why(tmp_path: Path) -> None:
    class Broken(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            messages = list(messages)
            if int(messages[0].content["config"]["server-round"]) == 2:
                raise RuntimeError("the SuperLink went away")
            return super().send_and_receive(messages, timeout=timeout)

    with pytest.raises(RuntimeError, match="went away"):
        fake_run(tmp_path / "run", grid=Broken(3, shift, train_metrics, evaluate_metrics))
    result = verify_run(tmp_path / "run")
    end = result.records[-1]
    assert result.ok and end["event"] == "run_end" and end["status"] == "failed"
    assert end["reason"] == "RuntimeError: the SuperLink went away" and end["rounds_done"] == 1


def test_the_model_hash_does_not_depend_on_the_storage() -> None:
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3)}
    b = {"n": np.array(3), "w": np.asfortranarray(a["w"])}
    assert arrays_sha256(a) == arrays_sha256(b)
    assert arrays_sha256(a) != arrays_sha256({**a, "w": a["w"].astype(np.float64)})
    assert arrays_sha256(a) != arrays_sha256({**a, "w": a["w"].reshape(3, 2)})


def test_fl_imaging_audit_verify_as_a_command(run: Path) -> None:
    """The command itself (its own process, :mod:`cli_runs`): 0 for the run as written, 1 once
    a result file changed."""
    proc = run_cli("fl-imaging-audit", "verify", run, cwd=run.parent)
    assert "verified" in proc.stdout + proc.stderr
    (run / "metrics.csv").write_text("round,site,metric,value\n")
    proc = run_cli("fl-imaging-audit", "verify", run, cwd=run.parent, expect=1)
    assert "metrics.csv" in proc.stdout + proc.stderr
