"""What a run's rows say about its privacy: every guarantee it has, for summary.txt and the
progress line.

Two kinds of differential privacy can protect a run, and each is stated on its own line:

- **patient-level** (``task.dp_sgd``, DP-SGD at every site): each site reports its epsilon after
  every round (``patient_*`` rows, see :mod:`fl_imaging.privacy.site_dp`); the line names
  each site's epsilon at its delta, the rounds it trained, its steps, noise and sample rate, and
  whether it still trains or has spent its budget;
- **client-level** (``strategy.dp``, DP-FedAvg): one epsilon for the whole run (site ``all``).

A run with neither says "no formal DP". Reads rows only (duck-typed: ``round``, ``site``,
``metric``, ``value``), so it imports nothing of the result files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from fl_imaging.config import CompressionMode, DPMode, RunConfig

__all__ = [
    "disclosure_lines",
    "patient_privacy_lines",
    "patient_progress",
    "privacy_lines",
    "encryption_line",
    "secure_aggregation_line",
    "spent_sites",
    "trained_parameters_line",
]

AGGREGATE = "all"
#: What client-level DP protects, and against whom (both of Flower's fixed-clipping modes add the
#: noise at the coordinator, which sees each site's clipped update before it).
CLIENT_LEVEL = (
    "protects a whole site's participation against whoever receives the model, the other sites "
    "included; the coordinator sees each update before its noise"
)


class _Row(Protocol):
    round: int
    site: str
    metric: str
    value: float


def _latest(rows: Iterable[_Row], metric: str) -> dict[str, tuple[int, float]]:
    """Each site's (round, value) of ``metric`` in its latest round (site ``all`` left out)."""
    latest: dict[str, tuple[int, float]] = {}
    for row in rows:
        if row.metric == metric and row.site != AGGREGATE:
            if row.site not in latest or row.round >= latest[row.site][0]:
                latest[row.site] = (row.round, row.value)
    return latest


def spent_sites(rows: Iterable[_Row]) -> list[str]:
    """The sites whose latest reply said their patient-level budget is spent, sorted."""
    return sorted(s for s, (_, v) in _latest(rows, "patient_budget_spent").items() if v >= 1)


def patient_progress(rows: Sequence[_Row], rnd: int, sites: Sequence[str]) -> str:
    """The progress line's part for round ``rnd``: each site's patient-level epsilon reported
    in that round and the sites whose budget is spent; empty without DP-SGD rows."""
    eps = {
        r.site: r.value
        for r in rows
        if r.round == rnd and r.metric == "patient_epsilon" and r.site != AGGREGATE
    }
    if not eps:
        return ""
    shown = "  ".join(
        f"{s} {eps[s]:.3f}" for s in [*sites, *sorted(set(eps) - set(sites))] if s in eps
    )
    spent = spent_sites(r for r in rows if r.round <= rnd)
    return f"patient epsilon {shown}" + (f" (budget spent: {', '.join(spent)})" if spent else "")


def patient_privacy_lines(rows: Sequence[_Row], cfg: RunConfig) -> list[str]:
    """summary.txt's lines on patient-level DP: one per site with its guarantee, then which
    sites still train; empty without ``task.dp_sgd``."""
    dp = cfg.task.dp_sgd
    if not dp.enabled:
        return []
    values = {
        m: _latest(rows, f"patient_{m}")
        for m in ("epsilon", "delta", "noise", "sample_rate", "steps")
    }
    trained: dict[str, set[int]] = {}
    for row in rows:
        if row.metric == "num_train" and row.site != AGGREGATE and row.value > 0:
            trained.setdefault(row.site, set()).add(row.round)
    head = (
        f"patient-level DP (DP-SGD at every site, Opacus, {dp.accountant.value.upper()} "
        f"accountant, per-case clipping norm {dp.max_grad_norm:g}"
        + (f", budget epsilon {dp.target_epsilon:g}" if dp.target_epsilon is not None else "")
        + "): protects each training patient against the coordinator, the other sites and "
        "whoever receives the model"
    )
    if not values["epsilon"]:
        return [
            head,
            trained_parameters_line(cfg),
            "  no site reported its privacy spent (no training round finished)",
        ]
    lines = [head, trained_parameters_line(cfg)]
    for site in sorted(values["epsilon"]):
        get = {m: v[site][1] for m, v in values.items() if site in v}
        lines.append(
            f"  site {site}: epsilon {get['epsilon']:.4g} at delta {get.get('delta', dp.delta):g} "
            f"after {len(trained.get(site, ()))} round(s) ({int(get.get('steps', 0))} steps, "
            f"noise {get.get('noise', float('nan')):.4g}, sample rate "
            f"{get.get('sample_rate', float('nan')):.4g})"
        )
    spent = spent_sites(rows)
    training = sorted(set(values["epsilon"]) - set(spent))
    if spent:
        lines.append(
            f"  budget spent (no further round fits): {', '.join(spent)}; still training: "
            + (", ".join(training) or "none")
        )
    return lines


#: How many parameter names :func:`trained_parameters_line` shows.
_SHOWN_NAMES = 12


def trained_parameters_line(cfg: RunConfig) -> str:
    """The patient-level lines' part on what DP-SGD trained: every parameter, or (with
    ``task.model.trainable``) the parameters those patterns match, counted and named, the others
    being the initial model's, unchanged at the sites. Builds the network once for the names."""
    patterns = list(cfg.task.model.trainable)
    if not patterns:
        return "  trained with DP-SGD: every parameter of the network"
    from tasks import build_task  # the names need the network (torch, MONAI)

    params = list(build_task(cfg.task).build_model().named_parameters())
    trained = [(n, p) for n, p in params if p.requires_grad]
    names = [n for n, _ in trained]
    shown = ", ".join(names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")
    values = sum(p.numel() for _, p in trained)
    total = sum(p.numel() for _, p in params)
    return (
        f"  trained with DP-SGD: {len(trained)} of {len(params)} parameter tensors ({values} of "
        f"{total} values), those matching task.model.trainable={patterns}: {shown}; the "
        "others are the initial model's, unchanged at every site (no patient's data reaches them)"
    )


def client_privacy_line(rows: Sequence[_Row], cfg: RunConfig) -> str:
    """summary.txt's line on client-level DP (DP-FedAvg), or an empty string without it."""
    dp = cfg.strategy.dp
    if dp.mode == DPMode.none:
        return ""
    spent = [r for r in rows if r.site == AGGREGATE and r.metric == "epsilon"]
    if not spent:
        return f"differential privacy: {dp.mode.value}, noise {dp.noise_multiplier}; not accounted"
    last = max(spent, key=lambda r: r.round)
    return (
        f"differential privacy: {dp.mode.value}, noise multiplier {dp.noise_multiplier}, clipping "
        f"norm {dp.clipping_norm}: epsilon {last.value:.4f} at delta {dp.target_delta:g} after "
        f"round {last.round}"
    )


def privacy_lines(rows: Sequence[_Row], cfg: RunConfig) -> list[str]:
    """Every privacy guarantee of the run, for summary.txt: the client-level line (DP-FedAvg:
    a whole site's participation), the patient-level lines (DP-SGD), or "no formal DP"."""
    client = client_privacy_line(rows, cfg)
    protects = CLIENT_LEVEL
    if cfg.strategy.secagg.enabled:
        protects = protects.replace(
            "the coordinator sees each update before its noise",
            f"weights {_secure_weights(cfg)}; the coordinator holds the un-noised sum of the "
            "updates, not single updates",
        )
    lines = [f"{client} (client-level: {protects})"] if client else []
    lines += patient_privacy_lines(rows, cfg)
    return lines or [
        "privacy: no formal DP (only model weights leave the sites; task.dp_sgd.enabled=true "
        "gives patient-level DP, strategy=dpfedavg client-level DP)"
    ]


def secure_aggregation_line(rows: Sequence[_Row], cfg: RunConfig) -> str:
    """What the coordinator saw of the sites' updates: only sums (secure aggregation: of how
    many sites, in which rounds, and which rounds it could not unmask) or every update in the
    clear."""
    if not cfg.strategy.secagg.enabled:
        return "coordinator: saw every site's model update in the clear (no secure aggregation)"
    summed = {r.round: int(r.value) for r in rows if r.metric == "secagg_sites"}
    rounds = sorted({r.round for r in rows if r.metric == "train_loss"} | set(summed))
    unmasked = [rnd for rnd in rounds if summed.get(rnd, 0) > 0]
    sizes = "/".join(str(n) for n in sorted({summed[rnd] for rnd in unmasked})) or "0"
    line = f"secure aggregation: the server saw only the sum of {sizes} sites' updates in "
    if unmasked and len(unmasked) == len(rounds):
        return line + "every round"
    missing = ", ".join(str(rnd) for rnd in rounds if rnd not in unmasked) or "-"
    shown = ", ".join(map(str, unmasked)) or "no round"
    return line + f"round(s) {shown}; round(s) {missing} gave no aggregate (failures above)"


def _secure_weights(cfg: RunConfig) -> str:
    weighting = cfg.strategy.secagg.weighting
    if weighting == "auto":
        weighting = "equal" if cfg.strategy.dp.mode != DPMode.none else "cases"
    return weighting


def encryption_line(rows: Sequence[_Row], cfg: RunConfig) -> str:
    """What the coordinator held under homomorphic encryption (ciphertexts of how many sites
    per round, the layers in the clear), or an empty string without it."""
    he = cfg.strategy.he
    if not he.enabled:
        return ""
    added = {r.round: int(r.value) for r in rows if r.metric == "he_sites"}
    sizes = "/".join(str(n) for n in sorted(set(added.values()) - {0})) or "0"
    clear = (
        f"only the layers {', '.join(he.layers)} encrypted, the others' updates in the clear"
        if he.layers
        else "every floating array encrypted"
    )
    return (
        f"only CKKS ciphertexts of each site's weighted update and their sum ({sizes} sites per "
        f"round), their sizes and which sites took part; it holds the public context, no "
        f"secret key, and never the trained model ({clear})"
    )


def _coordinator_saw(rows: Sequence[_Row], cfg: RunConfig) -> str:
    engine, strategy = cfg.engine, cfg.strategy
    client_dp = strategy.dp.mode != DPMode.none
    if strategy.he.enabled:
        saw = encryption_line(rows, cfg)
    elif strategy.secagg.enabled:
        saw = secure_aggregation_line(rows, cfg).replace("secure aggregation: the server saw ", "")
        if client_dp:
            saw += " (it holds that sum un-noised: the DP noise is added after unmasking)"
    else:
        saw = "every site's model update in the clear" + (
            " (before its DP noise)" if client_dp else ""
        )
    if strategy.compression != CompressionMode.none:
        saw += f"; compressed ({strategy.compression.value}), decoded before use"
    if engine.cross_site:
        saw += "; each site's own model and its scores at every site (engine.cross_site)"
    if engine.contributions:
        saw += "; the last round's single updates, left out one at a time (engine.contributions)"
    return saw


def _deviating(cfg: RunConfig) -> str:
    strategy = cfg.strategy
    if strategy.he.enabled:
        line = (
            "still no update and no aggregate: it holds no secret key (a context holding one is "
            "refused); it can send a crafted model in the clear layers or drop sites, and a "
            "coordinator colluding with one site can hand that site another site's ciphertext "
            "as the sum, which that site decrypts: the sites trust each other with the key"
        )
    elif strategy.secagg.enabled:
        line = (
            "still no single site's update: each round's keys are new and signed (every site "
            "checks them against its own roster), each stage is answered once per round, no "
            "site reveals both secrets of another, the threshold is above half of the round's "
            "sites and a site masks only among its policy's min_sites; it can still send a "
            "crafted global model, drop sites down to the threshold, or read one site's update "
            "with enough colluding sites (c of them, when 2 x threshold <= sites + c - 1)"
        )
    else:
        line = (
            "every site's update, for a global model of its choosing (a crafted model can make "
            "an update reveal training cases); a site's policy can require secure aggregation"
        )
    if strategy.dp.mode != DPMode.none:
        line += "; client-level DP is the coordinator's to add: it can leave the noise out"
    if cfg.task.dp_sgd.enabled:
        line += (
            "; patient-level DP holds: each site takes its noise from its own policy and its "
            "own ledger, never from the coordinator"
        )
    return line


def _metadata(cfg: RunConfig) -> str:
    strategy = cfg.strategy
    equal = strategy.secagg.enabled and _secure_weights(cfg) == "equal"
    if equal:
        cases = "no training case counts (the secure sum weighs sites equally)"
    elif strategy.secagg.enabled:
        cases = (
            "training case counts inside the masked vector; their sum per round is seen, so a "
            "site that drops out gives its count away (weights by cases)"
        )
    else:
        cases = "each site's training case count (num-examples)"
    parts = [
        "losses and validation scores per site and round",
        cases,
        "validation (and test) case counts with every evaluation",
        "bytes sent and the device used",
    ]
    if cfg.task.dp_sgd.enabled:
        parts.append("DP-SGD's noise, steps and sample rate (batch / training cases)")
    return "; ".join(parts) + (
        " (a site's policy keeps what it does not release: release.losses, "
        "release.case_counts, release.privacy_details)"
    )


def disclosure_lines(rows: Sequence[_Row], cfg: RunConfig) -> list[str]:
    """What each party of the run could learn, per threat, for summary.txt (and report.html):
    the coordinator honest but curious and deviating from the protocol, another site,
    whoever receives the final model, and the metadata that leaves each site; then every
    privacy guarantee (:func:`privacy_lines`). Returns one string per line."""
    engine = cfg.engine
    site = (
        "the global model of every round it took part in (from two in a row, the aggregate of "
        "the other sites' updates; with two sites, the other's update)"
    )
    if engine.cross_site:
        site += "; every other site's own model, to score it (engine.cross_site)"
    if engine.contributions:
        site += (
            "; the aggregate without each site, to score it, hence each site's last update up to "
            "its weight (engine.contributions)"
        )
    private = cfg.strategy.dp.mode != DPMode.none or cfg.task.dp_sgd.enabled
    final = "its weights, from which training cases can be inferred: " + (
        "bounded by the differential privacy below" if private else "no formal bound (no DP)"
    )
    if cfg.strategy.he.enabled:
        final = (
            "only the sites hold it (homomorphic encryption: each keeps he-model.pt in its "
            "state folder; the coordinator's run folder has no model.pt); " + final
        )
    return [
        "what each party could learn, by threat:",
        f"  coordinator, honest but curious: {_coordinator_saw(rows, cfg)}",
        f"  coordinator deviating from the protocol: {_deviating(cfg)}",
        f"  another site: {site}",
        f"  whoever receives the model: {final}",
        f"  metadata leaving each site: {_metadata(cfg)}",
        *privacy_lines(rows, cfg),
    ]
