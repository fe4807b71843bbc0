"""``scripts/bench_he.py``: the cost stage runs as a script and prints its figures; the table
reads a run's metrics.csv and prints each protection's ratios to plain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tenseal", reason="the HE tests need the he extra: pip install -e '.[he]'")

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_the_cost_stage_prints_seconds_bytes_and_error() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_he.py"), "--only", "cost", "--floats", "9000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout
    assert "HE aggregation of 9000 floats across 3 sites" in line
    assert "encrypt per site" in line and "add (coordinator)" in line
    # 9000 floats: 3 ciphertexts of about 131 kB each
    assert "0.4 MB sent per site" in line
    error = float(line.split("largest error of the sum ")[1].split(" ")[0])
    assert error < 1e-6


def test_the_table_gives_each_protection_against_plain(capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_he
    finally:
        sys.path.remove(str(SCRIPTS))
    runs = [
        bench_he.Run("plain", 50.0, [10.0, 4.0, 4.0], 1e6, 0.80),
        bench_he.Run("he", 60.0, [12.0, 5.0, 5.0], 3e6, 0.801),
    ]
    bench_he.print_table(runs)
    out = capsys.readouterr().out
    assert "he / plain: wall 1.20x, per round 1.22x (rounds 2+: 1.25x), bytes 3.00x" in out
    assert "final Dice +0.0010" in out
