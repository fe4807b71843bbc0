"""The result files' way from a deployed ServerApp to the researcher, in-process: the lines the
ServerApp writes (among the other lines of its log) and the receiver that writes the files back,
byte for byte, or refuses by name a missing chunk, a wrong hash and a truncated stream."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from fl_imaging.review.result_transfer import (
    CHUNK_BYTES,
    RESULT_MARKER,
    ResultReceiver,
    ResultTransferError,
    result_lines,
    send_results,
)


def _run_folder(folder: Path) -> dict[str, bytes]:
    """A run folder with a model of 3.5 chunks, a small text file, and files that stay."""
    files = {
        "model.pt": os.urandom(CHUNK_BYTES * 3 + CHUNK_BYTES // 2),
        "metrics.csv": b"round,site,metric,value\n1,all,dice,0.5\n",
        "summary.txt": b"",  # an empty file travels too
    }
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    (folder / "checkpoint.json").write_text("{}")  # not a result file
    (folder / "main.log").write_text("the coordinator's log\n")
    return files


def _received(tmp_path: Path, lines: list[str]) -> ResultReceiver:
    receiver = ResultReceiver(tmp_path / "researcher")
    for line in lines:
        receiver.feed(line + "\n")
    return receiver


def test_files_come_back_byte_for_byte_among_other_lines(tmp_path: Path) -> None:
    files = _run_folder(tmp_path / "coordinator")
    written: list[str] = []
    count, size, withheld = send_results(tmp_path / "coordinator", written.append)
    assert count == 3 and withheld == [] and size == sum(len(w) for w in written)
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in written)
    assert all(len(w) < 70_000 for w in written)  # bounded lines
    stream = ["INFO :      [ROUND 1]", *(w.rstrip("\n") for w in written), "INFO : done"]
    receiver = ResultReceiver(tmp_path / "researcher")
    consumed = [receiver.feed(line + "\n") for line in stream]
    assert consumed == [False, *[True] * len(written), False]
    assert receiver.complete
    names = receiver.finish()
    assert names == ["metrics.csv", "summary.txt", "model.pt"]  # RESULT_FILES order
    for name, content in files.items():
        assert (tmp_path / "researcher" / name).read_bytes() == content
    assert not (tmp_path / "researcher" / "checkpoint.json").exists()
    assert not (tmp_path / "researcher" / "main.log").exists()
    # the same log read a second time (the stream, then `flwr log --show`) changes nothing
    receiver.feed_all(stream)
    assert receiver.finish() == names


def test_a_missing_chunk_is_named(tmp_path: Path) -> None:
    _run_folder(tmp_path / "coordinator")
    lines = list(result_lines(tmp_path / "coordinator"))
    dropped = [line for line in lines if '"part":2,' not in line or "model.pt" not in line]
    assert len(dropped) == len(lines) - 1
    receiver = _received(tmp_path, dropped)
    assert not receiver.complete
    with pytest.raises(ResultTransferError, match=r"model\.pt: chunk\(s\) 3 of 4 missing"):
        receiver.finish()
    assert not (tmp_path / "researcher" / "model.pt").exists()
    assert (tmp_path / "researcher" / "metrics.csv").is_file()  # the others arrived


def test_a_wrong_hash_is_named(tmp_path: Path) -> None:
    _run_folder(tmp_path / "coordinator")
    lines = list(result_lines(tmp_path / "coordinator"))
    corrupt = []
    for line in lines:
        data = json.loads(line[len(RESULT_MARKER) :])
        if data.get("file") == "model.pt" and data.get("part") == 1:
            piece = bytearray(base64.b64decode(data["data"]))
            piece[100] ^= 0xFF
            data["data"] = base64.b64encode(bytes(piece)).decode()
            line = RESULT_MARKER + json.dumps(data)
        corrupt.append(line)
    receiver = _received(tmp_path, corrupt)
    with pytest.raises(ResultTransferError, match=r"model\.pt: the 4 chunk\(s\).*corrupted"):
        receiver.finish()
    assert not (tmp_path / "researcher" / "model.pt").exists()


def test_a_truncated_stream_is_refused(tmp_path: Path) -> None:
    _run_folder(tmp_path / "coordinator")
    lines = list(result_lines(tmp_path / "coordinator"))
    receiver = _received(tmp_path, lines[:-1])  # everything but the manifest
    with pytest.raises(ResultTransferError, match="log ended before the coordinator's list"):
        receiver.finish()
    half = _received(tmp_path, lines[:4])  # cut inside model.pt (the files before it done)
    with pytest.raises(ResultTransferError, match=r"model\.pt: chunk\(s\) 3, 4 of 4 missing"):
        half.finish()


def test_a_file_over_the_limit_is_named_not_cut(tmp_path: Path) -> None:
    _run_folder(tmp_path / "coordinator")
    lines = list(result_lines(tmp_path / "coordinator", max_file_bytes=CHUNK_BYTES))
    assert not any('"file":"model.pt"' in line for line in lines[:-1])
    receiver = _received(tmp_path, lines)
    assert receiver.finish() == ["metrics.csv", "summary.txt"]
    (reason,) = receiver.withheld
    assert "model.pt is 168 KiB, over the 48 KiB" in reason and "coordinator's run" in reason
    assert not (tmp_path / "researcher" / "model.pt").exists()


def test_only_result_files_are_written(tmp_path: Path) -> None:
    line = RESULT_MARKER + json.dumps(
        {
            "kind": "chunk",
            "file": "../.bashrc",
            "size": 1,
            "sha256": "0",
            "part": 0,
            "parts": 1,
            "data": "eA==",
        }
    )
    receiver = _received(tmp_path, [line])
    with pytest.raises(ResultTransferError, match=r"\.\./\.bashrc: not a result file"):
        receiver.finish()
    assert not (tmp_path / ".bashrc").exists() and not (tmp_path / "researcher").exists()
