"""Flower ClientApp: one hospital site trains and evaluates the global model on its own data.

Each site reads only its own folder: the one given by its SuperNode's ``--node-config
data-dir=...`` (deployment) or, in simulation, the entry of ``data.sites`` at its partition id.
Weights travel as NumPy arrays inside an ``ArrayRecord``; ``num-examples`` counts cases.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from fl_imaging.attacks import flipped_labels, malicious_sites, poison_state
from fl_imaging.config import AttackName, DPMode, RunConfig
from fl_imaging.data.sites import load_site
from fl_imaging.flower.local_norms import restore_local_norms, save_local_norms
from fl_imaging.flower.protocol import (
    EVAL_SPLIT,
    EVALUATE_GLOBAL,
    FINETUNE_EPOCHS,
    GLOBAL_EVAL,
    LOCAL_EPOCHS,
    MALICIOUS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SERVER_ROUND,
    SITE_NAME,
    SITE_RECORD,
    UNIT_WEIGHT,
    resolve_config,
)
from fl_imaging.site_training import SiteTrainer, finetune_seed, training_seed
from tasks import build_task
from tasks.base import ExtraLoss

__all__ = ["app", "build_client_app", "is_malicious", "site_of"]

log = logging.getLogger("fl_imaging.client")

#: Flower's client-side DP mods, applied to training replies of the matching DP mode.
CLIENT_DP_MODS = {
    DPMode.client_fixed: fixedclipping_mod,
    DPMode.client_adaptive: adaptiveclipping_mod,
}

#: Trainers kept for the life of the process (a Ray actor or a long-lived ClientApp process), so
#: that volumes are decoded once, not once per round. Keyed by (config text, site folder); those
#: of other configs (earlier runs) are dropped when a new run's first trainer is built.
_TRAINERS: dict[tuple[str, str], SiteTrainer] = {}


def site_of(context: Context, cfg: RunConfig) -> tuple[str, Path, int]:
    """Return this node's (site name, data folder, site index) from its node_config.

    Deployment: ``data-dir`` (and optional ``site-name``) given to ``flower-supernode``.
    Simulation: ``partition-id`` indexes ``data.sites``.
    """
    node = context.node_config
    if "data-dir" in node:
        path = Path(str(node["data-dir"]))
        return str(node.get("site-name", path.name)), path, int(node.get("site-index", 0))
    index = int(node["partition-id"])
    path = Path(cfg.data.sites[index])
    return path.name, path, index


def _ensure_logging() -> None:
    """Ray actors and ClientApp processes start without logging set up: show our progress."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _trainer(context: Context, cfg: RunConfig) -> SiteTrainer:
    name, path, index = site_of(context, cfg)
    key = (repr(cfg), str(path))
    if key not in _TRAINERS:
        for stale in [k for k in _TRAINERS if k[0] != key[0]]:
            del _TRAINERS[stale]  # an earlier run's site: free its cached volumes
        _ensure_logging()
        start = time.perf_counter()
        threads = cfg.engine.torch_threads or cfg.engine.cpus_per_client
        torch.set_num_threads(threads)
        site = load_site(
            path,
            cfg.task.name.value,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.seed + index,
            name=name,
            class_names=list(cfg.task.class_names) or None,
        )
        flips = is_malicious(context, cfg) and cfg.attack.name == AttackName.labelflip
        _TRAINERS[key] = SiteTrainer(
            name,
            site.train,
            site.val,
            build_task(cfg.task),
            batch_size=cfg.task.batch_size,
            cache=cfg.data.cache,
            label_transforms=[flipped_labels(cfg.task.num_classes)] if flips else [],
            test_cases=site.test,
        )
        log.info(
            "[site %s] %d training, %d validation and %d test cases from %s ready in %.1f s",
            name,
            len(site.train),
            len(site.val),
            len(site.test),
            path,
            time.perf_counter() - start,
        )
    return _TRAINERS[key]


def is_malicious(context: Context, cfg: RunConfig) -> bool:
    """True when this node plays a simulated malicious site (``attack=...``, simulation only)."""
    if cfg.attack.name == AttackName.none or "partition-id" not in context.node_config:
        return False
    return site_of(context, cfg)[2] in malicious_sites(len(cfg.data.sites), cfg.attack)


def _reply(
    msg: Message, trainer: SiteTrainer, metrics: dict[str, float], arrays: dict | None
) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord({**metrics, UNIT_WEIGHT: 1}),
            SITE_RECORD: ConfigRecord({SITE_NAME: trainer.name}),
        }
    )
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)


def _proximal_term(global_state: dict[str, torch.Tensor], mu: float) -> ExtraLoss:
    """FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` over the trainable parameters."""
    anchors = {k: v.detach().clone() for k, v in global_state.items()}

    def term(model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for name, param in model.named_parameters():
            if param.requires_grad:
                total = total + ((param - anchors[name].to(param.device)) ** 2).sum()
        return 0.5 * mu * total

    return term


def _train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train on the received global model; reply with the new weights and the training metrics.

    Applies FedProx's proximal term when the strategy sends ``proximal-mu``, and a simulated
    attack when this site is malicious.
    """
    trainer = _trainer(context, cfg)
    global_state = msg.content["arrays"].to_torch_state_dict()
    _load_global(trainer, global_state, context, cfg)
    settings = msg.content["config"]
    rnd = int(settings.get(SERVER_ROUND, 0))
    evaluation = _evaluation(trainer) if settings.get(EVALUATE_GLOBAL, False) and rnd > 1 else None
    epochs = int(settings.get(LOCAL_EPOCHS, cfg.task.local_epochs))
    mu = float(settings.get(PROXIMAL_MU, 0.0))
    _, _, index = site_of(context, cfg)
    result = trainer.fit(
        epochs,
        seed=training_seed(cfg.seed, rnd, index),
        extra_loss=_proximal_term(global_state, mu) if mu > 0 else None,
        log=lambda line: log.info("[site %s] round %d %s", trainer.name, rnd, line),
    )
    if cfg.strategy.fedbn:
        save_local_norms(trainer.model, context)
    state = trainer.state()
    malicious = is_malicious(context, cfg)
    if malicious:
        state = poison_state(global_state, state, cfg.attack, rnd, cfg.seed, site=index)
        log.info(
            "[site %s] round %d: sends a %s update (simulated attack)",
            trainer.name,
            rnd,
            cfg.attack.name.value,
        )
    metrics = {
        "train_loss": result.loss,
        NUM_EXAMPLES: result.num_samples,
        MALICIOUS: int(malicious),
    }
    reply = _reply(msg, trainer, metrics, arrays=state)
    if evaluation is not None:
        reply.content[GLOBAL_EVAL] = ConfigRecord(evaluation)
    return reply


def _load_global(
    trainer: SiteTrainer, state: dict[str, torch.Tensor], context: Context, cfg: RunConfig
) -> None:
    """Load the global weights; with FedBN, the site's own normalisation layers on top."""
    trainer.load_state(state)
    if cfg.strategy.fedbn:
        restore_local_norms(trainer.model, context)


def _test_evaluation(trainer: SiteTrainer, finetune_epochs: int, seed: int) -> dict[str, float]:
    """The final model's metrics on the site's test cases (``test_<metric>``) and, when
    ``finetune_epochs`` > 0, those of a copy fine-tuned that many epochs on the site's training
    cases (``finetuned_<metric>``; personalisation); ``num-examples`` = test cases (0: none)."""
    metrics = trainer.test_metrics(finetune_epochs, seed=seed)
    if not metrics:
        log.warning("[site %s] has no test cases: nothing to score in the test round", trainer.name)
    metrics[NUM_EXAMPLES] = trainer.num_test
    return metrics


def _evaluation(trainer: SiteTrainer) -> dict[str, float]:
    """The site's validation metrics of its current model (``val_loss``, the task's metrics) and
    the number of validation cases (``num-examples``)."""
    metrics = {("val_loss" if k == "loss" else k): v for k, v in trainer.evaluate().items()}
    metrics[NUM_EXAMPLES] = trainer.num_val
    return metrics


def build_client_app(config: RunConfig | None = None) -> ClientApp:
    """Return a ClientApp bound to ``config`` (simulation), or reading it from run_config (None).

    Client-side DP (``strategy.dp.mode=client_*``) runs training through Flower's
    ``fixedclipping_mod`` / ``adaptiveclipping_mod``, which clip the update before it leaves.
    """
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = resolve_config(config, context)
        mod = CLIENT_DP_MODS.get(cfg.strategy.dp.mode)
        if mod is None:
            return _train(msg, context, cfg)
        return mod(msg, context, lambda m, c: _train(m, c, cfg))

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = resolve_config(config, context)
        trainer = _trainer(context, cfg)
        _load_global(trainer, msg.content["arrays"].to_torch_state_dict(), context, cfg)
        settings = msg.content.config_records.get("config", ConfigRecord())
        if settings.get(EVAL_SPLIT, "val") == "test":
            epochs = int(settings.get(FINETUNE_EPOCHS, 0))
            index = site_of(context, cfg)[2]
            metrics = _test_evaluation(trainer, epochs, seed=finetune_seed(cfg.seed, index))
            return _reply(msg, trainer, metrics, arrays=None)
        return _reply(msg, trainer, _evaluation(trainer), arrays=None)

    return client


#: The ClientApp for deployment (``flower-supernode``): config comes in run_config.
app = build_client_app()
