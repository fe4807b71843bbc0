"""report.html (fl_imaging/review/report_page.py), read back with Python's own HTML parser: one
self-contained page (images as data URIs, nothing fetched) with the outcome, the audit chain's
status, what each party could learn, the per-round table, the update checks, curves, per-site
results, epsilon over rounds, cross-site results and contributions when their files exist."""

from __future__ import annotations

import base64
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fake_runs import fake_run

from fl_imaging.evaluation.files import CrossSiteRow, write_cross_site
from fl_imaging.review.report_page import REPORT_FILE, render_report, write_report
from fl_imaging.review.results import (
    AGGREGATE_SITE,
    MetricRow,
    load_weights,
    read_metrics,
    save_weights,
    write_metrics,
)
from fl_imaging.review.run_name import OVERRIDES_FILE

#: What Hydra records of `fl-imaging experiment=quick ... strategy=dpfedavg ...` for the run
#: of :func:`dp_run`, and the name it gives the run.
OVERRIDES = ("strategy=dpfedavg", "strategy.dp.noise_multiplier=0.5", "engine.test=true")
NAME = (
    "fedavg + DP server_fixed · demo segmentation · unet · engine.num_sites=3 engine.rounds=3 "
    "engine.test=true +2 more"
)


class Page(HTMLParser):
    """The parts of a page the tests look at: section titles, tables (rows of cell texts),
    image sources, every URL-valued attribute, tags that fetch or run things, the title, the
    heading, the style sheet and the text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.active: list[str] = []
        self.text: list[str] = []
        self.title = self.heading = self.style = ""
        self._tag = ""
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        values = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action", "data")]
        if tag in ("script", "link", "iframe", "object", "embed", "base"):
            self.active.append(tag)
        if tag == "img":
            self.images.append(values.get("src") or "")
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._tag == "title":
            self.title += data
        elif self._tag == "h1":
            self.heading += data
        elif self._tag == "style":
            self.style += data
        if self._cell is not None:
            self._cell.append(data)
        if self._tag == "h2" and data.strip():
            self.sections.append(data.strip())
            self._tag = ""

    def table_with(self, first_header: str, second: str = "") -> list[list[str]]:
        """The first table whose header starts with these cells."""
        for table in self.tables:
            if table and table[0][:1] == [first_header] and second in (table[0] + [""])[1]:
                return table
        raise AssertionError(f"no table headed {first_header!r}, {second!r}")

    @property
    def all_text(self) -> str:
        return "".join(self.text)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-round DP run of 3 in-process sites, made once."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        run_dir = tmp_path_factory.mktemp("report") / "run"
        hydra_file = run_dir / OVERRIDES_FILE  # as `fl-imaging` (Hydra) leaves it
        hydra_file.parent.mkdir(parents=True)
        typed = ("experiment=quick", "engine.rounds=3", "engine.num_sites=3", *OVERRIDES)
        hydra_file.write_text("".join(f"- {o}\n" for o in typed))
        fake_run(run_dir, *OVERRIDES, rounds=3)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    return run_dir


@pytest.fixture
def run(dp_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(dp_run, copy)
    return copy


def test_the_run_writes_a_self_contained_page(run: Path) -> None:
    page = Page((run / REPORT_FILE).read_text())
    assert page.sections == [
        "Outcome",
        "Audit chain",
        "What each party could learn",
        "Rounds",
        "Update checks (audit log)",
        "Curves",
        "Per-site results",
        "Privacy spent over rounds",
        "Failures",
        "Tracking",
        "Summary (summary.txt)",
        "Config (config.yaml)",
    ]
    assert not page.active  # no script, style sheet, frame ...
    assert page.urls == page.images  # the only URLs are the images' own
    assert len(page.images) == 2  # curves and epsilon
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :]).startswith(b"\x89PNG\r\n\x1a\n")
    assert page.heading == NAME and page.title == f"{NAME} (run)"  # what it is, not a date
    assert (run / "summary.txt").read_text().splitlines()[0] == f"run: {NAME}"
    assert "white-space: pre-wrap" in page.style  # summary lines wrap, none is cut off
    text = page.all_text
    assert "fl-imaging run run, in /" in text  # the folder it was written in
    assert "Audit chain verified" in text and "completed after round 3 of 3" in text
    assert "(audit.jsonl, 6 records)" in text  # run_start, 3 rounds, test_round, run_end
    assert "fl-imaging-audit verify" in text


def test_the_page_holds_the_run_s_figures(run: Path) -> None:
    page = Page(render_report(run))
    rows = read_metrics(run / "metrics.csv")
    values = {(r.round, r.site, r.metric): r.value for r in rows}
    rounds = page.table_with("round", "asked")
    header = rounds[0]
    assert header == [
        "round",
        "asked",
        "answered",
        "train loss",
        "dice site-1",
        "dice site-2",
        "dice site-3",
        "mean dice",
        "epsilon",
        "seconds",
    ]
    assert [r[0] for r in rounds[1:]] == ["1", "2", "3"]
    for line in rounds[1:]:
        rnd = int(line[0])
        assert line[1] == line[2] == "3"  # sites asked and answering, from the audit log
        assert float(line[3]) == pytest.approx(values[(rnd, AGGREGATE_SITE, "train_loss")], 1e-3)
        assert float(line[4]) == pytest.approx(values[(rnd, "site-1", "dice")], 1e-3)
        assert float(line[8]) == pytest.approx(values[(rnd, AGGREGATE_SITE, "epsilon")], 1e-3)
    # per-site results of the last round; the NaN Dice of class 1 at site-1 shows as "-"
    sites = page.table_with("site", "dice")
    assert sites[0][:3] == ["site", "dice", "dice_1"]
    assert [r[0] for r in sites[1:]] == ["site-1", "site-2", "site-3"]
    assert sites[1][2] == "-" and sites[2][2] == "0.5000"
    tests = page.table_with("site", "num_test")
    assert tests[0] == ["site", "num_test", "test_dice"]
    assert [float(r[2]) for r in tests[1:]] == pytest.approx([0.81, 0.82, 0.83])
    epsilon = page.table_with("round", "epsilon (all)")
    assert [float(r[1]) for r in epsilon[1:]] == pytest.approx(
        [values[(rnd, AGGREGATE_SITE, "epsilon")] for rnd in (1, 2, 3)], 1e-3
    )
    text = page.all_text
    assert "honest but curious: every site's model update in the clear" in text
    assert "differential privacy: server_fixed, noise multiplier 0.5" in text
    assert "Round 2: site-1: accepted (norm" in text
    assert "noise_multiplier: 0.5" in text  # the config
    assert "not tracked (tracking=none)" in text


def test_cross_site_results_and_contributions_are_embedded_when_present(run: Path) -> None:
    scores = {("global", "site-1"): 0.7, ("global", "site-2"): 0.6, ("site-1", "site-1"): 0.91}
    scores |= {("site-1", "site-2"): 0.62, ("site-2", "site-1"): 0.55, ("site-2", "site-2"): 0.88}
    kinds = {"global": "global model"} | {
        s: f"fine-tuned 1 epoch(s) at {s}" for s in ("site-1", "site-2")
    }
    rows = [
        CrossSiteRow(model, kinds[model], site, metric, value - shift, 4 + int(site[-1]))
        for (model, site), value in scores.items()
        for metric, shift in (("test_dice", 0.0), ("dice", 0.0), ("loss", -1.0))
    ]
    write_cross_site(rows, run / "cross_site.csv")
    shutil.copy(run / "curves.png", run / "cross_site.png")
    (run / "contributions.csv").write_text("site,contribution\nsite-1,0.4\nsite-2,0.6\n")
    write_report(run, main_metric="dice")
    page = Page((run / REPORT_FILE).read_text())
    assert "Cross-site evaluation" in page.sections and "Site contributions" in page.sections
    # a matrix per metric, the main one first: models down, sites across
    matrices = [t for t in page.tables if t[0][0] == "model"]
    assert len(matrices) == 3
    assert matrices[0] == [
        ["model", "site-1 (5 cases)", "site-2 (6 cases)"],
        ["global model", "0.7000", "0.6000"],
        ["fine-tuned 1 epoch(s) at site-1", "0.9100", "0.6200"],
        ["fine-tuned 1 epoch(s) at site-2", "0.5500", "0.8800"],
    ]
    assert "<h3>test dice</h3><table>" in (run / REPORT_FILE).read_text()
    assert matrices[1][1] == ["global model", "1.7000", "1.6000"]  # loss, then test_dice
    assert page.table_with("site", "contribution")[1:] == [["site-1", "0.4"], ["site-2", "0.6"]]
    assert len(page.images) == 3 and all(s.startswith("data:image/png") for s in page.images)


def test_site_results_show_devices_by_name_and_flags_as_yes_or_no(tmp_path: Path) -> None:
    rows = [MetricRow(1, AGGREGATE_SITE, "train_loss", 0.5)]
    for site, device, flag in (("site-1", -1.0, 0.0), ("site-2", 1.0, 1.0)):
        rows += [
            MetricRow(1, site, "device", device),
            MetricRow(1, site, "malicious", flag),
            MetricRow(1, site, "mixed_precision", 1.0 - flag),
            MetricRow(1, site, "dice", 0.5),
        ]
    write_metrics(rows, tmp_path / "metrics.csv")
    page = Page(render_report(tmp_path, "dice"))
    assert page.table_with("site", "device") == [
        ["site", "device", "dice", "malicious", "mixed_precision"],
        ["site-1", "cpu", "0.5000", "no", "yes"],
        ["site-2", "cuda:1", "0.5000", "yes", "no"],
    ]
    assert page.heading == f"fl-imaging run {tmp_path.name}"  # no config.yaml: its folder


def test_a_run_that_no_longer_verifies_says_so_and_why(run: Path) -> None:
    weights = load_weights(run / "model.pt")
    next(t for t in weights.values() if t.is_floating_point()).mul_(2)
    save_weights(weights, run / "model.pt")
    text = Page(render_report(run)).all_text
    assert "Audit chain does NOT verify" in text and "Audit chain verified" not in text
    assert "model.pt: sha256" in text and "does not match record seq 5 (line 6)" in text
    (run / "audit.jsonl").unlink()
    text = Page(render_report(run)).all_text
    assert "No audit log" in text
