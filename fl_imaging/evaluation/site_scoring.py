"""A site's side of cross-site evaluation and of contribution estimation: fine-tune a copy of
the final model and send it back, and score models sent by the coordinator on the site's own
test or validation cases, replying with the scores only.

Two Flower query messages (``query.<action>``), registered in the ClientApp through
:data:`fl_imaging.flower.site.queries.SITE_QUERIES`:

- ``FINETUNE_ACTION``: ``arrays`` (the final global model) and ``config`` with
  ``finetune-epochs``; the site fine-tunes a copy on its training cases exactly as its test
  round does (same seed, same epochs: the same weights) and replies with it (``arrays``) and its
  number of training cases. This reply is a site model in the clear: the coordinator and, in
  cross-site evaluation, every other site receive it.
- ``SCORE_ACTION``: one ``ArrayRecord`` per model, keyed ``model:<label>``, and ``config`` with
  ``split`` (``test`` or ``val``) and ``site-norms`` (the labels of global models, to which a
  FedBN site applies its own normalisation layers as in every round); the site scores each model
  on its cases of that split and replies with one ``MetricRecord`` per model, keyed
  ``scores:<label>`` (the task's metrics: ``dice``, ``dice_<k>``, ``loss`` or ``accuracy``,
  ``auc``, ``loss``), and ``num-examples``, the cases scored (0: none, and no scores).

The site's trainer (and its cached cases) is the one its training used; its model is put back
afterwards.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord

from fl_imaging.config import RunConfig
from fl_imaging.flower.protocol import EVAL_SPLIT, FINETUNE_EPOCHS, NUM_EXAMPLES, site_reply
from fl_imaging.flower.site.local_norms import restore_local_norms
from fl_imaging.training.attacks import site_attack
from fl_imaging.training.site_training import SiteRef, SiteTrainer, finetune_seed, process_trainers

__all__ = [
    "FINETUNE_ACTION",
    "MODEL_PREFIX",
    "SCORES_PREFIX",
    "SCORE_ACTION",
    "SITE_NORMS",
    "finetuned_model",
    "score_models",
]

log = logging.getLogger("fl_imaging.client")

#: Query actions (message types ``query.<action>``).
FINETUNE_ACTION = "finetuned_model"
SCORE_ACTION = "score_models"
#: Keys of the models in a score message and of their scores in the reply.
MODEL_PREFIX = "model:"
SCORES_PREFIX = "scores:"
#: Config key: labels of the global models (a FedBN site puts its own normalisation layers in).
SITE_NORMS = "site-norms"


def _trainer(cfg: RunConfig, site: SiteRef) -> SiteTrainer:
    """The site's trainer from this process's cache (built as the ClientApp builds it)."""
    attack = site_attack(cfg, site.index, site.simulated)
    return process_trainers().get(cfg, site, attack.label_transforms() if attack else ())


def finetuned_model(msg: Message, context: Context, cfg: RunConfig, site: SiteRef) -> Message:
    """``FINETUNE_ACTION``: the received global model (with FedBN, the site's own normalisation
    layers in it) fine-tuned ``finetune-epochs`` epochs on the site's training cases with the
    test round's seed (:func:`~fl_imaging.training.site_training.finetune_seed`). Replies with its
    weights (``arrays``) and ``num-examples`` (training cases); the trainer's model is put back."""
    trainer = _trainer(cfg, site)
    kept = trainer.state()
    trainer.load_state(msg.content["arrays"].to_torch_state_dict())
    if cfg.strategy.fedbn:
        restore_local_norms(trainer.model, context)
    epochs = int(msg.content["config"][FINETUNE_EPOCHS])
    trainer.fit(epochs, seed=finetune_seed(cfg.seed, site.index))
    tuned = trainer.state()
    trainer.load_state(kept)
    log.info("[site %s] fine-tuned the final model %d epoch(s) for cross-site", site.name, epochs)
    return site_reply(msg, site.name, {NUM_EXAMPLES: trainer.num_train}, ArrayRecord(tuned))


def score_models(msg: Message, context: Context, cfg: RunConfig, site: SiteRef) -> Message:
    """``SCORE_ACTION``: score every ``model:<label>`` of ``msg`` on the site's cases of the
    config's ``split`` (test or validation); reply with ``scores:<label>`` metric records and
    ``num-examples`` (a site without such cases replies 0 and no scores, and logs it)."""
    settings = msg.content.config_records.get("config", ConfigRecord())
    split = str(settings.get(EVAL_SPLIT, "val"))
    own_norms = {str(label) for label in settings.get(SITE_NORMS, [])}
    trainer = _trainer(cfg, site)
    cases = trainer.num_test if split == "test" else trainer.num_val
    reply = site_reply(msg, site.name, {NUM_EXAMPLES: cases})
    if cases == 0:
        log.warning("[site %s] has no %s cases: no model scored", site.name, split)
        return reply
    kept = trainer.state()
    models = {
        key.removeprefix(MODEL_PREFIX): record
        for key, record in msg.content.array_records.items()
        if key.startswith(MODEL_PREFIX)
    }
    for label, record in models.items():
        trainer.load_state(record.to_torch_state_dict())
        if cfg.strategy.fedbn and label in own_norms:
            restore_local_norms(trainer.model, context)
        reply.content[SCORES_PREFIX + label] = MetricRecord(trainer.evaluate(split))
    trainer.load_state(kept)
    log.info("[site %s] scored %d model(s) on %d %s cases", site.name, len(models), cases, split)
    return reply
