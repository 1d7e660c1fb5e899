# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""MS-like lesions: how many, how large, what shape, where (drawn on a volume's own grid, after its deformation).

* **count** and **size**: a :class:`LesionLoad` gives the range of the count and of the volume (ml, drawn
  log-uniformly); a lesion has at least ``min_voxels`` voxels of the grid (the lower end is raised to that on coarse
  grids, see :meth:`LesionLoad.volume_range`). Juxtacortical lesions are at most 1 ml, infratentorial ones 1.5 ml
  (:data:`LOCATION_MAX_ML`).
* **location**: each lesion draws a class with the load's weights and its centre uniformly among the voxels of that
  class's zone (:mod:`scripts.hunet.locations`) whose tissue probability is at least 0.6.
* **shape**: an ellipsoid of the drawn volume with random semi-axis ratios (0.45-1) and a random orientation; a
  periventricular lesion's long axis points away from the ventricle wall (along the gradient of the distance to the
  ventricles) with probability 0.7, as Dawson's fingers do. A share ``irregular`` of the lesions of at least 30
  voxels is irregular, inside its ellipsoid: either *lobulated* (the ellipsoid shrunk to 0.75 united with 2-4 smaller
  ellipsoids around points inside it) or *irregular* (the points where ``rho^2 <= 1 - a * n``, ``rho`` the
  ellipsoidal radius, ``n`` smoothed Gaussian noise of unit deviation, ``a`` in 0.3-0.6).
* **partial volume and tissue**: the shape is sampled at 2 or more points per voxel and axis (more across thick
  slices); the lesion fraction of a voxel is the covered share times the probability of the tissue the class may
  occupy (white matter; white or grey matter for juxtacortical lesions, which touch the cortex; brainstem and
  cerebellar tissue for infratentorial ones). The mask holds the voxels of fraction >= 0.5 on that tissue; only the
  connected part (26-neighbourhood) holding the centre is kept.
* **separation**: a lesion whose mask touches another (26-neighbourhood) is drawn again, so each recorded lesion is
  one connected component of the mask. After ``max_attempts`` failed draws a lesion is left out (logged, and
  ``requested`` / ``placed`` in the record differ).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from scripts.lesions.anatomy import GREY_MATTER, INFRATENTORIAL, WHITE_MATTER, Anatomy
from scripts.hunet.locations import LOCATIONS, LocationMaps

__all__ = ["LesionLoad", "LESION_LOADS", "LOCATION_MAX_ML", "LesionSet", "place_lesions", "render_shape"]

logger = logging.getLogger(__name__)

#: upper volume (ml) of the lesions of a class, whatever the load
LOCATION_MAX_ML: dict[str, float] = {"juxtacortical": 1.0, "infratentorial": 1.5}
_TISSUE_OF = {  # location class -> (tissue labels a lesion may cover, use grey matter probability too)
    "periventricular": ((WHITE_MATTER,), False),
    "deep_white_matter": ((WHITE_MATTER,), False),
    "juxtacortical": ((WHITE_MATTER, GREY_MATTER), True),
    "infratentorial": ((INFRATENTORIAL,), True),
}
_MIN_CENTRE_PROBABILITY = 0.6
_IRREGULAR_MIN_VOXELS = 30
_DAWSON_PROBABILITY = 0.7
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class LesionLoad:
    """How many lesions of what sizes, where.

    Attributes:
        name: the load's name.
        count: inclusive range of the number of lesions.
        volume_ml: range of a lesion's volume (ml), drawn log-uniformly.
        min_voxels: fewest voxels of a lesion on the volume's grid.
        irregular: share of irregular (lobulated or noisy) shapes among lesions of at least 30 voxels.
        weights: relative frequency of each location class (:data:`scripts.hunet.locations.LOCATIONS`).
        contrast: range of a lesion's intensity relative to grey matter (> 1: brighter).
    """

    name: str
    count: tuple[int, int]
    volume_ml: tuple[float, float]
    min_voxels: int = 3
    irregular: float = 0.4
    weights: Mapping[str, float] = field(default_factory=lambda: {
        "periventricular": 0.35, "juxtacortical": 0.2, "deep_white_matter": 0.3, "infratentorial": 0.15})
    contrast: tuple[float, float] = (1.15, 1.8)

    def __post_init__(self) -> None:
        if not 0 <= self.count[0] <= self.count[1]:
            raise ValueError(f"lesion load {self.name!r}: the count range must be 0 <= low <= high, got "
                             f"{self.count}.")
        if not 0 < self.volume_ml[0] <= self.volume_ml[1]:
            raise ValueError(f"lesion load {self.name!r}: the volume range (ml) must be 0 < low <= high, got "
                             f"{self.volume_ml}.")
        if self.min_voxels < 1 or not 0 <= self.irregular <= 1 or not 1 < self.contrast[0] <= self.contrast[1]:
            raise ValueError(f"lesion load {self.name!r}: min_voxels >= 1, irregular in [0, 1] and a contrast range "
                             f"above 1 are needed, got {self.min_voxels}, {self.irregular}, {self.contrast}.")
        unknown = set(self.weights) - set(LOCATIONS)
        if unknown or not sum(self.weights.values()) > 0 or min(self.weights.values()) < 0:
            raise ValueError(f"lesion load {self.name!r}: weights need non-negative values for {LOCATIONS} (some "
                             f"positive), got {dict(self.weights)}.")

    def volume_range(self, voxel_ml: float, location: str) -> tuple[float, float]:
        """The volume range (ml) of a lesion of class ``location`` on a grid of ``voxel_ml`` voxels: the load's,
        capped by :data:`LOCATION_MAX_ML`, its lower end at least ``min_voxels`` voxels (and the upper end at
        least twice that, on grids too coarse for the load)."""
        low = max(self.volume_ml[0], self.min_voxels * voxel_ml)
        high = min(self.volume_ml[1], LOCATION_MAX_ML.get(location, np.inf))
        return low, max(high, 2 * low)


#: the loads of ``--lesion_load``
LESION_LOADS: dict[str, LesionLoad] = {
    "low": LesionLoad("low", count=(2, 8), volume_ml=(0.01, 1.0)),
    "mixed": LesionLoad("mixed", count=(5, 20), volume_ml=(0.005, 3.0)),
    "high": LesionLoad("high", count=(20, 45), volume_ml=(0.005, 5.0), irregular=0.5),
    "many_small": LesionLoad("many_small", count=(30, 70), volume_ml=(0.003, 0.06), irregular=0.2),
}


@dataclass(frozen=True)
class LesionSet:
    """The lesions drawn into one volume.

    Attributes:
        label: uint8 mask (1 on lesion voxels).
        fraction: float32 lesion fraction of each voxel (partial volume, for the image).
        contrast: float32 intensity of the lesion over each voxel relative to grey matter (1 where none).
        lesions: one record per lesion: ``id``, ``location``, ``shape``, ``centre_voxel``, ``centre_mm``,
            ``voxels``, ``volume_ml``, ``semi_axes_mm``, ``contrast``.
        requested: the number of lesions drawn for the volume (``len(lesions)`` unless some found no place).
    """

    label: np.ndarray
    fraction: np.ndarray
    contrast: np.ndarray
    lesions: list[dict]
    requested: int


def _unit_ball_point(rng: np.random.Generator) -> np.ndarray:
    """A point drawn uniformly in the unit ball."""
    direction = rng.normal(size=3)
    return direction / np.linalg.norm(direction) * rng.uniform() ** (1 / 3)


def _semi_axes(rng: np.random.Generator, volume_mm3: float) -> np.ndarray:
    """Semi-axes (mm, longest first) of an ellipsoid of ``volume_mm3`` with random ratios (0.45-1)."""
    ratios = np.array([1.0, *np.sort(rng.uniform(0.45, 1.0, 2))[::-1]])
    major = (3 * volume_mm3 / (4 * np.pi * ratios.prod())) ** (1 / 3)
    return major * ratios


def _orientation(rng: np.random.Generator, major: np.ndarray | None) -> np.ndarray:
    """A rotation matrix (columns: the ellipsoid's axes in array-axis mm space): random, or with its first column
    along ``major``."""
    random = Rotation.random(random_state=rng).as_matrix()
    if major is None:
        return random
    u = major / np.linalg.norm(major)
    v = random[:, 1] - (random[:, 1] @ u) * u
    if np.linalg.norm(v) < 1e-6:
        v = random[:, 2] - (random[:, 2] @ u) * u
    v /= np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)], axis=1)


def render_shape(
    rng: np.random.Generator,
    kind: str,
    semi_axes: np.ndarray,
    rotation: np.ndarray,
    spacing: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """The covered share of each voxel of a box around a lesion centred on the box's centre voxel.

    Args:
        rng: the volume's generator (irregular shapes draw from it).
        kind: ``"ellipsoid"``, ``"lobulated"`` or ``"irregular"`` (see the module's docs).
        semi_axes: the ellipsoid's semi-axes (mm).
        rotation: its orientation (columns: the axes' directions in array-axis mm space).
        spacing: voxel size (mm).

    Returns:
        (share in [0, 1] of each voxel of the box, float32; the box's half-size in voxels per axis).
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    half = np.ceil(semi_axes.max() / spacing_arr + 0.5).astype(int)
    samples = np.maximum(2, np.ceil(2 * spacing_arr / spacing_arr.min()).astype(int))
    # sample points (mm from the centre) per axis: ``samples`` points inside each voxel of the box
    axes = [((np.arange((2 * h + 1) * n) + 0.5) / n - h - 0.5) * s for h, n, s in zip(half, samples, spacing_arr)]

    def rho2(centre: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
        # squared ellipsoidal radius: |rot^T (p - centre) / radii|^2 over the sample grid
        total = 0.0
        for k in range(3):
            q = (rot[0, k] * (axes[0] - centre[0])[:, None, None] + rot[1, k] * (axes[1] - centre[1])[None, :, None]
                 + rot[2, k] * (axes[2] - centre[2])[None, None, :])
            total = total + (q / radii[k]) ** 2
        return total

    origin = np.zeros(3)
    if kind == "ellipsoid":
        inside = rho2(origin, semi_axes, rotation) <= 1.0
    elif kind == "lobulated":
        inside = rho2(origin, 0.75 * semi_axes, rotation) <= 1.0
        for _ in range(int(rng.integers(2, 5))):
            centre = rotation @ (0.7 * semi_axes * _unit_ball_point(rng))
            radii = semi_axes * rng.uniform(0.35, 0.6, 3)
            inside |= rho2(centre, radii, Rotation.random(random_state=rng).as_matrix()) <= 1.0
        inside &= rho2(origin, semi_axes, rotation) <= 1.0
    elif kind == "irregular":
        r2 = rho2(origin, semi_axes, rotation)
        noise = rng.standard_normal(r2.shape)
        step = spacing_arr / samples
        noise = ndi.gaussian_filter(noise, 0.35 * semi_axes.mean() / step, mode="wrap")
        noise /= max(float(noise.std()), 1e-6)
        inside = (r2 <= 1.0) & (r2 <= 1.0 - rng.uniform(0.3, 0.6) * noise)
    else:
        raise ValueError(f"unknown lesion shape {kind!r}; use 'ellipsoid', 'lobulated' or 'irregular'.")
    box = tuple(int(2 * h + 1) for h in half)
    share = inside.reshape(box[0], samples[0], box[1], samples[1], box[2], samples[2]).mean(axis=(1, 3, 5))
    return share.astype(np.float32), half


def _box(centre: np.ndarray, half: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The slices of a box of half-size ``half`` around ``centre`` in the volume and in the box, clipped."""
    lo = centre - half
    hi = centre + half + 1
    vol = tuple(slice(max(0, int(a)), min(int(n), int(b))) for a, b, n in zip(lo, hi, shape))
    box = tuple(slice(v.start - int(a), v.stop - int(a)) for v, a in zip(vol, lo))
    return vol, box


def _dawson_axis(maps: LocationMaps, centre: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
    """The direction (array-axis mm space) in which the distance to the ventricles grows at ``centre``."""
    grad = np.zeros(3)
    for a in range(3):
        lo, hi = centre.copy(), centre.copy()
        lo[a] = max(lo[a] - 1, 0)
        hi[a] = min(hi[a] + 1, maps.ventricle_mm.shape[a] - 1)
        if hi[a] > lo[a]:
            with np.errstate(invalid="ignore"):  # inf - inf beyond the computed box: no direction
                grad[a] = (maps.ventricle_mm[tuple(hi)] - maps.ventricle_mm[tuple(lo)]) / ((hi[a] - lo[a]) * spacing[a])
    return grad if np.isfinite(grad).all() and np.linalg.norm(grad) > 1e-6 else None


def place_lesions(
    rng: np.random.Generator,
    anatomy: Anatomy,
    tissue: np.ndarray,
    maps: LocationMaps,
    load: LesionLoad,
    max_attempts: int = 30,
) -> LesionSet:
    """Draw and place the lesions of one volume (rules in the module's docs).

    Args:
        rng: the volume's generator.
        anatomy: the volume's (deformed) tissue probabilities, on its grid.
        tissue: its tissue map (:meth:`~scripts.lesions.anatomy.Anatomy.tissue`).
        maps: its location zones (:func:`scripts.hunet.locations.location_maps` of ``tissue``).
        load: the lesion load.
        max_attempts: draws per lesion before it is left out.

    Returns:
        the :class:`LesionSet`.
    """
    shape = tissue.shape
    spacing = np.asarray(anatomy.spacing, dtype=np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    label = np.zeros(shape, dtype=np.uint8)
    fraction = np.zeros(shape, dtype=np.float32)
    contrast = np.ones(shape, dtype=np.float32)
    taken = np.zeros(shape, dtype=bool)  # lesion voxels and their 26-neighbours
    names = [name for name in LOCATIONS if load.weights.get(name, 0) > 0]
    weights = np.array([load.weights[name] for name in names], dtype=np.float64)
    candidates = {}
    for name in names:
        labels, with_grey = _TISSUE_OF[name]
        probability = anatomy.wm + anatomy.gm if with_grey else anatomy.wm
        candidates[name] = np.flatnonzero(maps.zone(name) & (probability >= _MIN_CENTRE_PROBABILITY))
    requested = int(rng.integers(load.count[0], load.count[1] + 1))
    records: list[dict] = []
    for _ in range(requested):
        for _attempt in range(max_attempts):
            name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
            if candidates[name].size == 0:
                continue
            centre = np.array(np.unravel_index(int(rng.choice(candidates[name])), shape))
            if taken[tuple(centre)]:
                continue
            low, high = load.volume_range(voxel_ml, name)
            volume_ml = float(np.exp(rng.uniform(np.log(low), np.log(high))))
            semi_axes = _semi_axes(rng, volume_ml * 1000.0)
            major = _dawson_axis(maps, centre, spacing) if (
                name == "periventricular" and rng.uniform() < _DAWSON_PROBABILITY) else None
            rotation = _orientation(rng, major)
            kind = "ellipsoid"
            if volume_ml >= _IRREGULAR_MIN_VOXELS * voxel_ml and rng.uniform() < load.irregular:
                kind = "lobulated" if rng.uniform() < 0.5 else "irregular"
            share, half = render_shape(rng, kind, semi_axes, rotation, tuple(spacing))
            vol, box = _box(centre, half, shape)
            allowed_labels, with_grey = _TISSUE_OF[name]
            probability = anatomy.wm[vol] + (anatomy.gm[vol] if with_grey else 0.0)
            own = share[box] * np.minimum(probability, 1.0) * np.isin(tissue[vol], allowed_labels)
            components, _ = ndi.label(own >= 0.5, structure=_STRUCTURE)
            local_centre = tuple(int(c - s.start) for c, s in zip(centre, vol))
            if components[local_centre] == 0:
                continue
            mask = components == components[local_centre]
            voxels = int(mask.sum())
            if voxels < load.min_voxels or voxels * voxel_ml > high or (mask & taken[vol]).any():
                continue
            rim = ndi.binary_dilation(mask, structure=_STRUCTURE)
            value = float(rng.uniform(*load.contrast))
            own = np.where(rim, own, 0.0).astype(np.float32)
            contrast[vol] = np.where(own > fraction[vol], value, contrast[vol])
            fraction[vol] = np.maximum(fraction[vol], own)
            label[vol][mask] = 1
            taken[vol] |= rim
            records.append({
                "id": len(records) + 1, "location": name, "shape": kind,
                "centre_voxel": centre.tolist(),
                "centre_mm": np.round(anatomy.affine[:3, :3] @ centre + anatomy.affine[:3, 3], 2).tolist(),
                "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 5),
                "semi_axes_mm": np.round(semi_axes, 2).tolist(), "contrast": round(value, 4),
            })
            break
        else:
            logger.warning("a %s lesion found no free place in %d draws; left out", load.name, max_attempts)
    return LesionSet(label=label, fraction=fraction, contrast=contrast, lesions=records, requested=requested)
