"""What a run's rows say about its privacy: every guarantee it has, for summary.txt and the
progress line.

Two kinds of differential privacy can protect a run, and each is stated on its own line:

- **patient-level** (``task.dp_sgd``, DP-SGD at every site): each site reports its epsilon after
  every round (``patient_*`` rows, see :mod:`fl_imaging.flower.patient_ledger`); the line names
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
    "secure_aggregation_line",
    "spent_sites",
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
        return [head, "  no site reported its privacy spent (no training round finished)"]
    lines = [head]
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
    lines = [f"{client} (client-level: {CLIENT_LEVEL})"] if client else []
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


def disclosure_lines(rows: Sequence[_Row], cfg: RunConfig) -> list[str]:
    """What each party of the run could learn, for summary.txt (and report.html): the
    coordinator (the sites' updates in the clear or only their sum, the metrics and what the
    evaluations after the rounds sent it), each site (the global models it received, other
    sites' models with cross-site evaluation), whoever receives the final model (bounded by the
    differential privacy of the run, if any), then every privacy guarantee
    (:func:`privacy_lines`). Returns one string per line."""
    engine, strategy = cfg.engine, cfg.strategy
    saw = ["each site's metrics of every round (losses, validation scores, numbers of cases)"]
    if strategy.compression != CompressionMode.none:
        saw.append(f"updates compressed ({strategy.compression.value}), decoded before use")
    if engine.cross_site:
        saw.append("each site's own model and its scores at every site (engine.cross_site)")
    if engine.contributions:
        saw.append("the last round's single updates, left out one at a time (engine.contributions)")
    site = (
        "each site: saw the global model of every round it was asked into (from two in a row, "
        "the aggregate of the other sites' updates)"
    )
    if engine.cross_site:
        site += "; every other site's own model, to score it (engine.cross_site)"
    if engine.contributions:
        site += (
            "; the aggregate without each site, to score it, hence each site's last update up to "
            "its weight (engine.contributions)"
        )
    private = strategy.dp.mode != DPMode.none or cfg.task.dp_sgd.enabled
    final = (
        "final model: whoever receives model.pt can try to learn about the training cases from "
        "its weights; "
        + (
            "bounded by the differential privacy below"
            if private
            else "no formal bound (no differential privacy)"
        )
    )
    return [
        secure_aggregation_line(rows, cfg),
        "coordinator: also saw " + "; ".join(saw),
        site,
        final,
        *privacy_lines(rows, cfg),
    ]
