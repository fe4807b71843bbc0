"""The public share (``data.public_fraction``) and the ``public`` benchmark baseline: cases held
out of every site, seeded, without changing the test split; the baseline pretrained on them, whose
weights start every federated cell of its setup and seed."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from fl_imaging.benchmark.plan import cell_folder, plan_cells
from fl_imaging.config import BenchConfig, ConfigError
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.simulated import MARKER, load_pool, public_site_folder, simulated_sites
from fl_imaging.data.sites import SiteDataError

SHARED = Path(
    os.environ.get("FL_IMAGING_SHARED_DATA", Path(__file__).parents[2] / ".." / "shared" / "data")
)
HIPPOCAMPUS = SHARED / "msd_task04_hippocampus"
needs_hippocampus = pytest.mark.skipif(
    not (HIPPOCAMPUS / "dataset.json").is_file(), reason=f"MSD hippocampus not in {SHARED}"
)


def _hippocampus(tmp_path: Path, *more: str):
    return check_overrides(
        [
            "experiment=hippocampus",
            f"data.root={HIPPOCAMPUS}",
            "data.max_cases=40",
            "data.test_fraction=0.2",
            "data.num_sites=2",
            f"data.sites_dir={tmp_path / 'sites'}",
            *more,
        ]
    )


@needs_hippocampus
def test_public_share_is_held_out_of_every_site_seeded_and_keeps_the_test_split(
    tmp_path: Path,
) -> None:
    plain = load_pool(_hippocampus(tmp_path))
    cfg = _hippocampus(tmp_path, "data.public_fraction=0.25")
    pool = load_pool(cfg)
    split = {c.case_id: c.split for c in pool.cases}
    assert sum(s == "public" for s in split.values()) == 8  # a quarter of the 32 non-test cases
    # the same test cases as without a public share, so the tables compare
    assert {c.case_id for c in plain.cases if c.split == "test"} == {
        k for k, s in split.items() if s == "test"
    }
    assert {c.case_id: c.split for c in load_pool(cfg).cases} == split  # seeded
    folders = simulated_sites(cfg)
    public = public_site_folder(cfg)
    held_out = {p.name.split(".")[0] for p in (public / "images").iterdir()}
    assert held_out == {k for k, s in split.items() if s == "public"}
    for folder in folders:
        at_site = {p.name.split(".")[0] for p in (folder / "images").iterdir()}
        assert not at_site & held_out
    record = json.loads((public.parent / MARKER).read_text())
    assert sorted(record["public"]) == sorted(held_out)
    # another seed of the split holds out other cases
    other = load_pool(_hippocampus(tmp_path, "data.public_fraction=0.25", "data.partition.seed=1"))
    assert {c.case_id for c in other.cases if c.split == "public"} != held_out


@needs_hippocampus
def test_public_share_that_leaves_no_case_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="holds out 0"):
        load_pool(_hippocampus(tmp_path, "data.public_fraction=0.01"))
    with pytest.raises(SiteDataError, match="data.public_fraction is 0"):
        public_site_folder(_hippocampus(tmp_path))


def test_public_share_of_own_site_folders_is_refused() -> None:
    with pytest.raises(ConfigError, match="has no pool to hold them out from"):
        check_overrides(["data.public_fraction=0.2"])
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        check_overrides(["experiment=hippocampus", "data.public_fraction=1.5"])


def test_plan_starts_every_federated_cell_from_the_public_model(tmp_path: Path) -> None:
    bench = BenchConfig(
        name="warm",
        out_dir=str(tmp_path),
        seeds=[0, 1],
        baselines=["public", "pooled"],
        public_overrides=["engine.rounds=6"],
        strategies={
            "fedavg": ["strategy=fedavg"],
            "own": ["strategy=fedavg", "task.model.init=mine.pt"],
        },
    )
    cells = plan_cells(bench, ["experiment=hippocampus_dpsgd_warm"])
    assert [c.key for c in cells[:4]] == [
        "default/public/seed0",
        "default/pooled/seed0",
        "default/fedavg/seed0",
        "default/own/seed0",
    ]
    public, pooled, fedavg, own = cells[:4]
    assert public.kind == "public" and "engine.rounds=6" in public.overrides
    assert "engine.rounds=6" not in pooled.overrides
    start = f"task.model.init={tmp_path / 'warm' / 'cells' / 'default/public/seed0' / 'model.pt'}"
    assert start in fedavg.overrides
    assert not [o for o in pooled.overrides if o.startswith("task.model.init")]
    # a strategy's own init comes later, so it wins
    assert own.overrides.index("task.model.init=mine.pt") > own.overrides.index(start)
    # each seed starts from its own seed's public model
    assert cell_folder(bench, "default/public/seed1").as_posix() in " ".join(cells[6].overrides)


def test_bench_refuses_a_public_baseline_without_a_public_share(tmp_path: Path) -> None:
    from fl_imaging.benchmark import runner

    bench = replace(
        BenchConfig(), name="warm", out_dir=str(tmp_path), baselines=["public"], reference="public"
    )
    (cell,) = plan_cells(bench, ["experiment=hippocampus"])
    with pytest.raises(ConfigError, match="data.public_fraction is 0"):
        runner._checked(cell)
