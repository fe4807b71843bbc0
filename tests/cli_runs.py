"""The one way the tests start our commands as processes: :func:`run_cli` runs one to its end,
:func:`started_cli` starts one the test talks to (reads its output, sends it signals).

Both start the command as ``python -m <its module>`` with this Python, in a new session (its
own process group, as a terminal gives a command), and bound it in time: a command still
running after ``timeout`` seconds has its whole group killed and the test fails with the tail
of its output. :func:`run_cli` also fails the test, with that tail, when the exit code is not
the expected one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = ["COMMANDS", "cli_command", "output_tail", "run_cli", "started_cli", "stop_group"]

#: Our commands (``[project.scripts]`` of pyproject.toml) -> the module ``python -m`` runs.
COMMANDS = {
    "fl-imaging": "fl_imaging.cli",
    "fl-imaging-data": "fl_imaging.cli.data",
    "fl-imaging-predict": "fl_imaging.cli.predict",
    "fl-imaging-deploy": "fl_imaging.cli.deploy",
    "fl-imaging-bench": "fl_imaging.cli.bench",
    "fl-imaging-audit": "fl_imaging.cli.audit",
    "fl-imaging-eval": "fl_imaging.cli.eval",
}

#: Seconds a command may run unless the test says otherwise: a quick federation takes 15-25 s
#: on 2 cores, several times that when other work shares them.
DEFAULT_TIMEOUT_S = 300.0


#: What runs the command after a prelude (``python -c``): its module as ``python -m`` would,
#: with the command's name as ``sys.argv[0]``.
_AFTER_PRELUDE = """
import runpy as _runpy, sys as _sys
_sys.argv = [{command!r}, *_sys.argv[1:]]
_runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def cli_command(command: str, *args: object, prelude: str = "") -> list[str]:
    """The argument list that runs our ``command`` (a key of :data:`COMMANDS`) with ``args``
    (each made a string) with this Python, after the Python code ``prelude`` when there is one
    (run in the command's process first, e.g. to replace a function it calls). Raises KeyError
    naming our commands for another name."""
    if command not in COMMANDS:
        raise KeyError(f"{command!r} is not one of our commands: {', '.join(COMMANDS)}")
    strings = [str(a) for a in args]
    if not prelude:
        return [sys.executable, "-m", COMMANDS[command], *strings]
    code = prelude + _AFTER_PRELUDE.format(command=command, module=COMMANDS[command])
    return [sys.executable, "-c", code, *strings]


def output_tail(stdout: str | None, stderr: str | None = None, chars: int = 3000) -> str:
    """The last ``chars`` characters of a process's ``stdout`` and of its ``stderr``, labelled,
    for a failing test's message."""
    parts = [f"--- stdout (end) ---\n{(stdout or '')[-chars:]}"]
    if stderr is not None:
        parts.append(f"--- stderr (end) ---\n{stderr[-chars:]}")
    return "\n".join(parts)


def stop_group(proc: subprocess.Popen) -> None:
    """Kill the process group of ``proc`` (started by this module, so the leader of its own
    group) if its leader still runs, and reap the leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def run_cli(
    command: str,
    *args: object,
    cwd: Path | str,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    expect: int | None = 0,
    prelude: str = "",
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run our ``command`` (``fl-imaging``, ``fl-imaging-audit`` ...) with ``args`` in ``cwd``
    (``env``: the whole environment; None: this process's), capturing its output as text.
    Returns the finished process (``returncode``, ``stdout``, ``stderr``). Fails the test
    (AssertionError with the output's tail) when the exit code is not ``expect`` (None: any),
    or when the command still runs after ``timeout`` seconds (its process group is killed).
    ``prelude``: Python code run in the command's process before it (:func:`cli_command`);
    ``preexec_fn`` runs in the child before the command starts."""
    argv = cli_command(command, *args, prelude=prelude)
    shown = f"{command} {' '.join(str(a) for a in args)}"
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"`{shown}` still ran after {timeout:g} s (its process "
            f"group was killed)\n{output_tail(stdout, stderr)}"
        ) from None
    finally:
        stop_group(proc)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(
            f"`{shown}` exited {proc.returncode}, expected {expect}\n{output_tail(stdout, stderr)}"
        )
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


@contextmanager
def started_cli(
    command: str,
    *args: object,
    cwd: Path | str,
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """Start our ``command`` with ``args`` in ``cwd`` (``env``: the whole environment; None:
    this process's), its standard error merged into its standard output, a pipe of text;
    ``preexec_fn`` runs in the child before the command. Yields the running process, the
    leader of its own process group (``os.killpg(proc.pid, ...)`` signals all of it, as a
    terminal's Ctrl-C does). On leaving, a group whose leader still runs is killed: bound the
    test's own waits (``proc.communicate(timeout=...)``)."""
    proc = subprocess.Popen(
        cli_command(command, *args),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    try:
        yield proc
    finally:
        stop_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()
