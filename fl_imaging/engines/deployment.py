"""Run a federation on a running SuperLink (``engine=deployment``) through ``flwr run``.

The researcher's machine needs no site data and no SuperLink: it submits this project, the
Flower App of the root ``pyproject.toml`` (``[tool.flwr.app]``; the bundle ships the code and
``conf/``; copied first into ``run_dir/flower-app`` with just the files the bundle holds, see
:func:`stage_project_app`), with ``flwr run <app> fl-imaging --stream --run-config
flower-run-config.toml``:
that file, written into the run folder, holds the whole resolved experiment as YAML under
``fl-imaging-config`` (:mod:`fl_imaging.flower.app_config`), so every side runs exactly the
config checked here. A private Flower home (``flower-home/config.toml``: one SuperLink
connection, address and CA certificate) keeps the researcher's own Flower settings untouched.
The run's log is logged as it comes (:mod:`fl_imaging.console.flower_output`: ``main.log`` gets
every line, the console the ServerApp's own and its progress). The ServerApp runs on the
SuperLink's host and writes the usual result files into ``run_dir`` there (on one machine: the
researcher's run folder), then sends them in its log (:mod:`fl_imaging.review.result_transfer`):
they are written into the researcher's run folder as they arrive, each checked against its
SHA-256.

An installed copy of the toolkit without its project folder (``pip install`` of the wheel) has
no ``pyproject.toml`` to submit: then a bundle of one file is written into the run folder
(``flower-app/pyproject.toml``, the same ``[tool.flwr.app]``), and each SuperLink and SuperNode
imports the toolkit it has installed.
Runtime dependency installation is off: every machine runs the dependencies it has installed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path

from fl_imaging.config import RunConfig, config_to_yaml
from fl_imaging.console.flower_output import log_flower_output, readable_line
from fl_imaging.deploy.flower_home import CONNECTION, cli_home, toml_string
from fl_imaging.deploy.processes import ProcessError, flower_command
from fl_imaging.deploy.pull import run_log
from fl_imaging.flower.app_config import APP_CONFIG
from fl_imaging.flower.protocol import CONFIG_KEY
from fl_imaging.review.result_transfer import ResultReceiver, ResultTransferError

__all__ = [
    "DeploymentError",
    "project_app_dir",
    "run_deployment_engine",
    "write_app_dir",
    "write_run_config",
]

log = logging.getLogger("fl_imaging.engine")

APP_DIR = "flower-app"
HOME_DIR = "flower-home"
RUN_CONFIG_FILE = "flower-run-config.toml"
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")


class DeploymentError(RuntimeError):
    """The SuperLink refused the run, or the run failed; the message says what to check."""


def project_app_dir() -> Path | None:
    """The project folder of this toolkit when it is a Flower App (a source checkout or an
    editable install: ``pyproject.toml`` with ``[tool.flwr.app]`` above ``fl_imaging/``), else
    None (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    with pyproject.open("rb") as handle:
        app = tomllib.load(handle).get("tool", {}).get("flwr", {}).get("app", {})
    return root if app.get("components") else None


def write_app_dir(run_dir: Path) -> Path:
    """Write the one-file Flower App ``run_dir/flower-app`` (for an installed toolkit without
    its project folder) and return it: the ``[tool.flwr.app]`` of the root ``pyproject.toml``
    (components and run config keys), no code (each side imports the toolkit installed)."""
    app_dir = run_dir / APP_DIR
    app_dir.mkdir(parents=True, exist_ok=True)
    keys = "\n".join(
        f"{key} = {toml_string(value) if isinstance(value, str) else value}"
        for key, value in APP_CONFIG.items()
    )
    text = f"""# Written by fl-imaging (engine=deployment) for an installed toolkit without its
# project folder; the project's own pyproject.toml declares the same app.
[project]
name = "fl-imaging"
version = "0.1.0"
description = "fl-imaging experiment (config in --run-config)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fl-imaging"

[tool.flwr.app.components]
serverapp = "fl_imaging.flower.coordinator.server_app:app"
clientapp = "fl_imaging.flower.site.client_app:app"

[tool.flwr.app.config]
{keys}
"""
    (app_dir / "pyproject.toml").write_text(text)
    return app_dir


def stage_project_app(project: Path, run_dir: Path) -> Path:
    """Copy what the Flower App bundle of ``project`` holds (its ``pyproject.toml`` and the files
    its ``fab-include`` patterns match) into ``run_dir/flower-app`` and return that folder.

    ``flwr run`` builds the bundle from the folder it is given, and Flower 1.41 walks every file
    below it before it applies the patterns: in a checkout with its ``.venv``, ``runs/`` and
    demo data that is about 56,000 files and 3 s per submission, against 0.1 s for the copy.
    The bundle is the same (the same patterns, over the same files). The engine removes the
    folder when `flwr run` ends."""
    with (project / "pyproject.toml").open("rb") as handle:
        app = tomllib.load(handle)["tool"]["flwr"]["app"]
    staged = run_dir / APP_DIR
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    shutil.copy2(project / "pyproject.toml", staged / "pyproject.toml")
    for pattern in app.get("fab-include", []):
        for source in project.glob(pattern):
            if source.is_file() and "__pycache__" not in source.parts:
                target = staged / source.relative_to(project)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    return staged


def write_run_config(run_dir: Path, cfg: RunConfig) -> Path:
    """Write ``run_dir/flower-run-config.toml`` (what ``flwr run --run-config`` reads): the
    resolved ``cfg`` as YAML under ``fl-imaging-config``; return its path."""
    path = run_dir / RUN_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{CONFIG_KEY} = {toml_string(config_to_yaml(cfg))}\n")
    return path


def _run_status(run_id: str, env: dict[str, str]) -> str:
    """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``), or ''."""
    try:
        out = subprocess.run(
            [flower_command("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        runs = json.loads(out[out.index("{") :]).get("runs", [])
    except (ValueError, subprocess.TimeoutExpired, OSError):
        return ""
    return str(runs[0].get("status", "")) if runs else ""


def _stop_run(run_id: str, env: dict[str, str]) -> None:
    subprocess.run(
        [flower_command("flwr"), "stop", run_id, CONNECTION],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )


def run_deployment_engine(cfg: RunConfig, site_names: list[str]) -> None:
    """Submit ``cfg`` to the SuperLink ``engine.superlink`` and stream its log until it ends.

    ``site_names`` are the sites the researcher knows of (may be empty: the SuperNodes bring
    them). Uses ``flwr run`` with a private Flower home in ``run_dir`` (``HOME`` too, so the
    researcher's own Flower settings are untouched); its output is logged here line by line.
    Ctrl-C stops the run on the SuperLink.
    Raises :class:`DeploymentError` when the SuperLink refuses the run or the run fails.
    """
    run_dir = Path(cfg.run_dir).resolve()
    engine = cfg.engine
    project = project_app_dir()
    app_dir = stage_project_app(project, run_dir) if project else write_app_dir(run_dir)
    run_config = write_run_config(run_dir, cfg)
    ca = Path(engine.root_certificates) if engine.root_certificates else None
    env = cli_home(run_dir / HOME_DIR, engine.superlink, ca)
    command = [flower_command("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
    command += ["--run-config", str(run_config)]
    log.info(
        "deployment engine: submitting to the SuperLink at %s (%s), %d round(s), %s site(s) "
        "expected",
        engine.superlink,
        "TLS" if engine.root_certificates else "plain text, loopback trials only",
        engine.rounds,
        engine.num_sites or len(site_names) or "?",
    )
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=str(run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run_id = ""
    output: list[str] = []
    results = ResultReceiver(run_dir)  # the result files the ServerApp sends in its log
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if results.feed(line):
                continue
            output.append(line)
            log_flower_output(line)  # main.log; the console shows our lines and Flower's errors
            if not run_id and (match := _RUN_STARTED.search(line)):
                run_id = match.group(1)
                log.info("run %s started on the SuperLink", run_id)
        code = proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        if run_id:
            log.warning("stopping run %s on the SuperLink (Ctrl-C)", run_id)
            _stop_run(run_id, env)
        raise
    finally:
        if project:  # the staged copy of the app: flwr run has sent its bundle
            shutil.rmtree(app_dir, ignore_errors=True)
    if code != 0 or not run_id:
        tail = "".join(readable_line(line) + "\n" for line in output[-20:])
        raise DeploymentError(
            f"`flwr run` failed (exit {code}) against the SuperLink at {engine.superlink}:\n{tail}"
            "\nCheck that the SuperLink runs there (fl-imaging-deploy superlink), that "
            "engine.root_certificates is the CA certificate that signed its certificate, and "
            f"that {engine.superlink} is listed in that certificate."
        )
    status = _run_status(run_id, env)
    log.info("run %s on the SuperLink: %s", run_id, status or "status unknown")
    if status.endswith(":failed"):
        raise DeploymentError(
            f"run {run_id} failed on the SuperLink (status {status}); its log is above"
        )
    _receive_results(results, int(run_id), env, engine.superlink, engine.root_certificates)


def _receive_results(
    results: ResultReceiver, run_id: int, env: dict[str, str], superlink: str, ca: str | None
) -> None:
    """Finish receiving the result files of ``run_id`` into the run folder: when the stream
    ended before they all arrived, read the rest from the log the SuperLink keeps
    (``flwr log --show``). Logs what arrived; raises :class:`DeploymentError` naming what did
    not (``fl-imaging-deploy pull`` fetches them later)."""
    if not results.complete:
        log.info(
            "the stream ended before the result files all arrived: reading the rest from the "
            "SuperLink's log of run %d (flwr log --show)",
            run_id,
        )
        try:
            results.feed_all(run_log(run_id, env, superlink).splitlines())
        except ProcessError as err:
            log.warning("%s", err)
    try:
        names = results.finish()
    except ResultTransferError as err:
        raise DeploymentError(
            f"{err}\nFetch them again once the run has finished: fl-imaging-deploy pull "
            f"{run_id} --superlink {superlink}{f' --ca {ca}' if ca else ''} "
            f"--out {results.out_dir}"
        ) from None
    log.info(
        "results from the coordinator in %s: %d file(s), each as the coordinator wrote it "
        "(SHA-256 checked): %s",
        results.out_dir,
        len(names),
        ", ".join(names),
    )
    for reason in results.withheld:
        log.warning("not sent by the coordinator: %s", reason)
