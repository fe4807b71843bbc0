"""The MONAI image readers fl-imaging decodes with, set up once for every module loading images."""

from __future__ import annotations

import logging
import warnings

__all__ = ["IMAGE_READERS"]

#: MONAI readers for every image: NIfTI (nibabel), NRRD (pynrrd), DICOM series (pydicom), 2D
#: (PIL). MONAI's LoadImage tries a given list from its end until one reads the file, so the
#: commonest format (NIfTI) is tried first. NRRD comes before DICOM and PIL so that a ``.nhdr``
#: (which MONAI's suffix check does not list) is read by pynrrd.
IMAGE_READERS = ("PILReader", "PydicomReader", "NrrdReader", "NibabelReader")

# MONAI builds its GPU DICOM reader whenever LoadImage is created and, on a machine without
# nvImageCodec, says so on every load; the CPU pydicom reader is used either way.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")
# LoadImage logs at INFO each reader that could not read a file before the one that can; when
# none can, it raises with every reader's reason, which is what the user sees.
logging.getLogger("LoadImage").setLevel(logging.WARNING)
