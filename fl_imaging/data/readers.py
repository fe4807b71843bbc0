"""The MONAI image readers fl-imaging decodes with, set up once for every module loading images."""

from __future__ import annotations

import logging
import warnings

__all__ = ["IMAGE_READERS"]

#: MONAI readers tried first for every image: NIfTI (nibabel), DICOM series (pydicom), 2D (PIL).
IMAGE_READERS = ("NibabelReader", "PydicomReader", "PILReader")

# MONAI builds its GPU DICOM reader whenever LoadImage is created and, on a machine without
# nvImageCodec, says so on every load; the CPU pydicom reader is used either way.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")
