"""``scripts/bench_clinical.py``: its help, the overrides it builds and how it splits a round.
The benchmark itself is not run here (it is one, at 128^3)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fl_imaging.review.results import AGGREGATE_SITE, MetricRow

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """``scripts/bench_clinical.py`` imported (the scripts folder on the path, as when run)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_clinical", SCRIPTS / "bench_clinical.py"
        )
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_clinical"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_help_runs_as_a_script_and_names_its_options() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_clinical.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--channels", "--shape", "--rounds", "--gpus-per-site", "--csv"):
        assert option in proc.stdout


def test_defaults_are_clinical_size_and_channels_1_drops_the_modalities(
    bench: ModuleType, tmp_path: Path
) -> None:
    args = bench._parser().parse_args([])
    assert (args.shape, args.channels) == (128, 4)
    task, rest = bench.overrides_of(args, tmp_path)
    assert "data.modalities=[t1,t1c,t2,flair]" in rest and "task.in_channels=4" in task
    assert "task.roi_size=[96,96,96]" in task and "data.shape=[128,128,128]" in rest
    one = bench._parser().parse_args(["--channels", "1", "--shape", "32", "x.y=1"])
    task, rest = bench.overrides_of(one, tmp_path)
    assert not any(o.startswith("data.modalities") for o in rest)
    assert "task.in_channels=1" in task and rest[-1] == "x.y=1"  # the user's override last


def test_a_round_splits_into_the_slowest_sites_and_the_rest(bench: ModuleType) -> None:
    """Rounds 2.. are averaged; training and evaluation are the slowest site's; messaging is
    what the round has besides its parts."""
    rows = []
    for rnd, (round_s, fits, evals, aggr) in enumerate(
        [(50.0, (30.0, 40.0), (5.0, 6.0), 0.5), (20.0, (10.0, 12.0), (3.0, 4.0), 1.0)], start=1
    ):
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "round_seconds", round_s))
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "aggregation_seconds", aggr))
        for site, fit, ev in zip(("site-1", "site-2"), fits, evals, strict=True):
            rows.append(MetricRow(rnd, site, "fit_seconds", fit))
            rows.append(MetricRow(rnd, site, "evaluate_seconds", ev))
    split = bench.round_split(rows)
    assert split.rounds == [2]
    assert (split.round_s, split.training_s, split.evaluation_s) == (20.0, 12.0, 4.0)
    assert split.messaging_s == pytest.approx(3.0)
    assert split.overhead_share == pytest.approx(4.0 / 20.0)
    with pytest.raises(SystemExit, match="aggregation"):
        bench.round_split([r for r in rows if r.metric != "aggregation_seconds"])
