"""Evaluation-only runs (``engine.rounds=0``, ``fl-imaging-eval MODEL``): every site scores the
given model on its test cases, no site is asked to fit, the run folder holds the usual files and
``model.pt`` is the given weights file byte for byte; the commands of docs/how-to/warm-start.md
run as the page has them."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
import torch
from cli_runs import run_cli
from local_runs import local_run

from fl_imaging.cli.eval import eval_overrides
from fl_imaging.config import ConfigError
from fl_imaging.config.compose import check_overrides
from fl_imaging.training.site_training import SiteTrainer
from tasks import build_task

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "how-to" / "warm-start.md"


def _weights(path: Path) -> Path:
    torch.manual_seed(3)
    torch.save(
        build_task(check_overrides(["experiment=smoke"]).task).build_model().state_dict(), path
    )
    return path


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_an_eval_only_run_scores_every_site_and_fits_nothing(tmp_path: Path) -> None:
    weights = _weights(tmp_path / "given.pt")
    overrides = eval_overrides(
        str(weights), ["experiment=smoke", f"data.root={tmp_path / 'demo'}"], tmp_path
    )
    with mock.patch.object(
        SiteTrainer, "fit", side_effect=AssertionError("a site was asked to fit")
    ):
        run_dir = local_run(tmp_path / "run", *overrides)
    rows = _rows(run_dir)
    dice = {r["site"] for r in rows if r["metric"] == "test_dice"}
    assert dice == {"site-1", "site-2", "all"}
    assert not [r for r in rows if r["metric"] in ("train_loss", "num_train")]
    assert (run_dir / "model.pt").read_bytes() == weights.read_bytes()
    audit = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in audit] == ["run_start", "test_round", "run_end"]  # no round
    assert audit[0]["initial_model"]["path"] == str(weights)
    assert (run_dir / "report.html").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give the model it scores, task.model.init=PATH"),
        (["task.model.init=x.pt", "engine.test=false"], "set engine.test=true"),
        (
            ["task.model.init=x.pt", "engine.test=true", "engine.cross_site=true"],
            "engine.cross_site=True needs",
        ),
        (["task.model.init=x.pt", "engine.rounds=-1"], "engine.rounds=-1: must be 1 or more"),
    ],
)
def test_rounds_zero_is_an_evaluation_only_run_and_says_what_it_needs(
    extra: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_overrides(["experiment=smoke", "engine.rounds=0", *extra])


def test_eval_refuses_what_it_sets_itself_and_a_model_that_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fl-imaging-eval sets engine.rounds itself"):
        eval_overrides("m.pt", ["engine.rounds=3"], tmp_path)
    done = run_cli("fl-imaging-eval", "missing.pt", "experiment=smoke", cwd=tmp_path, expect=2)
    assert f"task.model.init={tmp_path / 'missing.pt'}: no such file or folder" in done.stderr


def _page_commands() -> list[list[str]]:
    """The commands of the page's ``bash`` blocks, one word list per line."""
    blocks = re.findall(r"^```bash\n(.*?)^```", PAGE.read_text(), re.S | re.M)
    lines = [line for block in blocks for line in block.splitlines() if line.strip()]
    return [shlex.split(line, comments=True) for line in lines]


@pytest.mark.slow
def test_the_warm_start_page_commands_run_as_written(tmp_path: Path) -> None:
    commands = _page_commands()
    assert [c[0] for c in commands] == ["fl-imaging", "fl-imaging", "fl-imaging-eval"]
    for words in commands:
        run_cli(words[0], *words[1:], cwd=tmp_path, timeout=240)
    public, tuned = tmp_path / "runs" / "public", tmp_path / "runs" / "fine-tuned"
    scored = tmp_path / "runs" / "eval"
    assert (tuned / "model.pt").is_file()
    assert (scored / "model.pt").read_bytes() == (public / "model.pt").read_bytes()
    assert {r["site"] for r in _rows(scored) if r["metric"] == "test_dice"} >= {"site-1", "site-2"}
    assert not [r for r in _rows(scored) if r["metric"] == "train_loss"]
    assert (scored / "report.html").is_file()
    start = json.loads((tuned / "audit.jsonl").read_text().splitlines()[0])
    assert start["initial_model"]["path"] == str(public / "model.pt")  # relative, from cwd
    frozen = torch.load(public / "model.pt", weights_only=True)
    final = torch.load(tuned / "model.pt", weights_only=True)
    assert torch.allclose(final["model.0.residual.weight"], frozen["model.0.residual.weight"])
    assert not torch.equal(final["model.2.0.conv.weight"], frozen["model.2.0.conv.weight"])
