"""Start, watch and stop Flower's deployment processes: the SuperLink and the SuperNodes.

Every process is started with its output going to a log file, its own Flower home folder
(``FLWR_HOME``) and the environment that finds this toolkit (``PYTHONPATH``) and Flower's helper
commands (``PATH``: ``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp`` are started by
name). Readiness is checked by polling the port (SuperLink) or waiting for Flower's log line
(SuperNode). Stopping sends SIGTERM to the process and to every descendant it had (Flower's
SuperExec runs in a session of its own, so a process-group signal would miss it), then SIGKILL to
whatever is left after a grace period. Linux: descendants are read from ``/proc``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CLIENTAPP_READY",
    "ManagedProcess",
    "ProcessError",
    "SUPERNODE_READY",
    "bin_dir",
    "descendants",
    "flower_command",
    "flower_env",
    "free_port",
    "port_open",
    "start_process",
    "stop_all",
    "stop_process",
    "wait_for_log",
    "wait_for_port",
]

log = logging.getLogger("fl_imaging.deploy")

#: Flower's log line once a SuperNode was accepted by the SuperLink.
SUPERNODE_READY = re.compile(r"SuperNode ID: \d+")
#: fl-imaging's ClientApp runner's log line once its imports are done and the SuperNode answered
#: its first request (:mod:`fl_imaging.deploy.warm_clientapp`): it can take a message now.
CLIENTAPP_READY = re.compile(r"the SuperNode accepts this runner's requests")
#: Exit code of ``flower-supernode`` when the SuperLink refused it (unknown key, ...).
SUPERNODE_CONNECTION_ERROR = 305


class ProcessError(RuntimeError):
    """A process that could not start, exited early or did not become ready; the message
    names its log file. ``log_text``: what the process wrote (empty when none was started),
    for :func:`fl_imaging.deploy.start_errors.start_cause`."""

    def __init__(self, message: str, log_text: str = "") -> None:
        super().__init__(message)
        self.log_text = log_text


@dataclass
class ManagedProcess:
    """A process started by :func:`start_process`: its name, command, log file and handle."""

    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    #: Size of the log file when the process started: its own output begins there.
    log_offset: int = 0
    #: Descendants seen while the process ran (Flower's helpers), as (pid, start time), so
    #: that they are stopped with it and a reused pid is never signalled.
    known_children: set[tuple[int, int]] = field(default_factory=set)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything this process wrote so far (not what earlier processes appended to the same
        log file); empty when the log is missing."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self.log_offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of its log, for error messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def bin_dir() -> Path:
    """The folder of this Python's commands (the virtual environment's ``bin``), where Flower's
    ``flower-superlink``, ``flower-supernode``, ``flwr`` and helpers are installed."""
    return Path(sys.executable).parent


def flower_command(name: str) -> str:
    """Full path of Flower's command ``name`` next to this Python, or on ``PATH``. Raises
    :class:`ProcessError` when it is not installed."""
    local = bin_dir() / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ProcessError(
            f"`{name}` is not installed next to {sys.executable} nor on PATH: install flwr "
            "into this environment (pip install -e .)"
        )
    return found


def _repo_root() -> Path:
    """The folder holding the ``fl_imaging`` package this process imported."""
    return Path(__file__).resolve().parents[2]


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: this environment, plus ``FLWR_HOME``, ``PATH``
    starting with this Python's ``bin`` (Flower starts its helpers by name), ``PYTHONPATH``
    starting with the folder of this ``fl_imaging`` (so every Flower process imports this copy),
    telemetry off and runtime dependency installation disabled; ``extra`` last."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")])
    paths = [str(_repo_root()), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_process(
    name: str,
    command: Sequence[str],
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start ``command`` with stdout and stderr appended to ``log_path``; returns its handle.

    The process gets a session of its own, so a Ctrl-C in the terminal reaches only the
    program that started it, which then stops it by PID (:func:`stop_process`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("ab")
    offset = handle.seek(0, os.SEEK_END)
    try:
        popen = subprocess.Popen(
            list(command),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    except OSError as err:
        raise ProcessError(f"cannot start {name} ({command[0]}): {err}") from None
    finally:
        handle.close()
    log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
    return ManagedProcess(name, list(command), log_path, popen, log_offset=offset)


def wait_for_port(proc: ManagedProcess, host: str, port: int, timeout: float = 60.0) -> None:
    """Wait until ``host:port`` accepts connections. Raises :class:`ProcessError` when ``proc``
    exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if not proc.alive():
            raise ProcessError(
                f"{proc.name} exited with code {proc.popen.returncode} before listening on "
                f"{host}:{port}; its log ({proc.log_path}) ends with:\n{proc.tail()}",
                proc.log_text(),
            )
        proc.known_children.update(_family(proc.pid))
        time.sleep(0.2)
    raise ProcessError(
        f"{proc.name} does not listen on {host}:{port} after {timeout:.0f} s; see {proc.log_path}",
        proc.log_text(),
    )


def wait_for_log(
    proc: ManagedProcess, pattern: re.Pattern[str], timeout: float = 60.0
) -> re.Match[str]:
    """Wait until ``proc``'s log matches ``pattern``; returns the match. Raises
    :class:`ProcessError` when the process exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(proc.log_text())
        if match:
            proc.known_children.update(_family(proc.pid))
            return match
        if not proc.alive():
            raise ProcessError(
                f"{proc.name} exited with code {proc.popen.returncode}; its log "
                f"({proc.log_path}) ends with:\n{proc.tail()}",
                proc.log_text(),
            )
        time.sleep(0.2)
    raise ProcessError(
        f"{proc.name} did not log {pattern.pattern!r} within {timeout:.0f} s; see {proc.log_path}",
        proc.log_text(),
    )


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state, ppid, ...), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (2nd field) is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()


def _identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time in clock ticks) of a living process, or None."""
    fields = _stat(pid)
    if fields is None or fields[0] == "Z":
        return None
    return pid, int(fields[19])


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (children, grandchildren, ...), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def _family(pid: int) -> set[tuple[int, int]]:
    """Identities of the living descendants of ``pid``."""
    return {i for i in map(_identity, descendants(pid)) if i is not None}


def _living(family: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The members of ``family`` still running (same pid and start time)."""
    return {i for i in family if _identity(i[0]) == i}


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_process(proc: ManagedProcess, grace: float = 15.0) -> int | None:
    """Stop ``proc`` and all its descendants: SIGTERM to the process, then to each descendant
    still running, SIGKILL to anything left after ``grace`` seconds. Returns the exit code (None
    if it never exited). Safe to call on a process that already exited."""
    family = _family(proc.pid) | proc.known_children
    if proc.alive():
        _signal([proc.pid], signal.SIGTERM)
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %d) ignored SIGTERM for %.0f s: killing it", proc.name, proc.pid, grace
            )
            _signal([proc.pid], signal.SIGKILL)
            proc.popen.wait(timeout=5)
    # Flower's helpers notice their parent is gone within a second; wait briefly, then insist.
    family = _living(family)
    deadline = time.monotonic() + min(grace, 10.0)
    while family and time.monotonic() < deadline:
        time.sleep(0.2)
        family = _living(family)
    if family:
        _signal([pid for pid, _ in family], signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while family and time.monotonic() < deadline:
            time.sleep(0.2)
            family = _living(family)
        _signal([pid for pid, _ in _living(family)], signal.SIGKILL)
    return proc.popen.returncode


def stop_all(procs: Sequence[ManagedProcess], grace: float = 15.0) -> None:
    """Stop every process of ``procs``, last started first (SuperNodes before the SuperLink)."""
    for proc in reversed(list(procs)):
        try:
            stop_process(proc, grace)
        except Exception as err:  # keep stopping the others
            log.warning("could not stop %s (pid %d): %s", proc.name, proc.pid, err)
