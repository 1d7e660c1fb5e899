# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tissue classes of a real brain from its T1 and grey/white-matter probability maps.

The maps must lie in MNI space (the MNI152 2009a template of the nilearn wheel, which ``python -m scripts.demo.data
--which mni`` extracts to ``data/mni/raw``; or any T1 registered to it, with its tissue probabilities), because two
rules are written in MNI millimetres. The rules:

* **brain**: the T1's non-zero voxels (the T1 must be skull-stripped, as the template is) within 4 mm of tissue
  (grey + white matter probability >= 0.3), or in a pocket that this 4 mm margin encloses (e.g. the cisterns). Its soft version (the mask smoothed by 0.5 mm, at least
  the tissue probability) is the brain probability.
* **CSF**: brain probability minus grey and white matter probability.
* **tissue class** of a voxel: the largest of background (1 - brain), CSF, grey and white matter probability.
* **ventricles**: the CSF components (6-connected) of at least 0.1 ml that the tissue encloses (they do not touch the
  outer 3 mm of the brain mask) and whose centre lies in the central box ``|x| <= 40, -95 <= y <= 45, -35 <= z <= 45``
  mm: the lateral ventricles with their horns (the thin third ventricle is usually not enclosed and stays CSF).
* **infratentorial** (brainstem and cerebellum, below the tentorium): brain voxels with
  ``|x| <= 12, -45 <= y <= -16, z <= -6`` (brainstem from the midbrain down), or ``y <= -38`` and
  ``z <= -2 - s * max(0, -50 - y) - 0.65 * min(|x|, 25) - 0.4 * max(|x| - 25, 0)`` with ``s = 0.45 - 0.008 * min(|x|,
  25)`` (a tent: highest at the midline behind the midbrain, sloping down backwards and sideways, fitted by eye to the
  tentorium of the MNI152 2009a template). Only grey and white matter there are labelled infratentorial; its CSF (the
  fourth ventricle, the cisterns) stays CSF.

:data:`TISSUE_LABELS` names the values of the tissue map the generator writes beside each volume.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from scripts.demo.data import MNI_FILES
from scripts.hunet.locations import (  # the tissue-map values, shared with the lesion reports
    BACKGROUND, CSF, GREY_MATTER, INFRATENTORIAL, TISSUE_LABELS, VENTRICLE, WHITE_MATTER,
)

__all__ = [
    "BACKGROUND", "CSF", "VENTRICLE", "GREY_MATTER", "WHITE_MATTER", "INFRATENTORIAL", "TISSUE_LABELS",
    "REGION_VENTRICLE", "REGION_INFRATENTORIAL", "MNI_NAMES", "Anatomy", "tissue_labels", "world_coordinates",
    "infratentorial_mask", "ventricle_mask", "build_anatomy", "load_anatomy",
]

logger = logging.getLogger(__name__)

#: values of :attr:`Anatomy.region`
REGION_VENTRICLE, REGION_INFRATENTORIAL = 1, 2
#: the files of ``--mni_dir``: T1, grey and white matter, as :func:`scripts.demo.data.fetch_mni` names them
MNI_NAMES: dict[str, str] = {key: Path(member).name for key, member in MNI_FILES.items()}

_TISSUE_THRESHOLD = 0.3  # grey + white matter probability that counts as tissue for the brain mask
_BRAIN_MARGIN_MM = 4.0  # brain mask: T1 non-zero within this distance of tissue
_BRAIN_SMOOTH_MM = 0.5  # smoothing of the brain mask into the brain probability
_SHELL_MM = 3.0  # ventricles must not touch this outer shell of the brain mask
_MIN_VENTRICLE_ML = 0.1
_VENTRICLE_BOX = ((-40.0, 40.0), (-95.0, 45.0), (-35.0, 45.0))  # MNI mm, on the components' centres


@dataclass(frozen=True)
class Anatomy:
    """A brain's tissue probabilities on its voxel grid.

    Attributes:
        brain: brain probability in [0, 1] (float32), at least ``gm + wm``.
        gm: grey matter probability in [0, 1] (float32).
        wm: white matter probability in [0, 1] (float32).
        region: uint8, :data:`REGION_VENTRICLE` on the ventricles, :data:`REGION_INFRATENTORIAL` below the tentorium,
            0 elsewhere.
        affine: the 4 x 4 voxel-to-world (MNI mm) matrix.
    """

    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    region: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """The voxel grid's shape."""
        return tuple(int(s) for s in self.brain.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def tissue(self) -> np.ndarray:
        """The tissue map (uint8, :data:`TISSUE_LABELS`) of this grid."""
        return tissue_labels(self.brain, self.gm, self.wm, self.region)


def tissue_labels(brain: np.ndarray, gm: np.ndarray, wm: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The tissue map of probability maps: the most probable of background, CSF, grey and white matter, CSF in the
    ventricle region labelled :data:`VENTRICLE`, grey and white matter in the infratentorial region
    :data:`INFRATENTORIAL`.

    Args:
        brain: brain probability (CSF = ``brain - gm - wm``, background = ``1 - brain``).
        gm: grey matter probability.
        wm: white matter probability.
        region: :attr:`Anatomy.region` on the same grid.

    Returns:
        uint8 array with the values of :data:`TISSUE_LABELS`.
    """
    csf = np.clip(brain - gm - wm, 0.0, None)
    best = np.argmax(np.stack([1.0 - brain, csf, gm, wm]), axis=0)
    labels = np.array([BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER], dtype=np.uint8)[best]
    labels[(labels == CSF) & (region == REGION_VENTRICLE)] = VENTRICLE
    labels[((labels == GREY_MATTER) | (labels == WHITE_MATTER)) & (region == REGION_INFRATENTORIAL)] = INFRATENTORIAL
    return labels


def world_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The world (x, y, z) coordinates in mm of every voxel of a grid (float32 arrays of ``shape``)."""
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    a = np.asarray(affine, dtype=np.float64)
    return tuple(  # type: ignore[return-value]
        np.broadcast_to(a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3], shape).astype(np.float32) for r in range(3)
    )


def infratentorial_mask(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The region below the tentorium (brainstem and cerebellum) at MNI coordinates ``x, y, z`` (mm); the rule is
    in the module's docs."""
    ax = np.abs(x)
    lateral = np.minimum(ax, 25.0)
    slope = 0.45 - 0.008 * lateral
    tent = -2.0 - slope * np.maximum(0.0, -50.0 - y) - 0.65 * lateral - 0.4 * np.maximum(ax - 25.0, 0.0)
    brainstem = (ax <= 12.0) & (y >= -45.0) & (y <= -16.0) & (z <= -6.0)
    return brainstem | ((y <= -38.0) & (z <= tent))


def ventricle_mask(csf: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The ventricles: CSF components that tissue encloses, in the central box (rule in the module's docs).

    Args:
        csf: boolean CSF mask (tissue class CSF).
        brain: boolean brain mask.
        affine: voxel-to-world matrix (MNI mm).

    Returns:
        boolean mask.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shell_voxels = max(1, int(round(_SHELL_MM / float(spacing.min()))))
    shell = brain & ~ndi.binary_erosion(brain, iterations=shell_voxels)
    components, n = ndi.label(csf)
    if n == 0:
        return np.zeros(csf.shape, dtype=bool)
    index = np.arange(1, n + 1)
    sizes_ml = ndi.sum_labels(np.ones(csf.shape, np.float32), components, index) * float(np.prod(spacing)) / 1000.0
    centres = np.array(ndi.center_of_mass(np.ones(csf.shape, np.float32), components, index)).reshape(-1, 3)
    world = centres @ affine[:3, :3].T + affine[:3, 3]
    inside = np.all([(world[:, a] >= lo) & (world[:, a] <= hi) for a, (lo, hi) in enumerate(_VENTRICLE_BOX)], axis=0)
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = (sizes_ml >= _MIN_VENTRICLE_ML) & inside
    keep[np.unique(components[shell])] = False
    keep[0] = False
    return keep[components]


def _probabilities(gm: np.ndarray, wm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grey and white matter maps as probabilities in [0, 1] (maps beyond 1, e.g. 0-255, scaled by their maximum)."""
    gm = np.asarray(gm, dtype=np.float32)
    wm = np.asarray(wm, dtype=np.float32)
    if not (np.isfinite(gm).all() and np.isfinite(wm).all()) or gm.min() < 0 or wm.min() < 0:
        raise ValueError("the grey/white matter maps must hold finite, non-negative probabilities (0-1 or 0-255).")
    peak = max(float(gm.max()), float(wm.max()), float((gm + wm).max()))
    if peak <= 0:
        raise ValueError("the grey/white matter maps are empty (all zero); give the maps of a brain.")
    if peak > 1.0:
        gm, wm = gm / peak, wm / peak
    return gm, wm


def build_anatomy(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, affine: np.ndarray) -> Anatomy:
    """Tissue probabilities, ventricles and the infratentorial region from a skull-stripped T1 and its grey/white
    matter maps in MNI space (rules in the module's docs).

    Args:
        t1: the T1 volume (zero outside the brain).
        gm: grey matter probability map (0-1, or 0-255 as in the template).
        wm: white matter probability map, same grid.
        affine: their voxel-to-world matrix (MNI mm).

    Returns:
        the :class:`Anatomy`.

    Raises:
        ValueError: maps of different shapes, not 3D, negative or empty, or a T1 without brain voxels.
    """
    t1 = np.asarray(t1, dtype=np.float32)
    if t1.ndim != 3 or np.shape(gm) != t1.shape or np.shape(wm) != t1.shape:
        raise ValueError(f"the T1 and the grey/white matter maps must be 3D volumes on one grid, got shapes "
                         f"{t1.shape}, {np.shape(gm)} and {np.shape(wm)}.")
    affine = np.asarray(affine, dtype=np.float64)
    gm, wm = _probabilities(gm, wm)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    tissue = gm + wm
    margin = max(1, int(round(_BRAIN_MARGIN_MM / float(spacing.min()))))
    near_tissue = ndi.binary_fill_holes(
        ndi.binary_dilation(ndi.binary_fill_holes(tissue >= _TISSUE_THRESHOLD), iterations=margin))
    mask = (t1 > 0.02 * float(t1.max())) & near_tissue
    if not mask.any():
        raise ValueError("no brain voxels: the T1 must be a skull-stripped brain (non-zero on the brain) overlapping "
                         "its tissue maps.")
    brain = ndi.gaussian_filter(mask.astype(np.float32), _BRAIN_SMOOTH_MM / spacing)
    brain = np.clip(np.maximum(brain, tissue), 0.0, 1.0).astype(np.float32)
    labels = tissue_labels(brain, gm, wm, np.zeros(t1.shape, np.uint8))
    region = np.zeros(t1.shape, dtype=np.uint8)
    x, y, z = world_coordinates(t1.shape, affine)
    region[infratentorial_mask(x, y, z) & mask] = REGION_INFRATENTORIAL
    region[ventricle_mask(labels == CSF, mask, affine)] = REGION_VENTRICLE
    logger.info("anatomy %s at %s mm: brain %.0f ml, ventricles %.1f ml, infratentorial %.0f ml", t1.shape,
                np.round(spacing, 2).tolist(), mask.sum() * np.prod(spacing) / 1000,
                (region == REGION_VENTRICLE).sum() * np.prod(spacing) / 1000,
                (region == REGION_INFRATENTORIAL).sum() * np.prod(spacing) / 1000)
    return Anatomy(brain=brain, gm=gm.astype(np.float32), wm=wm.astype(np.float32), region=region, affine=affine)


def load_anatomy(mni_dir: str | os.PathLike) -> Anatomy:
    """:func:`build_anatomy` of the T1 and tissue maps in ``mni_dir`` (the files of :data:`MNI_NAMES`).

    Raises:
        ValueError: a file is missing (the message says how to fetch them) or the maps do not fit together.
    """
    import nibabel as nib

    folder = Path(mni_dir)
    missing = [name for name in MNI_NAMES.values() if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"--mni_dir {folder} lacks {', '.join(missing)}; fetch the MNI152 T1 and its tissue maps "
                         "with `python -m scripts.demo.data --output data --which mni` (into data/mni/raw).")
    images = {key: nib.load(str(folder / name)) for key, name in MNI_NAMES.items()}
    affine = images["t1"].affine
    for key in ("gm", "wm"):
        if not np.allclose(images[key].affine, affine, atol=1e-3):
            raise ValueError(f"{folder / MNI_NAMES[key]} is not on the T1's voxel grid (affines differ).")
    arrays = {key: np.asarray(img.dataobj, dtype=np.float32) for key, img in images.items()}
    return build_anatomy(arrays["t1"], arrays["gm"], arrays["wm"], affine)
