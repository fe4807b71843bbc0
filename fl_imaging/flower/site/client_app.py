"""Flower ClientApp: one hospital site trains and evaluates the global model on its own data.

Each site reads only its own folder: the one given by its SuperNode's ``--node-config
data-dir=...`` (deployment) or, in simulation, the entry of ``data.sites`` at its partition id.
Its trainer (:mod:`fl_imaging.training.site_training`) is kept between rounds; weights travel as
NumPy
arrays (``ArrayRecord``), clipped, masked or compressed on the way out (:mod:`.outgoing_update`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fl_imaging.config import RunConfig
from fl_imaging.config.devices import device_metrics
from fl_imaging.console.events import EPOCH, Progress, progress_extra
from fl_imaging.console.site_lines import send_site_lines
from fl_imaging.flower.app_config import resolve_config
from fl_imaging.flower.packed_arrays import packed_arrays_mod
from fl_imaging.flower.protocol import (
    CONTROL_DELTA,
    EVAL_SPLIT,
    EVALUATE_GLOBAL,
    FINETUNE_EPOCHS,
    LOCAL_EPOCHS,
    MALICIOUS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SERVER_ROUND,
    site_errors,
    site_reply,
)
from fl_imaging.flower.site.control_variates import SITE_CONTROL, SiteControl
from fl_imaging.flower.site.gate import gated_reply
from fl_imaging.flower.site.local_norms import restore_local_norms, save_local_norms
from fl_imaging.flower.site.outgoing_update import outgoing_update
from fl_imaging.flower.site.personal_model import personal_scores, train_personal_model
from fl_imaging.flower.site.queries import SITE_QUERIES, secagg_guard
from fl_imaging.he.site import open_global_model
from fl_imaging.privacy.site_dp import patient_metrics, site_privacy
from fl_imaging.site.setup import SiteSetup
from fl_imaging.training.attacks import SimulatedAttack, site_attack
from fl_imaging.training.control_variates import local_step_size
from fl_imaging.training.site_costs import EVALUATE_SECONDS, FIT_SECONDS, timed_metrics
from fl_imaging.training.site_training import (
    SiteRef,
    SiteTrainer,
    SiteTrainers,
    finetune_seed,
    personal_seed,
    process_trainers,
    proximal_term,
    training_seed,
)

__all__ = ["app", "build_client_app"]

log = logging.getLogger("fl_imaging.client")


class SimulatedDropout(RuntimeError):
    """A simulated site fails its training round (``attack=dropout``)."""


def _evaluation(trainer: SiteTrainer, settings: ConfigRecord, seed: int = 0) -> dict[str, float]:
    """The site's scores (:meth:`SiteTrainer.scores`: validation, or ``split=test`` in
    ``settings``) and the number of cases scored (``num-examples``)."""
    epochs = int(settings.get(FINETUNE_EPOCHS, 0))
    metrics, cases = trainer.scores(str(settings.get(EVAL_SPLIT, "val")), epochs, seed=seed)
    return {**metrics, NUM_EXAMPLES: cases}


def _round(msg: Message) -> int:
    """The round a message belongs to (its ``server-round``, else its group id, else 0)."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if config is not None and SERVER_ROUND in config:
        return int(config[SERVER_ROUND])  # type: ignore[arg-type]
    group = str(msg.metadata.group_id)
    return int(group) if group.isdigit() else 0


def _epoch_lines(site: str, node: int, rnd: int, epochs: int) -> Callable[[str], None]:
    """The training's line logger of ``site`` (Flower node ``node``) in round ``rnd``: each line
    (one per epoch) logged with its progress event, epoch 1, 2, ... of ``epochs``."""
    done = itertools.count(1)

    def line(text: str) -> None:
        event = Progress(EPOCH, rnd, site=site, node=node, epoch=next(done), epochs=epochs)
        log.info("[site %s] round %d %s", site, rnd, text, extra=progress_extra(event))

    return line


def build_client_app(
    config: RunConfig | None = None,
    trainers: SiteTrainers | None = None,
    site_lines: Path | None = None,
) -> ClientApp:
    """Return a ClientApp bound to ``config`` (simulation), or reading it from run_config (None),
    taking its site trainers from ``trainers`` (default: the process's, :func:`process_trainers`,
    looked up at each message: Ray hands every message a copy of the app). Every message passes
    the site's own policy and record (:mod:`.site_gate`). What happens to a
    reply before it leaves (client-side DP, masking, compression): :mod:`.outgoing_update`;
    DP-SGD: :mod:`fl_imaging.privacy.site_dp`. ``site_lines``: the run's folder for its sites'
    log lines (simulation, :func:`~fl_imaging.console.site_lines.send_site_lines`); without
    it, a site's lines go to stderr (a SuperNode's log)."""
    client = ClientApp(mods=[packed_arrays_mod])  # arrays travel packed (.packed_arrays)

    def site_trainer(
        context: Context, cfg: RunConfig, site: SiteRef, global_state: dict
    ) -> tuple[SiteTrainer, SimulatedAttack | None]:
        """``site``'s trainer holding ``global_state`` (with FedBN, the site's own normalisation
        layers on top), and the attack it plays in a simulation (or None)."""
        send_site_lines(site_lines, log)
        attack = site_attack(cfg, site.index, site.simulated)
        cache = process_trainers() if trainers is None else trainers
        trainer = cache.get(cfg, site, attack.label_transforms() if attack else ())
        trainer.load_state(global_state)
        if cfg.strategy.fedbn:
            restore_local_norms(trainer.model, context)
        return trainer, attack

    def train_site(msg: Message, context: Context, cfg: RunConfig, site: SiteRef) -> Message:
        """Train on the received global model; reply with the new weights and the training
        metrics (and, with one message per round, the evaluation of the model received)."""
        global_state = msg.content["arrays"].to_torch_state_dict()
        trainer, attack = site_trainer(context, cfg, site, global_state)
        settings = msg.content["config"]
        rnd = int(settings.get(SERVER_ROUND, 0))
        evaluated = settings.get(EVALUATE_GLOBAL, False) and rnd > 1
        previous = _evaluation(trainer, ConfigRecord()) if evaluated else None
        mu = float(settings.get(PROXIMAL_MU, 0.0))
        if attack is not None and attack.drops_out(rnd):
            raise SimulatedDropout(f"simulated dropout in round {rnd} (attack=dropout)")
        setup = SiteSetup.of(dict(context.node_config), cfg, site)
        privacy = site_privacy(setup, cfg, trainer, settings, int(msg.metadata.run_id))  # DP-SGD
        epochs = int(settings.get(LOCAL_EPOCHS, cfg.task.local_epochs))
        control = SiteControl.of(msg, context, trainer.model)  # SCAFFOLD, else None
        extra_loss = proximal_term(global_state, mu) if mu > 0 else None
        with timed_metrics(FIT_SECONDS) as costs:  # the site's own seconds and peak memory
            result = (trainer.fit if privacy is None else privacy.fit)(
                epochs,
                seed=training_seed(cfg.seed, rnd, site.index),
                extra_loss=control.correction if control is not None else extra_loss,
                log=_epoch_lines(site.name, int(context.node_id), rnd, epochs),
            )
        if cfg.strategy.fedbn:
            save_local_norms(trainer.model, context)
        state = trainer.state() if result.num_samples else global_state  # 0: did not train
        delta = None
        if control is not None:
            lr, note = local_step_size(trainer.task.optimizer(trainer.model))
            if note and SITE_CONTROL not in context.state.array_records:  # once per run
                log.warning("[site %s] %s", site.name, note)
            delta = control.finish(context, global_state, state, lr)
        personal = train_personal_model(  # Ditto: the personal model, after the global one
            trainer, context, global_state, settings, seed=personal_seed(cfg.seed, rnd, site.index)
        )
        if personal is not None:
            log.info(
                "[site %s] round %d personal model (Ditto): loss %.4f",
                site.name,
                rnd,
                personal.loss,
            )
        if attack is not None:
            state = attack.poison(global_state, state, rnd, site.name)
        metrics = {
            "train_loss": result.loss,
            NUM_EXAMPLES: result.num_samples,
            MALICIOUS: int(attack is not None),
            **device_metrics(trainer.task.device, trainer.task.amp),  # for the summary
            **costs,
        }
        metrics = patient_metrics(privacy, metrics)
        reply = site_reply(msg, site.name, metrics, ArrayRecord(state), previous)
        if delta is not None:
            reply.content[CONTROL_DELTA] = delta
        return reply

    def train(msg: Message, context: Context, cfg: RunConfig, site: SiteRef) -> Message:
        return outgoing_update(
            msg,
            context,
            cfg,
            lambda m, c: train_site(m, c, cfg, site),
            lambda: secagg_guard(context, cfg, site),
            lambda: SiteSetup.of(dict(context.node_config), cfg, site),
        )

    def evaluate(msg: Message, context: Context, cfg: RunConfig, site: SiteRef) -> Message:
        global_state = msg.content["arrays"].to_torch_state_dict()
        trainer, _ = site_trainer(context, cfg, site, global_state)
        settings = msg.content.config_records.get("config", ConfigRecord())
        with timed_metrics(EVALUATE_SECONDS) as costs:
            metrics = _evaluation(trainer, settings, finetune_seed(cfg.seed, site.index))
            if settings.get(EVAL_SPLIT) == "test":  # Ditto: the personal model too
                metrics.update(personal_scores(trainer, context))
        return site_reply(msg, site.name, {**metrics, **costs})

    def for_site(handler: Callable[..., Message]) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            cfg = resolve_config(config, context)
            site = SiteRef.of_node(context.node_config, cfg.data.sites)
            with site_errors(site.name):  # a failure names the site in the error reply
                setup = SiteSetup.of(dict(context.node_config), cfg, site)

                def answer() -> Message:
                    # homomorphic encryption: the global model arrives encrypted (he.site)
                    opened = open_global_model(msg, setup, cfg, _round(msg))
                    return handler(opened, context, cfg, site)

                return gated_reply(setup, msg, cfg, answer)

        return handle

    client.train()(for_site(train))
    client.evaluate()(for_site(evaluate))
    for action, handler in SITE_QUERIES.items():  # secure aggregation's stages, scoring
        client.query(action)(for_site(handler))
    return client


#: The ClientApp for deployment (``flower-supernode``): config comes in run_config.
app = build_client_app()
