"""The ``fl-imaging`` command: check the overrides, then let Hydra compose and run the pipeline.

    fl-imaging [OVERRIDES ...]            # e.g. experiment=hippocampus strategy=fedmedian
    fl-imaging --multirun seed=0,1        # a sweep, one run folder per job

Before Hydra starts a run, the overrides are checked
(:func:`fl_imaging.config.compose.check_overrides`),
so a config error stops at once with exit code 2; the run itself is :func:`fl_imaging.run.run`.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from fl_imaging.common.process_exit import end_process
from fl_imaging.config import RunConfig, TrackingBackend, config_dir, validate_config
from fl_imaging.console.terminal import RunConsole, run_console
from fl_imaging.engines.interrupts import (
    INTERRUPTED_EXIT_CODE,
    RunInterrupted,
    exit_stopped_run,
)
from fl_imaging.review.tracking import add_tracking_tags
from fl_imaging.run import USER_ERRORS, check_overrides, run

__all__ = ["main", "resume_command"]

log = logging.getLogger("fl_imaging")

#: Hydra options that take the next argument as their value.
_OPTIONS_WITH_VALUE = {
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--config-dir",
    "-cd",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--experimental-rerun",
}


def _overrides_of(argv: list[str]) -> list[str]:
    overrides: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _OPTIONS_WITH_VALUE:
            skip = True
            continue
        if arg.startswith("-") or "=" not in arg:
            continue
        overrides.append(arg)
    return overrides


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The ``fl-imaging`` command that goes on from ``run_dir``: the same overrides (but
    ``resume=`` and Hydra's own ``hydra.*``, so that the resumed run gets a new folder)."""
    kept = [a for a in argv if not a.startswith(("resume=", "hydra.", "--multirun", "-m"))]
    return shlex.join(["fl-imaging", *kept, f"resume={run_dir}"])


def _with_sweep_tags(cfg: RunConfig) -> RunConfig:
    """A ``--multirun`` job's config with its tracked run tagged by the sweep (``sweep``: its
    folder, ``sweep_job``: the job number, ``sweep_overrides``: the job's overrides) and named
    ``SWEEP/JOB``; other runs', and untracked ones', as they are."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or cfg.tracking.backend == TrackingBackend.none:
        return cfg
    sweep = Path(hydra_cfg.sweep.dir).resolve()
    tags = {
        "sweep": str(sweep),
        "sweep_job": str(hydra_cfg.job.num),
        "sweep_overrides": " ".join(hydra_cfg.overrides.task),
    }
    return add_tracking_tags(cfg, tags, run_name=f"{sweep.name}/{hydra_cfg.job.num}")


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(composed: DictConfig) -> None:
    # the terminal: lines and the live view (fl_imaging.console.terminal); main.log: Hydra's
    # job logging (conf/hydra/job_logging/run_log.yaml)
    verbose = bool(OmegaConf.select(composed, "engine.verbose", default=False))
    with run_console(verbose=verbose) as console:
        code = _run_and_report(composed, console)
    if code == 2:
        sys.exit(2)
    if code is not None:
        exit_stopped_run()


def _run_and_report(composed: DictConfig, console: RunConsole) -> int | None:
    """Validate and run the ``composed`` config; on a failure a user can fix or a stop, stop
    the live view, say why and return the exit code (2, or the stopped run's), else None."""
    try:
        run(_with_sweep_tags(validate_config(composed)))
    except USER_ERRORS as err:
        console.stop_view()
        log.error("%s", err)
        return 2
    except RunInterrupted as stop:
        console.stop_view()
        log.warning(
            "stopped: the finished rounds' results are in %s (metrics.csv, summary.txt, "
            "config.yaml, model.pt, the checkpoint); to go on:\n  %s",
            stop.run_dir,
            resume_command(sys.argv[1:], stop.run_dir),
        )
        return INTERRUPTED_EXIT_CODE
    except KeyboardInterrupt:  # Ctrl-C before the engine took over the signals (the checks)
        console.stop_view()
        log.warning("stopped (Ctrl-C) before the first round: no round ran, nothing to resume")
        return INTERRUPTED_EXIT_CODE
    return None


def main() -> None:
    """Entry point of ``fl-imaging``: check the overrides, then hand over to Hydra."""
    argv = sys.argv[1:]
    if not {"--help", "-h", "--hydra-help"} & set(argv):
        try:
            check_overrides(_overrides_of(argv))
        except USER_ERRORS as err:
            print(f"fl-imaging: error: {err}", file=sys.stderr)
            sys.exit(2)
        finally:
            GlobalHydra.instance().clear()
    _hydra_main()
    # every file of the run (or of each run of a sweep) is written and closed by now; Python's
    # own teardown after MONAI and torch would add seconds to every run
    end_process(0)


if __name__ == "__main__":
    main()
