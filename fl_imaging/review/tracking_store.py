"""Where and under which names MLflow and TensorBoard keep a run: the tracked name of a metric,
the tag that describes the run and the MLflow store that ``tracking.uri`` names. Both the
run-level tracking (:mod:`fl_imaging.review.tracking`) and the backends
(:mod:`fl_imaging.review.tracking_backends`) read them; neither library is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["DESCRIPTION_TAG", "MlflowStore", "metric_key", "mlflow_store"]

#: The tag that holds what the run is (:func:`fl_imaging.review.run_name.run_name`), whatever
#: name the tracker shows.
DESCRIPTION_TAG = "description"


def metric_key(metric: str, site: str) -> str:
    """The tracked name of ``metric`` at ``site``: ``METRIC/SITE`` (MLflow's UI and TensorBoard
    group the sites of one metric under it); characters MLflow refuses become ``_``."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. ")
    clean = ["".join(c if c in allowed else "_" for c in part) for part in (metric, site)]
    return "/".join(clean)


@dataclass(frozen=True)
class MlflowStore:
    """Where MLflow keeps a run: its tracking URI, the artifact folder of a new experiment
    (None: the server's), and the folder of a local store (None: not local)."""

    uri: str
    artifacts: str | None
    folder: Path | None


def mlflow_store(uri: str | None) -> MlflowStore:
    """The store ``tracking.uri`` names: None or a folder -> a local store in that folder
    (``mlflow.db`` + ``artifacts/``; MLflow 3 no longer writes its plain-file store); a
    ``sqlite:///`` URI -> that database, artifacts next to it; any other URI -> MLflow's."""
    scheme = urlparse(uri).scheme if uri else ""
    if not uri or len(scheme) <= 1 or scheme == "file":
        folder = Path(urlparse(uri).path if scheme == "file" else uri or "mlruns").resolve()
        db = folder / "mlflow.db"
        return MlflowStore(f"sqlite:///{db}", (folder / "artifacts").as_uri(), folder)
    if scheme == "sqlite":
        path = uri.split(":///", 1)[-1]
        db = Path(path).resolve() if path and path != ":memory:" else None
        artifacts = (db.parent / "artifacts").as_uri() if db else None
        return MlflowStore(f"sqlite:///{db}" if db else uri, artifacts, db.parent if db else None)
    return MlflowStore(uri, None, None)
