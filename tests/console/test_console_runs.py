"""``fl-imaging`` on a terminal: the live view (rounds, time left, each site's state, the last
round's line) in a pseudo-terminal, and plain lines with no escape code at all when ``NO_COLOR``
is set. Two short runs (2 sites, 2 rounds of the quick experiment); the redirected case is in
test_end_to_end.py."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

#: The longest one run may take, in seconds (about 40 s on 2 cores).
RUN_TIMEOUT_S = 300

_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def _in_terminal(tmp_path: Path, **env: str) -> tuple[int, str]:
    """Run a short ``fl-imaging`` with stdout and stderr on a pseudo-terminal of 100 x 40;
    returns its exit code and everything it wrote. Killed (its whole group, by PID) after
    :data:`RUN_TIMEOUT_S` seconds."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    args = [
        "experiment=quick",
        "task.local_epochs=2",
        f"data.root={tmp_path / 'demo'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_imaging.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        cwd=tmp_path,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", **env},
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal closed: every process of the run ended
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"no end within {RUN_TIMEOUT_S} s:\n{b''.join(chunks)[-3000:]!r}")
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", errors="replace")


def test_a_terminal_gets_the_live_view_of_rounds_sites_and_the_last_round(tmp_path: Path) -> None:
    code, output = _in_terminal(tmp_path)
    text = _ESCAPES.sub("", output)
    assert code == 0, text[-3000:]
    assert "\x1b[" in output  # drawn: colours and the cursor moved back over the view
    assert re.search(r"round [12]/2 (training|evaluating)", text), text[-3000:]
    assert "rounds" in text and "time left" in text
    assert re.search(r"site-[12]  (waiting|training, epoch [12]/2|evaluating|done)", text)
    last = text[text.rindex("finished") :]  # the view's last drawing stays on the screen
    assert "2/2 rounds" in last and "sites: 2 done" in last
    assert "last round: round 2/2  train loss" in last
    assert "results in" in last  # the lines after the run come below the view
    assert "\x1b[?25h" in output  # the cursor is back
    # the sites' lines are in main.log, not on the screen
    assert "epoch 1/2: loss" not in text and "ClientAppActor" not in text
    assert "epoch 2/2: loss" in (tmp_path / "run" / "main.log").read_text()


def test_no_color_on_a_terminal_gives_plain_lines_without_any_escape_code(tmp_path: Path) -> None:
    code, output = _in_terminal(tmp_path, NO_COLOR="1")
    assert code == 0, output[-3000:]
    assert "\x1b" not in output, output[-3000:]
    assert "round 1/2  train loss" in output and "round 2/2  train loss" in output
    assert "results in" in output
