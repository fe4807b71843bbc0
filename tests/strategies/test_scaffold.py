"""SCAFFOLD: control variates after one round (and the correction in the next) against a hand
computation on a linear model with plain SGD on fixed data, through the real pieces (the
coordinator's chain, Flower's in-memory Grid, a site's context state, the task's training loop);
what it refuses; a real run of the command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_cli
from flower_fakes import FakeGrid, numpy_of, record
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType

from fl_imaging.config import ConfigError
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.protocol import CONTROL, CONTROL_DELTA, site_reply
from fl_imaging.flower.site.control_variates import SITE_CONTROL, SiteControl
from fl_imaging.review.results import read_metrics
from strategies import build_strategy
from strategies.scaffold import Scaffold
from tasks.base import ImagingTask

pytestmark = pytest.mark.usefixtures("task_identity")

LR, EPOCHS, SERVER_LR = 0.1, 2, 0.5  # K = EPOCHS local steps (one batch of 2 cases per epoch)
W0, B0 = np.array([[0.5, -0.25]]), np.array([0.1])
#: Each site's fixed training batch: inputs (2 cases x 2 features) and targets (2 x 1).
DATA = {
    1: (np.array([[1.0, 2.0], [0.0, -1.0]]), np.array([[1.0], [0.0]])),
    2: (np.array([[2.0, 0.0], [1.0, 1.0]]), np.array([[-1.0], [2.0]])),
    3: (np.array([[-1.0, 1.0], [3.0, 0.5]]), np.array([[0.5], [1.5]])),
}

#: c_i after round 1 (c = c_i = 0): (x - y_i) / (K lr) as [weight_1, weight_2, bias]. Site 1 by
#: hand: residuals (-0.9, 0.35), gradient (-0.9, -2.15, -0.55), step 1 to (0.59, -0.035, 0.155);
#: residuals (-0.325, 0.19), gradient (-0.325, -0.84, -0.135), step 2 to (0.6225, 0.049, 0.1685);
#: c_1 = ((0.5, -0.25, 0.1) - y_1) / 0.2 = (-0.6125, -1.495, -0.3425).
HAND_CI = {
    1: [-0.6125, -1.495, -0.3425],
    2: [1.9275, -1.7175, 0.105],
    3: [0.6840625, -1.02859375, -1.0778125],
}


class LinearTask(ImagingTask):
    """A task whose network is ``nn.Linear(2, 1)`` and whose loss is the mean squared error:
    only what :meth:`ImagingTask.train` uses is there (the training loop under test)."""

    def network(self) -> torch.nn.Module:
        return torch.nn.Linear(2, 1)

    def default_loss(self) -> torch.nn.Module:
        return torch.nn.MSELoss()

    def builtin_network_definition(self) -> dict:
        raise NotImplementedError

    def load_transforms(self):  # noqa: ANN201
        raise NotImplementedError

    def inference_preprocessing_definition(self) -> list:
        raise NotImplementedError

    def train_transforms(self):  # noqa: ANN201
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, loader: object) -> dict[str, float]:
        raise NotImplementedError


def sgd_task() -> LinearTask:
    cfg = check_overrides(
        ["task.optimizer.name=sgd", "task.optimizer.momentum=0", f"task.optimizer.lr={LR}"]
    )
    return LinearTask(cfg.task)


class ScaffoldGrid(FakeGrid):
    """Flower's in-memory Grid whose 3 sites answer training messages as our ClientApp does
    with SCAFFOLD: ``c_i`` from their context (:class:`SiteControl`), the task's own SGD loop
    with the correction, ``c_i+ - c_i`` in the reply."""

    def __init__(self) -> None:
        super().__init__(3, lambda site, rnd, sent: sent)
        self.task = sgd_task()
        self.contexts: dict[int, Context] = {s: self.context_of(s) for s in DATA}

    def answer(self, msg: Message, site: int) -> Message:
        assert msg.metadata.message_type == MessageType.TRAIN
        received = msg.content["arrays"].to_torch_state_dict()
        model = self.task.build_model()
        model.load_state_dict(received)
        control = SiteControl.of(msg, self.contexts[site], model)
        assert control is not None
        x, t = (torch.tensor(a, dtype=torch.float32) for a in DATA[site])
        result = self.task.train(
            model, [{"image": x, "label": t}] * 1, EPOCHS, extra_loss=control.correction
        )
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        delta = control.finish(self.contexts[site], received, trained, LR)
        reply = site_reply(
            msg, f"site-{site}", {"num-examples": result.num_samples}, ArrayRecord(trained)
        )
        reply.content[CONTROL_DELTA] = delta
        return reply


def hand_sgd(w: np.ndarray, b: np.ndarray, site: int, corr_w: np.ndarray, corr_b: np.ndarray):
    """EPOCHS steps of w <- w - LR (grad + corr) on the site's mean squared error, by hand:
    grad_w = 2/B sum_j r_j x_j, grad_b = 2/B sum_j r_j with r = x w^T + b - t."""
    x, t = DATA[site]
    for _ in range(EPOCHS):
        r = x @ w.T + b - t  # (B, 1)
        grad_w = 2.0 / len(x) * (r * x).sum(axis=0, keepdims=True)
        grad_b = 2.0 / len(x) * r.sum(axis=0)
        w, b = w - LR * (grad_w + corr_w), b - LR * (grad_b + corr_b)
    return w, b


def one_round(strategy: object, grid: ScaffoldGrid, rnd: int, arrays: ArrayRecord):
    messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=None))
    sites = sorted(int(r.content["site"]["name"].split("-")[1]) for r in replies)
    new, _ = strategy.aggregate_train(rnd, replies)
    return new, sites, messages


def test_control_variates_after_one_round_match_a_hand_computation() -> None:
    cfg = check_overrides(
        ["strategy=scaffold", f"strategy.params.server_learning_rate={SERVER_LR}"]
    )
    strategy = build_strategy(cfg.strategy, num_sites=3, clients_per_round=2)
    scaffold = next(s for s in _chain(strategy) if isinstance(s, Scaffold))
    grid = ScaffoldGrid()
    start = ArrayRecord(
        {
            "weight": torch.tensor(W0, dtype=torch.float32),
            "bias": torch.tensor(B0, dtype=torch.float32),
        }
    )
    # round 1: c = c_i = 0, so plain SGD; c_i+ = (x - y_i) / (K lr); c = (|S|/N) mean(c_i+)
    new, sites, messages = one_round(strategy, grid, 1, start)
    assert len(sites) == 2 and all(len(m.content[CONTROL]) == 0 for m in messages)
    zero_w, zero_b = np.zeros((1, 2)), np.zeros(1)
    trained = {s: hand_sgd(W0, B0, s, zero_w, zero_b) for s in sites}
    ci = {s: ((W0 - w) / (EPOCHS * LR), (B0 - b) / (EPOCHS * LR)) for s, (w, b) in trained.items()}
    for s in sites:  # the same figures, worked out once on paper
        np.testing.assert_allclose(np.concatenate([ci[s][0].ravel(), ci[s][1]]), HAND_CI[s])
    for s in sites:
        kept = numpy_of(grid.contexts[s].state.array_records[SITE_CONTROL])
        np.testing.assert_allclose(kept["weight"], ci[s][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kept["bias"], ci[s][1], rtol=1e-5, atol=1e-6)
    c_w = 2 / 3 * np.mean([ci[s][0] for s in sites], axis=0)
    c_b = 2 / 3 * np.mean([ci[s][1] for s in sites], axis=0)
    np.testing.assert_allclose(scaffold.control["weight"], c_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaffold.control["bias"], c_b, rtol=1e-5, atol=1e-6)
    # the global model: x + eta_g (mean y_i - x), both sites with 2 cases
    x1_w = W0 + SERVER_LR * (np.mean([trained[s][0] for s in sites], axis=0) - W0)
    x1_b = B0 + SERVER_LR * (np.mean([trained[s][1] for s in sites], axis=0) - B0)
    got = numpy_of(new)
    np.testing.assert_allclose(got["weight"], x1_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["bias"], x1_b, rtol=1e-5, atol=1e-6)
    # round 2: each step is corrected by c - c_i; c_i++ = c_i - c + (x - y_i) / (K lr)
    new2, sites2, messages2 = one_round(strategy, grid, 2, new)
    sent_c = numpy_of(messages2[0].content[CONTROL])
    np.testing.assert_allclose(sent_c["weight"], c_w, rtol=1e-5, atol=1e-6)
    for s in sites2:
        old_w, old_b = ci.get(s, (zero_w, zero_b))
        w2, b2 = hand_sgd(x1_w, x1_b, s, c_w - old_w, c_b - old_b)
        kept = numpy_of(grid.contexts[s].state.array_records[SITE_CONTROL])
        want_w = old_w - c_w + (x1_w - w2) / (EPOCHS * LR)
        want_b = old_b - c_b + (x1_b - b2) / (EPOCHS * LR)
        np.testing.assert_allclose(kept["weight"], want_w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(kept["bias"], want_b, rtol=1e-4, atol=1e-5)
    assert new2 is not None


def _chain(strategy: object) -> list:
    from strategies.wrapper import wrapper_chain

    return wrapper_chain(strategy)


def test_the_correction_is_zero_valued_with_gradient_c_minus_ci() -> None:
    model = torch.nn.Linear(2, 1)
    c = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([0.5])}
    ci = {"weight": torch.tensor([[0.25, -1.0]])}  # no bias yet: zeros
    term = SiteControl(model, c, ci).correction
    value = term(model)
    value.backward()
    assert float(value.detach()) == 0.0 and term.steps == 1
    assert model.weight.grad.tolist() == [[0.75, 3.0]] and model.bias.grad.tolist() == [0.5]


def test_a_malformed_control_delta_leaves_the_site_out(caplog: pytest.LogCaptureFixture) -> None:
    strategy = Scaffold(num_sites=2)
    grid = FakeGrid(2, lambda site, rnd, sent: sent)
    start = record({"w": np.zeros(2, np.float32)})
    messages = list(strategy.configure_train(1, start, ConfigRecord(), grid))
    replies = []
    for i, msg in enumerate(messages):
        reply = site_reply(
            msg, f"site-{i}", {"num-examples": 1}, record({"w": np.ones(2, np.float32)})
        )
        bad = np.array([np.nan, 0.0], np.float32) if i == 0 else np.ones(2, np.float32)
        reply.content[CONTROL_DELTA] = record({"w": bad})
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert "holds NaN or Inf" in caplog.text
    np.testing.assert_allclose(numpy_of(arrays)["w"], [1.0, 1.0])
    np.testing.assert_allclose(strategy.control["w"], [0.5, 0.5])  # 1 of 2 sites: share 1/2


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("strategy.secagg.enabled=true", "masks only the packed model update"),
        ("strategy.compression=int8", "carries the encoded model update only"),
        ("strategy.norm_bound=1", "but not its control variate change"),
        ("strategy.dp.mode=server_fixed", "outside the clipping, the noise and the epsilon"),
        ("strategy.fedbn=true", "their control variates would be noise"),
    ],
)
def test_what_scaffold_cannot_combine_with_is_refused(override: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_overrides(["strategy=scaffold", "task.model.norm=batch", override])
    assert f"strategy=scaffold with {override.split('=')[0]}" in str(err.value)
    assert reason in str(err.value)


@pytest.mark.slow
def test_a_real_run_with_scaffold_exits_0(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_cli(
        "fl-imaging",
        "experiment=quick",
        "strategy=scaffold",
        "task.optimizer.name=sgd",
        "task.optimizer.momentum=0",
        f"data.root={tmp_path / 'demo'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    rows = read_metrics(run / "metrics.csv")
    accepted = [r for r in rows if r.metric == "update_accepted"]
    assert accepted and all(r.value == 1.0 for r in accepted)
    assert {r.round for r in rows if r.metric == "train_loss"} == {1, 2}
    dice = [r.value for r in rows if r.metric == "dice" and r.site != "all"]
    assert dice and all(0 <= d <= 1 for d in dice)
