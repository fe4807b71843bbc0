"""Cross-site evaluation after the test round (``engine.cross_site``): the global model and each
site's own model, scored on every site's test cases through the Grid (models go to the sites,
only scores come back), as NVIDIA FLARE's cross-site model evaluation does.

A site's own model is the final global model fine-tuned ``engine.finetune_epochs`` epochs at
the site, exactly as its test round fine-tuned it (same seed: its score at its own site is the
test round's ``finetuned_<metric>``); with ``engine.finetune_epochs=0``, the site's last training
reply (its last local model, FLARE's choice), which the coordinator already received. What the
coordinator sees: each site's fine-tuned model, which it then sends to every other site; so
does every site. The test round's global-model row equals ``test_<metric>``.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fl_imaging.evaluation.coordinator_scoring import finetuned_models, score_at_sites
from fl_imaging.evaluation.files import GLOBAL_MODEL, CrossSiteRow
from fl_imaging.flower.coordinator.federation import FederationPlan
from strategies.arrays import to_record
from strategies.last_updates import LastUpdates

__all__ = ["cross_site_evaluation"]

log = logging.getLogger("fl_imaging.server")


def _site_models(
    grid: Grid, plan: FederationPlan, keeper: LastUpdates | None
) -> tuple[dict[str, ArrayRecord], dict[str, str], list[str]]:
    """Each site's own model by site name, how it was made, and notes on what is missing."""
    cfg, recorder = plan.cfg, plan.strategy
    epochs = cfg.engine.finetune_epochs
    assert recorder.global_arrays is not None
    if epochs > 0:
        models, failures = finetuned_models(
            grid,
            recorder.global_arrays,
            epochs,
            timeout=cfg.engine.round_timeout,
            sites=recorder.sites,
        )
        for site, reason in failures:
            recorder.failures.append((plan.rounds_done(), site, f"cross-site evaluation: {reason}"))
        kinds = {site: f"fine-tuned {epochs} epoch(s) at {site}" for site in models}
        notes = [
            "cross-site evaluation: each site's fine-tuned model went to the coordinator and to "
            "every other site; only scores came back"
        ]
        return models, kinds, notes
    latest = keeper.latest if keeper is not None else {}
    models = {site: to_record(arrays) for site, (_, arrays) in latest.items()}
    kinds = {
        site: f"last local model of round {rnd} at {site}" for site, (rnd, _) in latest.items()
    }
    notes = [
        "cross-site evaluation: each site's last local model (its last update, which the "
        "coordinator received in training) went to every other site; only scores came back"
    ]
    return models, kinds, notes


def cross_site_evaluation(
    grid: Grid, plan: FederationPlan, keeper: LastUpdates | None
) -> tuple[list[CrossSiteRow], list[str]]:
    """Score the final global model and every site's own model (module docstring; ``keeper``
    holds the sites' last updates) on every connected site's test cases.

    Returns one :class:`CrossSiteRow` per (model, scoring site, metric) and notes for
    summary.txt: what travelled, and each site that could not take part and why (its failures
    also go to the recorder's failures).
    """
    cfg, recorder = plan.cfg, plan.strategy
    assert recorder.global_arrays is not None
    log.info("cross-site evaluation: every site scores the global model and each site's model")
    site_models, kinds, notes = _site_models(grid, plan, keeper)
    models = {GLOBAL_MODEL: recorder.global_arrays, **dict(sorted(site_models.items()))}
    kinds[GLOBAL_MODEL] = "global model"
    scores = score_at_sites(
        grid,
        models,
        "test",
        site_norms=[GLOBAL_MODEL],
        timeout=cfg.engine.round_timeout,
        sites=recorder.sites,
    )
    for site, reason in scores.failures:
        recorder.failures.append((plan.rounds_done(), site, f"cross-site evaluation: {reason}"))
    rows = [
        CrossSiteRow(label, kinds[label], site, metric, value, scores.cases[site])
        for label, per_site in scores.values.items()
        for site, metrics in per_site.items()
        for metric, value in metrics.items()
    ]
    empty = sorted(site for site, cases in scores.cases.items() if cases == 0)
    if empty:
        notes.append(
            f"cross-site evaluation: {', '.join(empty)} have no test cases, so no model was "
            "scored there (give test cases in split.csv, or data.test_fraction)"
        )
    missing = sorted(set(plan.site_names) - set(site_models))
    if missing:
        notes.append(f"cross-site evaluation: no own model from {', '.join(missing)}")
    main = [r for r in rows if r.metric == plan.main_metric]
    for label in models:
        values = {r.site: r.value for r in main if r.model == label}
        if values:
            log.info(
                "cross-site: %s, test %s: %s",
                kinds[label],
                plan.main_metric,
                "  ".join(f"{site} {value:.3f}" for site, value in sorted(values.items())),
            )
    return rows, notes
