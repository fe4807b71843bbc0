"""Patient-level differential privacy at one site: DP-SGD with Opacus, accounted per site.

DP-SGD (Abadi et al. 2016) at every site (``task.dp_sgd``): each step samples every training
case independently with probability ``q = task.batch_size / N`` (Poisson sampling, N the site's
training cases), clips each case's gradient to L2 norm ``max_grad_norm``, sums them and adds
Gaussian noise of std ``sigma * max_grad_norm``. A site's epsilon at ``delta`` then bounds what the
weights it sends (and so the global model, and whatever is computed from it) reveal about any one
of its training patients, whoever looks: the coordinator, the other sites, or whoever receives
the final model. Not covered: the number of training cases (FedAvg's weight, and ``q``), which is
sent in the clear as in every federated system, and the scores of validation and test cases
(patients never trained on). The training loss, computed on the patients without noise, is kept
at the site (logged there, not sent).

All of the privacy machinery is Opacus': per-case gradients (``GradSampleModule``), clipping and
noise (``DPOptimizer``), Poisson sampling (``UniformWithReplacementSampler``, what its
``DPDataLoader`` uses), the noise for a target (``get_noise_multiplier``) and the accountants
(``rdp``, ``prv``), which count every noised step through the optimizer's step hook. Ours: the
loop around them (a MONAI batch of dicts, an empty Poisson batch that still takes its noised step,
FedProx's term), the per-site ledger, and the refusals of what cannot be accounted honestly.

Sampling and noise draw from a generator seeded by the operating system, never by the run's
``seed``: the seed is in the config every site holds, and noise or batches anyone can replay
give no privacy. DP-SGD runs are therefore not bit-reproducible.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from monai.data import DataLoader, list_data_collate

from fl_imaging.config import ConfigError, DPSGDConfig, RunConfig
from fl_imaging.training.site_training import SiteTrainer
from tasks.base import ExtraLoss, TrainResult

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

__all__ = [
    "planned_steps",
    "PrivacyLedger",
    "check_sites_privacy",
    "new_ledger",
    "private_fit",
    "sample_rate",
    "site_privacy_problems",
    "steps_per_epoch",
]


@dataclass(frozen=True)
class PrivacyLedger:
    """A site's DP-SGD accounting so far: the noise multiplier ``sigma`` and sample rate ``q``
    it trains with (fixed for a run) and the noised ``steps`` taken; Opacus' accountant history
    is ``[(sigma, q, steps)]``."""

    noise_multiplier: float
    sample_rate: float
    steps: int = 0

    def epsilon(self, dp: DPSGDConfig, extra_steps: int = 0) -> float:
        """Epsilon at ``dp.delta`` after ``steps + extra_steps`` steps, by ``dp.accountant``
        (0.0 before any step)."""
        steps = self.steps + extra_steps
        if steps == 0:
            return 0.0
        accountant = _accountant(dp, [(self.noise_multiplier, self.sample_rate, steps)])
        return float(accountant.get_epsilon(delta=dp.delta))

    def fits(self, dp: DPSGDConfig, extra_steps: int) -> bool:
        """Whether ``extra_steps`` more steps keep epsilon within ``dp.target_epsilon`` (always,
        without a target)."""
        return dp.target_epsilon is None or self.epsilon(dp, extra_steps) <= dp.target_epsilon


def _accountant(dp: DPSGDConfig, history: list[tuple[float, float, int]]) -> IAccountant:
    """Opacus' accountant ``dp.accountant`` holding ``history`` ((sigma, q, steps) entries)."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=dp.accountant.value)
    accountant.history = list(history)
    return accountant


def sample_rate(num_train: int, batch_size: int) -> float:
    """Poisson sampling rate ``batch_size / num_train`` (each case's chance to be in a step's
    batch; the expected batch size is ``batch_size``)."""
    return batch_size / num_train


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Noised steps in one local epoch: ``int(1 / q)``, the length of Opacus' Poisson sampler."""
    return int(1 / sample_rate(num_train, batch_size))


def planned_steps(cfg: RunConfig, num_train: int) -> int:
    """The site's steps over the whole run: rounds x local epochs x steps per epoch."""
    per_epoch = steps_per_epoch(num_train, cfg.task.batch_size)
    return cfg.engine.rounds * cfg.task.local_epochs * per_epoch


def site_privacy_problems(cfg: RunConfig, site: str, num_train: int) -> list[str]:
    """What makes DP-SGD at ``site`` (``num_train`` training cases) impossible to account
    honestly, one message per problem naming the site and the key to change; empty when none."""
    dp, batch = cfg.task.dp_sgd, cfg.task.batch_size
    if num_train < batch:
        return [
            f"site {site} has {num_train} training case(s), fewer than task.batch_size={batch}: "
            f"Poisson sampling at rate {batch}/{num_train} > 1 is no sampled Gaussian mechanism "
            f"the accountant models; set task.batch_size to at most {num_train}"
        ]
    problems = []
    if dp.delta >= 1 / num_train:
        problems.append(
            f"site {site}: task.dp_sgd.delta={dp.delta:g} is not small against 1/{num_train} "
            "(its training cases): such a guarantee allows one patient's record to be released "
            f"whole; set task.dp_sgd.delta below {1 / num_train:.2g}, e.g. 1e-5"
        )
    try:
        ledger = new_ledger(cfg, num_train)
    except ConfigError as err:
        return [*problems, f"site {site}: {err}"]
    first = cfg.task.local_epochs * steps_per_epoch(num_train, batch)
    if not ledger.fits(dp, first):
        problems.append(
            f"site {site}: with task.dp_sgd.noise_multiplier={ledger.noise_multiplier:g} one "
            f"round ({first} steps at sample rate {ledger.sample_rate:.4g}) already spends "
            f"epsilon {ledger.epsilon(dp, first):.3g}, over task.dp_sgd.target_epsilon="
            f"{dp.target_epsilon:g}: the site would never train; raise the noise multiplier or "
            "the target"
        )
    return problems


def check_sites_privacy(cfg: RunConfig, sites: Sequence[tuple[str, int]]) -> None:
    """Refuse a DP-SGD run before training when any site's accounting would be dishonest
    (:func:`site_privacy_problems`); ``sites`` holds (name, training cases). Raises
    :class:`ConfigError` listing every problem; does nothing without ``task.dp_sgd.enabled``
    or in an evaluation-only run (``engine.rounds=0``: no site trains, nothing is spent)."""
    if not cfg.task.dp_sgd.enabled or cfg.engine.rounds == 0:
        return
    problems = [p for name, n in sites for p in site_privacy_problems(cfg, name, n)]
    if problems:
        raise ConfigError(
            "patient-level DP (task.dp_sgd) cannot be accounted:\n  - " + "\n  - ".join(problems)
        )


def new_ledger(cfg: RunConfig, num_train: int) -> PrivacyLedger:
    """The ledger a site starts with: ``task.dp_sgd.noise_multiplier`` or, without one, the
    smallest noise multiplier (Opacus' ``get_noise_multiplier``, ``dp.accountant``) that keeps
    the run's planned steps within ``target_epsilon`` at ``delta``; no step taken. Raises
    :class:`ConfigError` when the target is out of reach."""
    dp = cfg.task.dp_sgd
    q = sample_rate(num_train, cfg.task.batch_size)
    if dp.noise_multiplier is not None:
        return PrivacyLedger(float(dp.noise_multiplier), q)
    from opacus.accountants.utils import get_noise_multiplier

    assert dp.target_epsilon is not None  # the config check asks for one of the two
    steps = planned_steps(cfg, num_train)
    try:
        with warnings.catch_warnings():  # its search tries noise levels far from the answer
            warnings.filterwarnings("ignore", message="Optimal order is the")
            sigma = get_noise_multiplier(
                target_epsilon=dp.target_epsilon,
                target_delta=dp.delta,
                sample_rate=q,
                steps=steps,
                accountant=dp.accountant.value,
            )
    except ValueError:
        raise ConfigError(
            f"task.dp_sgd.target_epsilon={dp.target_epsilon:g} at delta {dp.delta:g} is out of "
            f"reach in {steps} steps at sample rate {q:.4g} (a noise multiplier over 10^6 would "
            "be needed): raise the target, or lower engine.rounds or task.local_epochs"
        ) from None
    return PrivacyLedger(float(sigma), q)


def _secret_generator(device: torch.device | None = None) -> torch.Generator:
    """A torch generator on ``device`` (default: the CPU) seeded by the operating system (see
    the module docstring)."""
    return torch.Generator(device=device or "cpu").manual_seed(secrets.randbits(63))


def private_fit(
    trainer: SiteTrainer,
    ledger: PrivacyLedger,
    dp: DPSGDConfig,
    epochs: int,
    *,
    seed: int,
    extra_loss: ExtraLoss | None = None,
    log: Callable[[str], None] | None = None,
    generators: tuple[torch.Generator, torch.Generator] | None = None,
) -> tuple[TrainResult, PrivacyLedger]:
    """Train ``trainer.model`` in place with DP-SGD for ``epochs`` local epochs.

    Each epoch takes :func:`steps_per_epoch` steps, each on a Poisson sample of the training
    cases (augmented with ``seed``); every step, an empty sample included, adds the noise and is
    counted by Opacus' accountant (``dp.accountant``). FedProx's term (``extra_loss``) uses no
    patient data, so its gradient is added after clipping and noise (neither applies to it).
    ``generators`` (sampling, noise) are for tests; by default both are seeded by the OS.

    Returns the last epoch's mean loss per sampled case (the term included; kept at the site)
    with the number of cases sampled, and the ledger with the steps taken. Raises
    :class:`ConfigError` when the site's sample rate differs from its ledger's (its number of
    training cases changed since its accounting began).
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    q = sample_rate(trainer.num_train, trainer.batch_size)
    if not math.isclose(q, ledger.sample_rate, rel_tol=1e-12):
        raise ConfigError(
            f"[site {trainer.name}] has {trainer.num_train} training cases (sample rate {q:.4g}) "
            f"but its privacy accounting began at sample rate {ledger.sample_rate:.4g}: its "
            "accountant would no longer describe its training; start a new run"
        )
    task = trainer.task
    # Opacus draws the noise on the parameters' device, with a generator that must live there
    sampling, noise = generators or (_secret_generator(), _secret_generator(task.device))
    torch.manual_seed(seed)
    trainer.train_transform.set_random_state(seed=seed % (2**32))
    sampler = UniformWithReplacementSampler(
        num_samples=trainer.num_train, sample_rate=q, generator=sampling
    )
    loader = DataLoader(
        trainer.train_data,
        batch_sampler=sampler,
        collate_fn=lambda items: list_data_collate(items) if items else None,
        num_workers=0,
    )
    model = trainer.model.to(task.device).train()
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(
        task.optimizer(model),
        noise_multiplier=ledger.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=trainer.batch_size,
        generator=noise,
    )
    accountant = _accountant(
        dp, [(ledger.noise_multiplier, q, ledger.steps)] if ledger.steps else []
    )
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
    loss_fn = task.loss_function()
    params = [p for p in model.parameters() if p.requires_grad]
    total, count = 0.0, 0
    try:
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' hooks
        for epoch in range(1, epochs + 1):
            total, count = 0.0, 0
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                if batch is None:  # nobody sampled: the step still adds noise and is counted
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
                    loss, size = torch.zeros(()), 0
                else:
                    images = batch["image"].to(task.device)
                    loss = loss_fn(wrapped(images), batch["label"].to(task.device))
                    loss.backward()
                    size = images.shape[0]
                if not optimizer.pre_step():  # clip, sum, noise, scale; counted by the hook
                    raise RuntimeError("DP-SGD skipped a step; no step may go uncounted")
                if extra_loss is not None:
                    term = extra_loss(model)
                    for p, grad in zip(params, torch.autograd.grad(term, params), strict=True):
                        p.grad = p.grad + grad
                    loss = loss + term.detach()
                optimizer.original_optimizer.step()
                total += float(loss.detach()) * size
                count += size
            if log is not None:
                log(f"epoch {epoch}/{epochs}: loss {total / max(count, 1):.4f} ({count} sampled)")
    finally:
        optimizer.zero_grad(set_to_none=True)
        wrapped.to_standard_module()
    steps = sum(s for _, _, s in accountant.history)
    expected = ledger.steps + epochs * steps_per_epoch(trainer.num_train, trainer.batch_size)
    if steps != expected:
        raise RuntimeError(f"DP-SGD counted {steps} steps, expected {expected}")
    return TrainResult(loss=total / max(count, 1), num_samples=count), replace(ledger, steps=steps)
