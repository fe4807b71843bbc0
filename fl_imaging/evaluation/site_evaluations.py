"""What a run does after its test round for a consortium that wants to know what each site got
out of it and brought to it: cross-site evaluation (``engine.cross_site``,
:mod:`.cross_site`) and site contributions (``engine.contributions``, :mod:`.contributions`),
with their result files; the ServerApp calls :func:`evaluate_across_sites` once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from flwr.serverapp import Grid

from fl_imaging.common.atomic import reason_of
from fl_imaging.config import ConfigError, RunConfig
from fl_imaging.data.sites import SiteData
from fl_imaging.evaluation.contributions import site_contributions
from fl_imaging.evaluation.cross_site import cross_site_evaluation
from fl_imaging.evaluation.files import (
    contributions_line,
    cross_site_line,
    plot_cross_site,
    write_contributions,
    write_cross_site,
)
from fl_imaging.flower.coordinator.federation import FederationPlan
from fl_imaging.flower.coordinator.polling import StopRequested
from strategies.last_updates import LastUpdates
from strategies.wrapper import wrapper_chain

__all__ = ["check_test_cases", "evaluate_across_sites"]

log = logging.getLogger("fl_imaging.server")


def check_test_cases(cfg: RunConfig, sites: Sequence[SiteData]) -> None:
    """Before a simulated run: refuse ``engine.cross_site`` when no site has test cases (the
    matrix would be empty), and warn about each site without any. Raises :class:`ConfigError`."""
    if not cfg.engine.cross_site:
        return
    without = [site.name for site in sites if not site.test]
    if without and len(without) == len(sites):
        raise ConfigError(
            "engine.cross_site=true scores every model on the sites' test cases, but no site has "
            "any: set data.test_fraction (e.g. data.test_fraction=0.25), or mark test cases in "
            "each site's split.csv"
        )
    if without:
        log.warning(
            "engine.cross_site: %s have no test cases; no model is scored there", ", ".join(without)
        )


def _write(what: str, write: Callable[..., object], *args: object) -> str:
    """Call ``write(*args)``; a note for summary.txt when the file cannot be written."""
    try:
        write(*args)
    except OSError as err:
        log.error("could not write %s: %s", what, reason_of(err))
        return f"could not write {what}: {reason_of(err)}"
    return ""


def evaluate_across_sites(grid: Grid, plan: FederationPlan) -> list[str]:
    """After the test round: with ``engine.cross_site``, the cross-site matrix (cross_site.csv,
    cross_site.png); with ``engine.contributions``, each site's contribution
    (contributions.csv); both into ``plan.run_dir``. Returns the lines for summary.txt (empty
    when neither is on). A step that fails is logged with its traceback and named in a line,
    and the run goes on to write its files. Raises
    :class:`~fl_imaging.flower.coordinator.polling.StopRequested` when the run is asked to stop
    meanwhile."""
    cfg = plan.cfg
    keeper = next((n for n in wrapper_chain(plan.strategy) if isinstance(n, LastUpdates)), None)
    lines: list[str] = []
    steps = (
        ("cross-site evaluation", cfg.engine.cross_site, _cross_site),
        ("site contributions", cfg.engine.contributions, _contributions),
    )
    for name, wanted, step in steps:
        if not wanted:
            continue
        try:
            lines += step(grid, plan, keeper)
        except StopRequested:
            raise
        except Exception as err:  # the trained model and the run's files must still be written
            log.exception("%s failed", name)
            lines.append(f"{name} failed: {type(err).__name__}: {err} (main.log has the details)")
    return [line for line in lines if line]


def _cross_site(grid: Grid, plan: FederationPlan, keeper: LastUpdates | None) -> list[str]:
    """The cross-site matrix, its files and summary lines."""
    rows, notes = cross_site_evaluation(grid, plan, keeper)
    csv_path, png = plan.run_dir / "cross_site.csv", plan.run_dir / "cross_site.png"
    lines = [cross_site_line(rows, plan.main_metric), *notes]
    lines.append(_write("cross_site.csv", write_cross_site, rows, csv_path))
    if rows:
        lines.append(_write("cross_site.png", plot_cross_site, rows, plan.main_metric, png))
    return lines


def _contributions(grid: Grid, plan: FederationPlan, keeper: LastUpdates | None) -> list[str]:
    """The sites' contributions, their file and summary lines."""
    contributions, notes = site_contributions(grid, plan, keeper)
    path = plan.run_dir / "contributions.csv"
    lines = [contributions_line(contributions), *notes]
    lines.append(_write("contributions.csv", write_contributions, contributions, path))
    return lines
