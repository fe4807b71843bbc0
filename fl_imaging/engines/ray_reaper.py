"""Stop what a simulation started when the process that started it dies without stopping it.

Ray's processes (GCS server, raylet, its workers, which run the sites) are started by the
``fl-imaging`` process; it stops them itself when a run ends or is interrupted, but not when it
is killed outright (``kill -9``, out of memory): they would keep running, and Ray's temporary
folder would stay behind. Ray offers nothing for a driver that vanished, so this watcher is ours.
It runs as a process of its own (in its own session, so a Ctrl-C in the terminal does not reach
it), notes every second the processes descended from the run's process, and once that process
is gone, stops them (SIGTERM, then SIGKILL after a grace period) and removes the folder. The run
also asks it to do so when it ends (SIGUSR1, :func:`finish_reaper`): after ``ray.shutdown`` Ray's
actors exit on their own time, no longer children of the run's process, and this watcher still
knows them.

    python -m fl_imaging.engines.ray_reaper PARENT_PID RAY_TMP_DIR

It reads the process tree from ``/proc`` (Linux); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["descendants", "finish_reaper", "main", "start_reaper", "stop_processes"]

_PROC = Path("/proc")

#: Seconds between SIGTERM and SIGKILL for what a finished run left (Ray's exiting workers).
ASKED_GRACE_S = 1.0
#: Seconds between SIGTERM and SIGKILL for the processes of a run that was killed.
ORPHAN_GRACE_S = 5.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone (a zombie,
    which has exited and waits to be reaped, counts as gone)."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every process descended from ``pid`` (children, their children ...): pid -> start time
    (clock ticks since boot, to recognise a pid that was reused). Empty without ``/proc``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in _PROC.iterdir() if _PROC.is_dir() else []:
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
            starts[int(entry.name)] = stat[1]
    found: dict[int, int] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if child not in found and child in starts:
            found[child] = starts[child]
            todo.extend(children.get(child, []))
    return found


def _alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == start


def stop_processes(processes: dict[int, int], grace: float) -> None:
    """SIGTERM each of ``processes`` still running (same pid and start time), SIGKILL those
    left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in processes.items():
            if _alive(pid, start):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in processes.items()):
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """Watch ``PARENT_PID`` (argv[0]); once it is gone, stop its last known descendants and
    remove ``RAY_TMP_DIR`` (argv[1]). Returns 0."""
    args = sys.argv[1:] if argv is None else argv
    parent, folder = int(args[0]), Path(args[1])
    if not _PROC.is_dir():
        return 0
    me = os.getpid()
    start = _stat(parent)
    known: dict[int, int] = {}
    asked = False
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # taken by sigtimedwait below
    while start is not None and _alive(parent, start[1]):
        known.update({p: s for p, s in descendants(parent).items() if p != me})
        known = {p: s for p, s in known.items() if _alive(p, s)}
        if signal.sigtimedwait({signal.SIGUSR1}, 1.0) is not None:  # wakes at once when asked
            asked = True
            break
    # asked: Ray was shut down and what is left are its workers on their way out; a killed run
    # leaves Ray's servers running, which get the time to stop cleanly
    stop_processes(known, grace=ASKED_GRACE_S if asked else ORPHAN_GRACE_S)
    shutil.rmtree(folder, ignore_errors=True)
    return 0


def start_reaper(ray_tmp: Path) -> subprocess.Popen[bytes] | None:
    """Start the watcher for this process and ``ray_tmp`` (None without ``/proc``); stop it by
    its PID (``terminate()``) once the run cleaned up after itself."""
    if not _PROC.is_dir():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "fl_imaging.engines.ray_reaper", str(os.getpid()), str(ray_tmp)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def finish_reaper(reaper: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Ask the watcher to stop the processes the run left behind now and to remove Ray's folder
    (SIGUSR1), and wait up to ``timeout`` seconds for it to finish."""
    if reaper.poll() is None:
        reaper.send_signal(signal.SIGUSR1)
    try:
        reaper.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        reaper.kill()


if __name__ == "__main__":
    sys.exit(main())
