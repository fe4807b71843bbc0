"""Each site's contribution to the federation (``engine.contributions``), by leave-one-out over
the last round's updates.

For the last round's aggregated updates (kept by :class:`~strategies.last_updates.LastUpdates`),
the run's own aggregator gives the aggregate of all of them and, for each site i, the aggregate
without site i (FedAvg's weighted mean of the others for the FedAvg family; the median, trimmed
mean, Krum's pick, geometric median ... of the others for the robust aggregators; stateful ones
from their state before that round). Every one of these models is sent to every connected site
and scored on its **validation** cases (never the test cases: a figure meant to reward or
select sites must not be tuned on test data), and only the scores come back. The utility of a
model is the mean over the sites (each site once) of the task's main metric; site i's
contribution is utility(all) - utility(without i): positive when the federation is better with
it, negative when it does harm (a site sending noise).

Leave-one-out costs n + 1 aggregations and (n + 1) x n scorings for n sites; cheaper estimators
of the Shapley value (GTG-Shapley, FedCE) pay off for many sites and are not implemented here.
What the coordinator sees: each site's update of the last round in the clear (as in any run
without secure aggregation, which is refused with ``engine.contributions``).
"""

from __future__ import annotations

import logging
import math

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fl_imaging.evaluation.coordinator_scoring import SiteScores, score_at_sites
from fl_imaging.evaluation.files import Contribution
from fl_imaging.flower.coordinator.federation import FederationPlan
from strategies.last_updates import LastUpdates

__all__ = ["ALL_SITES", "METHOD", "leave_one_out", "site_contributions", "utility"]

log = logging.getLogger("fl_imaging.server")

#: Label of the aggregate of every kept update.
ALL_SITES = "all sites"
METHOD = "leave-one-out"


def _without(site: str) -> str:
    return f"without {site}"


def utility(scores: SiteScores, label: str, metric: str, sites: list[str]) -> float:
    """Mean over ``sites`` (each once) of ``metric`` of model ``label``; NaN values (a class
    absent from a site's cases) left out; NaN when none is left."""
    values = [scores.values[label][site].get(metric, math.nan) for site in sites]
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def leave_one_out(
    scores: SiteScores, contributors: list[str], metric: str
) -> dict[str, tuple[float, float]]:
    """(utility with every site, utility without the site) for each site of ``contributors``
    whose leave-one-out model was scored, over the sites that scored every model."""
    scorers = scores.scored_sites()
    full = utility(scores, ALL_SITES, metric, scorers)
    return {
        site: (full, utility(scores, _without(site), metric, scorers))
        for site in contributors
        if _without(site) in scores.values
    }


def site_contributions(
    grid: Grid, plan: FederationPlan, keeper: LastUpdates | None
) -> tuple[list[Contribution], list[str]]:
    """Estimate every site's contribution (module docstring) from ``keeper``'s last round.

    Returns one :class:`~fl_imaging.evaluation.files.Contribution` per site of the run (NaN with
    a note for a site whose update was not in the last aggregate) and notes for summary.txt.
    """
    cfg, recorder, metric = plan.cfg, plan.strategy, plan.main_metric
    if keeper is None or not keeper.replies:
        return [], ["site contributions: no round's updates were aggregated, nothing to estimate"]
    rnd, contributors = keeper.round, sorted(keeper.replies)
    log.info(
        "contributions: leave-one-out over round %d's updates of %d sites", rnd, len(contributors)
    )
    models: dict[str, ArrayRecord | None] = {ALL_SITES: keeper.aggregate_record()}
    for site in contributors:
        models[_without(site)] = keeper.aggregate_record([site])
    scored = {label: arrays for label, arrays in models.items() if arrays is not None}
    scores = score_at_sites(
        grid,
        scored,
        "val",
        site_norms=list(scored),
        timeout=cfg.engine.round_timeout,
        sites=recorder.sites,
    )
    for site, reason in scores.failures:
        recorder.failures.append((plan.rounds_done(), site, f"site contributions: {reason}"))
    scorers = scores.scored_sites()
    scored_on = "validation cases, mean over sites: " + (
        ", ".join(f"{s} ({scores.cases[s]})" for s in scorers) or "no site"
    )
    cases = sum(scores.cases[s] for s in scorers)
    aggregator = cfg.strategy.name + (
        f" with norm bound {cfg.strategy.norm_bound}" if cfg.strategy.norm_bound else ""
    )
    figures = leave_one_out(scores, contributors, metric) if ALL_SITES in scores.values else {}
    out: list[Contribution] = []
    for site in sorted(set(plan.site_names) | set(contributors)):
        with_site, without_site = figures.get(site, (math.nan, math.nan))
        note = ""
        if site not in contributors:
            note = f"no update of this site was aggregated in round {rnd}"
        elif models[_without(site)] is None:
            note = f"{cfg.strategy.name} gives no aggregate of the other sites' updates"
        elif site not in figures or not scorers:
            note = "the models were not scored (see the failures)"
        out.append(
            Contribution(
                site=site,
                method=METHOD,
                round=rnd,
                aggregator=aggregator,
                metric=metric,
                scored_on=scored_on,
                cases=cases,
                with_site=with_site,
                without_site=without_site,
                contribution=with_site - without_site,
                note=note,
            )
        )
    for c in out:
        log.info("contribution of %s: %+.4f %s", c.site, c.contribution, c.note)
    notes = [
        "site contributions: computed at the coordinator from each site's update of round "
        f"{rnd} (seen in the clear); the leave-one-out models went to every site, only "
        "validation scores came back"
    ]
    return out, notes
