"""Patient-level DP (``task.dp_sgd``): DP-SGD at every site with Opacus.

The epsilon a site reports against Google's ``dp_accounting``, per-case clipping, FedProx's term,
empty Poisson batches, the budget stop and the zero-weight replies it sends, the ledger carried
over a resume, every refusal, and the models converted for per-case gradients. Sites are driven
through the real ClientApp with hand-made messages, on tiny demo volumes; one stub trainer holds
in-memory cases for the exact one-step checks. Real runs through the engine:
``test_dp_sgd_federation.py``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from monai.transforms import Compose
from opacus.accountants import RDPAccountant
from torch import nn

from fl_imaging.config import ConfigError, RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.flower.protocol import SiteError
from fl_imaging.flower.site import client_app
from fl_imaging.privacy.dp_sgd import (
    PrivacyLedger,
    check_sites_privacy,
    private_fit,
    site_privacy_problems,
)
from fl_imaging.privacy.ledger import SiteLedger
from fl_imaging.training.model_checks import check_dp_sgd_model
from fl_imaging.training.site_training import SiteTrainers, proximal_term
from tasks import build_task
from tasks.private_model import check_per_sample_gradients, private_network

pytestmark = pytest.mark.usefixtures("task_identity")

DP = ["task.dp_sgd.enabled=true"]


def dp_accounting_epsilon(q: float, sigma: float, steps: int, delta: float = 1e-5) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps from Google's dp_accounting (its RDP
    accountant, at Opacus' orders so that both search the same alphas)."""
    accountant = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


# --- a site through the ClientApp ---------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo site of 8 cases of 16^3: 6 training and 2 validation cases."""
    (site,) = make_demo_data(
        tmp_path_factory.mktemp("demo"), num_sites=1, cases_per_site=8, shape=(16, 16, 16)
    )
    return site


def site_config(site: Path, *overrides: str) -> RunConfig:
    cfg = check_overrides(
        [
            "experiment=quick",
            "task.roi_size=[16,16,16]",
            "task.model.channels=[4,8]",
            "task.local_epochs=1",
            "task.batch_size=2",
            *DP,
            *overrides,
        ]
    )
    cfg.data.sites = [str(site)]
    return cfg


class Site:
    """A site's ClientApp with its own context, answering training messages."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.app = client_app.build_client_app(cfg, SiteTrainers())
        self.context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
        self.weights = {
            k: v.clone() for k, v in build_task(cfg.task).build_model().state_dict().items()
        }

    def train(self, rnd: int, **config: object) -> Message:
        content = RecordDict(
            {
                "arrays": ArrayRecord(self.weights),
                "config": ConfigRecord({"server-round": rnd, **config}),
            }
        )
        msg = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)
        return self.app(msg, self.context)


def metrics_of(reply: Message) -> dict[str, float]:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return dict(reply.content["metrics"])


def the_ledger(tmp_path: Path) -> SiteLedger:
    """The one simulated site's privacy ledger in the test's site state folder."""
    (path,) = (tmp_path / "site-state").glob("site-1-*/privacy-ledger.json")
    return SiteLedger(path, "site-1")


def test_reported_epsilon_equals_dp_accounting_for_the_steps_taken(
    demo_site: Path, tmp_path: Path
) -> None:
    site = Site(site_config(demo_site, "task.dp_sgd.noise_multiplier=1.0"))
    q, per_round = 2 / 6, 3  # 6 training cases, batch 2: int(1 / q) steps per epoch
    for rnd in (1, 2, 3):
        m = metrics_of(site.train(rnd))
        steps = rnd * per_round
        assert m["patient_steps"] == steps and m["num-examples"] == 6
        assert m["patient_noise"] == 1.0 and m["patient_sample_rate"] == pytest.approx(q)
        expected = dp_accounting_epsilon(q, 1.0, steps)
        assert m["patient_epsilon"] == pytest.approx(expected, rel=2e-3)
        # one step more or less would show: the comparison is tight enough to find it
        for miscounted in (steps - 1, steps + 1):
            other = dp_accounting_epsilon(q, 1.0, miscounted)
            assert abs(other - m["patient_epsilon"]) > 5 * 2e-3 * expected
        assert m["patient_delta"] == 1e-5 and m["patient_budget_spent"] == 0
        assert "train_loss" not in m  # computed on the patients without noise: stays at the site
    (entry,) = the_ledger(tmp_path).entries()  # kept by the site, in its own state folder
    assert entry.steps == 9 and entry.noise == 1.0 and entry.sample_rate == pytest.approx(q)


def test_target_epsilon_sets_the_noise_so_that_the_run_ends_at_the_target(
    demo_site: Path,
) -> None:
    site = Site(site_config(demo_site, "task.dp_sgd.target_epsilon=3", "engine.rounds=2"))
    first, last = metrics_of(site.train(1)), metrics_of(site.train(2))
    sigma = last["patient_noise"]
    assert first["patient_noise"] == sigma and first["patient_budget_spent"] == 0
    # Opacus' search stops within 0.01 below the target
    assert 2.99 <= dp_accounting_epsilon(2 / 6, sigma, 6) <= 3.0 + 3e-3
    assert last["patient_epsilon"] == pytest.approx(dp_accounting_epsilon(2 / 6, sigma, 6), 2e-3)
    assert last["patient_budget_spent"] == 1  # the planned rounds are done: no round fits


def test_a_site_over_its_budget_sends_the_global_model_with_weight_zero(demo_site: Path) -> None:
    one, two = dp_accounting_epsilon(2 / 6, 1.0, 3), dp_accounting_epsilon(2 / 6, 1.0, 6)
    cfg = site_config(
        demo_site,
        "task.dp_sgd.noise_multiplier=1.0",
        f"task.dp_sgd.target_epsilon={(one + two) / 2:.4f}",
    )
    site = Site(cfg)
    first = metrics_of(site.train(1))
    assert first["num-examples"] == 6 and first["patient_budget_spent"] == 1
    second = site.train(2)
    m = metrics_of(second)
    assert m["num-examples"] == 0 and m["patient_budget_spent"] == 1
    assert m["patient_steps"] == 3 and m["patient_epsilon"] == pytest.approx(
        first["patient_epsilon"]
    )
    sent = second.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(sent[k], v) for k, v in site.weights.items())
    assert sorted(m) == sorted(first)  # same keys: Flower's aggregators demand them


def test_a_ledger_the_coordinator_carries_is_never_adopted(demo_site: Path) -> None:
    site = Site(site_config(demo_site, "task.dp_sgd.noise_multiplier=1.0"))
    carried = {"dp-sgd-ledger:site-1": [0.001, 2 / 6, 0.0]}  # the old carry-over, lower noise
    m = metrics_of(site.train(1, **carried))
    assert m["patient_noise"] == 1.0 and m["patient_steps"] == 3


def test_the_ledger_survives_a_restart_and_counts_every_run_on_the_data(
    demo_site: Path, tmp_path: Path
) -> None:
    cfg = site_config(demo_site, "task.dp_sgd.noise_multiplier=1.0")
    q = 2 / 6
    for rnd in (1, 2):
        metrics_of(Site(cfg).train(rnd, **{"run-key": "run-a"}))  # a new process each round
    resumed = metrics_of(Site(cfg).train(3, **{"run-key": "run-a"}))  # same run, resumed
    assert resumed["patient_steps"] == 9
    other = metrics_of(Site(cfg).train(1, **{"run-key": "run-b"}))  # a new run, same data
    assert other["patient_steps"] == 3
    assert other["patient_epsilon"] == pytest.approx(dp_accounting_epsilon(q, 1.0, 3), rel=2e-3)
    # the patients' budget: both runs composed (12 steps at the same noise and rate)
    expected = dp_accounting_epsilon(q, 1.0, 12)
    assert other["patient_lifetime_epsilon"] == pytest.approx(expected, rel=2e-3)
    assert {e.run: e.steps for e in the_ledger(tmp_path).entries()} == {"run-a": 9, "run-b": 3}


def test_a_policy_budget_raises_lowered_noise_and_stops_the_site_across_runs(
    demo_site: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "site.yaml"
    policy.write_text("dp_sgd:\n  required: true\n  max_epsilon: 10.0\n  delta: 1.0e-5\n")
    cfg = site_config(demo_site, "task.dp_sgd.noise_multiplier=0.3", "engine.rounds=1")
    cfg.site.policy = str(policy)
    first = metrics_of(Site(cfg).train(1, **{"run-key": "a"}))
    assert first["patient_noise"] > 0.3  # the policy's floor, not the coordinator's 0.3
    assert 5.0 < first["patient_lifetime_epsilon"] <= 10.0
    second = metrics_of(Site(cfg).train(1, **{"run-key": "b"}))  # a new run on the same data
    assert second["patient_noise"] > first["patient_noise"]  # less budget left: more noise
    assert first["patient_lifetime_epsilon"] < second["patient_lifetime_epsilon"] <= 10.0
    # a round more than the run planned (the coordinator said 1): over the site's budget
    m = metrics_of(Site(cfg).train(2, **{"run-key": "b"}))
    assert m["num-examples"] == 0 and m["patient_budget_spent"] == 1
    assert m["patient_lifetime_epsilon"] == pytest.approx(second["patient_lifetime_epsilon"])
    cfg.task.dp_sgd.enabled = False  # a run without DP-SGD: refused by dp_sgd.required
    with pytest.raises(SiteError, match="refused: policy dp_sgd.required"):
        Site(cfg).train(1)


def test_a_deployed_site_refuses_in_its_first_reply_naming_itself(demo_site: Path) -> None:
    site = Site(site_config(demo_site, "task.dp_sgd.target_epsilon=8", "task.batch_size=8"))
    with pytest.raises(SiteError, match=r"\[site site-1\] .*fewer than task.batch_size=8"):
        site.train(1)  # Flower turns it into the error reply, its reason naming the site


# --- refusals before training -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "needs task.dp_sgd.target_epsilon"),
        (["task.dp_sgd.target_epsilon=0"], "target_epsilon=0.0: must be positive"),
        (["task.dp_sgd.noise_multiplier=0"], "noise_multiplier=0.0: must be positive"),
        (["task.dp_sgd.target_epsilon=8", "task.dp_sgd.delta=1"], "task.dp_sgd.delta=1.0"),
        (["task.dp_sgd.target_epsilon=8", "task.dp_sgd.max_grad_norm=0"], "max_grad_norm=0.0"),
        (["task.dp_sgd.target_epsilon=8", "engine.finetune_epochs=1"], "engine.finetune_epochs=1"),
        (
            [
                "task.dp_sgd.target_epsilon=8",
                "task.dp_sgd.noise_multiplier=1",
                "strategy=krum",
            ],
            "strategy=krum with task.dp_sgd.noise_multiplier and task.dp_sgd.target_epsilon",
        ),
        (["task.dp_sgd.accountant=gdp"], "expected one of: rdp, prv"),
    ],
)
def test_settings_that_cannot_be_accounted_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match="") as err:
        check_overrides(["experiment=quick", *DP, *overrides])
    assert message in str(err.value)


def test_a_krum_run_without_budget_stops_is_accepted() -> None:
    check_overrides(["experiment=quick", *DP, "task.dp_sgd.target_epsilon=8", "strategy=krum"])


@pytest.mark.parametrize(
    ("overrides", "cases", "message"),
    [
        (["task.dp_sgd.target_epsilon=8", "task.batch_size=8"], 5, "site s has 5 training case"),
        (["task.dp_sgd.target_epsilon=8", "task.dp_sgd.delta=0.2"], 6, "not small against 1/6"),
        (["task.dp_sgd.target_epsilon=1e-7"], 6, "is out of reach in"),
        (
            ["task.dp_sgd.target_epsilon=0.5", "task.dp_sgd.noise_multiplier=0.5"],
            6,
            "one round (9 steps at sample rate 0.3333) already spends",
        ),
    ],
)
def test_site_settings_that_cannot_be_accounted_are_refused_with_the_site(
    overrides: list[str], cases: int, message: str
) -> None:
    cfg = check_overrides(["experiment=quick", *DP, "task.batch_size=2", *overrides])
    problems = site_privacy_problems(cfg, "s", cases)
    assert any(message in p for p in problems), problems
    with pytest.raises(ConfigError, match="patient-level DP") as err:
        check_sites_privacy(cfg, [("s", cases)])
    assert message in str(err.value)


# --- the DP-SGD step itself, on a stub site -------------------------------------------------------


class StubTrainer:
    """What :func:`private_fit` uses of a SiteTrainer: a tiny U-Net (SGD, no momentum) and
    in-memory cases of 8^3 (no transforms)."""

    name = "stub"

    def __init__(
        self, cases: list[dict], batch_size: int, *overrides: str, model: nn.Module | None = None
    ) -> None:
        cfg = check_overrides(
            [
                "experiment=quick",
                "task.roi_size=[8,8,8]",
                "task.model.channels=[2,4]",
                "task.optimizer.name=sgd",
                "task.optimizer.momentum=0",
                "task.optimizer.lr=0.5",
                *DP,
                "task.dp_sgd.noise_multiplier=1",
                *overrides,
            ]
        )
        self.cfg = cfg
        self.task = build_task(cfg.task, torch.device("cpu"))
        torch.manual_seed(0)
        self.model = model or self.task.build_model()
        self.train_data, self.batch_size = cases, batch_size
        self.train_transform = Compose([])

    @property
    def num_train(self) -> int:
        return len(self.train_data)

    def fit(self, *, extra_loss=None, epochs: int = 1, noise: float = 1.0):  # noqa: ANN001, ANN201
        """One epoch of DP-SGD with fixed sampling and noise generators; returns the update
        (flat tensor: weights after - before) and the ledger."""
        before = torch.cat([p.detach().flatten().clone() for p in self.model.parameters()])
        q = self.batch_size / self.num_train
        generators = (torch.Generator().manual_seed(1), torch.Generator().manual_seed(7))
        _, ledger = private_fit(
            self,  # type: ignore[arg-type]
            PrivacyLedger(noise, q),
            self.cfg.task.dp_sgd,
            epochs,
            seed=0,
            extra_loss=extra_loss,
            generators=generators,
        )
        after = torch.cat([p.detach().flatten() for p in self.model.parameters()])
        return after - before, ledger


def cases(n: int, huge: int | None = None) -> list[dict]:
    """``n`` random cases; case ``huge`` (if given) has intensities 10^4 times larger."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        image = torch.randn(1, 8, 8, 8, generator=gen) * (1e4 if i == huge else 1.0)
        label = (torch.rand(1, 8, 8, 8, generator=gen) > 0.7).long()
        out.append({"image": image, "label": label})
    return out


def case_gradient_norm(trainer: StubTrainer, case: dict) -> float:
    model = copy.deepcopy(trainer.model)
    loss = trainer.task.loss_function()(model(case["image"][None]), case["label"][None])
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return float(torch.sqrt(sum((g**2).sum() for g in grads)))


@pytest.mark.parametrize("clip", [1.0, 1e12])
def test_one_huge_case_moves_the_update_by_at_most_the_clipping_norm(clip: float) -> None:
    """Replace one case of a full batch (sample rate 1, one step) by a case with a huge gradient:
    the update moves by at most lr * (C + |g_replaced|) / B, the sampling and the noise being
    the same. Without clipping (C = 10^12) it moves far more: the test can fail."""
    n, lr = 4, 0.5
    # a network without normalisation, so that intensities 10^4 times larger give a gradient as
    # much larger (instance norm would cancel the scale)
    torch.manual_seed(0)
    net = nn.Conv3d(1, 2, 3, padding=1)
    normal = StubTrainer(cases(n), n, model=copy.deepcopy(net))
    attacked = StubTrainer(cases(n, huge=0), n, model=copy.deepcopy(net))
    overrides = [f"task.dp_sgd.max_grad_norm={clip}"]
    normal.cfg = attacked.cfg = check_overrides(
        ["experiment=quick", *DP, "task.dp_sgd.noise_multiplier=1", *overrides]
    )
    replaced = case_gradient_norm(normal, normal.train_data[0])
    assert case_gradient_norm(attacked, attacked.train_data[0]) > 1e3  # it is huge
    noise = min(1.0, 1.0 / clip)  # noise std sigma * C stays 1 (float32 keeps the difference)
    update, ledger = normal.fit(noise=noise)
    attacked_update, _ = attacked.fit(noise=noise)
    assert ledger.steps == 1
    distance = float((attacked_update - update).norm())
    bound = lr * (min(clip, 1.0) + replaced) / n
    if clip == 1.0:
        assert distance <= bound * (1 + 1e-4)
    else:
        assert distance > 100 * lr * (1.0 + replaced) / n


def test_fedprox_term_is_added_after_the_noise_without_clipping() -> None:
    """One SGD step with FedProx: the update is the plain DP-SGD update minus lr * mu * (w -
    w_global), exactly (same sampling and noise): the term is neither clipped nor dropped."""
    plain, prox = StubTrainer(cases(4), 4), StubTrainer(cases(4), 4)
    anchor = {k: v + 0.3 for k, v in plain.model.state_dict().items()}
    mu, lr = 0.2, 0.5
    update, _ = plain.fit()
    prox_update, _ = prox.fit(extra_loss=proximal_term(anchor, mu))
    weights = torch.cat([p.detach().flatten() for p in plain.model.parameters()]) - update
    anchors = torch.cat([anchor[k].flatten() for k, _ in plain.model.named_parameters()])
    expected = update - lr * mu * (weights - anchors)
    torch.testing.assert_close(prox_update, expected, rtol=1e-4, atol=1e-6)


def test_empty_poisson_batches_still_take_a_noised_counted_step() -> None:
    trainer = StubTrainer(cases(20), 1)  # sample rate 0.05: most steps sample nobody
    before = [p.detach().clone() for p in trainer.model.parameters()]
    update, ledger = trainer.fit(epochs=2)
    assert ledger.steps == 40  # int(1 / 0.05) per epoch, empty batches included
    assert float(update.norm()) > 0 and len(before) > 0


@pytest.mark.parametrize("name", ["unet", "densenet"])
def test_per_case_gradients_of_the_task_loss_are_each_case_alone(name: str) -> None:
    """Opacus' per-case gradients equal each case's own gradient: the tasks' losses (Dice+CE
    per case, cross-entropy) are means over cases, as Opacus assumes."""
    from opacus import GradSampleModule

    task_overrides = ["task.model.channels=[2,4]", "task.roi_size=[8,8,8]"]
    if name == "densenet":
        task_overrides = [
            "task=classification",
            "task.model.channels=[4,8]",
            "task.roi_size=[32,32,32]",
        ]
    cfg = check_overrides(
        ["experiment=quick", *DP, "task.dp_sgd.noise_multiplier=1", *task_overrides]
    )
    task = build_task(cfg.task, torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model()
    images = torch.randn(3, 1, *cfg.task.roi_size)
    labels = (torch.rand(3, 1, 8, 8, 8) > 0.5).long()
    if name == "densenet":
        labels = torch.tensor([0, 1, 1])
    wrapped = GradSampleModule(model)
    task.loss_function()(wrapped(images), labels).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per_case = [p.grad_sample.clone() for p in params]
    wrapped.to_standard_module()
    for i in range(3):
        alone = torch.autograd.grad(
            task.loss_function()(model(images[i : i + 1]), labels[i : i + 1]), params
        )
        for got, want in zip(per_case, alone, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)


# --- models -------------------------------------------------------------------------------------


def test_batch_norm_becomes_group_norm_everywhere_with_a_logged_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = check_overrides(
        ["experiment=quick", *DP, "task.dp_sgd.target_epsilon=8", "task.model.norm=batch"]
    )
    task = build_task(cfg.task)
    first, second = task.build_model(), task.build_model()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in first.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in first.modules())
    assert first.state_dict().keys() == second.state_dict().keys()  # server and sites agree
    with caplog.at_level(logging.INFO, logger="fl_imaging"):
        check_dp_sgd_model(cfg)
    assert "batch-norm layer(s) became GroupNorm" in caplog.text
    assert "model.0.conv.unit0.adn.N" in caplog.text  # names the layers


def densenet_config(*overrides: str) -> RunConfig:
    return check_overrides(
        ["experiment=quick", "task=classification", *DP, "task.dp_sgd.target_epsilon=8", *overrides]
    )


def test_in_place_activations_are_made_out_of_place_and_then_train() -> None:
    cfg = densenet_config()
    plain = build_task(cfg.task).network()
    assert any(getattr(m, "inplace", False) for m in plain.modules())
    model, conversion = private_network(plain)
    assert conversion.out_of_place and conversion.group_norm
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    check_per_sample_gradients(model, torch.randn(2, 1, *cfg.task.roi_size))


def test_layers_opacus_cannot_train_are_refused_by_name() -> None:
    stats = nn.Sequential(
        nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, affine=True, track_running_stats=True)
    )
    with pytest.raises(ConfigError, match=r"1 \(InstanceNorm3d"):
        private_network(stats)

    in_place = nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(inplace=True), nn.Conv3d(2, 2, 3))
    with pytest.raises(ConfigError, match="training one case at a time fails"):
        check_per_sample_gradients(in_place, torch.randn(2, 1, 8, 8, 8))  # left unfixed


def test_a_network_that_cannot_normalise_a_single_case_is_refused() -> None:
    """DenseNet at 16^3 ends at 1 voxel with GroupNorm of one channel per group (converted
    batch norm): a Poisson batch of one case cannot be normalised. Refused before training."""
    with pytest.raises(ConfigError, match="one value per group"):
        check_dp_sgd_model(densenet_config("task.roi_size=[16,16,16]"))
    check_dp_sgd_model(densenet_config("task.roi_size=[32,32,32]"))


def test_the_default_unet_passes_as_it_is() -> None:
    cfg = check_overrides(["experiment=quick", *DP, "task.dp_sgd.target_epsilon=8"])
    model, conversion = private_network(build_task(cfg.task).network())
    assert conversion.message() == ""
    check_per_sample_gradients(model, torch.randn(2, 1, *cfg.task.roi_size))
    np.testing.assert_equal(len(list(model.parameters())) > 0, True)
