# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tissue-map values and the location class of a white-matter voxel (used by lesion reports and the generator).

A tissue map is a uint8 volume with the values of :data:`TISSUE_LABELS`: 0 background, 1 CSF, 2 ventricle, 3 grey
matter, 4 white matter, 5 infratentorial tissue (brainstem and cerebellum). ``python -m scripts.lesions.generate``
writes one beside each synthetic volume; any segmentation relabelled to these values works.

The rule, applied to a lesion's centre voxel (distances between voxel centres, in mm, on the map's own grid):

1. **infratentorial**: the voxel is labelled infratentorial (brainstem or cerebellum tissue);
2. **periventricular**: white matter within :data:`PERIVENTRICULAR_MM` (5 mm) of a ventricle voxel;
3. **juxtacortical**: other white matter within :data:`JUXTACORTICAL_MM` (3 mm) of grey matter, i.e. touching it
   (the grey matter of the map: cortex and the deep grey nuclei it holds);
4. **deep_white_matter**: the rest of the white matter.

Other voxels (background, CSF, grey matter) have no class. The generator places each lesion's centre in the zone of
its class and records the class; a reader with the tissue map (e.g. a lesion report) finds the same class with
:func:`location_maps` and :func:`location_at`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["BACKGROUND", "CSF", "VENTRICLE", "GREY_MATTER", "WHITE_MATTER", "INFRATENTORIAL", "TISSUE_LABELS",
           "LOCATIONS", "PERIVENTRICULAR_MM", "JUXTACORTICAL_MM", "LocationMaps", "location_maps", "location_at"]

BACKGROUND, CSF, VENTRICLE, GREY_MATTER, WHITE_MATTER, INFRATENTORIAL = range(6)
#: the values of a tissue map and their names
TISSUE_LABELS: dict[int, str] = {
    BACKGROUND: "background", CSF: "csf", VENTRICLE: "ventricle", GREY_MATTER: "grey_matter",
    WHITE_MATTER: "white_matter", INFRATENTORIAL: "infratentorial",
}
#: the location classes; a zone map holds ``index + 1`` (0: no class)
LOCATIONS: tuple[str, ...] = ("periventricular", "juxtacortical", "deep_white_matter", "infratentorial")
PERIVENTRICULAR_MM = 5.0
JUXTACORTICAL_MM = 3.0


@dataclass(frozen=True)
class LocationMaps:
    """The location zones of a tissue map and the distances they come from.

    Attributes:
        zones: uint8, ``LOCATIONS.index(name) + 1`` on the voxels of each class, 0 elsewhere.
        ventricle_mm: distance (mm) of each voxel to the nearest ventricle voxel, exact within the ventricles' box
            grown by the periventricular distance plus two voxels, ``inf`` beyond (and without ventricles).
        grey_mm: distance (mm) of each voxel to the nearest grey matter voxel (``inf`` without grey matter).
    """

    zones: np.ndarray
    ventricle_mm: np.ndarray
    grey_mm: np.ndarray

    def zone(self, name: str) -> np.ndarray:
        """The boolean mask of the class ``name`` (one of :data:`LOCATIONS`)."""
        if name not in LOCATIONS:
            raise ValueError(f"unknown location class {name!r}; use one of {LOCATIONS}.")
        return self.zones == LOCATIONS.index(name) + 1


def _distance_to(mask: np.ndarray, spacing: Sequence[float], within_mm: float | None = None) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest voxel of ``mask`` (0 on it, ``inf`` everywhere if it is empty).

    With ``within_mm``, only the box of ``mask`` grown by ``within_mm`` plus two voxels is computed (exact there,
    ``inf`` outside), which is all a threshold at ``within_mm`` needs.
    """
    distance = np.full(mask.shape, np.inf, dtype=np.float32)
    if not mask.any():
        return distance
    box = tuple(slice(None) for _ in mask.shape)
    if within_mm is not None:
        nonzero = np.nonzero(mask)
        margin = [int(np.ceil(within_mm / s)) + 2 for s in spacing]
        box = tuple(slice(max(0, int(i.min()) - m), int(i.max()) + m + 1) for i, m in zip(nonzero, margin))
    distance[box] = ndi.distance_transform_edt(~mask[box], sampling=[float(s) for s in spacing])
    return distance


def location_maps(
    tissue: np.ndarray,
    spacing: Sequence[float],
    periventricular_mm: float = PERIVENTRICULAR_MM,
    juxtacortical_mm: float = JUXTACORTICAL_MM,
) -> LocationMaps:
    """The location zones of a tissue map (rule in the module's docs).

    Args:
        tissue: 3D tissue map with the values of :data:`TISSUE_LABELS`.
        spacing: voxel size in mm along each axis.
        periventricular_mm: the periventricular distance to the ventricles.
        juxtacortical_mm: the juxtacortical distance to grey matter.

    Returns:
        the :class:`LocationMaps`.

    Raises:
        ValueError: a map that is not 3D, or a spacing or distance that is not positive.
    """
    tissue = np.asarray(tissue)
    if tissue.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"the tissue map must be 3D with 3 spacings, got shape {tissue.shape} and {list(spacing)}.")
    if min(spacing) <= 0 or periventricular_mm <= 0 or juxtacortical_mm <= 0:
        raise ValueError("spacing and distances must be positive mm.")
    ventricle_mm = _distance_to(tissue == VENTRICLE, spacing, periventricular_mm)
    grey_mm = _distance_to(tissue == GREY_MATTER, spacing)
    wm = tissue == WHITE_MATTER
    zones = np.zeros(tissue.shape, dtype=np.uint8)
    periventricular = wm & (ventricle_mm <= periventricular_mm)
    juxtacortical = wm & ~periventricular & (grey_mm <= juxtacortical_mm)
    zones[wm] = LOCATIONS.index("deep_white_matter") + 1
    zones[juxtacortical] = LOCATIONS.index("juxtacortical") + 1
    zones[periventricular] = LOCATIONS.index("periventricular") + 1
    zones[tissue == INFRATENTORIAL] = LOCATIONS.index("infratentorial") + 1
    return LocationMaps(zones=zones, ventricle_mm=ventricle_mm, grey_mm=grey_mm)


def location_at(maps: LocationMaps, voxel: Sequence[int]) -> str | None:
    """The location class at a voxel (e.g. a lesion's centre), ``None`` outside the white matter and the
    infratentorial region."""
    zone = int(maps.zones[tuple(int(v) for v in voxel)])
    return LOCATIONS[zone - 1] if zone else None
