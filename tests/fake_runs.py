"""A whole run through the real ServerApp code (plan, strategy chain, audit log, tracking,
result files) with in-process sites (a :class:`~flower_fakes.FakeGrid`): seconds, no Ray."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from flower_fakes import Answer, Arrays, FakeGrid
from flwr.app import Message

from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.coordinator.federation import FederationPlan, plan_federation
from fl_imaging.flower.coordinator.server_app import run_federation
from fl_imaging.flower.protocol import EVAL_SPLIT, site_reply
from fl_imaging.review.tracking import resolve_tracking


def shift(site: int, rnd: int, sent: Arrays) -> Arrays:
    """A site's training: its floating arrays moved by a small step that depends on the site
    (its number) and the round; counters stay."""
    step = 0.01 * site / rnd
    return {k: v + step if v.dtype.kind == "f" else v for k, v in sent.items()}


def train_metrics(site: int) -> dict[str, float]:
    """Cases, the equal weight DP-FedAvg needs, a loss per site (by its number)."""
    return {"num-examples": 10 * site, "unit-weight": 1, "train_loss": 1.0 / site}


def evaluate_metrics(site: int) -> dict[str, float]:
    """Validation figures that differ per site, one NaN (an empty class at site 1)."""
    return {
        "num-examples": 5,
        "val_loss": 1.0 / site,
        "dice": site / (site + 1),
        "dice_1": math.nan if site == 1 else 0.5,
    }


class TestedSites(FakeGrid):
    """:class:`FakeGrid` sites that also answer the test round (``engine.test``): site k scores
    ``test_dice`` 0.8 + k / 100 on 4 test cases."""

    __test__ = False  # not a test class, whatever its name

    def answer(self, msg: Message, site: int) -> Answer:
        if msg.content["config"].get(EVAL_SPLIT) == "test":
            return site_reply(
                msg, f"site-{site}", {"num-examples": 4, "test_dice": 0.8 + site / 100}
            )
        return super().answer(msg, site)


def fake_run(
    run_dir: Path,
    *overrides: str,
    sites: int = 3,
    rounds: int = 2,
    grid: FakeGrid | None = None,
) -> FederationPlan:
    """Run ``experiment=quick`` with ``overrides`` for ``rounds`` rounds over ``sites``
    in-process sites (:class:`TestedSites`, or ``grid``) into ``run_dir``; returns the plan (its
    recorder holds the rows). Needs the ``task_identity`` fixture."""
    cfg = check_overrides(
        ["experiment=quick", f"engine.rounds={rounds}", f"engine.num_sites={sites}", *overrides]
    )
    cfg = resolve_tracking(replace(cfg, run_dir=str(run_dir)))
    plan = plan_federation(cfg, [])
    grid = grid or TestedSites(sites, shift, train_metrics, evaluate_metrics)
    run_federation(grid, cfg, [], plan)
    return plan
