"""Result files of a run: the metrics table, the per-round summary, curves, model and config,
and the lines a run prints (progress per round, privacy spent).

Rows are kept in long form, one value per (round, site, metric), so that any number of sites and
metrics fits one CSV a person can open in a spreadsheet. Site ``all`` holds the sample-weighted
aggregate over the sites of that round.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import pickle
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fl_imaging.common.atomic import reason_of, write_atomically
from fl_imaging.config import RunConfig, config_to_yaml
from fl_imaging.config.devices import devices_line
from fl_imaging.privacy.report import (
    disclosure_lines,
    patient_progress,
    secure_aggregation_line,
)
from fl_imaging.review.run_name import run_name, run_overrides

if TYPE_CHECKING:
    import torch

__all__ = [
    "AGGREGATE_SITE",
    "TEST_PREFIXES",
    "Failure",
    "MetricRow",
    "RunFolderError",
    "SitesFailed",
    "WeightsFileError",
    "format_round_table",
    "load_weights",
    "plot_curves",
    "progress_line",
    "read_metrics",
    "secure_aggregation_line",
    "save_weights",
    "write_metrics",
    "write_run_files",
]

log = logging.getLogger("fl_imaging.server")

#: Site name of the rows that hold the aggregate over the sites of a round.
AGGREGATE_SITE = "all"
#: Prefixes of the test round's metrics: the final global model (``test_``), after local
#: fine-tuning (``finetuned_``), each site's personal model under Ditto (``personal_``).
TEST_PREFIXES = ("test_", "finetuned_", "personal_")
#: With more sites than this, the progress line and the console give a summary over the sites
#: instead of one figure per site (summary.txt and metrics.csv keep every site).
LISTED_SITES = 12
FIELDS = ("round", "site", "metric", "value")


@dataclass(frozen=True)
class MetricRow:
    """One value: ``round`` (1-based), ``site`` name or ``all``, ``metric`` name, ``value``."""

    round: int
    site: str
    metric: str
    value: float


class SitesFailed(RuntimeError):
    """Some site took part in no round of a run that needed every site; the message names each
    site and its first reason (the run's files are written)."""


#: A site that failed in a round: (round, site name, reason).
Failure = tuple[int, str, str]


class RunFolderError(RuntimeError):
    """The run's files (checkpoint, results) could not be written into its folder: disk full,
    no permission, ... The message names the folder and the operating system's reason."""


class WeightsFileError(ValueError):
    """A weights file (``model.pt``) that cannot be read: truncated, damaged or not a PyTorch
    weights file. The message names the file."""


#: What ``torch.load(..., weights_only=True)`` raises on a truncated or damaged file (checked
#: with torch 2.13: a cut-off zip gives OSError, an empty file EOFError, a changed header byte
#: RuntimeError from its zip reader or UnicodeDecodeError, a foreign pickle UnpicklingError).
_TORCH_LOAD_ERRORS = (
    OSError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """``torch.save`` ``state_dict`` (moved to the CPU, from whatever device trained it) to
    ``path`` atomically (a reader never sees half a file; on failure an earlier file stays as
    it was); returns ``path``. Raises ``OSError``."""
    import torch

    weights = {k: v.detach().cpu() for k, v in state_dict.items()}
    return write_atomically(path, lambda handle: torch.save(weights, handle))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read the weights ``save_weights`` wrote, with ``torch.load(weights_only=True)`` (no code
    runs while loading), on the CPU: a ``state_dict`` (parameter name -> tensor), also taken
    from MONAI's checkpoint form ``{"model": state_dict, ...}`` (what its ``CheckpointSaver``
    writes, and some model zoo bundles ship). Raises :class:`WeightsFileError` naming ``path``
    when it is missing, truncated or damaged. (A changed byte inside a tensor's data is not
    found: torch's reader does not check its zip checksums.)"""
    import torch

    if not path.is_file():
        raise WeightsFileError(f"{path} not found")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text advises weights_only=False: not here
        raise WeightsFileError(
            f"{path}: the file is damaged or not a weights file (it holds objects other than "
            "tensors, which are not loaded: loading them could run code)"
        ) from None
    except _TORCH_LOAD_ERRORS as err:
        first = (str(err).splitlines() or [""])[0]
        detail = type(err).__name__ + (f": {first[:80]}" if first else "")
        raise WeightsFileError(
            f"{path}: the file is truncated or damaged (torch.load: {detail})"
        ) from None
    if isinstance(weights, dict) and isinstance(weights.get("model"), dict):
        weights = weights["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise WeightsFileError(f"{path} holds no model weights (a dict of tensors)")
    return weights


def write_metrics(rows: list[MetricRow], path: Path) -> Path:
    """Write rows to a CSV with columns round, site, metric, value, atomically (see
    :func:`fl_imaging.common.atomic.write_atomically`); returns ``path``. Raises ``OSError``."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(FIELDS)
    for row in sorted(rows, key=lambda r: (r.round, r.site == AGGREGATE_SITE, r.site, r.metric)):
        writer.writerow((row.round, row.site, row.metric, f"{row.value:.6g}"))
    return write_atomically(path, lambda handle: handle.write(text.getvalue().encode()))


def read_metrics(path: Path) -> list[MetricRow]:
    """Read a CSV written by :func:`write_metrics` back into rows."""
    with path.open(newline="") as handle:
        return [
            MetricRow(int(r["round"]), r["site"], r["metric"], float(r["value"]))
            for r in csv.DictReader(handle)
        ]


def _by_round(rows: list[MetricRow]) -> dict[int, dict[tuple[str, str], float]]:
    table: dict[int, dict[tuple[str, str], float]] = defaultdict(dict)
    for row in rows:
        table[row.round][(row.site, row.metric)] = row.value
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def format_round_table(rows: list[MetricRow], main_metric: str, sites: list[str]) -> str:
    """Return a plain-text table: one line per round with the aggregate train loss, each site's
    validation ``main_metric`` and their mean over sites."""
    header = ["round", "train loss", *(f"{main_metric} {s}" for s in sites), f"mean {main_metric}"]
    lines = [header]
    for rnd, values in sorted(_by_round(rows).items()):
        per_site = [values.get((s, main_metric)) for s in sites]
        present = [v for v in per_site if v is not None and not math.isnan(v)]
        mean = sum(present) / len(present) if present else None
        lines.append(
            [
                str(rnd),
                _fmt(values.get((AGGREGATE_SITE, "train_loss"))),
                *(_fmt(v) for v in per_site),
                _fmt(mean),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def plot_curves(rows: list[MetricRow], main_metric: str, path: Path) -> Path:
    """Plot, per site, the training loss and the validation ``main_metric`` against the round,
    into a PNG at ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # imported here: the strategies record rows without plotting

    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        series[(row.metric, row.site)].append((row.round, row.value))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in (
        (axes[0], "train_loss", "training loss"),
        (axes[1], main_metric, f"validation {main_metric}"),
    ):
        for (name, site), points in sorted(series.items()):
            if name != metric:
                continue
            points.sort()
            style = {"color": "black", "linewidth": 2.5} if site == AGGREGATE_SITE else {}
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site, **style)
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run stopped before its first round has none
            ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        write_atomically(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def progress_line(
    rnd: int, rounds: int, rows: list[MetricRow], main_metric: str, sites: list[str]
) -> str:
    """The line printed after round ``rnd`` of ``rounds``: the aggregate training loss, each of
    ``sites``' latest validation ``main_metric`` (with one message per round, a round's model is
    scored in the next round: the line says which round's), the client-level epsilon when
    accounted, each site's patient-level epsilon (DP-SGD), seconds."""
    values = {(r.site, r.metric): r.value for r in rows if r.round == rnd}
    scored = max((r.round for r in rows if r.metric == main_metric and r.round <= rnd), default=rnd)
    scores = {(r.site, r.metric): r.value for r in rows if r.round == scored}
    per_site = _per_site_scores(
        [(s, scores[(s, main_metric)]) for s in sites if (s, main_metric) in scores]
    )
    label = main_metric if scored == rnd else f"{main_metric} (round {scored} model)"
    epsilon = values.get((AGGREGATE_SITE, "epsilon"))
    patients = patient_progress(rows, rnd, sites)  # patient-level DP: each site's epsilon
    return (
        f"round {rnd}/{rounds}  train loss {_fmt(values.get((AGGREGATE_SITE, 'train_loss')))} | "
        f"{label} {per_site or '-'} | "
        + (f"epsilon {epsilon:.3f} | " if epsilon is not None else "")
        + (f"{patients} | " if patients else "")
        + f"{values.get((AGGREGATE_SITE, 'round_seconds'), float('nan')):.1f} s"
    )


def _per_site_scores(scores: list[tuple[str, float]]) -> str:
    """Each site's score, or past :data:`LISTED_SITES` sites their mean, lowest and highest."""
    if len(scores) <= LISTED_SITES:
        return "  ".join(f"{site} {value:.3f}" for site, value in scores)
    finite = [(value, site) for site, value in scores if math.isfinite(value)]
    if not finite:
        return f"- over {len(scores)} sites"
    low, high = min(finite), max(finite)
    mean = sum(value for value, _ in finite) / len(finite)
    return (
        f"mean {mean:.3f} over {len(finite)} sites (lowest {low[1]} {low[0]:.3f}, "
        f"highest {high[1]} {high[0]:.3f})"
    )


def write_run_files(
    run_dir: Path,
    cfg: RunConfig,
    rows: list[MetricRow],
    failures: list[Failure],
    model: torch.nn.Module | None,
    site_names: list[str],
    main_metric: str,
    stopped: str = "",
) -> None:
    """Write metrics.csv, curves.png, model.pt, config.yaml and summary.txt into ``run_dir``
    from the run's ``rows`` and ``failures``; the summary has the run's name
    (:func:`~fl_imaging.review.run_name.run_name`), the per-round table, the failures,
    the device each site trained on (:func:`~fl_imaging.config.devices.devices_line`), what each
    party
    could learn (:func:`~fl_imaging.privacy.report.disclosure_lines`) and
    ``stopped``: why a run ended early. Each file is written
    atomically; without ``model`` (homomorphic encryption: the coordinator never held the
    trained weights) no model.pt. Raises :class:`RunFolderError` naming the file and the
    reason (``No space left on device``) when one cannot be written; the files written before
    it stay."""
    table = format_round_table(rows, main_metric, site_names)
    failed = "".join(f"\nround {rnd}: site {site} failed: {why}" for rnd, site, why in failures)
    # where the sites trained, who could learn what, then why it stopped
    lines = (devices_line(rows), *disclosure_lines(rows, cfg), stopped)
    notes = "".join(f"\n{line}" for line in lines if line)
    name = run_name(cfg, run_overrides(run_dir))
    summary = f"run: {name}\n" + table + "\n" + failed + notes + "\n"
    writers: dict[str, Callable[[Path], object]] = {
        "metrics.csv": lambda path: write_metrics(rows, path),
        "curves.png": lambda path: plot_curves(rows, main_metric, path),
        "model.pt": lambda path: None if model is None else save_weights(model.state_dict(), path),
        "config.yaml": lambda path: write_atomically(path, _text(config_to_yaml(cfg))),
        "summary.txt": lambda path: write_atomically(path, _text(summary)),
    }
    for name, write in writers.items():
        try:
            write(run_dir / name)
        except OSError as err:
            raise RunFolderError(
                f"could not write the run's results into {run_dir} ({name}: {reason_of(err)}): "
                "free space there or give a folder you can write to (hydra.run.dir=...)"
            ) from None
    if len(site_names) > LISTED_SITES:  # a column per site: for the file, not the console
        table = f"{len(site_names)} sites: the table, a column per site, is in summary.txt"
    log.info(
        "per-round results (validation %s per site):\n%s%s%s", main_metric, table, failed, notes
    )


def _text(text: str) -> Callable[[BinaryIO], object]:
    """A writer for :func:`~fl_imaging.common.atomic.write_atomically`: ``text`` as UTF-8."""
    return lambda handle: handle.write(text.encode())
