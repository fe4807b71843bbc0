"""Fetch public datasets from their official sources, check them and lay them out for fl-imaging.

Three datasets, each in the folder layout that fl-imaging's dataset adapters read:

* Medical Segmentation Decathlon (MSD) tasks, from the tar archives MONAI mirrors on AWS::

      OUT/Task04_Hippocampus/dataset.json
      OUT/Task04_Hippocampus/imagesTr/*.nii.gz
      OUT/Task04_Hippocampus/labelsTr/*.nii.gz      (imagesTs/ too, unlabelled)

* MedMNIST v2 / MedMNIST+ ``.npz`` files, from Zenodo record 10519652::

      OUT/adrenalmnist3d.npz          28 px (28^3 for the 3D flags)
      OUT/adrenalmnist3d_64.npz       64 px; 2D flags also have _128 and _224

* MedNIST-style 2D class folders (RSNA / MIDL-C ``MedNIST_64x64_500.zip`` or MONAI's
  ``MedNIST.tar.gz``), flattened so that the class folders sit directly in OUT::

      OUT/<ClassName>/*.jpg | *.jpeg

Every download goes to ``NAME.part`` first (a second run resumes it where the server allows),
is checked against its published MD5 and only then takes its final name. Archives are unpacked
into a hidden staging folder inside OUT, refusing members with absolute paths, ``..`` or links,
and moved into place only when the whole archive unpacked and the layout checks pass, so a
failed run leaves no half-extracted dataset behind. macOS junk (``._*``, ``.DS_Store``,
``__MACOSX/``) is deleted after extraction.

Only the standard library and numpy are used (numpy to read ``.npy`` headers inside ``.npz``).
"""

from __future__ import annotations

from fl_imaging.data.datasets.class_folders_download import (
    MEDNIST_SOURCES,
    ArchiveSource,
    class_folder_layout_problems,
    class_folder_summary,
    fetch_mednist,
)
from fl_imaging.data.datasets.medmnist_download import (
    MEDMNIST_KEYS,
    MEDMNIST_MD5,
    MEDMNIST_URL,
    fetch_medmnist,
    medmnist_filename,
    medmnist_layout_problems,
    medmnist_md5,
    medmnist_sizes,
    medmnist_summary,
)
from fl_imaging.data.datasets.msd_download import (
    MSD_MD5,
    MSD_URL,
    fetch_msd_task,
    msd_layout_problems,
    msd_summary,
)
from fl_imaging.data.fetch import (
    ChecksumError,
    DownloadError,
    Fetched,
    UnsafeArchiveError,
    download_file,
    extract_archive,
    md5_of,
    remove_macos_junk,
    report_layout,
    require_out_or_check,
    script_main,
    script_parser,
    verify_md5,
)

__all__ = [
    "MEDMNIST_KEYS",
    "MEDMNIST_MD5",
    "MEDMNIST_URL",
    "MEDNIST_SOURCES",
    "MSD_MD5",
    "MSD_URL",
    "ArchiveSource",
    "ChecksumError",
    "DownloadError",
    "Fetched",
    "UnsafeArchiveError",
    "class_folder_layout_problems",
    "class_folder_summary",
    "download_file",
    "extract_archive",
    "fetch_medmnist",
    "fetch_mednist",
    "fetch_msd_task",
    "md5_of",
    "medmnist_filename",
    "medmnist_layout_problems",
    "medmnist_md5",
    "medmnist_sizes",
    "medmnist_summary",
    "msd_layout_problems",
    "msd_summary",
    "remove_macos_junk",
    "report_layout",
    "require_out_or_check",
    "script_main",
    "script_parser",
    "verify_md5",
]
