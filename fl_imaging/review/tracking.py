"""Experiment tracking of a run: its config, every per-round, per-site metric and its files sent
to MLflow or TensorBoard (``tracking=mlflow|tensorboard``), through the libraries' own clients
(:mod:`fl_imaging.review.tracking_backends`).

Tracking happens where ``metrics.csv`` is written (the ServerApp: this machine in simulation, the
SuperLink's host in a deployment): the config as parameters when the run starts, each round's new
rows as they arrive (metric ``METRIC/SITE``, step = round), the files at the end. It never stops
a run: a tracking server that fails is logged, tracking stops, the run goes on and its summary
says so. ``tracking.json`` in the run folder says where the run is tracked (MLflow run id).
mlflow and tensorboard are imported only when tracking is on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from fl_imaging.common.atomic import reason_of, write_atomically
from fl_imaging.config import ConfigError, RunConfig, TrackingBackend
from fl_imaging.review.results import AGGREGATE_SITE, MetricRow
from fl_imaging.review.run_name import folder_name, run_name, run_overrides
from fl_imaging.review.tracking_store import DESCRIPTION_TAG, metric_key, mlflow_store

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "TRACKING_FILE",
    "RunTracker",
    "add_tracking_tags",
    "check_tracking",
    "flat_config",
    "open_tracker",
    "resolve_tracking",
    "run_files",
    "tensorboard_folder",
    "tracked_name",
]

log = logging.getLogger("fl_imaging.tracking")

TRACKING_FILE = "tracking.json"
#: Suffixes of the run folder's files sent as artifacts (not checkpoints, not main.log).
ARTIFACT_SUFFIXES = (".yaml", ".csv", ".txt", ".png", ".pt", ".html", ".jsonl", ".json")
#: Seconds a tracking server gets to answer the check before a run.
CHECK_TIMEOUT = 5.0


class Backend(Protocol):
    """What :class:`RunTracker` needs of MLflow or TensorBoard."""

    def start(self, params: dict[str, Any], tags: dict[str, str], config_yaml: str) -> dict:
        """Open the run; returns what ``tracking.json`` records (run id, where)."""

    def log_rows(self, rows: Sequence[MetricRow]) -> None:
        """Send metric rows, each as ``METRIC/SITE`` at step ``round``."""

    def log_files(self, paths: Sequence[Path]) -> None:
        """Send the run's files."""

    def log_model(
        self,
        model: torch.nn.Module,
        example: np.ndarray,
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        bundle: Path | None,
    ) -> str:
        """Send the final model (in eval mode, on the CPU), with ``example`` as one input
        batch, the input and output shapes of its signature (``-1``: any size) and the MONAI
        bundle's folder; returns where the model is (a model URI, or "")."""

    def finish(self, status: str, tags: dict[str, str]) -> None:
        """Close the run with ``status`` (FINISHED, FAILED, KILLED) and last ``tags``."""


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as dotted keys (``task.model.channels``) with scalar values (int, float, bool,
    str); lists, mappings and None as JSON text of at most 500 characters."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
            return
        key = prefix[:-1]
        value = node if isinstance(node, bool | int | float | str) else json.dumps(node)
        if isinstance(value, str) and len(value) > 500:
            value = value[:497] + "..."
        flat[key] = value

    walk(plain, "")
    return flat


def resolve_tracking(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``tracking.uri`` made absolute where it is a folder (the default MLflow
    store ``mlruns/`` of the working folder included), so that a ServerApp elsewhere (a
    deployment) and ``config.yaml`` name the same place."""
    tracking = cfg.tracking
    uri = tracking.uri
    if tracking.backend == TrackingBackend.mlflow and not uri:
        uri = str(Path("mlruns").resolve())
    elif tracking.backend != TrackingBackend.none and uri and len(urlparse(uri).scheme) <= 1:
        uri = str(Path(uri).resolve())
    return replace(cfg, tracking=replace(tracking, uri=uri)) if uri != tracking.uri else cfg


def add_tracking_tags(cfg: RunConfig, tags: dict[str, str], run_name: str) -> RunConfig:
    """``cfg`` with ``tags`` added to ``tracking.tags`` (the user's win) and ``run_name`` as the
    run's name unless one is set: what ``--multirun`` and ``fl-imaging-bench`` add."""
    tracking = cfg.tracking
    merged = {**tags, **dict(tracking.tags)}
    return replace(
        cfg, tracking=replace(tracking, tags=merged, run_name=tracking.run_name or run_name)
    )


def _writable(folder: Path, key: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fl-imaging-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{key}: cannot write to {folder} ({reason_of(err)}): give a folder you can write "
            "to, or run with tracking=none"
        ) from None


def _reachable(uri: str) -> None:
    """Raise ConfigError when no HTTP server answers at ``uri`` (any HTTP answer will do)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CHECK_TIMEOUT):
            return
    except urllib.error.HTTPError:
        return  # it answered (authentication, another path ...): reachable
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"tracking.uri={uri}: no MLflow server answers there ({reason}). Start it (mlflow "
            "server --host 127.0.0.1 --port 5000, or a private address with --allowed-hosts), "
            "fix the address, or run with tracking=none"
        ) from None


#: The URI schemes MLflow 3 keeps runs under (its tracking store registry,
#: ``mlflow/tracking/_tracking_service/utils.py``), a database's with an optional ``+DRIVER``;
#: plugins add theirs as ``mlflow.tracking_store`` entry points.
MLFLOW_SCHEMES = (
    "file",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "uc",
)
#: Database schemes MLflow opens through SQLAlchemy (sqlite is a local store: its folder is
#: checked instead).
_DATABASES = ("postgresql", "mysql", "mssql")
#: What a tracking server is asked: only MLflow's REST API answers it (as JSON).
MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search"


def _known_scheme(uri: str) -> str:
    """The scheme of the MLflow tracking URI ``uri`` (``postgresql`` for
    ``postgresql+psycopg2://``). Raises :class:`ConfigError` naming it and the schemes MLflow
    serves when MLflow (and its installed plugins) keep no runs under it."""
    from importlib.metadata import entry_points

    scheme = urlparse(uri).scheme.split("+", 1)[0]
    plugins = [ep.name for ep in entry_points(group="mlflow.tracking_store")]
    if scheme in (*MLFLOW_SCHEMES, *plugins):
        return scheme
    raise ConfigError(
        f"tracking.uri={uri}: MLflow keeps no runs under the scheme {scheme}://; give a folder "
        "(the default: mlruns/), sqlite:///FILE.db, http(s)://HOST:PORT of an `mlflow server`, "
        f"or a database URI (one of {', '.join(MLFLOW_SCHEMES)}), or run with tracking=none"
    )


def _database_driver(uri: str) -> None:
    """Raise :class:`ConfigError` when SQLAlchemy (which MLflow opens a database store with)
    has no dialect or no installed driver for the database URI ``uri``; its password is not
    shown. The database itself is reached when the run opens it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except ArgumentError as err:
        raise ConfigError(
            f"tracking.uri: not a database URI MLflow can open ({err}); write it as "
            "DIALECT[+DRIVER]://USER:PASSWORD@HOST:PORT/DATABASE, or run with tracking=none"
        ) from None
    shown = url.render_as_string(hide_password=True)
    try:
        url.get_dialect().import_dbapi()
    except (ArgumentError, ImportError) as err:
        raise ConfigError(
            f"tracking.uri={shown}: MLflow cannot open this database here ({err}): install "
            "the driver into this environment (e.g. pip install psycopg for postgresql, "
            "pymysql for mysql+pymysql), or run with tracking=none"
        ) from None


def _answers_as_mlflow(uri: str) -> None:
    """Ask the server at ``uri`` what only an MLflow tracking server answers (a search for one
    experiment, :data:`MLFLOW_PROBE`) through MLflow's own client (its credentials and TLS
    settings), once and within :data:`CHECK_TIMEOUT` seconds. Raises :class:`ConfigError`
    naming the address and the answer when it is not MLflow's (a web server's 404 page, a
    refusal of the credentials)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    bounded = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    before = {key: os.environ.get(key) for key in bounded}
    os.environ.update(bounded)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except MlflowException as err:
        text = (str(err).strip().splitlines() or [""])[0]
        code = re.search(r"error code (\d+)", text)
        answer = f"HTTP {code.group(1)}" if code else text.split(". Response body")[0][:300]
        status = int(code.group(1)) if code else err.get_http_status_code()
        hint = (
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) for it"
            if status in (401, 403)
            else "give the address of an `mlflow server` (http://HOST:PORT, the path it "
            "serves under if any)"
        )
        raise ConfigError(
            f"tracking.uri={uri}: the server there does not answer as an MLflow tracking "
            f"server (asked MLflow's experiment search, {MLFLOW_PROBE}: {answer}); {hint}, or "
            "run with tracking=none"
        ) from None
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_tracking(cfg: RunConfig) -> None:
    """Check, before a run, that its tracking can work: the package is installed, a local store
    or log folder can be written, ``tracking.uri`` has a scheme MLflow keeps runs under, an
    ``http(s)://`` server answers and answers as MLflow, a database's driver is installed.
    Raises :class:`ConfigError` naming the key and what to do. (A Databricks workspace, a
    plugin's store and a database's server are reached when the run opens them.)"""
    tracking = cfg.tracking
    if tracking.backend == TrackingBackend.none:
        return
    package = "mlflow" if tracking.backend == TrackingBackend.mlflow else "tensorboard"
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"tracking={tracking.backend.value} needs the {package} package: pip install "
            f"{package} (or run with tracking=none)"
        )
    if tracking.backend == TrackingBackend.tensorboard:
        if tracking.uri:
            _writable(Path(tracking.uri), "tracking.uri")
        return
    store = mlflow_store(tracking.uri)
    if store.folder is not None:
        _writable(store.folder, "tracking.uri")
        return
    scheme = _known_scheme(store.uri)
    if scheme in ("http", "https"):
        _reachable(store.uri)
        _answers_as_mlflow(store.uri)
    elif scheme in _DATABASES:
        _database_driver(store.uri)


def run_files(run_dir: Path) -> list[Path]:
    """The run folder's files to send as artifacts: config, metrics, summary, plots, model,
    audit log, report (not checkpoints, temporary files or the command's log), by name."""
    return sorted(
        p
        for p in Path(run_dir).iterdir()
        if p.is_file()
        and p.suffix in ARTIFACT_SUFFIXES
        and not p.name.startswith((".", "checkpoint"))
        and p.name != TRACKING_FILE
    )


class RunTracker:
    """One tracked run: sends rows and files to ``backend``, never raising; the first failure
    stops tracking and is kept in ``failed`` (and :meth:`note`). ``what`` names the backend."""

    def __init__(self, backend: Backend, what: str, run_dir: Path) -> None:
        self.backend = backend
        self.what = what
        self.run_dir = run_dir
        self.info: dict[str, Any] = {"backend": what}
        self.failed = ""
        self.sent = 0
        self.where = ""

    def _safely(self, stage: str, call: Any) -> bool:
        if self.failed:
            return False
        try:
            call()
        except Exception as err:  # a tracking server's failure must never stop the run
            first = (str(err).strip().splitlines() or [""])[0][:200]
            self.failed = f"{stage}: {type(err).__name__}: {first}"
            log.warning(
                "tracking (%s) failed %s; the run goes on without it", self.what, self.failed
            )
            self._write_info()
            return False
        return True

    def start(self, cfg: RunConfig, extra_tags: dict[str, str] | None = None) -> None:
        """Open the run with ``cfg``'s parameters, its tags and ``extra_tags`` (code version,
        config hash) and its YAML; write ``tracking.json``."""
        from fl_imaging.config import config_to_yaml

        tags = {str(k): str(v) for k, v in cfg.tracking.tags.items()}
        tags.update(extra_tags or {})
        tags["run_dir"] = str(self.run_dir)

        def open_run() -> None:
            self.info.update(self.backend.start(flat_config(cfg), tags, config_to_yaml(cfg)))

        if self._safely("when opening the run", open_run):
            self.where = str(self.info.get("where", ""))
            log.info("tracking: %s", self.where)
        self._write_info()

    def log_rows(self, rows: Sequence[MetricRow], rnd: int | None = None) -> None:
        """Send the rows of ``rows`` not sent yet (rows only grow during a run); ``rnd`` names
        the round in a failure message."""
        new = list(rows[self.sent :])
        stage = f"in round {rnd}" if rnd is not None else "sending the final metrics"
        if new and self._safely(stage, lambda: self.backend.log_rows(new)):
            self.sent = len(rows)

    def finish(
        self,
        status: str,
        tags: dict[str, str] | None = None,
        model: torch.nn.Module | None = None,
        input_shape: Sequence[int] = (),
        any_size: bool = False,
    ) -> None:
        """Send the run folder's files (:func:`run_files`), then, with ``model`` (the run's
        final network), that model and the MONAI bundle (``bundle/``, when written) with a zero
        input of ``input_shape`` (``(1, C_in, *roi_size)``) as its example (``any_size``: the
        network takes any spatial size, as a segmentation network does, and its signature
        says so); its URI goes to ``tracking.json`` (``model_uri``). Close the run with
        ``status``."""
        files = run_files(self.run_dir)
        self._safely("sending the run's files", lambda: self.backend.log_files(files))
        if model is not None:
            self._safely("sending the model", lambda: self._log_model(model, input_shape, any_size))
        self._safely("closing the run", lambda: self.backend.finish(status, tags or {}))
        # What the tracking side holds: a run whose tracking failed was never closed there.
        self.info["status"] = f"{status} (tracking failed: not sent)" if self.failed else status
        self._write_info()

    def _log_model(
        self, model: torch.nn.Module, input_shape: Sequence[int], any_size: bool
    ) -> None:
        import copy

        import numpy as np
        import torch

        bundle = self.run_dir / "bundle"
        copied = copy.deepcopy(model).cpu().eval()  # the example must not move batch-norm stats
        example = np.zeros(tuple(input_shape), dtype=np.float32)
        with torch.no_grad():
            output = tuple(copied(torch.from_numpy(example)).shape)
        spatial = len(input_shape) - 2
        free = (-1,) * spatial if any_size else tuple(input_shape[2:])
        shapes = (
            (-1, int(input_shape[1]), *free),
            (-1, output[1], *free) if any_size else (-1, *output[1:]),
        )
        uri = self.backend.log_model(copied, example, shapes, bundle if bundle.is_dir() else None)
        if uri:
            self.info["model_uri"] = uri

    def note(self) -> str:
        """The summary's line on tracking: where the run is, or why tracking stopped."""
        if self.failed:
            return (
                f"tracking: {self.what} failed {self.failed}; what was sent before stays there, "
                "the run went on without tracking (every result is in this folder)"
            )
        return f"tracking: {self.where}"

    def _write_info(self) -> None:
        info = dict(self.info)
        if self.failed:
            info["failed"] = self.failed
        text = json.dumps(info, indent=1, sort_keys=True).encode()
        try:
            write_atomically(self.run_dir / TRACKING_FILE, lambda handle: handle.write(text))
        except OSError as err:
            log.warning("could not write %s: %s", TRACKING_FILE, reason_of(err))


def tracked_name(cfg: RunConfig, run_dir: Path) -> tuple[str, str]:
    """The name ``cfg``'s run gets in its tracker and the run's description
    (:func:`~fl_imaging.review.run_name.run_name` of ``cfg`` and the overrides recorded in
    ``run_dir``): the name is ``tracking.run_name`` when set (by the user, a sweep or a
    benchmark), else the description."""
    description = run_name(cfg, run_overrides(run_dir))
    return cfg.tracking.run_name or description, description


def tensorboard_folder(cfg: RunConfig, run_dir: Path, description: str) -> Path:
    """Where ``cfg``'s run writes its event files: a folder named after the run (its
    ``tracking.run_name``, else ``description``), inside the run folder's ``tensorboard/``, or,
    with ``tracking.uri``, in that folder (then an unnamed run's folder starts with its run
    folder's name, so that two runs of one config stay apart)."""
    tracking = cfg.tracking
    if tracking.uri and tracking.run_name:
        return Path(tracking.uri) / tracking.run_name
    if tracking.uri:
        return Path(tracking.uri) / folder_name(f"{Path(run_dir).name} {description}")
    return Path(run_dir) / "tensorboard" / folder_name(tracking.run_name or description)


def open_tracker(
    cfg: RunConfig,
    run_dir: Path,
    extra_tags: dict[str, str] | None = None,
    main_metric: str | None = None,
) -> RunTracker | None:
    """Start tracking ``cfg``'s run (its folder ``run_dir``; ``extra_tags`` added to the run's;
    ``main_metric``: the task's main validation metric, which TensorBoard's HParams tab ranks
    runs by, with the train loss) with its backend, named by :func:`tracked_name` and tagged
    with its ``description``; None when tracking is off. A backend that cannot be opened gives
    a tracker in the failed state (the run goes on)."""
    from fl_imaging.review.tracking_backends import MlflowBackend, TensorBoardBackend

    cfg = resolve_tracking(cfg)
    tracking = cfg.tracking
    name, description = tracked_name(cfg, Path(run_dir))
    backend: Backend
    if tracking.backend == TrackingBackend.mlflow:
        what = "MLflow"
        backend = MlflowBackend(mlflow_store(tracking.uri), tracking.experiment, name)
    elif tracking.backend == TrackingBackend.tensorboard:
        ranked = [metric_key(main_metric, AGGREGATE_SITE)] if main_metric else []
        ranked.append(metric_key("train_loss", AGGREGATE_SITE))
        folder = tensorboard_folder(cfg, Path(run_dir), description)
        backend, what = TensorBoardBackend(folder, ranked), "TensorBoard"
    else:
        return None
    tracker = RunTracker(backend, what, Path(run_dir))
    tracker.start(cfg, {**(extra_tags or {}), DESCRIPTION_TAG: description})
    return tracker
