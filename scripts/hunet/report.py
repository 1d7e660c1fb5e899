# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Lesion reports and per-case segmentation metrics (IoU, HD95, DSC, sensitivity, specificity) of the 2D workflow.

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

__all__ = ["lesion_report", "case_metrics", "METRICS"]

METRICS = ("iou", "hd95", "dsc", "sensitivity", "specificity")
"""The metrics :func:`case_metrics` computes (besides the confusion counts ``tp``, ``fp``, ``fn``, ``tn``)."""


def lesion_report(mask: np.ndarray, spacing: Sequence[float], connectivity: int = 3) -> dict:
    """Describe the lesions of a binary mask: 3D connected components, volumes in ml, slices involved.

    Args:
        mask: label map ``(H, W, D)`` (or ``(H, W)``); every non-zero voxel is lesion.
        spacing: voxel size in mm per axis of ``mask``.
        connectivity: neighbourhood of the components, 1 (faces) to ``mask.ndim`` (faces, edges, corners).

    Returns:
        dict with ``num_lesions``, ``total_volume_ml``, ``voxel_volume_ml``, ``num_voxels``,
        ``slices_involved`` (indices along the last axis), ``shape``, ``spacing_mm`` and ``lesions`` (per
        lesion: ``id``, ``num_voxels``, ``volume_ml``, ``slices``, ``centroid_voxel``, ``bbox_min``, ``bbox_max``),
        largest lesion first.
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
    if not 1 <= connectivity <= 3:
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}.")
    fg = mask > 0
    labels, num = ndimage.label(fg, structure=ndimage.generate_binary_structure(3, connectivity))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions = []
    if num:
        counts = np.bincount(labels.ravel(), minlength=num + 1)
        boxes = ndimage.find_objects(labels)
        centroids = ndimage.center_of_mass(fg, labels, range(1, num + 1))
        for i in range(1, num + 1):
            box = boxes[i - 1]
            sub = labels[box] == i
            slices = (np.nonzero(sub.any(axis=(0, 1)))[0] + box[2].start).tolist()
            lesions.append(
                {
                    "num_voxels": int(counts[i]),
                    "volume_ml": counts[i] * voxel_ml,
                    "slices": slices,
                    "centroid_voxel": [round(float(c), 2) for c in centroids[i - 1]],
                    "bbox_min": [int(s.start) for s in box],
                    "bbox_max": [int(s.stop - 1) for s in box],
                }
            )
        lesions.sort(key=lambda r: -r["num_voxels"])
        for i, les in enumerate(lesions, 1):
            les["id"] = i
    total = int(fg.sum())
    return {
        "num_lesions": int(num),
        "num_voxels": total,
        "total_volume_ml": total * voxel_ml,
        "voxel_volume_ml": voxel_ml,
        "slices_involved": np.nonzero(fg.any(axis=(0, 1)))[0].tolist(),
        "shape": list(mask.shape),
        "spacing_mm": spacing,
        "connectivity": connectivity,
        "lesions": lesions,
    }


def case_metrics(
    pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, spacing: Sequence[float] | None = None
) -> dict:
    """IoU, HD95 (mm when ``spacing`` is given), DSC, sensitivity and specificity of one binary case.

    Args:
        pred: predicted mask, any shape (non-zero = foreground); a leading channel of size 1 is dropped.
        label: reference mask of the same shape.
        spacing: voxel size per spatial axis for HD95 (default 1).

    Returns:
        dict of the five metrics plus ``tp``, ``fp``, ``fn``, ``tn``. DSC and IoU are 1 when both masks are
        empty; sensitivity is NaN without reference foreground; HD95 is NaN when either mask is empty.
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
    }
