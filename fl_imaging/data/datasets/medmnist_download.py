"""Fetch MedMNIST v2 / MedMNIST+ ``.npz`` files and check what they hold.

The files come from Zenodo record 10519652 and are checked against the MD5s the MedMNIST package
publishes (downloads and checksums: :mod:`fl_imaging.data.fetch`); they give the layout the
MedMNIST adapter (:mod:`fl_imaging.data.datasets.medmnist`) reads::

      OUT/adrenalmnist3d.npz          28 px (28^3 for the 3D flags)
      OUT/adrenalmnist3d_64.npz       64 px; 2D flags also have _128 and _224

``scripts/download_medmnist.py`` is the command line for this module. Only the standard library
and numpy are used (numpy to read ``.npy`` headers inside ``.npz``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fl_imaging.data.fetch import DownloadError, Fetched, download_file, say

__all__ = [
    "MEDMNIST_ALL_SIZES",
    "MEDMNIST_KEYS",
    "MEDMNIST_MD5",
    "MEDMNIST_URL",
    "fetch_medmnist",
    "medmnist_filename",
    "medmnist_layout_problems",
    "medmnist_md5",
    "medmnist_sizes",
    "medmnist_summary",
]

# --------------------------------------------------------------------------------------------
# Source and its published checksums
# --------------------------------------------------------------------------------------------

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
"""Zenodo record 10519652 (MedMNIST v2 / MedMNIST+); ``{file}`` e.g. ``adrenalmnist3d_64.npz``."""

# MD5 of each file in Zenodo record 10519652, by flag and image size, as published in the
# MedMNIST package (medmnist/info.py, MedMNIST/MedMNIST commit 805b742, "MD5", "MD5_64", ...).
# The 3D flags come in 28 and 64 only; the 2D flags in 28, 64, 128 and 224.
MEDMNIST_MD5: dict[str, dict[int, str]] = {
    "pathmnist": {
        28: "a8b06965200029087d5bd730944a56c1",
        64: "55aa9c1e0525abe5a6b9d8343a507616",
        128: "ac42d08fb904d92c244187169d1fd1d9",
        224: "2c51a510bcdc9cf8ddb2af93af1eadec",
    },
    "chestmnist": {
        28: "02c8a6516a18b556561a56cbdd36c4a8",
        64: "9de6cd0b934ebb5b7426cfba5efbae16",
        128: "db107e5590b27930b62dbaf558aebee3",
        224: "45bd33e6f06c3e8cdb481c74a89152aa",
    },
    "dermamnist": {
        28: "0744692d530f8e62ec473284d019b0c7",
        64: "b70a2f5635c6199aeaa28c31d7202e1f",
        128: "2defd784463fa5243564e855ed717de1",
        224: "8974907d8e169bef5f5b96bc506ae45d",
    },
    "octmnist": {
        28: "c68d92d5b585d8d81f7112f81e2d0842",
        64: "e229e9440236b774d9f0dfef9d07bdaf",
        128: "0a97e76651ace45c5d943ee3f65b63ae",
        224: "abc493b6d529d5de7569faaef2773ba3",
    },
    "pneumoniamnist": {
        28: "28209eda62fecd6e6a2d98b1501bb15f",
        64: "8f4eceb4ccffa70c672198ea285246c6",
        128: "05b46931834c231683c68f40c47b2971",
        224: "d6a3c71de1b945ea11211b03746c1fe1",
    },
    "retinamnist": {
        28: "bd4c0672f1bba3e3a89f0e4e876791e4",
        64: "afda852cc34dcda56f86ad2b2457dbcc",
        128: "e48e916a24454daf90583d4e6efb1a18",
        224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
    },
    "breastmnist": {
        28: "750601b1f35ba3300ea97c75c52ff8f6",
        64: "742edef2a1fd1524b2efff4bd7ba9364",
        128: "363e4b3f8d712e9b5de15470a2aaadf1",
        224: "b56378a6eefa9fed602bb16d192d4c8b",
    },
    "bloodmnist": {
        28: "7053d0359d879ad8a5505303e11de1dc",
        64: "2b94928a2ae4916078ca51e05b6b800b",
        128: "adace1e0ed228fccda1f39692059dd4c",
        224: "b718ff6835fcbdb22ba9eacccd7b2601",
    },
    "tissuemnist": {
        28: "ebe78ee8b05294063de985d821c1c34b",
        64: "123ece2eba09d0aa5d698fda57103344",
        128: "61b955355d7425a89687b06cca3ce0c2",
        224: "b077128c4a949f0a4eb01517f9037b9c",
    },
    "organamnist": {
        28: "68e3f8846a6bd62f0c9bf841c0d9eacc",
        64: "2dcccc29b88e6da5a01161ef20cda288",
        128: "eeae80d0a227a8d099027e1b3cfd3b60",
        224: "50747347e05c87dd3aaf92c49f9f3170",
    },
    "organcmnist": {
        28: "b9ceb9546e10131b32923c5bbeaea2b1",
        64: "3ce34a8724ea6f548e6db4744d03b6a9",
        128: "773c1f009daa3fe5d9a2a201b2a7ed94",
        224: "050f5e875dc056f6768abf94ec9995d1",
    },
    "organsmnist": {
        28: "9ab87b696fb54e2a387ebe992d6ed5f1",
        64: "53a6d115339d874c25e309a994ff46d3",
        128: "ded0c5fa01a95dc4978b956f613e9b8e",
        224: "b354719e553fbbb2513d5533f52a4cb1",
    },
    "organmnist3d": {
        28: "a0c5a1ff56af4f155c46d46fbb45a2fe",
        64: "58a2205adf14a9d0a189cb06dc78bf10",
    },
    "nodulemnist3d": {
        28: "8755a7e9e05a4d9ce80a24c3e7a256f3",
        64: "c47c5b7d457bf6332200d2ea6d64ecd8",
    },
    "adrenalmnist3d": {
        28: "bbd3c5a5576322bc4cdfea780653b1ce",
        64: "17721accfe9fb005146a47d33bc54b2f",
    },
    "fracturemnist3d": {
        28: "6aa7b0143a6b42da40027a9dda61302f",
        64: "f01d7e6316aedf4210da0da5b7437b42",
    },
    "vesselmnist3d": {
        28: "b41fd4f7e7e2feedddb201585ecafa1b",
        64: "6bb274a8846e1097066dcd64e2c4520f",
    },
    "synapsemnist3d": {
        28: "1235b78a3cd6280881dd7850a78eadb6",
        64: "43bd14ebf3af9d3dd072446fedc14d5e",
    },
}

MEDMNIST_KEYS = (
    "train_images",
    "train_labels",
    "val_images",
    "val_labels",
    "test_images",
    "test_labels",
)
"""The arrays every MedMNIST ``.npz`` holds."""

MEDMNIST_ALL_SIZES = (28, 64, 128, 224)

# --------------------------------------------------------------------------------------------
# Layout check
# --------------------------------------------------------------------------------------------


def medmnist_sizes(flag: str) -> tuple[int, ...]:
    """The image sizes published for ``flag``: (28, 64) for the 3D flags, (28, 64, 128, 224)
    for the 2D ones (for a flag not in :data:`MEDMNIST_MD5`, guessed from a ``3d`` ending)."""
    if flag in MEDMNIST_MD5:
        return tuple(sorted(MEDMNIST_MD5[flag]))
    return (28, 64) if flag.endswith("3d") else MEDMNIST_ALL_SIZES


def medmnist_filename(flag: str, size: int) -> str:
    """The file name of a MedMNIST flag at a size: ``{flag}.npz`` for 28, else
    ``{flag}_{size}.npz``."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_md5(flag: str, size: int) -> str | None:
    """The published MD5 of ``flag`` at ``size``, or None when it is not known here."""
    return MEDMNIST_MD5.get(flag, {}).get(size)


def _npz_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of every array in an ``.npz``, read from the ``.npy`` headers only (no
    array is decompressed)."""
    arrays = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with zf.open(name) as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            arrays[name[: -len(".npy")]] = (tuple(shape), str(dtype))
    return arrays


def medmnist_layout_problems(root: Path, flag: str, size: int) -> list[str]:
    """Check ``root/{flag}.npz`` (size 28) or ``root/{flag}_{size}.npz``.

    Opens the file (array headers only), checks the six arrays of :data:`MEDMNIST_KEYS` are
    there, that each split has as many labels as images, and that the images are
    ``size`` pixels wide (``size``^3 volumes for 3D flags). Returns the problems found, one
    sentence each; an empty list means the file is right.
    """
    path = Path(root) / medmnist_filename(flag, size)
    if not path.is_file():
        where = "" if Path(root).is_dir() else f" ({root} is not a folder)"
        return [f"{path} not found{where}"]
    try:
        arrays = _npz_arrays(path)
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        return [f"{path} is not a readable .npz file: {error}"]
    problems = []
    missing = [k for k in MEDMNIST_KEYS if k not in arrays]
    if missing:
        problems.append(f"{path} lacks the array(s) {', '.join(missing)}")
    is_3d = flag.endswith("3d")
    want = f"(N, {size}, {size}, {size})" if is_3d else f"(N, {size}, {size}[, 3])"
    for split in ("train", "val", "test"):
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            continue
        shape = images[0]
        n_images, n_labels = (shape[0] if shape else 0), (labels[0][0] if labels[0] else 0)
        if n_images != n_labels:
            problems.append(
                f"{path}: {split}_images has {n_images} images but {split}_labels has "
                f"{n_labels} labels"
            )
        if is_3d:
            right = len(shape) == 4 and shape[1:] == (size, size, size)
        else:
            right = len(shape) in (3, 4) and shape[1:3] == (size, size)
        if not right:
            problems.append(f"{path}: {split}_images has shape {shape}, expected {want}")
    if "train_images" in arrays and arrays["train_images"][0][:1] == (0,):
        problems.append(f"{path}: train_images is empty")
    return problems


def medmnist_summary(root: Path, flag: str, size: int) -> str:
    """One line on what a MedMNIST file holds: images per split, their shape and dtype."""
    path = Path(root) / medmnist_filename(flag, size)
    try:
        arrays = _npz_arrays(path)
    except (OSError, zipfile.BadZipFile, ValueError):
        return f"{path}: missing or unreadable"
    parts = []
    for split in ("train", "val", "test"):
        if f"{split}_images" in arrays:
            parts.append(f"{split} {arrays[f'{split}_images'][0][0]}")
    shape = arrays.get("train_images", ((0,), "?"))
    labels = arrays.get("train_labels", ((0,), "?"))
    return (
        f"{path}: {', '.join(parts) or 'no images'}; images "
        f"{'x'.join(map(str, shape[0][1:]))} {shape[1]}, labels per image "
        f"{'x'.join(map(str, labels[0][1:])) or '1'}"
    )


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def fetch_medmnist(
    flag: str,
    size: int,
    out: Path,
    *,
    md5: str | None = None,
    url: str | None = None,
    quiet: bool = False,
) -> Fetched:
    """Download one MedMNIST file (``flag`` at ``size`` px) from Zenodo into ``out`` and check it.

    The MD5 is the published one from :data:`MEDMNIST_MD5`; ``md5`` overrides it, and is
    required for a flag or size not listed there (the download is refused without a
    checksum). ``url`` defaults to :data:`MEDMNIST_URL`. A file already there is checked and
    reused.

    Returns a :class:`Fetched` whose ``path`` is ``out`` (the folder holding the ``.npz``).
    Raises :class:`DownloadError` (or a subclass) on failure; a file failing its checksum is
    never given its final name.
    """
    filename = medmnist_filename(flag, size)
    known = medmnist_md5(flag, size)
    if flag in MEDMNIST_MD5 and size not in MEDMNIST_MD5[flag]:
        raise DownloadError(
            f"{flag} is published in sizes {', '.join(map(str, medmnist_sizes(flag)))} only, "
            f"not {size}"
        )
    if size not in MEDMNIST_ALL_SIZES:
        raise DownloadError(f"MedMNIST sizes are {', '.join(map(str, MEDMNIST_ALL_SIZES))}")
    if md5 is None and known is None:
        raise DownloadError(
            f"no published MD5 is known here for {filename}, so it will not be downloaded "
            "unchecked: give its MD5 (--md5 on the command line), taken from the Zenodo "
            "record https://zenodo.org/records/10519652"
        )
    expected = md5 or known
    assert expected is not None
    if md5 and known and md5.strip().lower() != known:
        say(f"note: using the given MD5 {md5}, not the published {known}", quiet)
    out = Path(out)
    dest = out / filename
    already = dest.exists()
    download_file(url or MEDMNIST_URL.format(file=filename), dest, expected, quiet=quiet)
    problems = medmnist_layout_problems(out, flag, size)
    if problems:
        raise DownloadError(f"{dest} passed its checksum but: {'; '.join(problems)}")
    return Fetched(out, downloaded=not already)
