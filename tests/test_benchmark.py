"""The benchmark (fl-imaging-bench) and what it is built from: the smoke preset end to end and
resumed, the plan of cells, a cell's state, the tables' figures on hand-made numbers, FedBN at a
site, the test round after the last round, and the demo's test cases."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import FakeGrid, record
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fl_imaging import bench_cli
from fl_imaging.baselines import train_pooled
from fl_imaging.bench_cli import main
from fl_imaging.benchmark.cells import CELL_FILE, cell_status
from fl_imaging.benchmark.plan import Cell, plan_cells
from fl_imaging.benchmark.report import SiteResult, site_results, summarise
from fl_imaging.benchmark.whole_test import WHOLE_TEST_FILE, whole_test_metrics
from fl_imaging.cli import check_fedbn, check_overrides, run
from fl_imaging.config import BenchConfig, ConfigError, DataName, RunConfig
from fl_imaging.data.demo import make_demo_data
from fl_imaging.data.sites import load_site
from fl_imaging.flower import client_app
from fl_imaging.flower.final_test import test_final_model as final_test_round
from fl_imaging.flower.local_norms import (
    LOCAL_NORMS,
    norm_state_keys,
    restore_local_norms,
    save_local_norms,
)
from fl_imaging.results import MetricRow
from fl_imaging.site_training import SiteTrainer, finetune_seed, training_seed

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
    """The smoke benchmark run once for this module (1.5-3 minutes on 2 cores), then rerun."""
    root = tmp_path_factory.mktemp("smoke")
    args = ["experiment=smoke", f"bench.out_dir={root / 'bench'}"]
    out = root / "bench" / "smoke"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the demo's data root is relative to the working directory
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
    markdown = (smoke.out / "summary.md").read_text()
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
            cached = smoke.out / "cells" / "demo" / method / f"seed{seed}" / WHOLE_TEST_FILE
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
        bench_cli, "run_cell", lambda cell, *a: ran.append(cell.key) or ("failed", 0.0, "")
    )
    monkeypatch.chdir(tmp_path)
    code = main(["experiment=smoke", f"bench.out_dir={tmp_path}", "task.model.norm=null"])
    assert code == 2 and ran == []


def test_bench_where_every_cell_fails_still_writes_its_tables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_cli, "run_cell", lambda cell, *a: ("failed", 0.0, "boom"))
    out = tmp_path / "not-yet"
    assert main(["experiment=smoke", f"bench.out_dir={out}"]) == 1
    with (out / "smoke" / "results.csv").open() as f:
        assert list(csv.DictReader(f)) == []  # a header, no rows
    assert (out / "smoke" / "summary.md").is_file()


def test_whole_test_of_a_cell_without_its_models_says_which_file(
    tmp_path: Path, demo_site: Path
) -> None:
    cfg = _site_config(demo_site)
    cfg.data.name = DataName.folders
    for kind, lacking in (("pooled", "model.pt"), ("local", "SITE.pt")):
        with pytest.raises(FileNotFoundError, match=lacking):
            whole_test_metrics(cfg, tmp_path, kind)
    assert not (tmp_path / WHOLE_TEST_FILE).exists()


def test_bench_without_a_benchmark_is_a_config_error(tmp_path: Path) -> None:
    assert main([f"bench.out_dir={tmp_path}"]) == 2
    assert main(["experiment=smoke", "bench.seeds=[]", f"bench.out_dir={tmp_path}"]) == 2
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
    cells = plan_cells(_bench(setups={}, baselines=[], seeds=[0]), [])
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


# --- FedBN at a site ----------------------------------------------------------------------------


@pytest.fixture
def demo_site(tmp_path: Path) -> Path:
    (site,) = make_demo_data(
        tmp_path / "demo",
        num_sites=1,
        cases_per_site=4,
        shape=(16, 16, 16),
        dicom_sites=(),
        test_cases=1,
    )
    return site


def _site_config(site: Path, *overrides: str) -> RunConfig:
    cfg = check_overrides(
        [
            "experiment=quick",
            "task.roi_size=[16,16,16]",
            "task.model.channels=[4,8]",
            "task.local_epochs=1",
            "task.model.norm=batch",
            *overrides,
        ]
    )
    cfg.data.sites = [str(site)]
    return cfg


def _message(kind: str, arrays: dict[str, torch.Tensor], **config: object) -> Message:
    return Message(
        content=RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)}),
        message_type=kind,
        dst_node_id=1,
    )


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("fedbn", [True, False])
def test_fedbn_site_keeps_its_own_normalisation_layers(
    monkeypatch: pytest.MonkeyPatch, demo_site: Path, fedbn: bool
) -> None:
    monkeypatch.setattr(client_app, "_TRAINERS", {})
    cfg = _site_config(demo_site, f"strategy.fedbn={str(fedbn).lower()}")
    app = client_app.build_client_app(cfg)
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    start = {
        k: v.clone() for k, v in client_app.build_task(cfg.task).build_model().state_dict().items()
    }

    reply = app(_message(MessageType.TRAIN, start, **{"server-round": 1}), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    (trainer,) = client_app._TRAINERS.values()
    norms = norm_state_keys(trainer.model)
    assert any(k.endswith("running_mean") for k in norms)
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert (LOCAL_NORMS in context.state.array_records) == fedbn
    if fedbn:
        kept = context.state.array_records[LOCAL_NORMS].to_torch_state_dict()
        assert sorted(kept) == sorted(norms)
        assert all(torch.equal(kept[k], trained[k]) for k in norms)

    # the next global model: normalisation layers far from any site's, other weights moved
    sent = reply.content["arrays"].to_torch_state_dict()
    other = next(k for k in sent if k not in norms and sent[k].is_floating_point())
    weight = next(k for k in norms if k.endswith(".weight"))
    glob = {
        k: (torch.full_like(v, 7.0) if k in norms and v.is_floating_point() else v + 0.5)
        if v.is_floating_point()
        else v
        for k, v in sent.items()
    }
    reply = app(_message(MessageType.EVALUATE, glob), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["num-examples"] == 1
    now = trainer.model.state_dict()
    assert torch.equal(now[other], glob[other])
    if fedbn:
        assert all(torch.equal(now[k], trained[k]) for k in norms)
        assert not torch.equal(now[weight], glob[weight])
    else:
        assert all(torch.equal(now[k], glob[k]) for k in norms)


@pytest.mark.usefixtures("task_identity")
def test_test_round_scores_the_global_model_and_keeps_it_after_fine_tuning(
    monkeypatch: pytest.MonkeyPatch, demo_site: Path
) -> None:
    monkeypatch.setattr(client_app, "_TRAINERS", {})
    cfg = _site_config(demo_site)
    app = client_app.build_client_app(cfg)
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    glob = client_app.build_task(cfg.task).build_model().state_dict()
    msg = _message(MessageType.EVALUATE, glob, split="test", **{"finetune-epochs": 1})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = dict(reply.content["metrics"])
    assert metrics["num-examples"] == 1  # the demo's split.csv holds 1 test case out
    assert {"test_dice", "test_loss", "finetuned_dice", "finetuned_loss"} <= set(metrics)
    assert "dice" not in metrics and "val_loss" not in metrics
    assert metrics["test_loss"] != metrics["finetuned_loss"]  # fine-tuning changed the model
    # ... a copy of it: the site's model is the global model again afterwards
    (trainer,) = client_app._TRAINERS.values()
    now = trainer.model.state_dict()
    assert all(torch.equal(now[k], glob[k]) for k in glob)


def test_site_trainer_state_is_a_copy_and_test_metrics_put_the_model_back(
    demo_site: Path,
) -> None:
    cfg = _site_config(demo_site)
    site = load_site(demo_site, "segmentation", val_fraction=0.34, seed=0)
    task = client_app.build_task(cfg.task)
    trainer = SiteTrainer("site-1", site.train, site.val, task, batch_size=1, test_cases=site.test)
    before = trainer.state()
    trainer.fit(1, seed=training_seed(0, 1, 0))
    after = trainer.state()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed  # training moved the model, not the earlier copy of its weights
    metrics = trainer.test_metrics(1, seed=finetune_seed(0, 0))
    assert {"test_dice", "finetuned_dice", "test_loss", "finetuned_loss"} <= set(metrics)
    assert metrics["test_loss"] != metrics["finetuned_loss"]
    now = trainer.state()
    assert all(torch.equal(now[k], after[k]) for k in after)
    no_test = SiteTrainer("site-2", site.train, site.val, task, batch_size=1)
    assert no_test.test_metrics(1, seed=0) == {}


def test_training_and_finetuning_seeds_never_collide() -> None:
    grid = [(seed, rnd, site) for seed in range(3) for rnd in range(1, 21) for site in range(8)]
    training = {training_seed(*key) for key in grid}
    finetuning = {finetune_seed(seed, site) for seed in range(3) for site in range(8)}
    assert len(training) == len(grid) and len(finetuning) == 24
    assert not training & finetuning


@pytest.mark.usefixtures("task_identity")
def test_pooled_baseline_fine_tunes_each_site_as_its_test_round_does(
    monkeypatch: pytest.MonkeyPatch, demo_site: Path
) -> None:
    """The pooled model's ``finetuned_*`` rows are what a site's test round reports for that
    model: same cases, same seed, same epochs."""
    monkeypatch.setattr(client_app, "_TRAINERS", {})
    cfg = _site_config(demo_site, "engine.rounds=1")
    site = load_site(demo_site, "segmentation", val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    rows, model = train_pooled(cfg, [site], finetune_epochs=1)
    metrics = {r.metric: r.value for r in rows if r.site == site.name}
    assert metrics["num_test"] == 1 and {"test_dice", "finetuned_dice"} <= set(metrics)
    app = client_app.build_client_app(cfg)
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    msg = _message(MessageType.EVALUATE, model.state_dict(), split="test", **{"finetune-epochs": 1})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    site_metrics = reply.content["metrics"]
    for name in ("test_dice", "test_loss", "finetuned_dice", "finetuned_loss"):
        assert site_metrics[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name


@pytest.mark.usefixtures("task_identity")
def test_a_site_process_keeps_only_the_current_runs_trainers(
    monkeypatch: pytest.MonkeyPatch, demo_site: Path
) -> None:
    monkeypatch.setattr(client_app, "_TRAINERS", {})
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    first = client_app._trainer(context, _site_config(demo_site))
    assert client_app._trainer(context, _site_config(demo_site)) is first  # same run: reused
    second = client_app._trainer(context, _site_config(demo_site, "seed=1"))
    assert second is not first and list(client_app._TRAINERS.values()) == [second]


def test_local_norms_round_trip_through_the_context() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2), torch.nn.GroupNorm(1, 2)
    )
    assert norm_state_keys(model) == [
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "2.weight",
        "2.bias",
    ]
    context = Context(1, 1, {}, RecordDict(), {})
    assert not restore_local_norms(model, context)
    torch.nn.init.constant_(model[1].weight, 3.0)
    save_local_norms(model, context)
    torch.nn.init.constant_(model[1].weight, -1.0)
    torch.nn.init.constant_(model[0].weight, 5.0)
    assert restore_local_norms(model, context)
    assert torch.all(model[1].weight == 3.0) and torch.all(model[0].weight == 5.0)
    assert norm_state_keys(torch.nn.Sequential(torch.nn.InstanceNorm3d(2))) == []


def test_fedbn_needs_a_model_with_normalisation_parameters(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # the run folder (partition.csv)
    cfg = check_overrides(
        [
            "experiment=quick",
            "strategy.fedbn=true",
            "data.cases_per_site=3",
            "data.shape=[12,12,12]",
            f"data.root={tmp_path / 'demo'}",
        ]
    )
    with pytest.raises(ConfigError, match=r"task\.model\.norm=null.*task\.model\.norm=batch"):
        run(cfg)  # refused before the engine starts
    check_fedbn(check_overrides(["strategy.fedbn=true", "task.model.norm=batch"]))
    check_fedbn(check_overrides(["task=classification", "strategy.fedbn=true"]))  # DenseNet


# --- the test round on the server ---------------------------------------------------------------


class ScoringGrid(FakeGrid):
    """Node 1 and 2 score the model; node 2 has an AUC-like NaN; node 3 fails."""

    def __init__(self) -> None:
        super().__init__(3, lambda n, r, s: s)
        self.configs: list[dict] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == MessageType.EVALUATE
            self.configs.append(dict(msg.content["config"]))
            node = msg.metadata.dst_node_id
            if node == 3:
                replies.append(Message(Error(code=0, reason="out of memory"), reply_to=msg))
                continue
            metrics = {
                "num-examples": 3 if node == 1 else 1,
                "test_dice": 0.8 if node == 1 else 0.4,
                "test_auc": 0.9 if node == 1 else math.nan,
                "finetuned_dice": 0.9 if node == 1 else 0.5,
                "unit-weight": 1,
            }
            content = RecordDict(
                {
                    "metrics": MetricRecord(metrics),
                    "site": ConfigRecord({"name": f"hospital-{node}"}),
                }
            )
            replies.append(Message(content, reply_to=msg))
        return replies


@pytest.mark.usefixtures("task_identity")
def test_final_test_round_rows_per_site_weighted_mean_and_failures() -> None:
    grid = ScoringGrid()
    rows, failures = final_test_round(
        grid, record({"w": np.zeros(3, np.float32)}), 5, finetune_epochs=2, timeout=10
    )
    assert grid.configs == [{"split": "test", "finetune-epochs": 2}] * 3
    table = {(r.site, r.metric): r.value for r in rows}
    assert {r.round for r in rows} == {5}
    assert table[("hospital-1", "test_dice")] == 0.8 and table[("hospital-2", "num_test")] == 1
    assert math.isnan(table[("hospital-2", "test_auc")])
    assert ("hospital-1", "unit-weight") not in table
    assert table[("all", "test_dice")] == pytest.approx((3 * 0.8 + 0.4) / 4)
    assert table[("all", "finetuned_dice")] == pytest.approx((3 * 0.9 + 0.5) / 4)
    assert table[("all", "test_auc")] == pytest.approx(0.9)  # the NaN site left out
    assert not [k for k in table if k[0] == "node-3"]
    assert failures == [(5, "node-3", "test round: out of memory")]


# --- the demo's test cases ----------------------------------------------------------------------


def test_demo_test_cases_are_held_out_in_split_csv(tmp_path: Path) -> None:
    sites = make_demo_data(
        tmp_path, num_sites=2, cases_per_site=5, shape=(12, 12, 12), dicom_sites=(), test_cases=2
    )
    for site in sites:
        lines = (site / "split.csv").read_text().splitlines()
        assert lines[0] == "case_id,split" and len(lines) == 3
        data = load_site(site, "segmentation", val_fraction=0.34, seed=0)
        assert sorted(c.case_id for c in data.test) == [
            f"{site.name.replace('-', '')}-case{c:03d}" for c in (3, 4)
        ]
        assert len(data.train) == 2 and len(data.val) == 1
    # without test cases, no split.csv: every case is for training and validation
    (plain,) = make_demo_data(
        tmp_path / "plain", num_sites=1, cases_per_site=3, shape=(12, 12, 12), dicom_sites=()
    )
    assert not (plain / "split.csv").exists()
    assert load_site(plain, "segmentation", val_fraction=0.34, seed=0).test == []
