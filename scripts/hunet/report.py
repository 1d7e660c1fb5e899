# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Lesion reports and per-case segmentation metrics (IoU, HD95, DSC, sensitivity, specificity) of the 2D workflow."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from monai.utils import optional_import
from scipy import ndimage
from scripts.io_utils import atomic_write_text

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", name="Engine")
    Events, _ = optional_import("ignite.engine", name="Events")

__all__ = ["lesion_report", "case_metrics", "CaseMetricsSaver", "write_json_atomic"]

logger = logging.getLogger(__name__)

METRICS = ("iou", "hd95", "dsc", "sensitivity", "specificity")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON (NaN/inf as null) to ``path`` atomically."""
    atomic_write_text(json.dumps(_json_safe(obj), indent=2), path)
    return Path(path)


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


def _spacing_of(x: Any) -> list[float] | None:
    aff = getattr(x, "affine", None)
    if aff is None:
        return None
    aff = np.asarray(aff.detach().cpu() if isinstance(aff, torch.Tensor) else aff, dtype=np.float64)
    n = aff.shape[0] - 1
    return np.sqrt((aff[:n, :n] ** 2).sum(axis=0)).tolist()


class CaseMetricsSaver:
    """Ignite handler: per-case IoU, HD95, DSC, sensitivity, specificity written to CSV and JSON when the run ends.

    It reads the decollated engine output (a list of dicts, one per case) after post-processing; the prediction
    and the label must lie on the same grid (e.g. the prediction inverted to the original image space).

    Args:
        output_dir: folder for ``<name>.csv`` and ``<name>.json``.
        pred_key: key of the binary prediction.
        label_key: key of the reference mask.
        name: base file name.
    """

    def __init__(
        self, output_dir: str | os.PathLike, pred_key: str = "pred", label_key: str = "label", name: str = "metrics"
    ) -> None:
        self.output_dir = Path(output_dir)
        self.pred_key, self.label_key, self.name = pred_key, label_key, name
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            pred, label = item[self.pred_key], item[self.label_key]
            src = item.get("image", label)
            name = getattr(src, "meta", {}).get("filename_or_obj") or getattr(label, "meta", {}).get("filename_or_obj")
            name = name or f"case_{len(self.rows)}"
            row = {"case": Path(str(name)).name, **case_metrics(pred, label, _spacing_of(label))}
            self.rows.append(row)
            logger.info("%s: %s", row["case"], {k: round(row[k], 4) for k in METRICS})

    def summary(self) -> dict:
        """Mean and standard deviation of each metric over the cases (NaNs left out)."""
        out = {}
        for k in METRICS:
            vals = np.array([r[k] for r in self.rows], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            out[k] = {
                "mean": float(vals.mean()) if vals.size else float("nan"),
                "std": float(vals.std()) if vals.size else float("nan"),
                "n": int(vals.size),
            }
        return out

    def _write(self, engine: Engine) -> None:
        fields = ["case", *METRICS, "tp", "fp", "fn", "tn"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(buf.getvalue(), self.output_dir / f"{self.name}.csv")
        payload = {"hd95_unit": "mm", "cases": self.rows, "summary": self.summary()}
        write_json_atomic(payload, self.output_dir / f"{self.name}.json")
        logger.info("per-case metrics written to %s", self.output_dir / f"{self.name}.csv")
