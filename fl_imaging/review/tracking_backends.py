"""The two tracking backends, each through its library's own client: MLflow's ``MlflowClient``
and PyTorch's TensorBoard ``SummaryWriter`` (tensorboard's event files and protobufs).

Both are imported only here, and only when a run is tracked (:mod:`fl_imaging.review.tracking` picks
one and keeps failures from reaching the run).
"""

from __future__ import annotations

import logging
import os
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fl_imaging.review.results import MetricRow
from fl_imaging.review.tracking_store import DESCRIPTION_TAG, metric_key

if TYPE_CHECKING:
    from fl_imaging.review.tracking_store import MlflowStore

__all__ = ["MlflowBackend", "TensorBoardBackend"]


def _monai() -> list[str]:
    """The pip requirement of the MONAI that builds the logged networks."""
    import monai

    return [f"monai=={monai.__version__}"]


#: MLflow's limits per ``log_batch`` call (metrics, params).
_METRICS_PER_BATCH, _PARAMS_PER_BATCH = 1000, 100


def _quiet(*names: str) -> None:
    """Keep the libraries' INFO chatter (database set-up, migrations) out of the run's log,
    unless MLflow's own ``MLFLOW_LOGGING_LEVEL`` says otherwise. Call after importing them
    (MLflow sets its logger's level as it is imported)."""
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)


class MlflowBackend:
    """One MLflow run in ``experiment`` (created when missing, with the store's artifact folder)
    named ``run_name``, through ``MlflowClient`` at ``store.uri``."""

    def __init__(self, store: MlflowStore, experiment: str, run_name: str) -> None:
        self.store = store
        self.experiment = experiment
        self.run_name = run_name
        self.client: Any = None
        self.run_id = ""

    def start(self, params: dict[str, Any], tags: dict[str, str], config_yaml: str) -> dict:
        """Create the run with ``tags`` and ``params`` (as strings) and ``config.yaml``; returns
        the tracking URI, experiment and run ids and a ``where`` line for the summary."""
        # A server that went away must cost seconds, not MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        _quiet("mlflow", "alembic")

        if self.store.folder is not None:
            self.store.folder.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.store.uri)
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(
                    self.experiment, artifact_location=self.store.artifacts
                )
            except MlflowException:  # another job created it meanwhile
                found = client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        if tags.get("commit"):
            tags = {**tags, "mlflow.source.git.commit": tags["commit"]}
        if tags.get(DESCRIPTION_TAG):  # MLflow's UI shows it as the run's description
            tags = {**tags, "mlflow.note.content": tags[DESCRIPTION_TAG]}
        run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.client, self.run_id = client, run.info.run_id
        items = [Param(key, str(value)) for key, value in sorted(params.items())]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=items[start : start + _PARAMS_PER_BATCH])
        client.log_text(self.run_id, config_yaml, "config.yaml")
        where = f"MLflow run {self.run_id} (experiment {self.experiment}) in {self.store.uri}" + (
            f"; see it with: mlflow ui --backend-store-uri {self.store.uri}"
            if self.store.folder is not None
            else ""
        )
        return {
            "tracking_uri": self.store.uri,
            "experiment": self.experiment,
            "experiment_id": experiment_id,
            "run_id": self.run_id,
            "run_name": self.run_name,
            "where": where,
        }

    def log_rows(self, rows: Sequence[MetricRow]) -> None:
        """Log each row as metric ``METRIC/SITE`` at step ``round``."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(metric_key(r.metric, r.site), r.value, stamp, r.round) for r in rows]
        for start in range(0, len(metrics), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])

    def log_files(self, paths: Sequence[Path]) -> None:
        """Log each file as an artifact at the run's artifact root."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def log_model(
        self,
        model: torch.nn.Module,
        example: np.ndarray,
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        bundle: Path | None,
    ) -> str:
        """Log ``model`` (the run's final network, in eval mode on the CPU) as the MLflow model
        ``model`` (``mlflow.pytorch.log_model``) with ``example`` (one input batch
        ``(1, C_in, *roi_size)`` float32) as its input example and a signature of float32
        tensors of ``shapes`` (input, output; ``-1``: any size), and the MONAI bundle's folder
        ``bundle`` (when given) as artifacts under ``bundle/``. Returns the model's URI
        (``models:/...``), which ``mlflow.pytorch.load_model`` and ``mlflow.pyfunc.load_model``
        take."""
        import mlflow
        import mlflow.pytorch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        inputs, outputs = (Schema([TensorSpec(np.dtype(np.float32), s)]) for s in shapes)

        if bundle is not None:
            self.client.log_artifacts(self.run_id, str(bundle), "bundle")
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.store.uri)
        try:
            with mlflow.start_run(run_id=self.run_id):  # the fluent API logs models
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    input_example=example,
                    signature=ModelSignature(inputs=inputs, outputs=outputs),
                    # named, not inferred: inference loads the model again in a subprocess
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", *_monai()],
                )
        finally:
            mlflow.set_tracking_uri(before)
        return str(info.model_uri)

    def finish(self, status: str, tags: dict[str, str]) -> None:
        """Set ``tags`` and end the run with ``status`` (FINISHED, FAILED, KILLED)."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.client.set_terminated(self.run_id, status)


class TensorBoardBackend:
    """Event files in ``folder`` through PyTorch's ``SummaryWriter``: scalars ``METRIC/SITE``
    (step = round), the run's description and config as hyperparameters (HParams tab, which
    ranks runs by the scalars ``ranked``, e.g. ``dice/all`` and ``train_loss/all``) and the
    config as text, the summary as text, the run's plots as images."""

    def __init__(self, folder: Path, ranked: Sequence[str]) -> None:
        self.folder = folder
        self.ranked = list(ranked)
        self.writer: Any = None

    def start(self, params: dict[str, Any], tags: dict[str, str], config_yaml: str) -> dict:
        """Open the writer; write the hyperparameters, tags and config; returns ``logdir`` and
        a ``where`` line for the summary."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.folder))
        described = {DESCRIPTION_TAG: tags[DESCRIPTION_TAG]} if DESCRIPTION_TAG in tags else {}
        experiment, start, end = hparams({**described, **params}, dict.fromkeys(self.ranked, 0.0))
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        self.writer.add_text("config", textwrap.indent(config_yaml, "    "))
        self.writer.add_text("tags", "\n\n".join(f"{k}: {v}" for k, v in sorted(tags.items())))
        self.writer.flush()
        return {
            "logdir": str(self.folder),
            "where": f"TensorBoard event files in {self.folder}; see them with: tensorboard "
            f"--logdir {self.folder}",
        }

    def log_rows(self, rows: Sequence[MetricRow]) -> None:
        """Write each row as scalar ``METRIC/SITE`` at step ``round``."""
        for row in rows:
            self.writer.add_scalar(metric_key(row.metric, row.site), row.value, row.round)
        self.writer.flush()

    def log_files(self, paths: Sequence[Path]) -> None:
        """Plots (PNG) as images, text files as text; every file's path in ``files``."""
        import matplotlib.image

        for path in paths:
            if path.suffix == ".png":
                image = matplotlib.image.imread(path)
                self.writer.add_image(f"files/{path.name}", image, dataformats="HWC")
            elif path.suffix == ".txt":
                self.writer.add_text(path.stem, textwrap.indent(path.read_text(), "    "))
        listing = "\n\n".join(str(p) for p in paths)
        self.writer.add_text("files", f"The run's files (not copied here):\n\n{listing}")
        self.writer.flush()

    def log_model(
        self,
        model: torch.nn.Module,
        example: np.ndarray,
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        bundle: Path | None,
    ) -> str:
        """TensorBoard keeps no models: write where the MONAI bundle ``bundle`` is (when given)
        as text ``model``; returns "" (no model URI). The other arguments are not used."""
        if bundle is not None:
            self.writer.add_text("model", f"The final model, as a MONAI bundle: {bundle}")
            self.writer.flush()
        return ""

    def finish(self, status: str, tags: dict[str, str]) -> None:
        """Write the final status and ``tags`` as text, and close the writer."""
        lines = [f"status: {status}", *(f"{k}: {v}" for k, v in sorted(tags.items()))]
        self.writer.add_text("status", "\n\n".join(lines))
        self.writer.close()
