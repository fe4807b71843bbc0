"""docs/how-to/multi-modal.md: the commands of its "Train, inspect, predict" block, read from
the page and run as the page has them (each our real command, as a process, in a fresh working
folder): a federated run on the multi-modal demo, the check of one of its sites, predictions on
another's cases."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import nibabel as nib
import pytest
from cli_runs import run_cli

PAGE = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "multi-modal.md"


def page_commands(page: Path = PAGE) -> list[list[str]]:
    """The command lines of the bash block under the page's "Train, inspect, predict" heading,
    continuation lines joined, as argument lists."""
    section = page.read_text().split("## Train, inspect, predict", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"{page}: no bash block under 'Train, inspect, predict'"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip()]


@pytest.mark.slow
def test_the_pages_commands_train_inspect_and_predict(tmp_path: Path) -> None:
    commands = page_commands()
    assert [c[0] for c in commands] == ["fl-imaging", "fl-imaging-data", "fl-imaging-predict"]
    outputs = [run_cli(c[0], *c[1:], cwd=tmp_path).stdout for c in commands]
    assert (tmp_path / "runs" / "multi-modal" / "model.pt").is_file()
    assert "ready to join" in outputs[1] and "(4 ch)" in outputs[1]
    masks = sorted((tmp_path / "predictions" / "site-2").glob("*.nii.gz"))
    site = tmp_path / "demo-mm" / "site-2"
    assert [m.name for m in masks] == sorted(p.name for p in (site / "images" / "t1").iterdir())
    assert nib.load(masks[0]).shape == nib.load(site / "images" / "t1" / masks[0].name).shape
