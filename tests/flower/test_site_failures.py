"""Sites that fail: an error reply names its site, a site that never trains is named in
summary.txt and fails the run (or is dropped under engine.min_sites, and said so), and the cases
a site leaves out with data.exclude_bad_cases reach the site itself."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fake_runs import TestedSites, evaluate_metrics, fake_run, shift, train_metrics
from flower_fakes import Answer, FakeGrid
from flwr.app import Error, Message, MessageType, RecordDict
from local_runs import local_run

from fl_imaging.config import RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.flower.coordinator.federation import plan_federation
from fl_imaging.flower.coordinator.server_app import run_federation
from fl_imaging.flower.protocol import ReplySites, SiteError, error_reason, site_errors
from fl_imaging.review.results import SitesFailed, read_metrics
from fl_imaging.training.site_training import SiteRef, site_cases

pytestmark = pytest.mark.usefixtures("task_identity")


def _error_from(node: int, exc: Exception) -> Message:
    """The error reply Flower builds when a ClientApp raises ``exc`` (its reason format)."""
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    reason = f"{type(exc)}:<'{exc}'>"
    return Message(Error(code=0, reason=reason), reply_to=instruction)


def test_an_error_raised_at_a_site_names_the_site() -> None:
    with pytest.raises(SiteError) as raised:
        with site_errors("hospital-b"):
            raise ValueError("cannot decode /data/b/images/7.nii.gz")
    reply = _error_from(4, raised.value)
    assert ReplySites()(reply) == "hospital-b"
    assert error_reason(reply) == (
        "[site hospital-b] ValueError: cannot decode /data/b/images/7.nii.gz"
    )
    foreign = _error_from(5, RuntimeError("Node Unavailable"))
    assert ReplySites()(foreign) == "node-5"  # Flower's own error: no name in it
    assert ReplySites({5: "hospital-c"})(foreign) == "hospital-c"  # ... but known from before


class BrokenSiteGrid(FakeGrid):
    """Sites 1..n train by sending back what they got; site ``broken`` raises every time."""

    def __init__(self, nodes: int, broken: int) -> None:
        super().__init__(nodes, lambda node, rnd, sent: sent)
        self.broken = broken

    def answer(self, msg: Message, site: int) -> Answer:
        if site != self.broken:
            return super().answer(msg, site)
        try:
            with site_errors(f"site-{site}"):
                raise OSError(f"/data/site-{site}/images: Input/output error")
        except SiteError as err:
            return Message(Error(0, f"{type(err)}:<'{err}'>"), reply_to=msg)


def _cfg(tmp_path: Path, *overrides: str) -> RunConfig:
    cfg = check_overrides(["experiment=quick", "engine.rounds=2", "engine.num_sites=3", *overrides])
    return replace(cfg, run_dir=str(tmp_path))


def test_a_site_that_fails_every_round_is_named_and_fails_the_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    plan = plan_federation(cfg, [])
    run_federation(BrokenSiteGrid(3, broken=2), cfg, [], plan)
    summary = (tmp_path / "summary.txt").read_text()
    assert "site site-2 took part in no round ([site site-2] OSError: /data/site-2" in summary
    assert "the run fails" in summary and "node-" not in summary
    with pytest.raises(SitesFailed, match="site site-2 took part in no round"):
        plan.raise_if_sites_failed()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert {r.site for r in rows if r.metric == "train_loss"} == {"site-1", "site-3", "all"}


def test_under_min_sites_the_run_goes_on_without_the_site_and_says_so(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "engine.min_sites=2")
    plan = plan_federation(cfg, [])
    run_federation(BrokenSiteGrid(3, broken=3), cfg, [], plan)
    summary = (tmp_path / "summary.txt").read_text()
    assert "site site-3 took part in no round" in summary
    assert "trained without it (engine.min_sites=2)" in summary
    plan.raise_if_sites_failed()  # tolerated: no error


def test_a_site_slower_than_the_round_timeout_is_left_out_of_that_round(tmp_path: Path) -> None:
    """Flower's Grid returns only the replies that came within ``engine.round_timeout``: site 3
    takes 10 s to train in round 2 (simulated), so that round aggregates the other two and
    names it; in round 1 it was on time."""

    def seconds(site: int, rnd: int, kind: str) -> float:
        return 10.0 if (site, rnd, kind) == (3, 2, MessageType.TRAIN) else 0.1 * site

    grid = TestedSites(3, shift, train_metrics, evaluate_metrics, seconds=seconds)
    fake_run(tmp_path, "engine.round_timeout=5", "engine.min_sites=2", grid=grid)
    rows = read_metrics(tmp_path / "metrics.csv")
    trained = {(r.round, r.site) for r in rows if r.metric == "train_loss" and r.site != "all"}
    assert trained == {(1, "site-1"), (1, "site-2"), (1, "site-3"), (2, "site-1"), (2, "site-2")}
    summary = (tmp_path / "summary.txt").read_text()
    assert "site-3" in summary and "no train reply within engine.round_timeout=5 s" in summary


def test_the_order_the_sites_answer_in_changes_nothing(tmp_path: Path) -> None:
    """The same run with the sites finishing in two different orders every round (Flower's
    replies come as sites finish): the same metrics and the same model, to float rounding."""
    import torch

    def first_site_first(site: int, rnd: int, kind: str) -> float:
        return float(site)

    def last_site_first(site: int, rnd: int, kind: str) -> float:
        return float(-site)

    results = {}
    for name, seconds in (("forward", first_site_first), ("backward", last_site_first)):
        grid = TestedSites(3, shift, train_metrics, evaluate_metrics, seconds=seconds)
        fake_run(tmp_path / name, grid=grid)
        assert [site for site, kind in grid.arrivals if kind == "train"][:3] == (
            [1, 2, 3] if name == "forward" else [3, 2, 1]
        )
        rows = {
            (r.round, r.site, r.metric): r.value
            for r in read_metrics(tmp_path / name / "metrics.csv")
        }
        results[name] = (rows, torch.load(tmp_path / name / "model.pt", weights_only=True))
    (rows_f, model_f), (rows_b, model_b) = results["forward"], results["backward"]
    timing = {"round_seconds", "aggregation_seconds", "fit_seconds", "evaluate_seconds"}
    timing |= {"peak_rss_bytes"}  # measured, not computed: they differ between runs
    assert {k for k in rows_f if k[2] not in timing} == {k for k in rows_b if k[2] not in timing}
    for key, value in rows_f.items():
        if key[2] not in timing:
            assert value == pytest.approx(rows_b[key], rel=1e-5, nan_ok=True), key
    for key, tensor in model_f.items():
        torch.testing.assert_close(model_b[key], tensor, rtol=1e-6, atol=1e-7)


def _broken_demo(tmp_path: Path) -> list[Path]:
    """Two demo sites (NIfTI); case 0 of site-2 has a truncated image."""
    sites = make_demo_data(
        tmp_path / "demo", num_sites=2, cases_per_site=6, shape=(16, 16, 16), dicom_sites=()
    )
    image = sorted((sites[1] / "images").iterdir())[0]
    image.write_bytes(image.read_bytes()[:200])
    return sites


def test_cases_left_out_by_the_coordinator_are_left_out_at_the_site(tmp_path: Path) -> None:
    sites = _broken_demo(tmp_path)
    broken = sorted((sites[1] / "images").iterdir())[0].name.split(".")[0]
    cfg = check_overrides(
        ["experiment=quick", "data=folders", "data.exclude_bad_cases=true", "task.batch_size=2"]
    )
    cfg.data.sites = [str(s) for s in sites]
    from fl_imaging.data.prepare import prepare_sites

    cfg, _, _ = prepare_sites(cfg)
    assert cfg.data.excluded_cases == [f"site-2/{broken}"]
    ids = [c.case_id for c in site_cases(cfg, SiteRef("site-2", sites[1], 1, simulated=True))]
    assert broken not in ids and len(ids) == 5
    # a deployed site the coordinator never checked checks itself
    cfg.data.excluded_cases = []
    ids = [c.case_id for c in site_cases(cfg, SiteRef("site-2", sites[1], 1))]
    assert broken not in ids and len(ids) == 5


def test_exclude_bad_cases_trains_every_site_every_round(tmp_path: Path) -> None:
    """A whole run with the real sites in-process (:mod:`local_runs`)."""
    sites = _broken_demo(tmp_path)
    local_run(
        tmp_path / "run",
        "experiment=quick",
        "data=folders",
        f"data.sites=[{sites[0]},{sites[1]}]",
        "data.exclude_bad_cases=true",
        "task.roi_size=[16,16,16]",
    )
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    trained = {(r.round, r.site) for r in rows if r.metric == "train_loss"}
    assert trained >= {(rnd, s) for rnd in (1, 2) for s in ("site-1", "site-2")}
    assert "failed" not in (tmp_path / "run" / "summary.txt").read_text()
    assert np.isfinite([r.value for r in rows if r.metric == "dice"]).all()
