"""Ditto: the personal model's training (its regulariser, kept between rounds at the site), the
strategy's train config, what it refuses, and a real short run in which every site's personal
model differs from the global one and is scored beside it."""

from __future__ import annotations

from pathlib import Path

import local_runs
import pytest
import torch
from cli_runs import run_cli
from flower_fakes import FakeGrid, FakeTrainer, record
from flwr.app import ConfigRecord, Context, RecordDict

from fl_imaging.config import ConfigError
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.protocol import DITTO_EPOCHS, DITTO_LAMBDA
from fl_imaging.flower.site.personal_model import PERSONAL_MODEL, train_personal_model
from fl_imaging.review.results import read_metrics
from strategies import build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")


def test_the_personal_model_trains_with_the_regulariser_and_is_kept() -> None:
    """FakeTrainer moves every weight by ``shift`` per epoch, pulled back by the proximal term:
    from the global model, ``epochs`` epochs with ``lambda`` move it by
    ``shift * (1 - (1 - lambda)^epochs) / lambda``; the next round starts from the kept model."""
    shift, lam, epochs = 0.1, 0.5, 3
    global_state = {"w": torch.tensor([1.0, -2.0])}
    context = Context(1, 1, {}, RecordDict(), {})
    trainer = FakeTrainer(shift)
    settings = ConfigRecord({DITTO_LAMBDA: lam, DITTO_EPOCHS: epochs})
    train_personal_model(trainer, context, global_state, settings, seed=0)
    kept = context.state.array_records[PERSONAL_MODEL].to_torch_state_dict()["w"]
    moved = shift * (1 - (1 - lam) ** epochs) / lam  # 0.175
    torch.testing.assert_close(kept, global_state["w"] + moved)
    # lambda 0: plain local training, from the kept personal model (not the global one)
    again = ConfigRecord({DITTO_LAMBDA: 0.0, DITTO_EPOCHS: 2})
    train_personal_model(FakeTrainer(shift), context, global_state, again, seed=0)
    second = context.state.array_records[PERSONAL_MODEL].to_torch_state_dict()["w"]
    torch.testing.assert_close(second, kept + 2 * shift)
    # no Ditto in the round's config: nothing trained, nothing changed
    assert train_personal_model(trainer, context, global_state, ConfigRecord(), seed=0) is None


def test_ditto_sends_lambda_and_personal_epochs_in_the_train_config() -> None:
    cfg = check_overrides(
        ["strategy=ditto", "strategy.params.ditto_lambda=0.3", "strategy.params.personal_epochs=2"]
    )
    strategy = build_strategy(cfg.strategy, num_sites=2)
    grid = FakeGrid(2, lambda n, r, s: s)
    messages = list(
        strategy.configure_train(1, record({"w": torch.zeros(2).numpy()}), ConfigRecord(), grid)
    )
    assert [
        (m.content["config"][DITTO_LAMBDA], m.content["config"][DITTO_EPOCHS]) for m in messages
    ] == [(0.3, 2), (0.3, 2)]


def test_ditto_with_dp_sgd_is_refused() -> None:
    with pytest.raises(
        ConfigError, match="personal model trains on the site's patients without DP-SGD"
    ):
        check_overrides(
            ["strategy=ditto", "task.dp_sgd.enabled=true", "task.dp_sgd.target_epsilon=8"]
        )


def test_every_personal_model_differs_from_the_global_one_and_is_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grids: list[local_runs.ClientAppSites] = []

    class KeptSites(local_runs.ClientAppSites):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)
            grids.append(self)

    monkeypatch.setattr(local_runs, "ClientAppSites", KeptSites)
    run = tmp_path / "run"
    local_runs.local_run(
        run,
        "experiment=quick",
        "strategy=ditto",
        "engine.test=true",
        "data.test_fraction=0.34",
        f"data.root={tmp_path / 'demo'}",
    )
    final = torch.load(run / "model.pt", weights_only=True)
    (grid,) = grids
    for site, context in grid.contexts.items():
        personal = context.state.array_records[PERSONAL_MODEL].to_torch_state_dict()
        assert personal.keys() == final.keys()
        floats = [k for k, v in final.items() if v.is_floating_point()]
        assert any(not torch.allclose(personal[k], final[k]) for k in floats), site
    rows = read_metrics(run / "metrics.csv")
    sites = {"site-1", "site-2"}
    for metric in ("test_dice", "personal_dice", "personal_loss", "test_loss"):
        got = {r.site: r.value for r in rows if r.metric == metric}
        assert set(got) == {*sites, "all"}, metric
    test_loss = {r.site: r.value for r in rows if r.metric == "test_loss"}
    personal_loss = {r.site: r.value for r in rows if r.metric == "personal_loss"}
    assert all(test_loss[s] != personal_loss[s] for s in sites)  # two models, two scores


@pytest.mark.slow
@pytest.mark.extended
def test_a_real_run_with_ditto_exits_0(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli(
        "fl-imaging",
        "experiment=quick",
        "strategy=ditto",
        "engine.test=true",
        "data.test_fraction=0.34",
        f"data.root={tmp_path / 'demo'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    rows = read_metrics(run / "metrics.csv")
    personal = [r for r in rows if r.metric == "personal_dice" and r.site != "all"]
    assert len(personal) == 2 and all(0 <= r.value <= 1 for r in personal)
    assert "test (each site's personal model, Ditto) dice" in proc.stdout + proc.stderr


def test_ditto_runs_on_secure_aggregation(tmp_path: Path) -> None:
    """The global model of Ditto is FedAvg's, so it is summed securely like FedAvg's; the
    personal models never leave the sites."""
    run = tmp_path / "run"
    local_runs.local_run(
        run,
        "experiment=quick",
        "strategy=ditto",
        "strategy.secagg.enabled=true",
        "engine.test=true",
        "data.test_fraction=0.34",
        f"data.root={tmp_path / 'demo'}",
    )
    summary = (run / "summary.txt").read_text()
    assert "only the sum of 2 sites' updates in every round" in summary
    rows = read_metrics(run / "metrics.csv")
    assert {r.site for r in rows if r.metric == "personal_dice"} == {"site-1", "site-2", "all"}
