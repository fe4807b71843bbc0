"""The test round after the last training round: every site scores the final global model on its
own held-out test cases, and optionally again after fine-tuning it locally (personalisation).

Flower's strategies evaluate on the sites' validation cases during training; a benchmark's
figure must come from cases that chose nothing (no best round, no early stop), so the test cases
are scored once, here, with the model the run ends with. The messages are ordinary evaluate
messages with ``split=test`` in their config, sent to every connected site over the same Grid
(simulation or deployment).
"""

from __future__ import annotations

import logging
import math

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl_imaging.flower.coordinator.federation import FederationPlan
from fl_imaging.flower.protocol import (
    EVAL_SPLIT,
    FINETUNE_EPOCHS,
    NUM_EXAMPLES,
    ReplySites,
    error_reason,
)
from fl_imaging.review.results import AGGREGATE_SITE, TEST_PREFIXES, Failure, MetricRow

__all__ = ["score_final_model", "score_test_cases"]

log = logging.getLogger("fl_imaging.server")


def score_final_model(
    grid: Grid,
    arrays: ArrayRecord,
    server_round: int,
    finetune_epochs: int,
    timeout: float,
    sites: ReplySites | None = None,
) -> tuple[list[MetricRow], list[Failure]]:
    """Send ``arrays`` (the final global model) to every connected site for scoring on its test
    cases, after ``finetune_epochs`` epochs of local fine-tuning too when > 0; wait up to
    ``timeout`` seconds.

    Returns the metric rows, recorded at ``server_round`` (per site ``test_<metric>``,
    ``finetuned_<metric>``, ``personal_<metric>`` (Ditto's personal models) and ``num_test``,
    and their average over sites weighted by test cases as site ``all``), and the failures as
    (round, site, reason); ``sites`` names the replies.
    """
    sites = sites or ReplySites()
    config = ConfigRecord({EVAL_SPLIT: "test", FINETUNE_EPOCHS: finetune_epochs})
    messages = [
        Message(
            content=RecordDict({"arrays": arrays, "config": config}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node_id,
        )
        for node_id in grid.get_node_ids()
    ]
    rows: list[MetricRow] = []
    failures: list[Failure] = []
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        site = sites(reply)
        if reply.has_error():
            failures.append((server_round, site, f"test round: {error_reason(reply)}"))
            log.warning("test round: site %s failed: %s", site, error_reason(reply))
            continue
        metrics = dict(reply.content["metrics"])
        cases = float(metrics.pop(NUM_EXAMPLES, 0))
        rows.append(MetricRow(server_round, site, "num_test", cases))
        for name, value in metrics.items():
            if name.startswith(TEST_PREFIXES) and isinstance(value, int | float):
                rows.append(MetricRow(server_round, site, name, float(value)))
                if not math.isnan(float(value)):  # e.g. AUC of a site with one class only
                    totals[name] = totals.get(name, 0.0) + cases * float(value)
                    weights[name] = weights.get(name, 0.0) + cases
    for name, total in totals.items():
        if weights[name] > 0:
            rows.append(MetricRow(server_round, AGGREGATE_SITE, name, total / weights[name]))
    return rows, failures


def score_test_cases(grid: Grid, plan: FederationPlan) -> None:
    """The test round of ``plan``'s run (``engine.test``): every site scores the final model
    on its test cases (and after ``engine.finetune_epochs`` of fine-tuning); the rows and
    failures go to the recorder, and a line per figure to the log."""
    recorder, epochs = plan.strategy, plan.cfg.engine.finetune_epochs
    assert recorder.global_arrays is not None
    log.info(
        "test round: every site scores the final model on its test cases%s",
        f", then after {epochs} epoch(s) of local fine-tuning" if epochs else "",
    )
    done = max((r.round for r in recorder.rows), default=0)
    rows, failures = score_final_model(
        grid, recorder.global_arrays, done, epochs, plan.cfg.engine.round_timeout, recorder.sites
    )
    recorder.rows.extend(rows)
    recorder.failures.extend(failures)
    labels = {
        "test": "test (final model)",
        "finetuned": f"test after {epochs} epoch(s) of fine-tuning",
        "personal": "test (each site's personal model, Ditto)",
    }
    for prefix, label in labels.items():
        values = {r.site: r.value for r in rows if r.metric == f"{prefix}_{plan.main_metric}"}
        mean = values.pop(AGGREGATE_SITE, None)
        if values:
            log.info(
                "%s %s: %s%s",
                label,
                plan.main_metric,
                "  ".join(f"{site} {value:.3f}" for site, value in sorted(values.items())),
                f"  | all sites {mean:.3f}" if mean is not None else "",
            )
