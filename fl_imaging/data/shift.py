"""Acquisition shift: each simulated site sees its images through its own "scanner".

A scanner profile is a chain of MONAI intensity and resolution transforms with site-specific
strengths: contrast gamma (``AdjustContrast``), a smooth multiplicative bias field
(``RandBiasField``), Rician noise relative to the image's intensity spread (``RandRicianNoise``),
blur (``GaussianSmooth``) and a lower acquisition resolution (``RandSimulateLowResolution``:
down-sampled, then up-sampled back to the same grid, so labels still match). Profiles are drawn
from the partition seed, so a site keeps its scanner across runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import (
    AdjustContrast,
    Compose,
    GaussianSmooth,
    RandBiasField,
    RandRicianNoise,
    RandSimulateLowResolution,
)

__all__ = ["ScannerProfile", "apply_scanner", "scanner_profiles", "scanner_transform"]


@dataclass(frozen=True)
class ScannerProfile:
    """One site's scanner: ``gamma`` (contrast exponent, 1 = unchanged), ``bias`` (bias-field
    polynomial coefficient bound), ``noise`` (Rician noise std relative to the image's std),
    ``blur`` (Gaussian sigma, voxels) and ``resolution`` (share of the resolution kept, 1 = all)."""

    gamma: float = 1.0
    bias: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    resolution: float = 1.0

    def as_dict(self) -> dict[str, float]:
        """The profile's values by name, rounded for printing and JSON."""
        return {k: round(v, 4) for k, v in asdict(self).items()}


def scanner_profiles(num_sites: int, strength: float, seed: int) -> list[ScannerProfile]:
    """Draw one profile per site; ``strength`` 0 gives identical (unchanged) scanners and 1 a
    clearly visible shift (gamma in 0.6..1.6, noise up to 15 % of the image std, blur up to 1
    voxel, resolution down to 50 %). Deterministic in ``seed``."""
    rng = np.random.default_rng([seed, num_sites, 31337])
    profiles = []
    for _ in range(num_sites):
        u = rng.uniform(size=5)
        profiles.append(
            ScannerProfile(
                gamma=float(np.exp(strength * (u[0] - 0.5))),
                bias=float(0.3 * strength * u[1]),
                noise=float(0.15 * strength * u[2]),
                blur=float(strength * u[3]),
                resolution=float(1.0 - 0.5 * strength * u[4]),
            )
        )
    return profiles


def scanner_transform(profile: ScannerProfile, seed: int, spatial_dims: int = 3) -> Compose:
    """A MONAI transform applying ``profile`` to a channel-first image ``(C, *spatial)`` with
    ``spatial_dims`` (2 or 3) spatial axes; output has the same shape. Random parts (bias field,
    noise) are seeded by ``seed``."""
    steps: list = [AdjustContrast(gamma=profile.gamma)]
    if profile.bias > 0:
        steps.append(RandBiasField(coeff_range=(profile.bias, profile.bias), prob=1.0))
    if profile.blur > 0:
        steps.append(GaussianSmooth(sigma=profile.blur))
    if profile.resolution < 1.0:
        steps.append(
            RandSimulateLowResolution(
                prob=1.0,
                zoom_range=(profile.resolution, profile.resolution),
                upsample_mode="trilinear" if spatial_dims == 3 else "bilinear",
            )
        )
    if profile.noise > 0:
        steps.append(RandRicianNoise(prob=1.0, std=profile.noise, relative=True, sample_std=False))
    chain = Compose(steps)
    chain.set_random_state(seed=seed % (2**32))
    return chain


def apply_scanner(image: torch.Tensor, profile: ScannerProfile, seed: int) -> torch.Tensor:
    """Apply ``profile`` to ``image`` ``(C, *spatial)``; returns a float32 tensor, same shape."""
    chain = scanner_transform(profile, seed, spatial_dims=image.ndim - 1)
    return torch.as_tensor(chain(image.float()), dtype=torch.float32)
