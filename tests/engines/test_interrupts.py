"""Stopping a run: one Ctrl-C ends a real simulation within seconds with the finished rounds'
files, no Ray process and no temporary folder left, and a resume command that finishes it; a
killed run's Ray processes are stopped by the watcher; the Grid stops waiting once asked to."""

from __future__ import annotations

import codecs
import glob
import logging
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_runs import started_cli
from flower_fakes import FakeGrid, record
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from terminal_signals import sigint_as_in_a_terminal

from fl_imaging.cli.main import resume_command
from fl_imaging.engines.interrupts import stop_on_signal
from fl_imaging.flower.coordinator.polling import QuickPollGrid, StopRequested
from fl_imaging.review.results import read_metrics

RAY_PROCESS = re.compile(r"ray::|raylet|gcs_server")


class SilentGrid(FakeGrid):
    """Pushes messages and never has a reply (sites busy training)."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return []


def _train_messages(nodes: int) -> list[Message]:
    content = RecordDict({"arrays": record({}), "config": ConfigRecord({"server-round": 1})})
    return [
        Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN)
        for n in range(1, nodes + 1)
    ]


@pytest.mark.usefixtures("task_identity")
def test_the_grid_stops_waiting_once_the_run_is_asked_to_stop() -> None:
    stop = threading.Event()
    grid = QuickPollGrid(SilentGrid(2, lambda n, r, s: s), interval=0.05, stop=stop)
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    with pytest.raises(StopRequested):
        grid.send_and_receive(_train_messages(2), timeout=30)
    assert time.monotonic() - start < 2.0  # not the 30 s timeout
    with pytest.raises(StopRequested):  # a new round does not start either
        grid.send_and_receive(_train_messages(2), timeout=30)


def test_a_stopping_run_kills_the_busy_actors_before_ray_is_shut_down(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from fl_imaging.engines.ray_stop import busy_actors_stopped_first

    order: list[str] = []
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: order.append(f"kill {actor}"))
    monkeypatch.setattr(RayBackend, "terminate", lambda backend: order.append("shutdown"))
    backend = RayBackend.__new__(RayBackend)  # only its pool is used
    backend.pool = SimpleNamespace(_future_to_actor={"f1": "a1", "f2": "a2"})
    stop = threading.Event()
    with busy_actors_stopped_first(stop):
        RayBackend.terminate(backend)  # a run that ends: Flower's own order
        stop.set()
        with caplog.at_level(logging.INFO, logger="fl_imaging.engine"):
            RayBackend.terminate(backend)  # a stopping run: the busy actors first
    assert order == ["shutdown", "kill a1", "kill a2", "shutdown"]
    assert "stopped 2 site(s) in the middle of their round" in caplog.text
    RayBackend.terminate(backend)  # outside: Flower's method is back
    assert order[-1] == "shutdown" and len(order) == 5


def test_the_resume_command_keeps_the_overrides_but_hydra_and_resume() -> None:
    argv = ["experiment=quick", "engine.rounds=8", "hydra.run.dir=/x", "resume=/old", "seed=1"]
    assert resume_command(argv, Path("/runs/a b")) == shlex.join(
        ["fl-imaging", "experiment=quick", "engine.rounds=8", "seed=1", "resume=/runs/a b"]
    )


def _processes_in_group(pgid: int) -> list[str]:
    """Command lines of the live (not zombie) processes of process group ``pgid``."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            cmdline = Path(stat).with_name("cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(cmdline)
    return found


def _started(
    tmp_path: Path, ray_parent: Path, run: str, *overrides: str
) -> AbstractContextManager[subprocess.Popen[str]]:
    """``fl-imaging experiment=quick engine.rounds=4 OVERRIDES`` started in ``tmp_path`` into
    ``tmp_path / run``, in its own process group with SIGINT as a terminal leaves it, Ray's
    folder under ``ray_parent`` (:func:`cli_runs.started_cli`)."""
    return started_cli(
        "fl-imaging",
        "experiment=quick",
        "engine.rounds=4",
        *overrides,
        f"data.root={tmp_path / 'demo'}",
        f"hydra.run.dir={tmp_path / run}",
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(ray_parent)},
        preexec_fn=sigint_as_in_a_terminal,
    )


@pytest.fixture
def ray_parent() -> Iterator[Path]:
    """A short folder for this test's Ray folder (TMPDIR), with no other run's in it: a Unix
    socket path inside Ray's folder must stay under 108 bytes, and pytest's tmp_path is long."""
    folder = Path(tempfile.mkdtemp(prefix="fi-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _until(proc: subprocess.Popen[str], text: str, output: list[str], seconds: float) -> None:
    """Read the run's output until it holds ``text``; fail after ``seconds``. Reads the pipe's
    file descriptor itself: ``select`` and then ``readline`` on the text stream would leave the
    lines read ahead in Python's buffer unseen until more output came, so a test could see its
    line only once the run had ended (and send its Ctrl-C to a finished run)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 1.0)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        output.append(decoder.decode(chunk))
        if text in "".join(output[-2:]):  # the text may span two reads
            return
    raise AssertionError(f"no {text!r} in the run's output:\n{''.join(output)[-4000:]}")


def _until_logged(path: Path, text: str, seconds: float) -> None:
    """Wait until the log file ``path`` holds ``text``; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in {path} within {seconds} s")


def _ctrl_c_at(
    proc: subprocess.Popen[str],
    line: str,
    pause_s: float = 0.0,
    timeout: float = 90,
    log: Path | None = None,
    sig: signal.Signals = signal.SIGINT,
) -> tuple[str, float]:
    """Once a line of the run's output (or of its ``log`` file, main.log: a site's lines are
    only there) holds ``line`` (within 300 s) and ``pause_s`` more seconds, send SIGINT to the
    run's whole group, as Ctrl-C in a terminal does (another ``sig``: to the command's process
    alone, as ``kill`` and systemd do); returns all the output and the seconds from the signal
    to the exit. The group is killed if the run is still there after ``timeout`` seconds (the
    test then fails)."""
    output: list[str] = []
    try:
        if log is None:
            _until(proc, line, output, 300)
        else:
            _until_logged(log, line, 300)
        time.sleep(pause_s)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        sent = time.monotonic()
        rest, _ = proc.communicate(timeout=timeout)
        return "".join(output) + rest, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc (Linux)")
def test_ctrl_c_in_round_2_keeps_the_files_stops_ray_and_resume_finishes(
    tmp_path: Path, ray_parent: Path
) -> None:
    with _started(tmp_path, ray_parent, "first") as proc:
        text, stopped_in = _ctrl_c_at(proc, "round 1/4", timeout=60)
    assert proc.returncode == 130, text[-3000:]
    assert stopped_in < 30, text[-3000:]
    assert "Traceback" not in text
    run = tmp_path / "first"
    for name in ("metrics.csv", "summary.txt", "config.yaml", "model.pt", "checkpoint.json"):
        assert (run / name).is_file(), name
    done = max(r.round for r in read_metrics(run / "metrics.csv"))
    assert 1 <= done < 4
    assert f"interrupted (Ctrl-C) after round {done} of 4" in (run / "summary.txt").read_text()
    time.sleep(2)  # Ray's processes are told to stop before the command exits
    assert not [c for c in _processes_in_group(proc.pid) if RAY_PROCESS.search(c)]
    assert not list(ray_parent.glob("flimg-ray-*"))
    command = text[text.index("to go on:") :].splitlines()[1].split()
    assert command[0] == "fl-imaging" and command[-1] == f"resume={run}"

    with _started(tmp_path, ray_parent, "resumed", f"resume={run}") as resumed:
        rest, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, rest[-3000:]
    assert max(r.round for r in read_metrics(tmp_path / "resumed" / "metrics.csv")) == 4


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc (Linux)")
def test_sigterm_in_round_2_is_named_in_the_summary_not_ctrl_c(
    tmp_path: Path, ray_parent: Path
) -> None:
    """``kill PID`` (SIGTERM, as systemd or a scheduler stops a job) stops the run as Ctrl-C
    does, with the finished rounds' files, and its summary and output name SIGTERM."""
    with _started(tmp_path, ray_parent, "termed") as proc:
        text, stopped_in = _ctrl_c_at(proc, "round 1/4", timeout=60, sig=signal.SIGTERM)
    assert proc.returncode == 130, text[-3000:]
    assert stopped_in < 30, text[-3000:]
    assert "Traceback" not in text
    run = tmp_path / "termed"
    done = max(r.round for r in read_metrics(run / "metrics.csv"))
    summary = (run / "summary.txt").read_text()
    assert f"interrupted (SIGTERM) after round {done} of 4" in summary, summary
    assert "Ctrl-C" not in summary
    assert "SIGTERM: stopping" in text and (run / "checkpoint.json").is_file()
    time.sleep(2)  # Ray's processes are told to stop before the command exits
    assert not [c for c in _processes_in_group(proc.pid) if RAY_PROCESS.search(c)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc (Linux)")
def test_a_killed_run_leaves_no_ray_process_and_no_temporary_folder(
    tmp_path: Path, ray_parent: Path
) -> None:
    output: list[str] = []
    with _started(tmp_path, ray_parent, "killed", "engine.rounds=8") as proc:
        _until(proc, "round 1/8", output, 300)
        os.kill(proc.pid, signal.SIGKILL)  # the process alone, as the OOM killer would
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = [c for c in _processes_in_group(proc.pid) if RAY_PROCESS.search(c)]
            if not left and not list(ray_parent.glob("flimg-ray-*")):
                break
            time.sleep(0.5)
        try:
            assert not left, left
            assert not list(ray_parent.glob("flimg-ray-*"))
        finally:
            try:  # nothing of the group should be left; stop it anyway if something is
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_ctrl_c_while_many_sites_wait_in_round_1_exits_without_hanging(
    tmp_path: Path, ray_parent: Path
) -> None:
    # 24 sites on 2 actors: Flower's worker threads still wait on Ray when the run stops, and
    # Python's exit used to wait for them for ever.
    sites = ("data.num_sites=24", "data.cases_per_site=3")
    with _started(tmp_path, ray_parent, "many", *sites) as proc:
        text, stopped_in = _ctrl_c_at(
            proc, "ready in", pause_s=3, log=tmp_path / "many" / "main.log"
        )
    assert proc.returncode == 130, text[-3000:]
    assert stopped_in < 60, text[-3000:]
    assert "interrupted (Ctrl-C)" in (tmp_path / "many" / "summary.txt").read_text()
    # Ray was shut down after Flower's threads let go of it (Ray's core worker ended the process
    # with exit code 1 when they touched it afterwards): the command got to say how to go on
    assert "to go on:" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc (Linux)")
def test_ctrl_c_while_the_sites_are_checked_stops_ray_started_beside_them(
    tmp_path: Path, ray_parent: Path
) -> None:
    # Ray starts in the background while the sites are checked (fl_imaging.engines.local_ray)
    sites = ("data.num_sites=30", "data.cases_per_site=3")
    with _started(tmp_path, ray_parent, "checks", *sites) as proc:
        text, _ = _ctrl_c_at(proc, "checking site")
    assert proc.returncode == 130, text[-3000:]
    assert "before the first round: no round ran, nothing to resume" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert not [c for c in _processes_in_group(proc.pid) if RAY_PROCESS.search(c)]
    assert not list(ray_parent.glob("flimg-ray-*"))


def test_a_sigint_ignored_from_the_start_stays_ignored_while_a_run_is_on() -> None:
    # a background job of a non-interactive shell starts with SIGINT ignored: the terminal's
    # Ctrl-C is for the job in the foreground; SIGTERM still stops the run
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = threading.Event()
        with stop_on_signal(stop, force=lambda: None, interrupt_main=False):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert callable(signal.getsignal(signal.SIGTERM))
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            assert not stop.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            assert stop.is_set()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize(
    ("sig", "label"),
    [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP")],
)
def test_the_signal_that_stops_a_run_is_named(sig: signal.Signals, label: str) -> None:
    """Each stop signal (Ctrl-C, kill, a closed terminal) stops the run and is handed on by the
    name a person knows it by, for the summary."""
    stop = threading.Event()
    named: list[str] = []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_on_signal(stop, force=lambda: None, interrupt_main=False, on_signal=named.append):
            os.kill(os.getpid(), sig)
            time.sleep(0.2)
        assert stop.is_set() and named == [label]
    finally:
        signal.signal(signal.SIGINT, before)
