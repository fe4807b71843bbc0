"""Score a finished cell's final model on every site's test cases at once (benchmarks only).

Published figures for a public dataset (MedMNIST v2's AUC and accuracy, for one) are computed
over its whole test split, not averaged over sites; a site's share may even hold one class only,
where its AUC is undefined. So besides the per-site figures a benchmark scores each cell's final
model on the union of the sites' test cases: the pooled or federated global model
(``model.pt``), or, for the local baseline, each site's own model (``models/SITE.pt``), averaged.
FedBN cells have no single model (each site keeps its own normalisation layers, which never leave
it), so they get none. This is ours: neither Flower nor MONAI scores a federation's model on
pooled test data, which only a benchmark on public data may do. Results are cached in the
cell's ``whole_test.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from fl_imaging.config import RunConfig
from fl_imaging.data.sites import Case
from fl_imaging.review.results import load_weights
from fl_imaging.training.site_training import SiteTrainer

__all__ = ["ALL_TEST_CASES_FILE", "all_test_cases_metrics"]

log = logging.getLogger("fl_imaging.bench")

#: The cell's cache of these figures.
ALL_TEST_CASES_FILE = "whole_test.json"


def _model_files(folder: Path, kind: str) -> list[Path]:
    if kind == "local":
        return sorted((folder / "models").glob("*.pt"))
    return [folder / "model.pt"]


def all_test_cases_metrics(cfg: RunConfig, folder: Path, kind: str) -> dict[str, float]:
    """The test metrics (task metric -> value, ``loss`` included) of the final model(s) of the
    finished cell in ``folder`` (run with ``cfg``; ``kind`` ``pooled``, ``local`` or
    ``federated``) over every site's test cases together; the mean over site models for
    ``local``. Empty for FedBN cells and when the sites hold no test cases. Read from the
    cell's ``whole_test.json`` when there, else computed and written there.
    """
    cached = folder / ALL_TEST_CASES_FILE
    if cached.is_file():
        saved = json.loads(cached.read_text())
        return {k: math.nan if v is None else float(v) for k, v in saved.items()}
    metrics = {} if cfg.strategy.fedbn and kind == "federated" else _score(cfg, folder, kind)
    cached.write_text(json.dumps({k: (None if math.isnan(v) else v) for k, v in metrics.items()}))
    return metrics


#: Every site's test cases by data config: the same for each seed and method of a setup, so the
#: sites are checked once per setup, not once per cell.
_TEST_CASES: dict[str, list[Case]] = {}


def _test_cases(cfg: RunConfig) -> list[Case]:
    from fl_imaging.data.prepare import prepare_sites

    key = f"{cfg.task.name.value} {cfg.data!r}"
    if key not in _TEST_CASES:
        _, sites, _ = prepare_sites(cfg)
        _TEST_CASES[key] = [case for site in sites for case in site.test]
    return _TEST_CASES[key]


def _score(cfg: RunConfig, folder: Path, kind: str) -> dict[str, float]:
    from fl_imaging.config.devices import site_device
    from tasks import build_task

    cases = _test_cases(cfg)
    files = _model_files(folder, kind)
    if not cases:
        return {}
    missing = [str(f) for f in files if not f.is_file()]
    if not files:  # a local cell without its sites' models
        missing = [str(folder / "models" / "SITE.pt")]
    if missing:
        raise FileNotFoundError(
            f"cell {folder} is marked done but lacks {', '.join(missing)}: rerun it (delete "
            "its cell.json)"
        )
    task = build_task(cfg.task, site_device(cfg.task, "benchmark scoring"))
    scorer = SiteTrainer("all sites", [], [], task, batch_size=1, test_cases=cases)
    per_model = []
    for path in files:
        scorer.load_state(load_weights(path))  # WeightsFileError: one line naming the file
        per_model.append(scorer.evaluate("test"))
    log.info("%s: %d model(s) scored on all %d test cases", folder, len(files), len(cases))
    return {k: sum(m[k] for m in per_model) / len(per_model) for k in per_model[0]}
