"""Public dataset adapters: each reads a dataset in its official download layout into a pool of
cases, which :mod:`fl_imaging.data.partition` then splits into simulated sites.

- :func:`load_msd`: a Medical Segmentation Decathlon task (``dataset.json``, ``imagesTr/``,
  ``labelsTr/``), segmentation;
- :func:`load_class_folders`: ``ROOT/<class name>/<image files>`` (MedNIST), classification;
- :func:`load_medmnist`: a MedMNIST v2 ``{flag}.npz`` / ``{flag}_{size}.npz``, classification.

Beside each adapter, a ``*_download`` module fetches that dataset from its official source and
checks the layout the adapter reads (:mod:`.msd_download`, :mod:`.class_folders_download`,
:mod:`.medmnist_download`; the ``scripts/download_*.py`` command lines use them), on the shared
download machinery of :mod:`fl_imaging.data.fetch`.
"""

from fl_imaging.data.datasets.class_folders import load_class_folders
from fl_imaging.data.datasets.medmnist import load_medmnist
from fl_imaging.data.datasets.msd import load_msd
from fl_imaging.data.datasets.pool import DatasetPool

__all__ = ["DatasetPool", "load_class_folders", "load_medmnist", "load_msd"]
