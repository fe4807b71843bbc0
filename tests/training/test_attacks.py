"""Simulated malicious sites (fl_imaging/training/attacks.py), FedProx's proximal term, and the
metrics that
record which sites attacked.

Unit tests on hand-made tensors, plus one real run through Flower's simulation engine (slow).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import FakeGrid, FakeTrainer, numpy_of, record
from flwr.app import ConfigRecord
from local_runs import local_run
from torch import nn

from fl_imaging.config import AttackConfig, AttackName
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.site import client_app
from fl_imaging.review.results import read_metrics
from fl_imaging.training.attacks import flipped_labels, malicious_sites, poison_state
from fl_imaging.training.site_training import SiteTrainers, proximal_term
from strategies import build_strategy

State = dict[str, torch.Tensor]


def attack(name: str, **kwargs: object) -> AttackConfig:
    return AttackConfig(name=AttackName(name), **kwargs)  # type: ignore[arg-type]


# --- which sites are malicious ----------------------------------------------------------------


def test_malicious_sites_from_a_fraction_rounds_down_to_the_last_sites() -> None:
    assert malicious_sites(8, attack("signflip", fraction=0.25)) == {6, 7}
    assert malicious_sites(10, attack("signflip", fraction=0.35)) == {7, 8, 9}  # floor(3.5)
    # floor(0.25 * 3) = 0, but a positive fraction makes at least one site malicious
    assert malicious_sites(3, attack("noise", fraction=0.25)) == {2}
    assert malicious_sites(5, attack("scale", fraction=0.0)) == set()


def test_explicit_malicious_sites_override_the_fraction() -> None:
    cfg = attack("collusion", fraction=0.5, sites=[0, 2])
    assert malicious_sites(8, cfg) == {0, 2}


def test_no_attack_means_no_malicious_site_whatever_the_other_keys() -> None:
    assert malicious_sites(8, attack("none", fraction=0.5, sites=[1])) == set()


# --- what a malicious site sends --------------------------------------------------------------


def states() -> tuple[State, State]:
    """A global and a trained local state: float weights and bias, an int64 BatchNorm counter."""
    gen = torch.Generator().manual_seed(0)
    global_state = {
        "w": torch.randn(4, 3, generator=gen),
        "b": torch.randn(3, generator=gen),
        "num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }
    local_state = {
        "w": global_state["w"] + 0.1 * torch.randn(4, 3, generator=gen),
        "b": global_state["b"] + 0.1 * torch.randn(3, generator=gen),
        "num_batches_tracked": torch.tensor(11, dtype=torch.int64),
    }
    return global_state, local_state


def update_norm(sent: State, global_state: State) -> float:
    return math.sqrt(sum(float(((sent[k] - global_state[k]) ** 2).sum()) for k in ("w", "b")))


@pytest.mark.parametrize(("name", "factor"), [("signflip", -3.0), ("scale", 3.0)])
def test_signflip_and_scale_send_a_multiple_of_the_honest_update(name: str, factor: float) -> None:
    g, local = states()
    sent = poison_state(g, local, attack(name, scale=3.0), server_round=1, seed=0)
    for key in ("w", "b"):
        delta = local[key] - g[key]
        # signflip: global - scale * delta; scale: global + scale * delta (bit for bit)
        expected = g[key] - 3.0 * delta if factor < 0 else g[key] + 3.0 * delta
        assert torch.equal(sent[key], expected)
    assert update_norm(sent, g) == pytest.approx(3.0 * update_norm(local, g), rel=1e-6)
    assert torch.equal(sent["num_batches_tracked"], local["num_batches_tracked"])
    assert sent["num_batches_tracked"].dtype == torch.int64


def test_noise_has_the_norm_of_scale_times_the_honest_update() -> None:
    g, local = states()
    cfg = attack("noise", scale=4.0)
    sent = poison_state(g, local, cfg, server_round=2, seed=7)
    assert update_norm(sent, g) == pytest.approx(4.0 * update_norm(local, g), rel=1e-5)
    # not a multiple of the honest update: the direction is random
    flat_sent = torch.cat([(sent[k] - g[k]).ravel() for k in ("w", "b")])
    flat_honest = torch.cat([(local[k] - g[k]).ravel() for k in ("w", "b")])
    cosine = float(flat_sent @ flat_honest / (flat_sent.norm() * flat_honest.norm()))
    assert abs(cosine) < 0.9
    # reproducible from (seed, round), different in another round
    again = poison_state(g, local, cfg, server_round=2, seed=7)
    other = poison_state(g, local, cfg, server_round=3, seed=7)
    assert torch.equal(again["w"], sent["w"]) and not torch.equal(other["w"], sent["w"])
    assert torch.equal(sent["num_batches_tracked"], local["num_batches_tracked"])


def test_noise_attackers_draw_independent_directions() -> None:
    g, local = states()
    cfg = attack("noise", scale=4.0)
    a = poison_state(g, local, cfg, server_round=2, seed=7, site=0)
    b = poison_state(g, local, cfg, server_round=2, seed=7, site=1)
    da = torch.cat([(a[k] - g[k]).ravel() for k in ("w", "b")])
    db = torch.cat([(b[k] - g[k]).ravel() for k in ("w", "b")])
    assert float(da.norm()) == pytest.approx(float(db.norm()), rel=1e-5)  # same honest update
    # two sites' noise is not one shared direction (that would be collusion)
    assert abs(float(da @ db / (da.norm() * db.norm()))) < 0.9


def test_colluders_send_the_same_update_of_the_given_norm() -> None:
    g, local_a = states()
    gen = torch.Generator().manual_seed(1)
    local_b = {  # another site, trained differently
        "w": g["w"] - 0.5 * torch.randn(4, 3, generator=gen),
        "b": g["b"] + 2.0,
        "num_batches_tracked": torch.tensor(8, dtype=torch.int64),
    }
    cfg = attack("collusion", norm=2.5)
    sent_a = poison_state(g, local_a, cfg, server_round=4, seed=3, site=2)
    sent_b = poison_state(g, local_b, cfg, server_round=4, seed=3, site=5)
    for key in ("w", "b"):
        assert torch.equal(sent_a[key], sent_b[key])
    assert update_norm(sent_a, g) == pytest.approx(2.5, rel=1e-5)
    # integer buffers stay each site's own
    assert int(sent_a["num_batches_tracked"]) == 11 and int(sent_b["num_batches_tracked"]) == 8


@pytest.mark.parametrize("name", ["none", "labelflip"])
def test_no_update_change_without_an_update_attack(name: str) -> None:
    g, local = states()
    sent = poison_state(g, local, attack(name, scale=10.0), server_round=1, seed=0)
    assert all(torch.equal(sent[k], local[k]) for k in local)


def test_flipped_labels_map_class_k_to_the_last_minus_k() -> None:
    flip = flipped_labels(3)
    mask = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 2.0, 0.0]]])  # a (1, 2, 3) segmentation mask
    out = flip({"label": mask, "image": torch.ones(1, 2, 3)})
    assert torch.equal(out["label"], torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 2.0]]]))
    assert torch.equal(out["image"], torch.ones(1, 2, 3))  # only the label changes
    # a class label, as the classification task loads it (a 0-d float tensor)
    assert float(flip({"label": torch.tensor(0.0)})["label"]) == 2.0
    assert float(flip({"label": torch.tensor(1.0)})["label"]) == 1.0
    assert float(flipped_labels(2)({"label": torch.tensor(1.0)})["label"]) == 0.0


# --- FedProx ------------------------------------------------------------------------------------


def prox_model() -> tuple[nn.Module, State]:
    """A model with a BatchNorm (buffers must not count) and its global state, then moved away."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
        model[1].running_mean.add_(100.0)  # a buffer far away: not part of the term
    return model, global_state


def distance_sq(model: nn.Module, global_state: State) -> float:
    params = model.named_parameters()
    return sum(float(((p.detach() - global_state[n]) ** 2).sum()) for n, p in params)


def test_proximal_term_is_half_mu_times_the_squared_distance() -> None:
    model, g = prox_model()
    mu = 0.3
    value = float(proximal_term(g, mu)(model).detach())
    assert value == pytest.approx(mu / 2 * distance_sq(model, g), rel=1e-6)
    assert value > 0
    model.load_state_dict(g)
    assert float(proximal_term(g, mu)(model).detach()) == 0.0


def test_proximal_term_pulls_the_weights_towards_the_global_ones() -> None:
    model, g = prox_model()
    mu, lr = 0.5, 0.2
    before = math.sqrt(distance_sq(model, g))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    proximal_term(g, mu)(model).backward()
    optimizer.step()
    after = math.sqrt(distance_sq(model, g))
    # gradient mu * (w - w0): one step scales every parameter's distance by (1 - lr * mu)
    assert after == pytest.approx((1 - lr * mu) * before, rel=1e-5)
    assert after < before


def test_proximal_term_leaves_frozen_parameters_out() -> None:
    model, g = prox_model()
    model[0].weight.requires_grad_(False)
    frozen = float(((model[0].weight - g["0.weight"]) ** 2).sum())
    value = float(proximal_term(g, 1.0)(model).detach())
    assert value == pytest.approx(0.5 * (distance_sq(model, g) - frozen), rel=1e-6)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_fedprox_holds_a_sites_update_back_by_its_proximal_term(strategy: str) -> None:
    """Flower's FedProx sends ``proximal-mu`` in the train config; the site adds the term to its
    loss: over E epochs of a constant gradient ``shift`` a weight moves ``shift * (1 - (1 -
    mu)^E) / mu`` instead of ``E * shift`` (:class:`flower_fakes.FakeTrainer`)."""
    mu, shift = 0.5, 0.01
    prox = [f"strategy.params.proximal_mu={mu}"] if strategy == "fedprox" else []
    cfg = check_overrides([f"strategy={strategy}", *prox])
    cfg.data.sites = ["/nowhere/site-1"]
    grid = FakeGrid(1, lambda site, rnd, sent: sent)
    start = {"w": np.zeros((4, 5), np.float32), "b": np.ones(3, np.float32)}
    (msg,) = build_strategy(cfg.strategy, num_sites=1).configure_train(
        1, record(start), ConfigRecord(), grid
    )
    trainer = FakeTrainer(shift)
    app = client_app.build_client_app(cfg, SiteTrainers(build=lambda c, s, t: trainer))
    out = app(msg, grid.context_of(1))
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    epochs = cfg.task.local_epochs
    assert trainer.fits == [epochs] and epochs > 1
    moved = numpy_of(out.content["arrays"])
    expected = shift * (1 - (1 - mu) ** epochs) / mu if strategy == "fedprox" else epochs * shift
    for key, value in start.items():
        np.testing.assert_allclose(moved[key] - value, expected, rtol=1e-4)


# --- end to end: the metrics say who attacked ------------------------------------------------


def test_a_run_records_the_malicious_site_and_its_larger_update(tmp_path: Path) -> None:
    local_run(
        tmp_path / "run",
        "experiment=quick",
        "engine.rounds=1",
        "attack=signflip",
        "attack.sites=[1]",
        f"data.root={tmp_path / 'demo'}",
    )
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    per_site = [r for r in rows if r.round == 1 and r.site != "all"]
    malicious = {r.site: r.value for r in per_site if r.metric == "malicious"}
    assert malicious == {"site-1": 0.0, "site-2": 1.0}
    norms = {r.site: r.value for r in per_site if r.metric == "update_norm"}
    assert set(norms) == {"site-1", "site-2"}
    # site-2 sends -10 x its own update: about 10 times the honest site's norm
    assert norms["site-2"] > 3 * norms["site-1"] > 0
