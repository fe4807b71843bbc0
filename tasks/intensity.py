"""Intensity presets (``task.transforms.intensity``) as MONAI bundle config items.

``zscore``: each channel to mean 0, std 1 over every voxel (any modality); ``ct``: Hounsfield
units clipped to ``hu_window`` and scaled to [0, 1] (MONAI's ``ScaleIntensityRanged``, as CT
bundles do); ``mr``: each channel z-scored over its non-zero voxels, so the air around the
body does not weigh in (``NormalizeIntensityd(nonzero=True)``); ``none``: as stored.
"""

from __future__ import annotations

from typing import Any

from fl_imaging.config import ConfigError, IntensityPreset, TransformsConfig

__all__ = ["intensity_definitions"]


def intensity_definitions(cfg: TransformsConfig) -> list[dict[str, Any]]:
    """The intensity step of ``cfg.intensity`` on ``image``.

    Args:
        cfg: ``task.transforms``; ``hu_window`` ([lower, upper] in HU) is used by ``ct``.

    Returns:
        Zero or one MONAI dict transform definition; its output ``image`` is float
        ``(C_in, *spatial)``: z-scored (``zscore``, ``mr``) or in [0, 1] (``ct``).

    Raises:
        ConfigError: for a ``hu_window`` that is not two increasing numbers.
    """
    if cfg.intensity == IntensityPreset.none:
        return []
    if cfg.intensity == IntensityPreset.ct:
        window = list(cfg.hu_window)
        if len(window) != 2 or not window[0] < window[1]:
            raise ConfigError(
                f"task.transforms.hu_window={window}: give [lower, upper] Hounsfield units, "
                "lower first, e.g. [-175, 250] (abdomen) or [-1000, 400] (lung)"
            )
        return [
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": float(window[0]),
                "a_max": float(window[1]),
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        ]
    nonzero = cfg.intensity == IntensityPreset.mr
    return [
        {
            "_target_": "NormalizeIntensityd",
            "keys": "image",
            "channel_wise": True,
            "nonzero": nonzero,
        }
    ]
