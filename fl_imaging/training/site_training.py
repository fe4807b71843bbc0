"""One site's training and evaluation: its cases, decoded once and cached, and a task's model.

This is where site data meets a task. The Flower ClientApp gets one :class:`SiteTrainer` per site
from :class:`SiteTrainers`, which keeps it between rounds, so volumes are decoded once per
process, not once per round. FedProx's proximal term (:func:`proximal_term`) is added to the
loss here. The centralised baseline uses the same class on the pooled cases of all sites.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose

from fl_imaging.config import RunConfig
from fl_imaging.config.devices import site_device
from fl_imaging.data.prepare import checked_cases, excluded_of
from fl_imaging.data.sites import (
    Case,
    SiteDataError,
    class_folder_names,
    find_cases,
    load_site,
)
from tasks import build_task
from tasks.base import ExtraLoss, ImagingTask, TrainResult

__all__ = [
    "SiteRef",
    "SiteTrainer",
    "SiteTrainers",
    "build_site_trainer",
    "finetune_seed",
    "personal_seed",
    "process_trainers",
    "proximal_term",
    "site_cases",
    "training_seed",
]

log = logging.getLogger("fl_imaging.client")


def training_seed(seed: int, rnd: int, site: int) -> int:
    """The seed of one site's local training in round (or pooled pass) ``rnd``: distinct for
    every (run seed, round, site index), the same in every engine and baseline."""
    return seed * 100_003 + rnd * 1_009 + site


def personal_seed(seed: int, rnd: int, site: int) -> int:
    """The seed of site ``site``'s training of its personal model (Ditto) in round ``rnd``:
    distinct from its :func:`training_seed` of the same round."""
    return training_seed(seed, rnd, site) + 50_021


def finetune_seed(seed: int, site: int) -> int:
    """The seed of site ``site``'s fine-tuning of the final model (personalisation)."""
    return seed * 100_003 + 7_919 + site


class SiteTrainer:
    """Model, cached datasets and loops of one site (or of a pooled set of cases).

    Takes the site name (for messages), its training and validation cases, the task, the batch
    size, whether to cache decoded volumes in memory (MONAI ``CacheDataset``), transforms
    applied to training labels after decoding (e.g. a simulated label-flipping attack), its
    held-out test cases (scored only by :meth:`evaluate` with ``split="test"``) and
    ``decoded_cache``: with ``cache``, a folder where the output of the task's loading transforms
    is also kept on disk (MONAI ``PersistentDataset``, read back with
    ``torch.load(weights_only=True)``), so that the processes of one simulation that serve the
    same site decode each case once between them (None: each process decodes what it serves).
    """

    def __init__(
        self,
        name: str,
        train_cases: Sequence[Case],
        val_cases: Sequence[Case],
        task: ImagingTask,
        *,
        batch_size: int,
        cache: bool = True,
        label_transforms: Sequence[Callable] = (),
        test_cases: Sequence[Case] = (),
        decoded_cache: Path | None = None,
    ) -> None:
        self.name = name
        self.task = task
        self.model = task.build_model()
        self.batch_size = batch_size
        self.decoded_cache = decoded_cache
        #: Cases read back from ``decoded_cache`` (decoded by another process of the run).
        self.cases_reused = 0
        # Flat lists, so that CacheDataset caches everything before the first random transform.
        self.loading = Compose(list(task.load_transforms().transforms))
        self.train_after = [*label_transforms, *task.train_transforms().transforms]
        self.eval_after = list(task.eval_transforms().transforms)
        self.train_transform = Compose([*self.loading.transforms, *self.train_after])
        self.eval_transform = Compose([*self.loading.transforms, *self.eval_after])
        try:
            self.train_data = self._dataset(train_cases, self.train_after, cache)
            self.val_data = self._dataset(val_cases, self.eval_after, cache)
            self.test_data = self._dataset(test_cases, self.eval_after, cache)
        except Exception as err:  # MONAI wraps reader errors; name the site and the cause
            raise SiteDataError(
                f"[site {self.name}] could not decode its volumes: {err}. Run "
                "`fl-imaging-data inspect` on the site folder to find the broken file."
            ) from err

    def _dataset(self, cases: Sequence[Case], after: list[Callable], cache: bool) -> Dataset:
        """The dataset of ``cases``: the task's loading transforms, then ``after``. With
        ``cache``, decoded once into memory (through the shared ``decoded_cache`` folder when
        there is one); without, decoded at every access."""
        items = [case.as_dict() for case in cases]
        if self.decoded_cache is None or not cache:
            transform = Compose([*self.loading.transforms, *after])
            if not cache:
                return Dataset(items, transform=transform)
            return CacheDataset(items, transform=transform, progress=False, num_workers=0)
        # Keys are the items' file paths: the folder serves one run, hence one loading.
        decoded = PersistentDataset(items, transform=self.loading, cache_dir=self.decoded_cache)
        for item in items:
            name = f"{decoded.hash_func(item).decode('utf-8')}{decoded.transform_hash}.pt"
            self.cases_reused += (self.decoded_cache / name).is_file()
        loaded = [decoded[i] for i in range(len(decoded))]
        return CacheDataset(loaded, transform=Compose(after), progress=False, num_workers=0)

    @property
    def num_train(self) -> int:
        """Number of training samples (cases)."""
        return len(self.train_data)

    @property
    def num_val(self) -> int:
        """Number of validation samples (cases)."""
        return len(self.val_data)

    @property
    def num_test(self) -> int:
        """Number of held-out test samples (cases)."""
        return len(self.test_data)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load global weights (a torch state dict) into the site's model."""
        self.model.load_state_dict(state, strict=True)

    def state(self) -> dict[str, torch.Tensor]:
        """Return a copy of the site model's weights as a CPU state dict (training the model
        afterwards does not change it)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def fit(
        self,
        epochs: int,
        *,
        seed: int,
        extra_loss: ExtraLoss | None = None,
        log: Callable[[str], None] | None = None,
    ) -> TrainResult:
        """Train the model in place for ``epochs`` local epochs, shuffling and augmenting with
        ``seed``. Returns the last epoch's mean loss and the number of samples per epoch."""
        torch.manual_seed(seed)
        self.train_transform.set_random_state(seed=seed % (2**32))
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            self.train_data,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=0,
        )
        return self.task.train(self.model, loader, epochs, extra_loss=extra_loss, log=log)

    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Evaluate the current model on the site's ``val`` or ``test`` cases; returns the task's
        metric -> value (``loss`` included)."""
        data = {"val": self.val_data, "test": self.test_data}[split]
        loader = DataLoader(data, batch_size=1, shuffle=False, num_workers=0)
        return self.task.evaluate(self.model, loader)

    def scores(
        self, split: str = "val", finetune_epochs: int = 0, *, seed: int = 0
    ) -> tuple[dict[str, float], int]:
        """The model's metrics and the number of cases scored: on the validation cases
        (:meth:`validation_metrics`), or with ``split="test"`` on the test cases
        (:meth:`test_metrics`, after ``finetune_epochs`` of fine-tuning with ``seed``; a site
        without test cases says so and scores nothing)."""
        if split != "test":
            return self.validation_metrics(), self.num_val
        metrics = self.test_metrics(finetune_epochs, seed=seed)
        if not metrics:
            log.warning(
                "[site %s] has no test cases: nothing to score in the test round", self.name
            )
        return metrics, self.num_test

    def validation_metrics(self) -> dict[str, float]:
        """:meth:`evaluate` on the validation cases, the loss named ``val_loss``."""
        return {("val_loss" if k == "loss" else k): v for k, v in self.evaluate("val").items()}

    def test_metrics(self, finetune_epochs: int = 0, *, seed: int = 0) -> dict[str, float]:
        """Score the current model on the site's test cases (``test_<metric>``) and, when
        ``finetune_epochs`` > 0, after fine-tuning it that many epochs on the site's training
        cases with ``seed`` (``finetuned_<metric>``; personalisation). The model's weights are
        put back afterwards. Returns metric name -> value; empty without test cases."""
        if self.num_test == 0:
            return {}
        metrics = {f"test_{k}": v for k, v in self.evaluate("test").items()}
        if finetune_epochs > 0:
            final = self.state()
            self.fit(finetune_epochs, seed=seed)
            metrics.update({f"finetuned_{k}": v for k, v in self.evaluate("test").items()})
            self.load_state(final)
        return metrics


def proximal_term(global_state: dict[str, torch.Tensor], mu: float) -> ExtraLoss:
    """FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` over the model's trainable
    parameters (Li et al. 2020), to add to the task's loss; ``global_state`` is the global
    model's state dict (copied here), ``mu`` the weight Flower's FedProx sends. Returns a
    function of the model giving a scalar tensor."""
    anchors = {k: v.detach().clone() for k, v in global_state.items()}

    def term(model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for name, param in model.named_parameters():
            if param.requires_grad:
                if anchors[name].device != param.device:  # moved once, not at every batch
                    anchors[name] = anchors[name].to(param.device)
                total = total + ((param - anchors[name]) ** 2).sum()
        return 0.5 * mu * total

    return term


@dataclass(frozen=True)
class SiteRef:
    """Which site a process trains for: its ``name``, data ``folder``, index in the federation
    (seeds, simulated attacks) and whether it is a simulated site (Flower's simulation engine)."""

    name: str
    folder: Path
    index: int
    simulated: bool = False

    @classmethod
    def of_node(cls, node_config: Mapping[str, object], data_sites: Sequence[str]) -> SiteRef:
        """The site of a Flower node from its node config. Deployment: ``data-dir`` (and
        optional ``site-name``, ``site-index``) given to ``flower-supernode``. Simulation:
        ``partition-id`` indexes ``data_sites`` (``data.sites``)."""
        if "data-dir" in node_config:
            path = Path(str(node_config["data-dir"]))
            name = str(node_config.get("site-name", path.name))
            return cls(name, path, int(str(node_config.get("site-index", 0))))
        index = int(str(node_config["partition-id"]))
        path = Path(data_sites[index])
        return cls(path.name, path, index, simulated=True)


def build_site_trainer(
    cfg: RunConfig, site: SiteRef, label_transforms: Sequence[Callable] = ()
) -> SiteTrainer:
    """Read ``site``'s folder (split as ``cfg.data`` says, seeded by ``cfg.seed`` + its index) and
    return its trainer for ``cfg.task``, with ``label_transforms`` on its training labels, on
    the device ``task.device`` names on this machine
    (:func:`~fl_imaging.config.devices.site_device`:
    a GPU this machine lacks is refused, naming the site); sets torch's threads to
    ``engine.torch_threads`` (default: ``engine.cpus_per_client``)."""
    start = time.perf_counter()
    torch.set_num_threads(cfg.engine.torch_threads or cfg.engine.cpus_per_client)
    data = load_site(
        site.folder,
        cfg.task.name,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed + site.index,
        name=site.name,
        cases=site_cases(cfg, site),
    )
    trainer = SiteTrainer(
        site.name,
        data.train,
        data.val,
        build_task(cfg.task, site_device(cfg.task, f"site {site.name}")),
        batch_size=cfg.task.batch_size,
        cache=cfg.data.cache,
        label_transforms=label_transforms,
        test_cases=data.test,
        decoded_cache=Path(cfg.data.decoded_cache) if cfg.data.decoded_cache else None,
    )
    reused = f", {trainer.cases_reused} decoded by another worker" if trainer.decoded_cache else ""
    log.info(
        "[site %s] %d training, %d validation and %d test cases from %s ready in %.1f s%s",
        site.name,
        len(data.train),
        len(data.val),
        len(data.test),
        site.folder,
        time.perf_counter() - start,
        reused,
    )
    return trainer


def site_cases(cfg: RunConfig, site: SiteRef) -> list[Case]:
    """The cases ``site`` trains on: those of its folder, less its ``data.excluded_cases``
    (filled by the coordinator's check with ``data.exclude_bad_cases`` in simulation). A deployed
    site, whose folder the coordinator never sees, runs that check itself when
    ``data.exclude_bad_cases`` is set. A deployed site labelled by class folders needs
    ``task.class_names``: it sees only its own folders, so the shared list in the config is
    what makes class k mean the same at every site (its folders are checked against it).
    Logs what it leaves out; raises :class:`SiteDataError` as the check does."""
    modalities = list(cfg.data.modalities)
    if not site.simulated and not cfg.task.class_names:
        folders = class_folder_names(site.folder, cfg.task.name, modalities)
        if folders:
            raise SiteDataError(
                f"[site {site.name}] {site.folder / 'images'} holds class folders "
                f"[{', '.join(folders)}] but task.class_names is empty: in a deployment each "
                "site sees only its own folders, so the shared class list in the config is "
                "what makes class k mean the same at every site; the coordinator sets it "
                f"(e.g. task.class_names=[{','.join(folders)}], every site's classes in index "
                "order)"
            )
    if cfg.data.exclude_bad_cases and not site.simulated:
        cases, _ = checked_cases(site.folder, cfg, seed=cfg.seed + site.index)
    else:
        names = list(cfg.task.class_names) or None
        cases = find_cases(site.folder, cfg.task.name, site.name, names, modalities)
    excluded = excluded_of(cfg.data.excluded_cases, site.name)
    if excluded:
        log.info(
            "[site %s] leaves out %s (data.excluded_cases)", site.name, ", ".join(sorted(excluded))
        )
    return [c for c in cases if c.case_id not in excluded]


class SiteTrainers:
    """The trainers of one process (a Ray actor or a long-lived ClientApp process), kept between
    rounds so that volumes are decoded once, not once per round: one per (config, site folder).
    The trainers of another config (an earlier run) are dropped, with their cached volumes,
    when a new run's first trainer is built. ``build(cfg, site, label_transforms)`` makes a
    trainer (default :func:`build_site_trainer`)."""

    def __init__(
        self,
        build: Callable[[RunConfig, SiteRef, Sequence[Callable]], SiteTrainer] = build_site_trainer,
    ) -> None:
        self.build = build
        self._trainers: dict[tuple[str, str], SiteTrainer] = {}

    def get(
        self, cfg: RunConfig, site: SiteRef, label_transforms: Sequence[Callable] = ()
    ) -> SiteTrainer:
        """The trainer of ``site`` under ``cfg``, built on first use (``label_transforms`` are
        used then only)."""
        key = (repr(cfg), str(site.folder))
        if key not in self._trainers:
            for stale in [k for k in self._trainers if k[0] != key[0]]:
                del self._trainers[stale]
            self._trainers[key] = self.build(cfg, site, label_transforms)
        return self._trainers[key]

    def values(self) -> list[SiteTrainer]:
        """The trainers kept, oldest first."""
        return list(self._trainers.values())


#: The trainers of this process. Flower's simulation hands each Ray actor a copy of the
#: ClientApp for every message, so the cache must live in the process, not in the app object.
_PROCESS_TRAINERS = SiteTrainers()


def process_trainers() -> SiteTrainers:
    """The :class:`SiteTrainers` this process keeps for the ClientApp (one per process)."""
    return _PROCESS_TRAINERS
