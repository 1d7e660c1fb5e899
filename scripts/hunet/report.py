# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Lesion reports and per-case segmentation metrics of the 2D workflow: voxel-wise IoU, HD95, DSC, sensitivity and
specificity, and lesion-wise detection (lesion-level recall, precision and false-positive count, as MS lesion
challenges report them).

The evaluation writes the metrics with :class:`scripts.handlers.MetricsJSONWriter` (``case_metrics=case_metrics``)
and the masks with their reports with :class:`scripts.transforms.AtomicSaveSegmentationd` (``report=True``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from scripts.hunet.locations import LOCATIONS, TISSUE_LABELS, location_maps

__all__ = [
    "lesion_report", "lesion_detection", "connected_components", "check_tissue", "case_metrics", "METRICS",
    "OTHER_LOCATION",
]

METRICS = ("iou", "hd95", "dsc", "sensitivity", "specificity", "lesion_recall", "lesion_precision", "lesion_fp")
"""The metrics :func:`case_metrics` computes (besides the voxel counts ``tp``, ``fp``, ``fn``, ``tn`` and the lesion
counts ``gt_lesions``, ``pred_lesions``, ``detected_lesions``)."""
OTHER_LOCATION = "other"
"""The location of a lesion whose representative voxel has no class (grey matter, CSF, background)."""


def connected_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """The connected components of a 2D / 3D mask (``connectivity`` 1 to ``mask.ndim``) and their number."""
    if not 1 <= connectivity <= mask.ndim:
        raise ValueError(f"connectivity must be 1 to {mask.ndim} for a {mask.ndim}D mask, got {connectivity}.")
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, connectivity))


def check_tissue(tissue: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``tissue`` as a uint8 map of ``shape`` (a 2D map gains a last axis of 1).

    Raises:
        ValueError: another shape, fractional values, or values outside :data:`scripts.hunet.locations.TISSUE_LABELS`.
    """
    tissue = np.asarray(tissue)
    if tissue.ndim == 2:
        tissue = tissue[..., None]
    if tissue.shape != shape:
        raise ValueError(f"the tissue map's shape {tissue.shape} differs from the mask's {shape}; "
                         "it must lie on the image's grid.")
    if np.issubdtype(tissue.dtype, np.floating) and not np.array_equal(tissue, np.round(tissue)):
        raise ValueError("the tissue map must hold whole tissue values, not probabilities.")
    values = np.unique(tissue)
    unknown = [v for v in values.tolist() if int(v) not in TISSUE_LABELS]
    if unknown:
        raise ValueError(f"the tissue map holds values {unknown[:5]} outside {sorted(TISSUE_LABELS)} "
                         f"({', '.join(f'{k} {v}' for k, v in TISSUE_LABELS.items())}).")
    return tissue.astype(np.uint8)


def lesion_report(
    mask: np.ndarray, spacing: Sequence[float], connectivity: int = 3, tissue: np.ndarray | None = None
) -> dict:
    """Describe the lesions of a binary mask: what the mask supports and nothing more.

    Lesions are the 3D connected components of the non-zero voxels. Per lesion: voxels, volume (ml), slices (along
    the last axis), centroid, bounding box and ``key_slice``, the slice holding most of its voxels. With a tissue map
    (values of :data:`scripts.hunet.locations.TISSUE_LABELS`, on the mask's grid) each lesion also gets a
    ``location`` (:data:`scripts.hunet.locations.LOCATIONS` or :data:`OTHER_LOCATION`): the class, by
    :func:`scripts.hunet.locations.location_maps`, of the lesion voxel nearest its centroid (the generator's rule
    for a lesion's centre; a voxel inside the lesion, also for curved ones).

    Args:
        mask: label map ``(H, W, D)`` (or ``(H, W)``); every non-zero voxel is lesion.
        spacing: voxel size in mm per axis of ``mask``.
        connectivity: neighbourhood of the components, 1 (faces) to 3 (faces, edges, corners).
        tissue: optional tissue map of the same shape.

    Returns:
        dict with ``num_lesions``, ``total_volume_ml``, ``voxel_volume_ml``, ``num_voxels``, ``slices_involved``
        (every slice with lesion voxels), ``slices_to_review`` (the lesions' key slices, in slice order),
        ``shape``, ``spacing_mm``, ``connectivity``, ``lesions`` (largest first: ``id``, ``num_voxels``,
        ``volume_ml``, ``slices``, ``key_slice``, ``centroid_voxel``, ``bbox_min``, ``bbox_max`` and, with a tissue
        map, ``location``) and, with a tissue map, ``location_counts`` (lesions per class).

    Raises:
        ValueError: a mask that is not 2D or 3D, a bad spacing or connectivity, or a tissue map of another shape or
            with values outside the tissue labels.
    """
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[..., None]
    if mask.ndim != 3:
        raise ValueError(f"lesion_report expects a 2D or 3D mask, got shape {mask.shape}.")
    spacing = [float(s) for s in spacing][: mask.ndim]
    if len(spacing) == 2:
        spacing.append(1.0)
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must give a positive size per axis of the mask, got {spacing}.")
    fg = mask > 0
    labels, num = connected_components(fg, connectivity)
    zones = None
    if tissue is not None:
        zones = location_maps(check_tissue(tissue, mask.shape), spacing).zones
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions = []
    if num:
        counts = np.bincount(labels.ravel(), minlength=num + 1)
        boxes = ndimage.find_objects(labels)
        centroids = ndimage.center_of_mass(fg, labels, range(1, num + 1))
        for i in range(1, num + 1):
            box = boxes[i - 1]
            sub = labels[box] == i
            per_slice = sub.sum(axis=(0, 1))
            lesion = {
                "num_voxels": int(counts[i]),
                "volume_ml": counts[i] * voxel_ml,
                "slices": (np.nonzero(per_slice)[0] + box[2].start).tolist(),
                "key_slice": int(np.argmax(per_slice)) + box[2].start,
                "centroid_voxel": [round(float(c), 2) for c in centroids[i - 1]],
                "bbox_min": [int(b.start) for b in box],
                "bbox_max": [int(b.stop - 1) for b in box],
            }
            if zones is not None:
                voxels = np.argwhere(sub) + [b.start for b in box]
                nearest = voxels[np.argmin((((voxels - centroids[i - 1]) * spacing) ** 2).sum(axis=1))]
                zone = int(zones[tuple(nearest)])
                lesion["location"] = LOCATIONS[zone - 1] if zone else OTHER_LOCATION
            lesions.append(lesion)
        lesions.sort(key=lambda r: -r["num_voxels"])
        for i, les in enumerate(lesions, 1):
            les["id"] = i
    total = int(fg.sum())
    report = {
        "num_lesions": int(num),
        "num_voxels": total,
        "total_volume_ml": total * voxel_ml,
        "voxel_volume_ml": voxel_ml,
        "slices_involved": np.nonzero(fg.any(axis=(0, 1)))[0].tolist(),
        "slices_to_review": sorted({les["key_slice"] for les in lesions}),
        "shape": list(mask.shape),
        "spacing_mm": spacing,
        "connectivity": connectivity,
        "lesions": lesions,
    }
    if zones is not None:
        report["location_counts"] = {name: sum(les["location"] == name for les in lesions)
                                     for name in (*LOCATIONS, OTHER_LOCATION)}
    return report


def lesion_detection(pred: np.ndarray, label: np.ndarray, connectivity: int | None = None) -> dict:
    """Lesion-wise detection of one case: a reference lesion (connected component of ``label``) is detected when at
    least one predicted voxel overlaps it; a predicted lesion is a false positive when it overlaps no reference
    voxel.

    Args:
        pred: binary prediction (non-zero = lesion), 2D or 3D.
        label: binary reference of the same shape.
        connectivity: neighbourhood of the components (1 to ``ndim``; default ``ndim``: 26-connected in 3D).

    Returns:
        dict with ``gt_lesions``, ``pred_lesions``, ``detected_lesions``, ``lesion_fp`` (predicted lesions without
        overlap), ``lesion_recall`` (detected / reference lesions; NaN without reference lesions) and
        ``lesion_precision`` (predicted lesions with overlap / predicted lesions; NaN without predicted lesions).
    """
    p, g = np.asarray(pred) > 0, np.asarray(label) > 0
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and label {g.shape} must have the same shape.")
    if p.ndim not in (2, 3):
        raise ValueError(f"lesion_detection expects 2D or 3D masks, got shape {p.shape}.")
    g_labels, n_gt = connected_components(g, connectivity or g.ndim)
    p_labels, n_pred = connected_components(p, connectivity or p.ndim)
    detected = len(np.unique(g_labels[p & g]))
    hit = len(np.unique(p_labels[p & g]))
    return {
        "gt_lesions": int(n_gt),
        "pred_lesions": int(n_pred),
        "detected_lesions": int(detected),
        "lesion_fp": int(n_pred - hit),
        "lesion_recall": detected / n_gt if n_gt else float("nan"),
        "lesion_precision": hit / n_pred if n_pred else float("nan"),
    }


def case_metrics(
    pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, spacing: Sequence[float] | None = None
) -> dict:
    """IoU, HD95 (mm when ``spacing`` is given), DSC, sensitivity, specificity and lesion-wise detection of one
    binary case.

    Args:
        pred: predicted mask, any shape (non-zero = foreground); a leading channel of size 1 is dropped.
        label: reference mask of the same shape.
        spacing: voxel size per spatial axis for HD95 (default 1).

    Returns:
        dict of the voxel-wise metrics plus ``tp``, ``fp``, ``fn``, ``tn``, and the lesion-wise detection of
        :func:`lesion_detection` (26-connected lesions in 3D). DSC and IoU are 1 when both masks are empty;
        sensitivity is NaN without reference foreground; HD95 is NaN when either mask is empty.
    """
    p = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred) > 0
    g = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label) > 0
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and label {g.shape} must have the same shape (invert the resampling).")
    if p.ndim >= 3 and p.shape[0] == 1:
        p, g = p[0], g[0]
    tp = int(np.logical_and(p, g).sum())
    fp = int(np.logical_and(p, ~g).sum())
    fn = int(np.logical_and(~p, g).sum())
    tn = int(p.size - tp - fp - fn)
    union = tp + fp + fn
    hd95 = float("nan")
    if p.any() and g.any():
        sp = None if spacing is None else [float(s) for s in spacing][: p.ndim]
        # MONAI 1.6 passes its own deprecated argument inside compute_hausdorff_distance: nothing to change here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*get_mask_edges:always_return_as_numpy", FutureWarning)
            hd = compute_hausdorff_distance(
                torch.as_tensor(p[None, None]),
                torch.as_tensor(g[None, None]),
                include_background=True,
                percentile=95,
                spacing=sp,
            )
        hd95 = float(hd.item())
    return {
        "iou": tp / union if union else 1.0,
        "hd95": hd95,
        "dsc": 2 * tp / (2 * tp + fp + fn) if union else 1.0,
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        **lesion_detection(p, g),
    }
