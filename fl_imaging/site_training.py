"""One site's training and evaluation: its cases, decoded once and cached, and a task's model.

This is where site data meets a task. The Flower ClientApp holds one :class:`SiteTrainer` per site
and keeps it between rounds, so volumes are decoded once per process, not once per round. The
centralised baseline uses the same class on the pooled cases of all sites.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose

from fl_imaging.data.sites import Case, SiteDataError
from tasks.base import ExtraLoss, ImagingTask, TrainResult

__all__ = ["SiteTrainer", "finetune_seed", "training_seed"]


def training_seed(seed: int, rnd: int, site: int) -> int:
    """The seed of one site's local training in round (or pooled pass) ``rnd``: distinct for
    every (run seed, round, site index), the same in every engine and baseline."""
    return seed * 100_003 + rnd * 1_009 + site


def finetune_seed(seed: int, site: int) -> int:
    """The seed of site ``site``'s fine-tuning of the final model (personalisation)."""
    return seed * 100_003 + 7_919 + site


class SiteTrainer:
    """Model, cached datasets and loops of one site (or of a pooled set of cases).

    Takes the site name (for messages), its training and validation cases, the task, the batch
    size, whether to cache decoded volumes in memory (MONAI ``CacheDataset``), transforms
    applied to training labels after decoding (e.g. a simulated label-flipping attack) and its
    held-out test cases (scored only by :meth:`evaluate` with ``split="test"``).
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
    ) -> None:
        self.name = name
        self.task = task
        self.model = task.build_model()
        self.batch_size = batch_size
        # Flat lists, so that CacheDataset caches everything before the first random transform.
        loading = list(task.load_transforms().transforms)
        self.train_transform = Compose(
            [*loading, *label_transforms, *task.train_transforms().transforms]
        )
        self.eval_transform = Compose([*loading, *task.eval_transforms().transforms])
        self.train_data = self._dataset(train_cases, self.train_transform, cache)
        self.val_data = self._dataset(val_cases, self.eval_transform, cache)
        self.test_data = self._dataset(test_cases, self.eval_transform, cache)

    def _dataset(self, cases: Sequence[Case], transform: Compose, cache: bool) -> Dataset:
        items = [case.as_dict() for case in cases]
        if not cache:
            return Dataset(items, transform=transform)
        try:
            return CacheDataset(items, transform=transform, progress=False, num_workers=0)
        except Exception as err:  # MONAI wraps reader errors; name the site and the cause
            raise SiteDataError(
                f"[site {self.name}] could not decode its volumes: {err}. Run "
                "`fl-imaging-data inspect` on the site folder to find the broken file."
            ) from err

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
