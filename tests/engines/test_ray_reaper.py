"""The watcher that stops what a simulation started (fl_imaging.engines.ray_reaper): asked by a
run that ends, and on its own when the run's process is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_imaging.engines.ray_reaper import ORPHAN_GRACE_S, descendants, finish_reaper

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")

# a stand-in for a run's process: two children that, like a busy worker, ignore SIGTERM
STUBBORN = 'trap "" TERM; sleep 120 & sleep 120 & wait'


@pytest.fixture
def run_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["bash", "-c", STUBBORN], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(descendants(proc.pid)) == 2
    yield proc
    try:  # whatever is left of its group, by its process group id
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _reaper(parent: int, folder: Path) -> subprocess.Popen[bytes]:
    reaper = subprocess.Popen(
        [sys.executable, "-m", "fl_imaging.engines.ray_reaper", str(parent), str(folder)],
        start_new_session=True,
    )
    time.sleep(1.5)  # it notes the run's processes every second
    return reaper


def test_asked_at_the_end_of_a_run_it_stops_what_is_left_without_the_long_grace(
    tmp_path: Path, run_process: subprocess.Popen[bytes]
) -> None:
    folder = tmp_path / "ray"
    folder.mkdir()
    children = descendants(run_process.pid)
    reaper = _reaper(run_process.pid, folder)
    try:
        asked = time.monotonic()
        finish_reaper(reaper, timeout=30)
        took = time.monotonic() - asked
    finally:
        if reaper.poll() is None:
            reaper.kill()
    assert reaper.returncode == 0
    assert not folder.exists()
    assert not set(descendants(run_process.pid)) & set(children)
    # SIGTERM was ignored: the short grace, then SIGKILL (a killed run's processes get longer)
    assert took < ORPHAN_GRACE_S, took


def test_when_the_run_is_killed_it_stops_the_runs_processes_and_removes_the_folder(
    tmp_path: Path, run_process: subprocess.Popen[bytes]
) -> None:
    folder = tmp_path / "ray"
    folder.mkdir()
    children = list(descendants(run_process.pid))
    reaper = _reaper(run_process.pid, folder)
    try:
        os.kill(run_process.pid, signal.SIGKILL)  # the run alone, as the OOM killer would
        reaper.wait(timeout=3 * ORPHAN_GRACE_S + 10)
    finally:
        if reaper.poll() is None:
            reaper.kill()
    assert reaper.returncode == 0
    assert not folder.exists()
    for pid in children:  # gone, or exited and waiting to be reaped
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", pid
