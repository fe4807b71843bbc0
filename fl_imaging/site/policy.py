"""A site's own policy: what it promises its patients, enforced by the site itself.

The coordinator's config and messages are requests; a site answers them only within its policy
(a YAML file the hospital keeps: ``fl-imaging-deploy supernode --policy site.yaml``; in
simulation ``site.policy`` / ``site.policies``). Every refusal raises :class:`PolicyRefusal`
naming the policy key; it reaches the coordinator as the site's refusal, which stops the run
with that reason. Keys (all optional; the defaults accept everything):

.. code-block:: yaml

    secure_aggregation:
      required: true      # no update leaves this site unmasked
      min_sites: 3        # masked only among, and unmasked only inside a sum of, >= 3 sites
    protection:
      required: [secure_aggregation, homomorphic_encryption]  # an update leaves under one of
                          # these (either); secure_aggregation.required: true adds the first
    dp_sgd:
      required: true      # train with DP-SGD, noise computed here from this site's cases
      max_epsilon: 8.0    # over every run on this site's data (its own privacy ledger)
      delta: 1.0e-5
      accountant: rdp     # rdp | prv
    accept:               # empty lists accept anything
      tasks: [segmentation]
      strategies: [fedavg, fedprox]
      models: [unet]
      config_hashes: []   # SHA-256 of the run's task and strategy config (the refusal names it)
      bundles: []         # SHA-256 of the MONAI bundles this site runs (task=bundle: bundle code
                          # runs at the site, so an unlisted bundle is refused)
    release:              # what may leave the site besides the (masked) update
      losses: true        # train_loss, val_loss and every other loss
      case_counts: true   # how many cases a site trained or scored (false: the run must weigh
                          # sites equally; every count is sent as 1)
      privacy_details: true  # DP-SGD noise, sample rate and steps (they reveal the case count)
    max_rounds: 50        # training rounds this site takes part in per run
    statistics:           # fl-imaging-data stats (fl_imaging.statistics.site)
      allow: true         # false: refuse every statistics query
      min_count: 10       # release a statistic only when the cases behind it, and every
                          # non-empty histogram bin, count at least this many (whatever the
                          # coordinator asks for)

Ours: no library has a per-site federated policy; the file is parsed by OmegaConf against the
dataclasses below (so a wrong key or type names the key and the file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fl_imaging.config import DPMode, DPSGDAccountant, RunConfig, config_to_yaml, model_label
from fl_imaging.flower.protocol import NUM_EXAMPLES, SiteRefusal

__all__ = [
    "AcceptPolicy",
    "DPSGDPolicy",
    "PROTECTIONS",
    "PolicyError",
    "PolicyRefusal",
    "ProtectionPolicy",
    "ReleasePolicy",
    "SecureAggregationPolicy",
    "SitePolicy",
    "StatisticsPolicy",
    "check_bundle",
    "check_request",
    "check_rounds",
    "check_statistics",
    "load_policy",
    "release_metrics",
    "required_protections",
    "training_config_hash",
]

#: The protections ``protection.required`` may list: an update leaves under any one of them.
PROTECTIONS = ("secure_aggregation", "homomorphic_encryption")

#: Metrics a ``release.privacy_details: false`` site keeps (they tell its number of cases).
PRIVACY_DETAILS = ("patient_noise", "patient_sample_rate", "patient_steps")


class PolicyError(ValueError):
    """A policy file that cannot be read or holds a wrong key or value; names the file."""


class PolicyRefusal(SiteRefusal):
    """A request the site's policy does not allow; the message starts with ``policy KEY``."""


@dataclass
class SecureAggregationPolicy:
    """``secure_aggregation``: ``required`` (refuse to send an update unmasked) and
    ``min_sites`` (the fewest sites this site masks among and is unmasked with)."""

    required: bool = False
    min_sites: int = 2


@dataclass
class ProtectionPolicy:
    """``protection``: ``required`` lists the protections of :data:`PROTECTIONS` any one of
    which a training reply must leave under (empty: none required, unless
    ``secure_aggregation.required``, which adds ``secure_aggregation``)."""

    required: list[str] = field(default_factory=list)


@dataclass
class DPSGDPolicy:
    """``dp_sgd``: ``required`` (train only with DP-SGD), ``max_epsilon`` at ``delta`` over
    every run on this site's data (None: no lifetime budget), by ``accountant``."""

    required: bool = False
    max_epsilon: float | None = None
    delta: float = 1e-5
    accountant: DPSGDAccountant = DPSGDAccountant.rdp


@dataclass
class AcceptPolicy:
    """``accept``: the tasks, strategies, models and config hashes the site takes part in
    (empty: any), and the SHA-256 digests of the MONAI bundles it runs (empty: none, except at
    a simulated site without a policy file, whose owner runs the bundle on their own machine)."""

    tasks: list[str] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    config_hashes: list[str] = field(default_factory=list)
    bundles: list[str] = field(default_factory=list)


@dataclass
class ReleasePolicy:
    """``release``: which kinds of metrics may leave the site (see the module)."""

    losses: bool = True
    case_counts: bool = True
    privacy_details: bool = True


@dataclass
class StatisticsPolicy:
    """``statistics``: whether the site answers statistics queries at all (``allow``) and the
    fewest cases (or voxels, for a voxel histogram's bin) behind any number it releases
    (``min_count``; the coordinator may ask for more, never for less)."""

    allow: bool = True
    min_count: int = 10


@dataclass
class SitePolicy:
    """One site's policy (see the module); ``source`` is the file it was read from ("" for the
    default, which accepts everything)."""

    secure_aggregation: SecureAggregationPolicy = field(default_factory=SecureAggregationPolicy)
    protection: ProtectionPolicy = field(default_factory=ProtectionPolicy)
    dp_sgd: DPSGDPolicy = field(default_factory=DPSGDPolicy)
    accept: AcceptPolicy = field(default_factory=AcceptPolicy)
    release: ReleasePolicy = field(default_factory=ReleasePolicy)
    max_rounds: int | None = None
    statistics: StatisticsPolicy = field(default_factory=StatisticsPolicy)
    source: str = ""


def load_policy(path: Path | str | None) -> SitePolicy:
    """The policy in the YAML file ``path`` (None: the default policy). Raises
    :class:`PolicyError` naming the file and the key when it is missing, is not YAML, holds an
    unknown key or a value of the wrong type or range."""
    if path is None:
        return SitePolicy()
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"site policy {path}: no such file; give the policy file of this site")
    try:
        loaded = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(SitePolicy), loaded)
        policy = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise PolicyError(
            f"site policy {path}: unknown key '{err.full_key or err.key}'; the keys are "
            "secure_aggregation, protection, dp_sgd, accept, release, max_rounds, statistics "
            "(docs/how-to/site-policy.md)"
        ) from None
    except ValidationError as err:
        raise PolicyError(
            f"site policy {path}: invalid value {err.value!r} for '{err.full_key or err.key}'"
        ) from None
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as err:
        raise PolicyError(f"site policy {path}: cannot be read as YAML: {err}") from None
    assert isinstance(policy, SitePolicy)
    policy.source = str(path)
    problems = _problems(policy)
    if problems:
        raise PolicyError(f"site policy {path}: " + "; ".join(problems))
    return policy


def _problems(policy: SitePolicy) -> list[str]:
    problems = []
    if policy.secure_aggregation.min_sites < 2:
        problems.append("secure_aggregation.min_sites must be at least 2")
    unknown = [p for p in policy.protection.required if p not in PROTECTIONS]
    if unknown:
        problems.append(
            f"protection.required: unknown {', '.join(unknown)}; list any of "
            f"{', '.join(PROTECTIONS)}"
        )
    dp = policy.dp_sgd
    if dp.max_epsilon is not None and dp.max_epsilon <= 0:
        problems.append("dp_sgd.max_epsilon must be positive")
    if not 0 < dp.delta < 1:
        problems.append("dp_sgd.delta must lie between 0 and 1")
    if policy.max_rounds is not None and policy.max_rounds < 1:
        problems.append("max_rounds must be at least 1")
    if policy.statistics.min_count < 1:
        problems.append("statistics.min_count must be at least 1")
    return problems


def training_config_hash(cfg: RunConfig) -> str:
    """SHA-256 (hex) of the run's ``task`` and ``strategy`` config (what the site's cases are
    used for: the model, its training, the aggregation and its privacy), as YAML; what
    ``accept.config_hashes`` lists."""
    loaded = OmegaConf.create(config_to_yaml(cfg))
    part = OmegaConf.to_yaml({"task": loaded["task"], "strategy": loaded["strategy"]})
    return hashlib.sha256(part.encode()).hexdigest()


def _refuse(key: str, why: str, policy: SitePolicy) -> PolicyRefusal:
    where = f" ({policy.source})" if policy.source else ""
    return PolicyRefusal(f"policy {key}{where}: {why}")


def check_request(
    policy: SitePolicy,
    cfg: RunConfig,
    *,
    training: bool,
    masked: bool,
    encrypted: bool = False,
    simulated: bool = False,
) -> None:
    """Refuse a request of the run ``cfg`` that ``policy`` does not allow: a task, strategy,
    model, config hash or bundle (:func:`check_bundle`; ``simulated``: whether this site is
    simulated on the coordinator's machine) not accepted, more rounds than ``max_rounds``, a
    run without DP-SGD when it is required, a case-weighted run when case counts may not
    leave, and (for a training message, ``training``) a reply the coordinator did not ask to
    be masked (``masked``) or encrypted (``encrypted``) when the policy requires one of those
    protections (:func:`required_protections`). Raises :class:`PolicyRefusal`."""
    if cfg.task.bundle is not None:
        check_bundle(policy, cfg, simulated=simulated)
    accept = policy.accept
    checks = (
        ("accept.tasks", accept.tasks, cfg.task.name.value, "task"),
        ("accept.strategies", accept.strategies, cfg.strategy.name, "strategy"),
        ("accept.models", accept.models, model_label(cfg.task.model), "model"),
    )
    for key, allowed, value, what in checks:
        if allowed and value not in allowed:
            raise _refuse(key, f"the run's {what} is {value}, not one of {allowed}", policy)
    if accept.config_hashes:
        digest = training_config_hash(cfg)
        if digest not in accept.config_hashes:
            raise _refuse(
                "accept.config_hashes",
                f"the run's task and strategy config has SHA-256 {digest}, which the policy "
                "does not list (add it once the config is approved)",
                policy,
            )
    if policy.max_rounds is not None and cfg.engine.rounds > policy.max_rounds:
        raise _refuse(
            "max_rounds",
            f"the run asks for {cfg.engine.rounds} rounds, more than {policy.max_rounds}",
            policy,
        )
    if policy.dp_sgd.required and not cfg.task.dp_sgd.enabled:
        raise _refuse(
            "dp_sgd.required",
            "the run does not train with DP-SGD (task.dp_sgd.enabled=true)",
            policy,
        )
    if not policy.release.case_counts and not _equal_weights(cfg):
        raise _refuse(
            "release.case_counts",
            "the run weighs sites by their cases, which this site does not release; weigh "
            "sites equally (strategy.secagg.weighting=equal, or client-level DP)",
            policy,
        )
    required = required_protections(policy)
    given = {"secure_aggregation": masked, "homomorphic_encryption": encrypted}
    if training and required and not any(given[p] for p in required):
        key = "protection.required" if policy.protection.required else "secure_aggregation.required"
        how = {
            "secure_aggregation": "secure aggregation (strategy.secagg.enabled=true)",
            "homomorphic_encryption": "homomorphic encryption (strategy.he.enabled=true)",
        }
        raise _refuse(
            key,
            "the coordinator asked for this site's update unmasked and unencrypted; this site "
            "sends it only "
            f"under {' or '.join(how[p] for p in required)}",
            policy,
        )


def required_protections(policy: SitePolicy) -> list[str]:
    """The protections of which a training reply needs one: ``protection.required``, plus
    ``secure_aggregation`` with ``secure_aggregation.required: true`` (empty: none)."""
    required = list(dict.fromkeys(policy.protection.required))
    if policy.secure_aggregation.required and "secure_aggregation" not in required:
        required.insert(0, "secure_aggregation")
    return required


def check_bundle(policy: SitePolicy, cfg: RunConfig, *, simulated: bool) -> None:
    """Refuse to run the MONAI bundle the run names (``task.bundle``, ``task.bundle_sha256``)
    unless this site's copy is the one named and the policy accepts it. A bundle's configs
    are code the site would run, so only its files' bytes are read here
    (:func:`tasks.bundle_files.bundle_digest`), nothing of it is parsed.

    Accepted when this site's copy at ``task.bundle`` has the digest the run names (or the run
    names none) and that digest is listed in ``accept.bundles``; with no policy file, at a
    simulated site only (``simulated``: its owner runs the bundle on their own machine).

    Raises:
        PolicyRefusal: naming ``accept.bundles`` and both digests when they differ, this copy's
            digest when it is not listed, or the path when the site has no bundle there.
    """
    from fl_imaging.config import ConfigError
    from tasks.bundle_files import bundle_digest  # reads bytes only: no torch, no MONAI

    path = cfg.task.bundle
    try:
        digest = bundle_digest(str(path))
    except (ConfigError, OSError) as err:
        raise _refuse("accept.bundles", f"this site has no bundle to run: {err}", policy) from None
    named = cfg.task.bundle_sha256
    if named and named != digest:
        raise _refuse(
            "accept.bundles",
            f"the run names the bundle {path} with SHA-256 {named}, but this site's copy has "
            f"SHA-256 {digest}; refused (the coordinator and the site must hold the same bundle)",
            policy,
        )
    if digest in policy.accept.bundles:
        return
    if simulated and not policy.source:
        return
    raise _refuse(
        "accept.bundles",
        f"the bundle {path} (SHA-256 {digest}) is not listed; a bundle is code this site would "
        "run: review it and add its SHA-256 to accept.bundles (fl-imaging-deploy check-policy "
        f"POLICY task=bundle task.bundle={path} prints it)",
        policy,
    )


def _equal_weights(cfg: RunConfig) -> bool:
    """Whether the run weighs sites equally (client-level DP, or secure aggregation with equal
    weights)."""
    if cfg.strategy.dp.mode != DPMode.none:
        return True
    secagg = cfg.strategy.secagg
    return secagg.enabled and secagg.weighting == "equal"


def check_rounds(policy: SitePolicy, rounds_done: int) -> None:
    """Refuse one more training round when the site took part in ``max_rounds`` of this run
    already (counted by the site, whatever the coordinator says). Raises
    :class:`PolicyRefusal`."""
    if policy.max_rounds is not None and rounds_done >= policy.max_rounds:
        raise _refuse(
            "max_rounds",
            f"this site has trained in {rounds_done} round(s) of this run, the most it allows",
            policy,
        )


def check_statistics(policy: SitePolicy) -> None:
    """Refuse a statistics query (``fl-imaging-data stats``) when ``statistics.allow`` is
    false. Raises :class:`PolicyRefusal`."""
    if not policy.statistics.allow:
        raise _refuse("statistics.allow", "this site releases no statistics of its data", policy)


def release_metrics(policy: SitePolicy, metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` as they may leave the site: without losses (``release.losses: false``),
    every case count as 1 (``release.case_counts: false``; the weight stays 1 or 0, so that
    a site that trained nothing still counts as none), without DP-SGD's noise, sample rate and
    steps (``release.privacy_details: false``)."""
    release = policy.release
    kept: dict[str, float] = {}
    for key, value in metrics.items():
        if not release.losses and "loss" in key:
            continue
        if not release.privacy_details and key in PRIVACY_DETAILS:
            continue
        if not release.case_counts and key == NUM_EXAMPLES:
            value = 1.0 if value else 0.0
        kept[key] = value
    return kept
