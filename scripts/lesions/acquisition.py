# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Where a synthetic volume's voxels lie: its voxel grid (in-plane resolution, slice thickness) and the random
deformation that maps the template's anatomy onto it.

* **grid**: axial slices along world z, covering the template's field of view (the world box of its voxels). Each
  volume draws an in-plane voxel size (:data:`IN_PLANE_MM`) and a slice thickness (:data:`THICKNESSES`, e.g.
  1 x 1 x 3 or 1 x 1 x 5 mm); ``downsample`` multiplies the in-plane size, and the thickness is at least that; a given
  ``shape`` fixes the grid instead (voxel size = field of view / shape).
* **slice profile**: before sampling, the template maps are smoothed by a Gaussian with the variance of a box as
  wide as the voxel (minus the template's own), so a thick slice averages the tissue it spans (partial volume).
* **deformation**: output point ``p`` -> template point ``c + M (p - c) + t + d(p)``: ``M`` a rotation (up to
  ``max_rotation_deg`` about each axis) times per-axis scales (a global and a per-axis factor), ``t`` a shift,
  ``c`` the field of view's centre, ``d`` a smooth elastic displacement (cubic B-spline of random control-point
  displacements, :data:`CONTROL_MM` apart, standard deviation drawn in ``elastic_mm``). The probability maps are
  sampled linearly, the region labels by nearest neighbour; lesions are drawn afterwards on the deformed maps, so
  image, mask and tissue map agree voxel by voxel.
* **brain region**: only the box of the grid that the deformation maps into the template's brain is computed
  (:func:`brain_region`); the rest is background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from scripts.lesions.anatomy import Anatomy

__all__ = [
    "IN_PLANE_MM", "THICKNESSES", "THICKNESS_WEIGHTS", "CONTROL_MM", "Grid", "Deformation", "field_of_view",
    "check_grid_options", "sample_grid", "sample_deformation", "template_coordinates", "brain_region", "warp_anatomy",
]

#: range of the in-plane voxel size (mm) before ``downsample``
IN_PLANE_MM = (0.9, 1.2)
#: slice thicknesses (mm; at least the in-plane size), drawn with :data:`THICKNESS_WEIGHTS` (3D FLAIR, 2D FLAIR)
THICKNESSES = (1.0, 2.0, 3.0, 4.0, 5.0)
THICKNESS_WEIGHTS = (0.25, 0.1, 0.35, 0.1, 0.2)
#: distance (mm) between the control points of the elastic displacement
CONTROL_MM = 40.0


@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid, axis-aligned with the world (RAS): axis 2 is the slice axis.

    Attributes:
        shape: voxels along each axis.
        spacing: voxel size in mm (the third is the slice thickness).
        affine: 4 x 4 voxel-to-world matrix.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray

    @property
    def voxel_ml(self) -> float:
        """The volume of one voxel in ml."""
        return float(np.prod(self.spacing)) / 1000.0

    def crop(self, region: Sequence[slice]) -> Grid:
        """The part of the grid in ``region`` (one slice with start and stop per axis), on the same world positions."""
        start = np.array([r.start for r in region], dtype=np.float64)
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ start + self.affine[:3, 3]
        return Grid(shape=tuple(int(r.stop - r.start) for r in region), spacing=self.spacing, affine=affine)


@dataclass(frozen=True)
class Deformation:
    """A random deformation (see the module's docs).

    Attributes:
        matrix: 3 x 3 linear part ``M`` (rotation times scales).
        shift: ``t`` in mm.
        centre: ``c`` in world mm.
        control: ``(3, gx, gy, gz)`` displacements (mm) of the control points of ``d``.
        control_origin: world position (mm) of control point ``(0, 0, 0)``.
        description: the drawn parameters (angles, scales, shift, elastic standard deviation), for the sidecar.
    """

    matrix: np.ndarray
    shift: np.ndarray
    centre: np.ndarray
    control: np.ndarray
    control_origin: np.ndarray
    description: dict


def field_of_view(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The world box (mm) the voxels of a grid cover: its lower and upper corners."""
    corners = np.array([[a, b, c] for a in (-0.5, shape[0] - 0.5) for b in (-0.5, shape[1] - 0.5)
                        for c in (-0.5, shape[2] - 0.5)])
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def check_grid_options(downsample: float = 1.0, shape: Sequence[int] | None = None) -> None:
    """Check the grid options of :func:`sample_grid`.

    Raises:
        ValueError: ``downsample`` below 1, or a shape that is not three sizes of at least 8 voxels.
    """
    if shape is not None:
        if len(shape) != 3 or min(int(s) for s in shape) < 8:
            raise ValueError(f"--shape needs three sizes of at least 8 voxels, got {list(shape)}.")
    elif not downsample >= 1.0:
        raise ValueError(f"--downsample must be at least 1 (2 halves the resolution), got {downsample}.")


def sample_grid(
    rng: np.random.Generator,
    template_shape: Sequence[int],
    template_affine: np.ndarray,
    downsample: float = 1.0,
    shape: Sequence[int] | None = None,
) -> Grid:
    """Draw a volume's grid over the template's field of view (see the module's docs).

    Args:
        rng: the volume's generator.
        template_shape: the template's grid shape.
        template_affine: the template's voxel-to-world matrix.
        downsample: factor on the drawn in-plane voxel size (2: about 2 x 2 mm, slices at least as thick).
        shape: a fixed output shape instead of drawn voxel sizes.

    Returns:
        the :class:`Grid`.

    Raises:
        ValueError: see :func:`check_grid_options`.
    """
    lower, upper = field_of_view(template_shape, template_affine)
    extent = upper - lower
    # draw the protocol even for a fixed shape, so every volume uses the generator alike
    in_plane = rng.uniform(*IN_PLANE_MM)
    thickness = float(rng.choice(THICKNESSES, p=THICKNESS_WEIGHTS))
    check_grid_options(downsample, shape)
    if shape is not None:
        size = np.array([int(s) for s in shape])
        spacing = extent / size
    else:
        size_xy = in_plane * downsample
        spacing = np.array([size_xy, size_xy, max(thickness, size_xy)])
        size = np.maximum(np.round(extent / spacing).astype(int), 8)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (lower + upper) / 2 - (size - 1) / 2 * spacing
    return Grid(shape=tuple(int(s) for s in size), spacing=tuple(float(s) for s in spacing), affine=affine)


def sample_deformation(
    rng: np.random.Generator,
    grid: Grid,
    max_rotation_deg: float = 8.0,
    scale_range: tuple[float, float] = (0.92, 1.08),
    axis_scale_range: tuple[float, float] = (0.97, 1.03),
    max_shift_mm: float = 5.0,
    elastic_mm: tuple[float, float] = (1.0, 4.0),
) -> Deformation:
    """Draw a random deformation for a grid (see the module's docs).

    Args:
        rng: the volume's generator.
        grid: the output grid.
        max_rotation_deg: largest rotation about each axis.
        scale_range: range of the global scale.
        axis_scale_range: range of the extra scale per axis.
        max_shift_mm: largest shift along each axis.
        elastic_mm: range of the control points' displacement standard deviation.

    Returns:
        the :class:`Deformation`.
    """
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scales = rng.uniform(*scale_range) * rng.uniform(*axis_scale_range, 3)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    matrix = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scales)
    elastic = rng.uniform(*elastic_mm)
    lower = grid.affine[:3, 3] - 0.5 * np.asarray(grid.spacing)
    extent = np.asarray(grid.shape) * np.asarray(grid.spacing)
    n_control = np.ceil(extent / CONTROL_MM).astype(int) + 3  # one control interval beyond each side
    control = rng.normal(0.0, elastic, (3, *n_control))
    return Deformation(
        matrix=matrix, shift=shift, centre=lower + extent / 2, control=control,
        control_origin=lower - CONTROL_MM, description={
            "rotation_deg": np.round(angles, 3).tolist(), "scale": np.round(scales, 4).tolist(),
            "shift_mm": np.round(shift, 3).tolist(), "elastic_sd_mm": round(float(elastic), 3),
            "control_mm": CONTROL_MM,
        })


def _bspline_basis(positions: np.ndarray, n_control: int) -> np.ndarray:
    """``(len(positions), n_control)`` cubic B-spline weights at ``positions`` (in control-point units)."""
    base = np.floor(positions).astype(int)
    t = positions - base
    weights = np.stack([(1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6,
                        (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6, t ** 3 / 6], axis=1)
    basis = np.zeros((len(positions), n_control))
    rows = np.arange(len(positions))
    for offset in range(4):
        cols = np.clip(base - 1 + offset, 0, n_control - 1)
        np.add.at(basis, (rows, cols), weights[:, offset])
    return basis


def _tensor_product(bases: Sequence[np.ndarray], control: np.ndarray) -> np.ndarray:
    """``sum_abc bx[x, a] by[y, b] bz[z, c] control[a, b, c]``, one axis at a time (einsum without BLAS, so the
    result does not depend on the machine's thread count)."""
    bx, by, bz = bases
    out = np.einsum("zc,abc->abz", bz, control, optimize=False)
    out = np.einsum("yb,abz->ayz", by, out, optimize=False)
    return np.einsum("xa,ayz->xyz", bx, out, optimize=False)


def _axis_positions(grid: Grid) -> list[np.ndarray]:
    """World coordinates (mm) of the voxel centres along each axis of an axis-aligned grid."""
    return [grid.affine[a, 3] + grid.spacing[a] * np.arange(grid.shape[a]) for a in range(3)]


def template_coordinates(deformation: Deformation, grid: Grid, template_affine: np.ndarray) -> np.ndarray:
    """The template voxel coordinates of every output voxel under ``deformation``.

    Returns:
        float32 array ``(3, *grid.shape)`` for :func:`scipy.ndimage.map_coordinates`.
    """
    axes = _axis_positions(grid)
    bases = [_bspline_basis((p - deformation.control_origin[a]) / CONTROL_MM, deformation.control.shape[a + 1])
             for a, p in enumerate(axes)]
    inverse = np.linalg.inv(np.asarray(template_affine, dtype=np.float64))
    to_voxel = inverse[:3, :3]
    linear = to_voxel @ deformation.matrix
    offset = to_voxel @ (deformation.centre + deformation.shift) + inverse[:3, 3]
    centred = [p - deformation.centre[a] for a, p in enumerate(axes)]
    coords = np.empty((3, *grid.shape), dtype=np.float32)
    disp = [_tensor_product(bases, deformation.control[w]) for w in range(3)]
    for r in range(3):
        value = (linear[r, 0] * centred[0][:, None, None] + linear[r, 1] * centred[1][None, :, None]
                 + linear[r, 2] * centred[2][None, None, :] + offset[r])
        value = value + sum(to_voxel[r, w] * disp[w] for w in range(3) if to_voxel[r, w] != 0.0)
        coords[r] = value
    return coords


def _profile_sigma(template_affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Gaussian sigma (template voxels, per template axis) of the slice profile of a grid with ``spacing``."""
    a = np.asarray(template_affine, dtype=np.float64)[:3, :3]
    template_mm = np.linalg.norm(a, axis=0)
    directions = a / template_mm  # column j: world direction of template axis j
    # box profile of the output voxel minus the template's own, as a variance in world axes
    variance = np.maximum(np.asarray(spacing, dtype=np.float64) ** 2 - (directions ** 2 @ template_mm) ** 2, 0) / 12
    return np.sqrt((directions ** 2).T @ variance) / template_mm


def brain_region(anatomy: Anatomy, grid: Grid, deformation: Deformation, step: int = 4) -> tuple[slice, ...]:
    """The box of ``grid`` that holds every voxel the deformation maps into the template's brain (its bounding box),
    found on every ``step``-th voxel and padded by ``step`` voxels; the rest of the grid is background.

    Returns:
        one slice per axis (the whole axis when nothing maps into the brain).
    """
    nonzero = np.nonzero(anatomy.brain > 0.01)
    low = np.array([i.min() for i in nonzero]) - 1.0
    high = np.array([i.max() for i in nonzero]) + 1.0
    coarse = Grid(shape=tuple(int(np.ceil(n / step)) for n in grid.shape),
                  spacing=tuple(s * step for s in grid.spacing), affine=grid.affine @ np.diag([step, step, step, 1]))
    coords = template_coordinates(deformation, coarse, anatomy.affine)
    inside = np.all([(coords[a] >= low[a]) & (coords[a] <= high[a]) for a in range(3)], axis=0)
    if not inside.any():
        return tuple(slice(0, n) for n in grid.shape)
    region = []
    for a in range(3):
        hits = np.flatnonzero(inside.any(axis=tuple(b for b in range(3) if b != a)))
        region.append(slice(max(0, int(hits[0] - 1) * step), min(grid.shape[a], int(hits[-1] + 2) * step)))
    return tuple(region)


def warp_anatomy(anatomy: Anatomy, grid: Grid, deformation: Deformation) -> Anatomy:
    """The anatomy seen on ``grid`` through ``deformation``: probability maps smoothed by the slice profile and
    sampled linearly, region labels by nearest neighbour. Only the output voxels whose samples can be non-zero are
    interpolated (those whose nearest template voxel lies in the 26-neighbourhood of the smoothed brain's support).

    Returns:
        an :class:`~scripts.lesions.anatomy.Anatomy` on the grid (its affine the grid's).
    """
    coords = template_coordinates(deformation, grid, anatomy.affine)
    sigma = _profile_sigma(anatomy.affine, grid.spacing)
    maps = [anatomy.brain, anatomy.gm, anatomy.wm]  # the brain probability is at least gm and wm: its support holds all
    if sigma.max() > 0.05:
        maps = [ndi.gaussian_filter(m, sigma, truncate=3.0) for m in maps]
    support = ndi.binary_dilation(maps[0] > 0, structure=np.ones((3, 3, 3), dtype=bool)).astype(np.uint8)
    inside = ndi.map_coordinates(support, coords, order=0, mode="constant", cval=0, prefilter=False).astype(bool)
    points = coords[:, inside]

    def sample(volume: np.ndarray, order: int, dtype: type) -> np.ndarray:
        out = np.zeros(grid.shape, dtype=dtype)
        out[inside] = ndi.map_coordinates(volume, points, order=order, mode="constant", cval=0.0, prefilter=False)
        return out

    brain, gm, wm = (np.clip(sample(m, 1, np.float32), 0.0, 1.0) for m in maps)
    brain = np.maximum(brain, np.minimum(gm + wm, 1.0))
    return Anatomy(brain=brain, gm=gm, wm=wm, region=sample(anatomy.region, 0, np.uint8), affine=grid.affine.copy())
