"""One page per run, ``report.html``: everything a reader (an ethics board, a site's data
protection officer) needs to see about a run, in one self-contained file.

Built from the run folder's own files, so it can be rebuilt for any run (``write_report``):
the run's name in the header (:func:`fl_imaging.review.run_name.run_folder_name`: strategy,
data, model and the user's overrides), the outcome and the audit chain's status
(:func:`fl_imaging.review.audit.verify_run`), what each party could learn (from
``summary.txt``), the per-round table with the sites asked and answering, each update's
verdict, the curves, per-site results (validation and test round; devices by name, flags as
yes/no), the privacy spent over rounds, the cross-site evaluation as a matrix of models by
sites and the contributions when their files exist, the federated statistics of the sites'
data when ``fl-imaging-data stats`` wrote them into the folder (``stats.csv``), failures,
where the run is tracked, the summary and the config. Images are PNG data URIs; no script,
style sheet, font or image is fetched from anywhere."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fl_imaging.common.atomic import write_atomically
from fl_imaging.config.devices import DEVICE_METRIC, MIXED_PRECISION_METRIC, device_name
from fl_imaging.evaluation.files import GLOBAL_MODEL, cross_site_matrix, read_cross_site
from fl_imaging.flower.protocol import MALICIOUS
from fl_imaging.review.audit import AUDIT_FILE, AuditFileMissing, Verification, verify_run
from fl_imaging.review.results import AGGREGATE_SITE, TEST_PREFIXES, MetricRow, read_metrics
from fl_imaging.review.run_name import run_folder_name
from fl_imaging.statistics.files import statistics_section

__all__ = ["REPORT_FILE", "render_report", "write_report"]

REPORT_FILE = "report.html"
#: summary.txt lines that say what a party could learn (who saw what, privacy spent).
LEARN_PREFIXES = (
    "coordinator",
    "each site",
    "final model",
    "secure aggregation",
    "differential privacy",
    "patient",
    "privacy",
    "site ",
    "budget",
    "cross-site",
    "site contributions",
)
#: Per-site metrics that are yes (1) or no (0): a simulated malicious site, mixed precision,
#: an update in the secure sum (``secagg_summed``, strategies/recording.py).
FLAG_METRICS = (MALICIOUS, MIXED_PRECISION_METRIC, "secagg_summed")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 0.8em; white-space: pre-wrap;
      overflow-wrap: anywhere; }
p.run { color: #555; margin-top: -0.5em; }
td.own { font-weight: bold; }
.ok { background: #e3f4e3; border: 1px solid #5a5; padding: 0.6em; }
.bad { background: #fbe3e3; border: 1px solid #c55; padding: 0.6em; }
.rejected { color: #b00; font-weight: bold; } .flagged { color: #b60; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value) or abs(value) >= 1e4 or value == int(value):
        return f"{value:.4g}"
    return f"{value:.4f}"


def _readable(metric: str, value: float | None) -> str:
    """A per-site value as a person reads it: the device's name (``cpu``, ``cuda:0``) for
    :data:`~fl_imaging.config.devices.DEVICE_METRIC`, ``yes``/``no`` for
    :data:`FLAG_METRICS`, else the number (:func:`_fmt`)."""
    if value is None or math.isnan(value):
        return "-"
    if metric == DEVICE_METRIC:
        return device_name(value)
    if metric in FLAG_METRICS and value in (0.0, 1.0):
        return "yes" if value else "no"
    return _fmt(value)


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; ``left`` first columns left-aligned; cells are escaped here."""

    def cells(tag: str, values: list[str]) -> str:
        opened = [f'<{tag} class="l">' if i < left else f"<{tag}>" for i in range(len(values))]
        return "".join(f"{o}{_e(v)}</{tag}>" for o, v in zip(opened, values, strict=True))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _png(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _csv_table(path: Path) -> str:
    with path.open(newline="") as handle:
        lines = list(csv.reader(handle))
    return _table(lines[0], lines[1:]) if lines else "<p>(empty)</p>"


def _guess_metric(rows: list[MetricRow]) -> str:
    present = {r.metric for r in rows}
    return next((m for m in ("dice", "accuracy", "auc", "val_loss") if m in present), "val_loss")


def _sites(rows: list[MetricRow]) -> list[str]:
    return sorted({r.site for r in rows if r.site != AGGREGATE_SITE})


def _outcome(verification: Verification | None) -> str:
    records = verification.records if verification else []
    start = next((r for r in records if r.get("event") == "run_start"), None)
    end = next((r for r in records if r.get("event") == "run_end"), None)
    parts = []
    if start:
        code = start.get("code") or {}
        version = f"fl-imaging {code.get('package', '?')}"
        if code.get("commit"):
            version += f" at commit {str(code['commit'])[:12]}"
            version += " (with local changes)" if code.get("dirty") else ""
        parts.append(
            f"started {start.get('time', '?')}; {version}; config sha256 "
            f"{str(start.get('config_sha256', ''))[:16]}..."
        )
    if end:
        reason = f": {end['reason']}" if end.get("reason") else ""
        parts.append(
            f"{end.get('status', '?')} after round {end.get('rounds_done', '?')} of "
            f"{end.get('rounds', '?')}{reason}"
        )
    return "".join(f"<p>{_e(p)}</p>" for p in parts)


def _audit_section(run_dir: Path, verification: Verification | None, missing: str) -> str:
    if verification is None:
        return f'<div class="bad">No audit log: {_e(missing)}</div>'
    if verification.ok:
        notes = "".join(f"<li>{_e(n)}</li>" for n in verification.notes)
        return (
            f'<div class="ok"><b>Audit chain verified</b> ({AUDIT_FILE}, '
            f"{len(verification.records)} records)<ul>{notes}</ul>Check it yourself: "
            f"<code>fl-imaging-audit verify {_e(run_dir)}</code></div>"
        )
    return f'<div class="bad"><b>Audit chain does NOT verify</b>: {_e(verification.problem)}</div>'


def _round_table(
    rows: list[MetricRow], metric: str, sites: list[str], records: list[dict[str, Any]]
) -> str:
    by_round: dict[int, dict[tuple[str, str], float]] = defaultdict(dict)
    for row in rows:
        by_round[row.round][(row.site, row.metric)] = row.value
    audit = {r["round"]: r for r in records if r.get("event") == "round"}
    header = ["round", "asked", "answered", "train loss", *(f"{metric} {s}" for s in sites)]
    header += [f"mean {metric}", "epsilon", "seconds"]
    lines = []
    for rnd in sorted(set(by_round) | set(audit)):
        values = by_round.get(rnd, {})
        per_site = [values.get((s, metric)) for s in sites]
        present = [v for v in per_site if v is not None and not math.isnan(v)]
        record = audit.get(rnd, {})
        lines.append(
            [
                str(rnd),
                str(len(record["asked"])) if "asked" in record else "-",
                str(len(record["answered"])) if "answered" in record else "-",
                _fmt(values.get((AGGREGATE_SITE, "train_loss"))),
                *(_fmt(v) for v in per_site),
                _fmt(sum(present) / len(present) if present else None),
                _fmt(values.get((AGGREGATE_SITE, "epsilon"))),
                _fmt(values.get((AGGREGATE_SITE, "round_seconds"))),
            ]
        )
    return _table(header, lines) if lines else "<p>No round finished.</p>"


def _verdicts(records: list[dict[str, Any]]) -> str:
    """Each round's update verdicts, as the audit log holds them (per-site norms only where the
    coordinator saw each update)."""
    rounds = [r for r in records if r.get("event") == "round"]
    if not rounds:
        return "<p>No round recorded.</p>"
    out = []
    for record in rounds:
        if "secure_sum" in record:
            summed = record["secure_sum"]
            dropped = ", ".join(summed.get("dropped", []))
            out.append(
                f"<p>Round {record['round']}: secure aggregation; the coordinator saw only the sum "
                f"of {_e(', '.join(summed.get('summed', [])) or 'no site')}"
                + (f"; dropped: {_e(dropped)}" if dropped else "")
                + "</p>"
            )
            continue
        items = []
        for update in record.get("updates", []):
            status = update.get("status", "?")
            norm = update.get("norm")
            text = f"{update.get('site')}: {status}" + (
                f" (norm {norm:.4g})" if isinstance(norm, int | float) else ""
            )
            reason = f" - {update['reason']}" if update.get("reason") else ""
            items.append(f'<span class="{_e(status)}">{_e(text + reason)}</span>')
        for failure in record.get("failures", []):
            items.append(
                f'<span class="rejected">{_e(failure["site"])}: {_e(failure["reason"])}</span>'
            )
        out.append(f"<p>Round {record['round']}: {'; '.join(items) or 'no reply'}</p>")
    return "".join(out)


def _site_results(rows: list[MetricRow], sites: list[str]) -> str:
    last: dict[tuple[str, str], tuple[int, float]] = {}
    for row in rows:
        if row.site != AGGREGATE_SITE and not row.metric.startswith(("bytes_", "update_")):
            if (row.site, row.metric) not in last or row.round >= last[(row.site, row.metric)][0]:
                last[(row.site, row.metric)] = (row.round, row.value)
    metrics = sorted({m for _, m in last})
    validation = [m for m in metrics if not m.startswith((*TEST_PREFIXES, "num_test"))]
    test = [m for m in metrics if m not in validation]
    parts = []
    for title, names in (("latest round (validation)", validation), ("test round", test)):
        if names:
            lines = [
                [s, *(_readable(m, last.get((s, m), (0, None))[1]) for m in names)] for s in sites
            ]
            parts.append(f"<h3>{_e(title)}</h3>" + _table(["site", *names], lines))
    return "".join(parts) or "<p>No per-site result.</p>"


def _cross_site_tables(path: Path, main_metric: str) -> str:
    """cross_site.csv as one matrix per metric (the main one first): a row per model (how it
    was made), a column per site that scored it (with its test cases), each site's own model
    at its own site in bold."""
    try:
        rows = read_cross_site(path)
    except (OSError, KeyError, ValueError) as err:
        return f"<p>{_e(path.name)} cannot be read: {_e(err)}</p>"
    if not rows:
        return f"<p>{_e(path.name)} holds no score.</p>"
    kinds = {r.model: r.kind for r in rows}
    cases = {r.site: r.cases for r in rows}
    metrics = sorted({r.metric for r in rows}, key=lambda m: (m != main_metric, m))
    out = []
    for metric in metrics:
        models, sites, values = cross_site_matrix(rows, metric)
        header = "".join(f"<th>{_e(s)} ({cases[s]} cases)</th>" for s in sites)
        body = ""
        for model in models:
            label = "global model" if model == GLOBAL_MODEL else kinds.get(model, model)
            cells = "".join(
                ('<td class="own">' if model == site else "<td>")
                + _e(_fmt(values.get((model, site))))
                + "</td>"
                for site in sites
            )
            body += f'<tr><td class="l">{_e(label)}</td>{cells}</tr>'
        out.append(
            f"<h3>test {_e(metric)}</h3>"
            f'<table><tr><th class="l">model</th>{header}</tr>{body}</table>'
        )
    return "".join(out)


def _epsilon_plot(rows: list[MetricRow]) -> str:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if "epsilon" in row.metric and not math.isnan(row.value):
            series[f"{row.metric} ({row.site})"].append((row.round, row.value))
    if not series:
        return "<p>No epsilon recorded (no differential privacy accounted in this run).</p>"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=90)
    finally:
        plt.close(fig)
    header = ["round", *sorted(series)]
    rounds = sorted({rnd for points in series.values() for rnd, _ in points})
    lines = [
        [str(rnd), *(_fmt(dict(series[k]).get(rnd)) for k in sorted(series))] for rnd in rounds
    ]
    return _png(buffer.getvalue(), "epsilon over rounds") + _table(header, lines)


def render_report(run_dir: Path, main_metric: str | None = None) -> str:
    """The HTML text of ``run_dir``'s report (see the module); ``main_metric`` is the task's
    main metric (None: dice, accuracy or AUC, whichever ``metrics.csv`` holds)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else []
    metric = main_metric or _guess_metric(rows)
    sites = _sites(rows)
    summary = _read(run_dir / "summary.txt")
    verification: Verification | None = None
    missing = ""
    try:
        verification = verify_run(run_dir)
    except AuditFileMissing as err:
        missing = str(err)
    records = verification.records if verification else []
    learn = [ln for ln in summary.splitlines() if ln.strip().lower().startswith(LEARN_PREFIXES)]
    failures = [ln for ln in summary.splitlines() if " failed: " in ln or "took part in no" in ln]
    tracking = json.loads(_read(run_dir / "tracking.json") or "{}")
    sections = [
        ("Outcome", _outcome(verification) or "<p>(no audit record of the outcome)</p>"),
        ("Audit chain", _audit_section(run_dir, verification, missing)),
        (
            "What each party could learn",
            "<ul>" + "".join(f"<li>{_e(ln)}</li>" for ln in learn) + "</ul>"
            if learn
            else "<p>(summary.txt says nothing about it)</p>",
        ),
        ("Rounds", _round_table(rows, metric, sites, records)),
        ("Update checks (audit log)", _verdicts(records)),
    ]
    if (run_dir / "curves.png").is_file():
        sections.append(("Curves", _png((run_dir / "curves.png").read_bytes(), "curves")))
    sections.append(("Per-site results", _site_results(rows, sites)))
    sections.append(("Privacy spent over rounds", _epsilon_plot(rows)))
    cross = ""
    if (run_dir / "cross_site.png").is_file():
        cross += _png((run_dir / "cross_site.png").read_bytes(), "cross-site evaluation")
    if (run_dir / "cross_site.csv").is_file():
        cross += _cross_site_tables(run_dir / "cross_site.csv", metric)
    if cross:
        sections.append(("Cross-site evaluation", cross))
    if (run_dir / "contributions.csv").is_file():
        sections.append(("Site contributions", _csv_table(run_dir / "contributions.csv")))
    statistics = statistics_section(run_dir)  # fl-imaging-data stats --out RUN_DIR
    if statistics:
        sections.append(("Federated statistics", statistics))
    sections.append(
        (
            "Failures",
            "<ul>" + "".join(f"<li>{_e(ln)}</li>" for ln in failures) + "</ul>"
            if failures
            else "<p>No site failed.</p>",
        )
    )
    where = tracking.get("where") or tracking.get("failed") or "not tracked (tracking=none)"
    sections.append(("Tracking", f"<p>{_e(where)}</p>"))
    sections.append(("Summary (summary.txt)", f"<pre>{_e(summary)}</pre>"))
    sections.append(("Config (config.yaml)", f"<pre>{_e(_read(run_dir / 'config.yaml'))}</pre>"))
    body = "".join(f'<h2 id="{_e(_slug(t))}">{_e(t)}</h2>{content}' for t, content in sections)
    name = run_folder_name(run_dir) or f"fl-imaging run {run_dir.name}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(name)} ({_e(run_dir.name)})</title><style>{_STYLE}</style></head><body>"
        f'<h1>{_e(name)}</h1><p class="run">fl-imaging run {_e(run_dir.name)}, in '
        f"{_e(run_dir)}</p>{body}</body></html>\n"
    )


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def write_report(run_dir: Path, main_metric: str | None = None) -> Path:
    """Write ``run_dir/report.html`` (:func:`render_report`) atomically; returns its path.
    Raises ``OSError`` when it cannot be written."""
    text = render_report(run_dir, main_metric).encode()
    return write_atomically(Path(run_dir) / REPORT_FILE, lambda handle: handle.write(text))
