"""Run Python where only MONAI, torch and what they read with are importable: what a user of an
exported bundle has, without fl-imaging."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import monai
import nibabel
import numpy as np
import opacus
import torch

#: Only the folders that hold MONAI, torch and what they read with: fl-imaging is not there.
PACKAGE_DIRS = sorted(
    {str(Path(m.__file__).resolve().parents[1]) for m in (monai, torch, nibabel, np, opacus)}
)


def monai_only(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` with ``python -I -S`` (no site, no .pth files: neither fl-imaging's
    editable install nor this checkout on the path) and only :data:`PACKAGE_DIRS` added, in
    ``cwd``; first it checks that fl_imaging and tasks cannot be imported. Fails the test when
    the script fails (its output's end shown); returns the finished process."""
    prelude = textwrap.dedent(
        f"""\
        import importlib.util, sys
        sys.path[:0] = {PACKAGE_DIRS!r}
        assert importlib.util.find_spec("fl_imaging") is None, "fl_imaging is importable"
        assert importlib.util.find_spec("tasks") is None, "tasks is importable"
        """
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done
