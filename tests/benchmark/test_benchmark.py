"""The benchmark (fl-imaging-bench) and what it is built from: the smoke preset end to end and
resumed, the plan of cells, a cell's state, the tables' figures on hand-made numbers. A site's
side (FedBN, the test round) is in test_site_rounds.py."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_runs import run_cli
from local_runs import sites_in_process

from fl_imaging.benchmark import runner
from fl_imaging.benchmark.all_test_cases import ALL_TEST_CASES_FILE
from fl_imaging.benchmark.cells import CELL_FILE, cell_status
from fl_imaging.benchmark.plan import Cell, plan_cells
from fl_imaging.benchmark.report import SiteResult, site_results, summarise
from fl_imaging.cli.bench import main
from fl_imaging.config import BenchConfig, ConfigError
from fl_imaging.review.results import MetricRow

METHODS = ["pooled", "local", "fedavg", "fedbn", "dpfedavg"]
SITES = ["site-1", "site-2"]
SEEDS = [0, 1]

# --- the smoke preset end to end (the acceptance test of fl-imaging-bench) ----------------------


@dataclass
class Smoke:
    """One run of ``fl-imaging-bench experiment=smoke``, then the same command again."""

    out: Path
    code: int
    results: list[dict[str, str]]
    summary: list[dict[str, str]]
    cell_files: dict[Path, tuple[str, int]]
    rerun_code: int
    rerun_cell_files: dict[Path, tuple[str, int]]
    rerun_log: list[str]
    listing: str


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _cell_files(out: Path) -> dict[Path, tuple[str, int]]:
    return {p: (p.read_text(), p.stat().st_mtime_ns) for p in out.glob(f"cells/*/*/*/{CELL_FILE}")}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Smoke:
    """The smoke benchmark run once for this module, its federated cells with the real sites
    in-process (:mod:`local_runs`; 15-20 s on 2 cores, against 1.5-3 minutes on Ray), then
    rerun."""
    root = tmp_path_factory.mktemp("smoke")
    args = ["experiment=smoke", f"bench.out_dir={root / 'bench'}"]
    out = root / "bench" / "smoke"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the demo's data root is relative to the working directory
        with sites_in_process():
            code = main(args)
        before = _cell_files(out)
        lines = _Lines()
        bench_log = logging.getLogger("fl_imaging.bench")
        level = bench_log.level
        bench_log.addHandler(lines)
        bench_log.setLevel(logging.INFO)
        try:
            rerun_code = main(args)
        finally:
            bench_log.removeHandler(lines)
            bench_log.setLevel(level)
        listing = io.StringIO()
        with contextlib.redirect_stdout(listing):
            assert main([*args, "--list"]) == 0
    return Smoke(
        out=out,
        code=code,
        results=_csv(out / "results.csv") if code == 0 else [],
        summary=_csv(out / "summary.csv") if code == 0 else [],
        cell_files=before,
        rerun_code=rerun_code,
        rerun_cell_files=_cell_files(out),
        rerun_log=lines.lines,
        listing=listing.getvalue(),
    )


@pytest.mark.slow
def test_smoke_results_have_a_row_per_method_seed_and_site(smoke: Smoke) -> None:
    assert smoke.code == 0
    assert len(smoke.results) == len(SEEDS) * len(METHODS) * len(SITES) == 20
    keys = {(r["method"], int(r["seed"]), r["site"]) for r in smoke.results}
    assert keys == {(m, s, site) for m in METHODS for s in SEEDS for site in SITES}
    for row in smoke.results:
        assert 0.0 <= float(row["test_dice"]) <= 1.0
        assert row["setup"] == "demo" and int(row["num_test"]) == 2  # 25 % of 8 cases
        assert int(row["best_round"]) in (1, 2)
    kinds = {r["method"]: r["kind"] for r in smoke.results}
    assert kinds == {
        "pooled": "pooled",
        "local": "local",
        "fedavg": "federated",
        "fedbn": "federated",
        "dpfedavg": "federated",
    }


@pytest.mark.slow
def test_smoke_dp_rows_have_epsilon_and_only_federated_rows_traffic(smoke: Smoke) -> None:
    for row in smoke.results:
        dp = row["method"] == "dpfedavg"
        assert (row["epsilon"] != "") == dp, row
        if dp:
            assert float(row["epsilon"]) > 0
        federated = row["kind"] == "federated"
        assert (float(row["mb_up"]) > 0) == federated, row
        assert (float(row["mb_down"]) > 0) == federated, row
        # fine-tuning is scored for the final shared model, not for a site's own (local) model
        assert (row["finetuned_dice"] != "") == (row["method"] != "local"), row


@pytest.mark.slow
def test_smoke_summary_tables_and_plots(smoke: Smoke) -> None:
    assert [r["method"] for r in smoke.summary] == METHODS
    for column in ("setup", "kind", "seeds", "dice_mean", "dice_std", "worst_mean", "gap_mean"):
        assert column in smoke.summary[0]
    for column in ("finetuned_mean", "wall_s_mean", "mb_per_site_mean", "epsilon_mean"):
        assert column in smoke.summary[0]
    for row in smoke.summary:
        assert row["seeds"] == "2" and 0.0 <= float(row["dice_mean"]) <= 1.0
        assert float(row["worst_mean"]) <= float(row["dice_mean"])
    # the summary's mean is the mean over seeds of the mean over sites of results.csv
    fedavg = [float(r["test_dice"]) for r in smoke.results if r["method"] == "fedavg"]
    dice_mean = next(float(r["dice_mean"]) for r in smoke.summary if r["method"] == "fedavg")
    assert dice_mean == pytest.approx(sum(fedavg) / len(fedavg), abs=1e-3)

    # every method against FedAvg (bench.compare_with): the mean over seeds of the per-seed
    # difference of the mean over sites
    def seed_means(method: str) -> dict[int, float]:
        rows = [r for r in smoke.results if r["method"] == method]
        return {
            s: sum(float(r["test_dice"]) for r in rows if int(r["seed"]) == s) / 2 for s in SEEDS
        }

    fedbn, base = seed_means("fedbn"), seed_means("fedavg")
    row = next(r for r in smoke.summary if r["method"] == "fedbn")
    assert row["vs"] == "fedavg"
    assert float(row["vs_mean"]) == pytest.approx(
        sum(fedbn[s] - base[s] for s in SEEDS) / 2, abs=1e-3
    )
    markdown = (smoke.out / "summary.md").read_text()
    assert "dice - fedavg (95 % CI over seeds)" in markdown
    assert all(f"| {method} |" in markdown for method in METHODS)
    for plot in ("convergence_demo.png", "per_site_demo.png"):
        assert (smoke.out / plot).stat().st_size > 1000


@pytest.mark.slow
def test_smoke_scores_each_final_model_on_all_test_cases_at_once(smoke: Smoke) -> None:
    """Dice is a mean over cases and every demo site holds 2 test cases, so a global model's
    figure over all 4 test cases is the mean of its two sites' figures; FedBN has none."""
    summary = {r["method"]: r for r in smoke.summary}
    for method in ("pooled", "fedavg", "dpfedavg"):
        for seed in SEEDS:
            sites = [
                float(r["test_dice"])
                for r in smoke.results
                if r["method"] == method and int(r["seed"]) == seed
            ]
            cached = smoke.out / "cells" / "demo" / method / f"seed{seed}" / ALL_TEST_CASES_FILE
            whole = json.loads(cached.read_text())
            assert whole["dice"] == pytest.approx(sum(sites) / len(sites), abs=1e-4), method
        assert float(summary[method]["whole_dice_mean"]) >= 0.0
    assert summary["fedbn"]["whole_dice_mean"] == ""
    assert 0.0 <= float(summary["local"]["whole_dice_mean"]) <= 1.0  # each site's model, averaged
    assert "dice, all test cases at once" in (smoke.out / "summary.md").read_text()


@pytest.mark.slow
def test_smoke_every_cell_is_a_done_run_folder(smoke: Smoke) -> None:
    assert len(smoke.cell_files) == len(SEEDS) * len(METHODS)
    for path, (text, _) in smoke.cell_files.items():
        cell = json.loads(text)
        assert cell["status"] == "done" and cell["error"] == ""
        assert path.parent.relative_to(smoke.out / "cells") == Path(
            "demo", cell["method"], f"seed{cell['seed']}"
        )
        assert (path.parent / "metrics.csv").is_file() and (path.parent / "config.yaml").is_file()


@pytest.mark.slow
def test_smoke_rerun_reuses_every_cell_and_lists_them_done(smoke: Smoke) -> None:
    assert smoke.rerun_code == 0
    assert smoke.rerun_cell_files == smoke.cell_files  # same contents, not written again
    reused = [line for line in smoke.rerun_log if line.endswith("done before, reused")]
    assert len(reused) == len(smoke.cell_files)
    assert not [line for line in smoke.rerun_log if "running" in line or "FAILED" in line]
    assert "10 cells, 10 done before, 0 to run" in "\n".join(smoke.rerun_log)
    listed = smoke.listing.splitlines()
    assert len(listed) == len(smoke.cell_files)
    assert all(line.split() == ["done", line.split()[1]] for line in listed)
    assert {line.split()[1] for line in listed} == {
        f"demo/{m}/seed{s}" for m in METHODS for s in SEEDS
    }


def test_bench_checks_fedbn_of_every_cell_before_running_any(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """FedBN with a model without normalisation parameters is a config error of the benchmark,
    found before the first cell (the baselines, fedavg) runs, not when the fedbn cell fails."""
    ran: list[str] = []
    monkeypatch.setattr(
        runner, "run_cell", lambda cell, *a: ran.append(cell.key) or ("failed", 0.0, "")
    )
    monkeypatch.chdir(tmp_path)
    code = main(["experiment=smoke", f"bench.out_dir={tmp_path}", "task.model.norm=null"])
    assert code == 2 and ran == []


def test_bench_where_every_cell_fails_still_writes_its_tables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(runner, "run_cell", lambda cell, *a: ("failed", 0.0, "boom"))
    out = tmp_path / "not-yet"
    assert main(["experiment=smoke", f"bench.out_dir={out}"]) == 1
    with (out / "smoke" / "results.csv").open() as f:
        assert list(csv.DictReader(f)) == []  # a header, no rows
    assert (out / "smoke" / "summary.md").is_file()


def test_bench_without_a_benchmark_is_a_config_error(tmp_path: Path) -> None:
    assert main([f"bench.out_dir={tmp_path}"]) == 2
    assert main(["experiment=smoke", "bench.seeds=[]", f"bench.out_dir={tmp_path}"]) == 2
    assert not any(tmp_path.iterdir())


def test_bench_names_a_cell_whose_override_cannot_be_read(tmp_path: Path) -> None:
    """A malformed override in a cell's list (here a strategy's, with a stray bracket) stops
    ``fl-imaging-bench`` before any cell runs, with one line naming the cell and the override;
    a malformed override on its own command line, likewise."""
    proc = run_cli(
        "fl-imaging-bench",
        "experiment=smoke",
        f"bench.out_dir={tmp_path}",
        '+bench.strategies.bad=["task.roi_size=[32,32"]',
        cwd=tmp_path,
        expect=2,
    )
    assert "Traceback" not in proc.stderr
    assert "bench cell demo/bad/seed0: The override 'task.roi_size=[32,32' cannot be read" in (
        proc.stderr
    )
    proc = run_cli("fl-imaging-bench", "experiment=smoke", "bench.seeds=[0", cwd=tmp_path, expect=2)
    assert "Traceback" not in proc.stderr
    assert "The override 'bench.seeds=[0' cannot be read" in proc.stderr
    assert not any(tmp_path.iterdir())


# --- plan of cells ------------------------------------------------------------------------------


def _bench(**fields: object) -> BenchConfig:
    base = {
        "name": "t",
        "seeds": [0, 1],
        "setups": {"iid": ["data.partition.name=iid"], "shift": ["data.partition.name=shift"]},
        "strategies": {"fedavg": ["strategy=fedavg"], "dp": ["strategy=dpfedavg"]},
        "baselines": ["local", "pooled"],
        "finetune_epochs": 2,
    }
    return BenchConfig(**{**base, **fields})  # type: ignore[arg-type]


def test_plan_runs_each_setup_and_seed_baselines_first() -> None:
    cells = plan_cells(_bench(), ["experiment=smoke"])
    assert len(cells) == 2 * 2 * 4
    assert [c.key for c in cells[:8]] == [
        "iid/pooled/seed0",
        "iid/local/seed0",
        "iid/fedavg/seed0",
        "iid/dp/seed0",
        "iid/pooled/seed1",
        "iid/local/seed1",
        "iid/fedavg/seed1",
        "iid/dp/seed1",
    ]
    assert [c.setup for c in cells[8:]] == ["shift"] * 8
    assert [c.kind for c in cells[:4]] == ["pooled", "local", "federated", "federated"]
    dp = cells[7]
    assert (dp.setup, dp.method, dp.seed) == ("iid", "dp", 1)
    assert dp.overrides == (
        "experiment=smoke",
        "data.partition.name=iid",
        "strategy=dpfedavg",
        "seed=1",
        "engine.test=true",
        "engine.finetune_epochs=2",
    )
    # the user's overrides come first, so a setup's or strategy's win; the cell's seed wins over
    # a seed given on the command line
    (first, *_) = plan_cells(_bench(seeds=[3]), ["seed=9", "engine.rounds=4"])
    assert first.overrides[:2] == ("seed=9", "engine.rounds=4")
    assert first.overrides.index("seed=3") > first.overrides.index("seed=9")


def test_plan_without_setups_has_one_default_setup() -> None:
    cells = plan_cells(_bench(setups={}, baselines=[], seeds=[0], reference="fedavg"), [])
    assert [c.key for c in cells] == ["default/fedavg/seed0", "default/dp/seed0"]


def test_plan_cell_overrides_leave_out_the_bench_section() -> None:
    """bench.* settings change which cells run, not what a cell runs: a benchmark extended by a
    seed (bench.seeds=[0,1] after bench.seeds=[0]) reuses the cells that ran."""
    one = plan_cells(_bench(seeds=[0]), ["experiment=smoke", "bench.seeds=[0]"])
    two = plan_cells(_bench(seeds=[0, 1]), ["experiment=smoke", "bench.seeds=[0,1]"])
    assert one[0].overrides == two[0].overrides
    assert not [o for c in two for o in c.overrides if o.startswith("bench.")]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"baselines": ["pooled", "central"]}, "unknown central"),
        ({"seeds": []}, "bench.seeds is empty"),
        ({"strategies": {}, "baselines": []}, "no strategies and no baselines"),
        ({"strategies": {"local": ["strategy=fedavg"]}}, "local is the name of a baseline"),
        ({"strategies": {"dp/0.3": ["strategy=dpfedavg"]}}, "cannot name a folder"),
        ({"setups": {"../up": []}}, "cannot name a folder"),
        ({"reference": "fedavgg"}, r"bench.reference=fedavgg: not a method.*local, pooled, fedavg"),
        ({"baselines": []}, r"bench.reference=pooled: not a method.*values: fedavg, dp "),
    ],
)
def test_plan_refuses(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_cells(_bench(**fields), [])


# --- a cell's state -----------------------------------------------------------------------------


def test_cell_status_new_done_failed_changed(tmp_path: Path) -> None:
    cell = Cell("iid", "fedavg", "federated", 0, ("experiment=smoke", "seed=0"))
    folder = tmp_path / cell.key
    assert cell_status(cell, folder) == "new"
    folder.mkdir(parents=True)
    assert cell_status(cell, folder) == "new"

    def write(overrides: list[str], status: str) -> None:
        record = {"overrides": overrides, "status": status, "error": "", "seconds": 1.0}
        (folder / CELL_FILE).write_text(json.dumps(record))

    write(list(cell.overrides), "done")
    assert cell_status(cell, folder) == "done"
    write(list(cell.overrides), "failed")
    assert cell_status(cell, folder) == "failed"
    write(["experiment=smoke", "seed=0", "engine.rounds=5"], "done")
    assert cell_status(cell, folder) == "changed"
    (folder / CELL_FILE).write_text('{"overrides": [')  # cut short by a crash
    assert cell_status(cell, folder) == "new"


# --- the tables' figures ------------------------------------------------------------------------


def _rows() -> list[MetricRow]:
    a = [
        *(MetricRow(r, "a", "dice", v) for r, v in ((1, 0.4), (2, 0.7), (3, 0.6))),
        *(MetricRow(r, "a", "val_loss", v) for r, v in ((1, 0.3), (2, 0.5), (3, 0.8))),
        *(MetricRow(r, "a", "bytes_up", 1e6 * r) for r in (1, 2)),
        *(MetricRow(r, "a", "bytes_down_train", 5e5) for r in (1, 2)),
        *(MetricRow(r, "a", "bytes_down_evaluate", 2.5e5) for r in (1, 2)),
        MetricRow(3, "a", "test_dice", 0.65),
        MetricRow(3, "a", "test_loss", 0.2),
        MetricRow(3, "a", "finetuned_dice", 0.75),
        MetricRow(3, "a", "num_test", 4),
    ]
    b = [
        MetricRow(1, "b", "dice", math.nan),
        MetricRow(2, "b", "dice", 0.3),
        MetricRow(3, "b", "test_dice", 0.35),
        MetricRow(3, "b", "num_test", 1),
    ]
    no_test = [MetricRow(1, "c", "dice", 0.9)]
    overall = [
        MetricRow(1, "all", "epsilon", 1.0),
        MetricRow(2, "all", "epsilon", 2.5),
        MetricRow(2, "all", "dice", 0.99),
        MetricRow(2, "all", "bytes_up", 1e9),
    ]
    return [*a, *b, *no_test, *overall]


def _site_results(main: str) -> list[SiteResult]:
    return site_results(
        _rows(),
        setup="iid",
        method="dp",
        kind="federated",
        seed=1,
        dataset="demo",
        partition="sites",
        main=main,
        wall_s=12.5,
    )


def test_site_results_best_round_traffic_and_epsilon() -> None:
    a, b = _site_results("dice")  # site c has no test figures: no result
    assert (a.site, a.setup, a.method, a.kind, a.seed, a.wall_s) == (
        "a",
        "iid",
        "dp",
        "federated",
        1,
        12.5,
    )
    assert a.test == {"dice": 0.65, "loss": 0.2} and a.finetuned == {"dice": 0.75}
    assert a.num_test == 4 and b.num_test == 1
    assert (a.best_round, a.best_val) == (2, 0.7)
    assert (b.best_round, b.best_val) == (2, 0.3)  # the NaN round is no best round
    assert a.mb_up == pytest.approx(3.0) and a.mb_down == pytest.approx(1.5)
    assert b.mb_up == 0.0 and b.mb_down == 0.0  # the aggregate's bytes are nobody's
    assert a.epsilon == b.epsilon == 2.5  # the privacy spent by the end
    assert b.finetuned == {}


def test_site_results_lower_loss_is_better() -> None:
    a, b = _site_results("val_loss")
    assert (a.best_round, a.best_val) == (1, 0.3)
    assert b.best_round == 0 and math.isnan(b.best_val)


def _result(method: str, seed: int, site: str, dice: float, **fields: object) -> SiteResult:
    return SiteResult(
        setup="iid",
        method=method,
        kind="pooled" if method == "pooled" else "federated",
        seed=seed,
        site=site,
        dataset="demo",
        partition="sites",
        num_test=100 if site == "a" else 1,  # the figures do not weight by it
        test={"dice": dice},
        **fields,  # type: ignore[arg-type]
    )


def test_summarise_means_over_sites_then_seeds() -> None:
    results = [
        _result("fedavg", 0, "a", 0.8, wall_s=10.0, mb_up=1.0, mb_down=2.0),
        _result("fedavg", 0, "b", 0.6, wall_s=10.0, mb_up=1.0, mb_down=2.0),
        _result("fedavg", 0, "c", 0.4, wall_s=10.0, mb_up=1.0, mb_down=2.0),
        _result("fedavg", 1, "a", 0.9, wall_s=14.0, mb_up=2.0, mb_down=2.0),
        _result("fedavg", 1, "b", 0.5, wall_s=14.0, mb_up=2.0, mb_down=2.0),
        _result("fedavg", 1, "c", math.nan, wall_s=14.0, mb_up=2.0, mb_down=2.0),
        _result("pooled", 0, "a", 0.9, finetuned={"dice": 0.95}, epsilon=math.nan),
        _result("pooled", 0, "b", 0.7, finetuned={"dice": 0.85}),
    ]
    fedavg, pooled = summarise(results, ["dice"])
    assert (fedavg.setup, fedavg.method, fedavg.kind, fedavg.seeds) == (
        "iid",
        "fedavg",
        "federated",
        2,
    )
    figures = fedavg.figures
    # seed 0: mean 0.6, worst 0.4, gap 0.4; seed 1 (site c NaN): mean 0.7, worst 0.5, gap 0.4
    assert figures["dice"] == pytest.approx((0.65, math.sqrt(0.005)))
    assert figures["worst"] == pytest.approx((0.45, math.sqrt(0.005)))
    assert figures["gap"] == pytest.approx((0.4, 0.0), abs=1e-12)
    assert figures["wall_s"] == pytest.approx((12.0, math.sqrt(8.0)))
    assert figures["mb_per_site"] == pytest.approx((3.5, math.sqrt(0.5)))
    assert all(math.isnan(v) for v in figures["finetuned"] + figures["epsilon"])
    # one seed: no spread
    assert pooled.seeds == 1 and pooled.kind == "pooled"
    assert pooled.figures["dice"] == pytest.approx((0.8, 0.0))
    assert pooled.figures["finetuned"] == pytest.approx((0.9, 0.0))
    assert pooled.figures["gap"] == pytest.approx((0.2, 0.0))


def test_plots_give_every_method_its_own_colour(tmp_path: Path) -> None:
    from fl_imaging.benchmark.report import _colours

    for count in (2, 13, 20, 25):
        methods = [f"m{i}" for i in range(count)]
        colours = _colours(methods)
        assert list(colours) == methods and len(set(colours.values())) == count


def test_fl_imaging_bench_lists_the_cells_as_a_command(tmp_path: Path) -> None:
    """The command itself (its own process, :mod:`cli_runs`): ``--list`` names every cell of
    the smoke preset, none of them run."""
    proc = run_cli(
        "fl-imaging-bench", "experiment=smoke", f"bench.out_dir={tmp_path}", "--list", cwd=tmp_path
    )
    listed = proc.stdout.splitlines()
    assert len(listed) == len(SEEDS) * len(METHODS)
    assert {line.split()[1] for line in listed} == {
        f"demo/{m}/seed{s}" for m in METHODS for s in SEEDS
    }
    assert not list(tmp_path.glob("smoke/cells/*/*/*/*"))
