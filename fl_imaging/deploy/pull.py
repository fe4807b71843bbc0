"""Fetch a finished deployed run's result files from the SuperLink (``fl-imaging-deploy pull``).

The ServerApp sent them as lines of its log (:mod:`fl_imaging.review.result_transfer`); the
SuperLink keeps that log, and ``flwr log RUN_ID --show`` returns it over the same TLS
connection as ``flwr run`` (a private Flower home with one connection:
:func:`~fl_imaging.deploy.flower_home.cli_home`). The files are checked against the manifest
and written into the chosen folder.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from fl_imaging.deploy.flower_home import CONNECTION, cli_home
from fl_imaging.deploy.processes import ProcessError, flower_command
from fl_imaging.review.result_transfer import ResultReceiver

__all__ = ["pull_results", "run_log"]


def run_log(run_id: int, env: dict[str, str], superlink: str, timeout: float = 600) -> str:
    """The log of Flower run ``run_id`` as the SuperLink keeps it (``flwr log RUN_ID --show``
    with the Flower home of ``env``). Raises :class:`ProcessError` with Flower's message when
    the SuperLink cannot be reached or does not know the run."""
    try:
        done = subprocess.run(
            [flower_command("flwr"), "log", str(run_id), CONNECTION, "--show"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ProcessError(
            f"`flwr log {run_id} --show` did not answer within {timeout:.0f} s from the "
            f"SuperLink at {superlink}"
        ) from None
    if done.returncode != 0:
        raise ProcessError(
            f"`flwr log {run_id} --show` failed (exit {done.returncode}) against the SuperLink "
            f"at {superlink}:\n{(done.stdout + done.stderr).strip()[-2000:]}\nCheck the run id "
            "(`flwr ls`, or the line 'run N started on the SuperLink' of fl-imaging), that the "
            "SuperLink runs there and that --ca is the CA certificate that signed its "
            "certificate."
        )
    return done.stdout


def pull_results(
    run_id: int, superlink: str, ca_cert: Path | None, out_dir: Path
) -> ResultReceiver:
    """Fetch run ``run_id``'s result files from the SuperLink at ``superlink`` (TLS checked
    against ``ca_cert``; None: plain text, loopback trials only) into ``out_dir``. Returns the
    receiver, whose :meth:`~ResultReceiver.finish` names the files written or raises
    :class:`~fl_imaging.review.result_transfer.ResultTransferError` for any that did not arrive
    intact. Raises :class:`ProcessError` when the log cannot be fetched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fl-imaging-pull-") as home:
        env = cli_home(Path(home), superlink, ca_cert)
        text = run_log(run_id, env, superlink)
    receiver = ResultReceiver(out_dir)
    receiver.feed_all(text.splitlines())
    return receiver
