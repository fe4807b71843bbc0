"""A stand-in for systemd where none runs (this machine, CI): read a unit file made by
``fl-imaging-deploy service`` and run its ``ExecStart=`` as systemd would restart it.

:class:`UnitSupervisor` starts the command in ``WorkingDirectory=`` with the unit's
``Environment=`` on top of this one, its output appended to one file (the journal's stand-in),
and when it exits starts it again after ``RestartSec=`` seconds as ``Restart=`` says (``always``:
any exit; ``on-failure``: a non-zero code or a signal), giving up after ``StartLimitBurst=``
starts within ``StartLimitIntervalSec=``. :meth:`UnitSupervisor.stop` does what ``KillMode=mixed``
does: SIGTERM to the main process, SIGKILL to it after ``TimeoutStopSec=`` and to every process
it started that is still running (the control group's stand-in: descendants seen while it ran).
It runs the command as the current user (``User=`` is not applied) and applies no sandboxing.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fl_imaging.deploy.processes import descendants

__all__ = ["UnitSupervisor", "exec_words", "read_unit"]


def _started(pid: int) -> int | None:
    """The start time (clock ticks) of process ``pid``, None when it is gone: with the pid it
    names one process, never a later one that got the same pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's settings: section -> key -> values (a key may repeat, as
    ``Environment=``); comments and blank lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exec_words(value: str) -> list[str]:
    """The words of a systemd command line (``ExecStart=``, ``Environment=``) as systemd
    passes them: quotes removed, ``%%`` and ``$$`` made single."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(value)]


@dataclass(eq=False)  # a thread: hashed by identity
class UnitSupervisor(threading.Thread):
    """Runs one unit file's service until :meth:`stop` (see the module's docstring); keeps each
    start's main PID and each exit's code."""

    unit: Path
    journal: Path
    pids: list[int] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)
        service = read_unit(self.unit)["Service"]
        unit = read_unit(self.unit).get("Unit", {})
        self.command = exec_words(service["ExecStart"][0])
        self.cwd = Path(service["WorkingDirectory"][0].replace("%%", "%"))
        self.env = dict(os.environ)
        for assignment in service.get("Environment", []):
            for word in exec_words(assignment):
                key, _, value = word.partition("=")
                self.env[key] = value
        self.restart = service.get("Restart", ["no"])[0]
        self.restart_sec = float(service.get("RestartSec", ["0.1"])[0])
        self.stop_timeout = float(service.get("TimeoutStopSec", ["90"])[0])
        self.burst = int(unit.get("StartLimitBurst", ["5"])[0])
        self.interval = float(unit.get("StartLimitIntervalSec", ["10"])[0])
        self.stopping = threading.Event()
        self.gave_up = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.family: set[tuple[int, int | None]] = set()
        self._starts: list[float] = []

    def _restarts_after(self, code: int) -> bool:
        if self.restart == "always":
            return True
        return self.restart == "on-failure" and code != 0

    def run(self) -> None:
        while not self.stopping.is_set():
            now = time.monotonic()
            self._starts = [t for t in self._starts if now - t < self.interval] + [now]
            if len(self._starts) > self.burst:
                self.gave_up = True
                return
            with self.journal.open("ab") as out:
                self.proc = subprocess.Popen(
                    self.command,
                    cwd=self.cwd,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.pids.append(self.proc.pid)
            while self.proc.poll() is None:
                self.family.update((p, _started(p)) for p in descendants(self.proc.pid))
                time.sleep(0.2)
            self.exit_codes.append(self.proc.returncode)
            if self.stopping.is_set() or not self._restarts_after(self.proc.returncode):
                return
            self.stopping.wait(self.restart_sec)

    def main_pid(self) -> int | None:
        """The PID of the running start, or None between starts."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def journal_text(self) -> str:
        """Everything the service's starts wrote so far."""
        return self.journal.read_text(errors="replace") if self.journal.is_file() else ""

    def stop(self) -> None:
        """Stop as ``systemctl stop`` with ``KillMode=mixed`` would; wait for the thread."""
        self.stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        self.join(timeout=self.stop_timeout)
        for pid, started in self.family:
            if started is None or _started(pid) != started:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
