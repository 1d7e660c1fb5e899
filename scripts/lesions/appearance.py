# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""FLAIR-like intensities of a synthetic volume from its tissue probabilities and lesions.

1. **contrast**: each volume draws class intensities relative to white matter (1): CSF 0.05-0.3 (suppressed, dark),
   grey matter 1.2-1.45, times a scanner scale of 200-1000; lesions are brighter than grey matter by each lesion's
   own factor (:attr:`scripts.lesions.lesions.LesionLoad.contrast`). So CSF < white matter < grey matter < lesions.
2. **partial volume**: a voxel's signal is the probability-weighted sum of the class intensities (CSF = brain - grey
   - white matter), then ``(1 - f) * signal + f * lesion`` with ``f`` the lesion fraction.
3. **bias field**: multiplication by ``exp(b)``, ``b`` a random Legendre polynomial of degree 3 over the grid whose
   largest absolute value is drawn in 0.05-0.35.
4. **blur**: a Gaussian of 0-0.6 voxel in plane and 0-0.3 voxel across slices (reconstruction smoothing).
5. **noise**: Rician, ``|signal + n1 + i n2|`` with Gaussian ``n1, n2`` of 1.5-5 % of the white-matter intensity.
6. **skull-stripped**: zero where the brain probability is below 0.05.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from scripts.lesions.anatomy import Anatomy

__all__ = ["Contrast", "sample_contrast", "bias_field", "render_flair"]

_BRAIN_FLOOR = 0.05


@dataclass(frozen=True)
class Contrast:
    """Class intensities relative to white matter, and the scanner scale.

    Attributes:
        csf: CSF intensity (< 1).
        white_matter: 1.
        grey_matter: grey matter intensity (> 1).
        scale: the factor on all of them.
    """

    csf: float
    white_matter: float
    grey_matter: float
    scale: float


def sample_contrast(rng: np.random.Generator) -> Contrast:
    """Draw a volume's class intensities (see the module's docs)."""
    return Contrast(csf=float(rng.uniform(0.05, 0.3)), white_matter=1.0, grey_matter=float(rng.uniform(1.2, 1.45)),
                    scale=float(rng.uniform(200.0, 1000.0)))


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float, degree: int = 3) -> np.ndarray:
    """A smooth multiplicative field ``exp(b)``: ``b`` a Legendre polynomial of ``degree`` over the grid (coordinates
    in [-1, 1]) with random coefficients, scaled so that ``max |b| = amplitude``.

    Returns:
        float32 array of ``shape``.
    """
    if amplitude <= 0:
        return np.ones(shape, dtype=np.float32)
    order = np.arange(degree + 1)
    total = order[:, None, None] + order[None, :, None] + order[None, None, :]
    coefficients = rng.normal(size=(degree + 1,) * 3) / (1.0 + total) ** 1.5
    coefficients[total > degree] = 0.0
    coefficients[0, 0, 0] = 0.0
    log_field = np.polynomial.legendre.leggrid3d(*(np.linspace(-1.0, 1.0, n) for n in shape), coefficients)
    peak = float(np.abs(log_field).max())
    if peak > 0:
        log_field *= amplitude / peak
    return np.exp(log_field).astype(np.float32)


def render_flair(
    rng: np.random.Generator,
    anatomy: Anatomy,
    lesion_fraction: np.ndarray,
    lesion_contrast: np.ndarray,
    contrast: Contrast,
) -> tuple[np.ndarray, dict]:
    """The FLAIR-like image of a volume (steps in the module's docs).

    Args:
        rng: the volume's generator.
        anatomy: the volume's tissue probabilities on its grid.
        lesion_fraction: lesion fraction of each voxel.
        lesion_contrast: the lesion intensity over each voxel relative to grey matter.
        contrast: the class intensities.

    Returns:
        (the image as float32, the drawn parameters for the sidecar).
    """
    csf = np.clip(anatomy.brain - anatomy.gm - anatomy.wm, 0.0, None)
    signal = contrast.csf * csf + contrast.grey_matter * anatomy.gm + contrast.white_matter * anatomy.wm
    lesion = contrast.grey_matter * lesion_contrast
    signal = (1.0 - lesion_fraction) * signal + lesion_fraction * lesion
    amplitude = float(rng.uniform(0.05, 0.35))
    signal = signal * bias_field(rng, signal.shape, amplitude) * contrast.scale
    blur = (float(rng.uniform(0.0, 0.6)), float(rng.uniform(0.0, 0.3)))
    signal = ndi.gaussian_filter(signal.astype(np.float32), (blur[0], blur[0], blur[1]), truncate=3.0)
    noise = float(rng.uniform(0.015, 0.05)) * contrast.scale * contrast.white_matter
    real = signal + rng.normal(0.0, noise, signal.shape).astype(np.float32)
    imaginary = rng.normal(0.0, noise, signal.shape).astype(np.float32)
    image = np.sqrt(real * real + imaginary * imaginary)
    image[anatomy.brain < _BRAIN_FLOOR] = 0.0
    params = {
        "contrast": {k: round(v, 4) for k, v in asdict(contrast).items()},
        "bias_amplitude": round(amplitude, 4),
        "blur_sigma_voxels": [round(blur[0], 4), round(blur[0], 4), round(blur[1], 4)],
        "noise_sd": round(noise, 4),
    }
    return image.astype(np.float32), params
