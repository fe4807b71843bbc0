"""A site's side of Ditto (``strategy=ditto``): its personal model, kept in its Flower context
between rounds, trained after the global model with Ditto's regulariser, and scored on the
site's test cases beside the global model.

The personal model lives in ``context.state`` (a ``RecordDict`` Flower keeps per site and per
run, in simulation and in deployment, as compression's residual does), never in a reply: it
does not leave the site; only its test scores do (``personal_<metric>``). It starts as the
first global model the site receives; a resumed run is a new Flower run, whose sites start
again from the global model they receive. The regulariser is FedProx's term
(:func:`~fl_imaging.training.site_training.proximal_term`) with Ditto's ``lambda``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from fl_imaging.flower.protocol import DITTO_EPOCHS, DITTO_LAMBDA
from fl_imaging.training.site_training import SiteTrainer, proximal_term
from tasks.base import TrainResult

__all__ = ["PERSONAL_MODEL", "PERSONAL_PREFIX", "personal_scores", "train_personal_model"]

#: Key of the site's personal model (an ArrayRecord of its state dict) in ``context.state``.
PERSONAL_MODEL = "ditto-personal-model"
#: Prefix of the personal model's test metrics (``personal_dice`` beside ``test_dice``).
PERSONAL_PREFIX = "personal_"


def train_personal_model(
    trainer: SiteTrainer,
    context: Context,
    global_state: dict[str, torch.Tensor],
    settings: ConfigRecord,
    *,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> TrainResult | None:
    """When ``settings`` (the round's train config) carries Ditto's ``lambda``, train the site's
    personal model (from ``context.state``, or ``global_state`` in its first round) for the
    epochs it says with ``lambda / 2 * ||v - global_state||^2`` added to the loss, shuffled
    with ``seed``, and keep it in ``context.state``. Leaves ``trainer.model`` holding the
    personal weights: read the global reply's weights before. Returns the personal training's
    result, or None when ``settings`` asks for none."""
    if DITTO_LAMBDA not in settings:
        return None
    lam = float(settings[DITTO_LAMBDA])  # type: ignore[arg-type]
    epochs = int(settings.get(DITTO_EPOCHS, 1))  # type: ignore[arg-type]
    record = context.state.array_records.get(PERSONAL_MODEL)
    trainer.load_state(record.to_torch_state_dict() if record is not None else global_state)
    extra = proximal_term(global_state, lam) if lam > 0 else None
    result = trainer.fit(epochs, seed=seed, extra_loss=extra, log=log)
    context.state[PERSONAL_MODEL] = ArrayRecord(trainer.state())
    return result


def personal_scores(trainer: SiteTrainer, context: Context) -> dict[str, float]:
    """The site's personal model scored on its test cases (``personal_<metric>``), the
    trainer's model put back afterwards; empty without a personal model (the site never
    trained with Ditto) or without test cases."""
    record = context.state.array_records.get(PERSONAL_MODEL)
    if record is None or trainer.num_test == 0:
        return {}
    current = trainer.state()
    trainer.load_state(record.to_torch_state_dict())
    try:
        scores = trainer.evaluate("test")
    finally:
        trainer.load_state(current)
    return {f"{PERSONAL_PREFIX}{name}": value for name, value in scores.items()}
