"""Files and folders a command may not read, also when the tests run as root.

``chmod 000`` stops any user but root: root reads through it by its capabilities
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH. :func:`no_root_override` (a ``preexec_fn``) drops them
from the bounding set of the child before it starts our command, so that the command, even as
root, gets the kernel's real "Permission denied" for a path made unreadable by
:func:`unreadable`, through its real code path (nothing in the command is replaced).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["no_root_override", "unreadable"]

_PR_CAPBSET_DROP = 24  # prctl(2)
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2  # capabilities(7)


def no_root_override() -> None:
    """In a child about to start a command (``subprocess.Popen(preexec_fn=...)``): as root,
    drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so that the command
    obeys file modes as any user does; nothing for another user. Raises OSError when the
    kernel refuses."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl(PR_CAPBSET_DROP, {capability}): {os.strerror(code)}")


@contextmanager
def unreadable(path: Path) -> Iterator[Path]:
    """``path`` with mode 000 (no one but root may read, list or enter it) inside the block,
    its mode put back after it."""
    mode = path.stat().st_mode & 0o7777
    path.chmod(0)
    try:
        yield path
    finally:
        path.chmod(mode)
