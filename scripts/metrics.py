# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Segmentation metrics of an evaluation: per case and class in the case's original geometry, and the one rule
that aggregates them (nnU-Net's): per class, the mean over the cases; then the mean over the classes.

:class:`SegmentationMetrics` computes Dice, IoU, HD95 (millimetres: the voxel size of the reference's affine),
sensitivity and specificity of every foreground class of one case, with the binary definitions of
:func:`scripts.hunet.report.case_metrics` (the lesion workflow's). :func:`summarise` aggregates a metric's
per-case values; :class:`scripts.handlers.MetricsJSONWriter` writes both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .hunet.report import case_metrics

__all__ = ["METRICS", "AGGREGATION", "SegmentationMetrics", "summarise", "finite_mean"]

#: the metrics of :class:`SegmentationMetrics`, in column order
METRICS = ("dice", "iou", "hd95", "sensitivity", "specificity")

#: the aggregation rule, as metrics.json states it
AGGREGATION = (
    "per class: the mean (and std, n) over the cases with a finite value (HD95 is undefined when the prediction or "
    "the reference of a class is empty, sensitivity when the reference is); mean: the mean over the classes of the "
    "per-class means (nnU-Net's foreground mean); per case, <metric>_mean is the mean over that case's classes"
)

# binary metric of scripts.hunet.report.case_metrics -> name here
_BINARY = {"dsc": "dice", "iou": "iou", "hd95": "hd95", "sensitivity": "sensitivity", "specificity": "specificity"}


def _label_map(x: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    return arr[0] if arr.ndim >= 3 and arr.shape[0] == 1 else arr


class SegmentationMetrics:
    """Per-class metrics of one case: ``(pred, label, spacing) -> {metric: {class name: value}}``.

    ``pred`` and ``label`` are label maps of class indices (channel-first with one channel, or without a channel)
    on the same grid: the prediction inverted to the case's original geometry and the reference as stored.
    Class ``i`` (1-based) is ``class_names[i - 1]``; background is not evaluated. Per class (binary masks
    ``pred == i``, ``label == i``): Dice and IoU (1 when both masks are empty), HD95 (in the units of
    ``spacing``, millimetres for a NIfTI affine; NaN when either mask is empty), sensitivity (NaN without
    reference voxels) and specificity.

    Args:
        class_names: names of classes 1, 2, ... (``out_channels - 1`` of them).

    Raises:
        ValueError: no class names.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        if isinstance(class_names, str) or not class_names:
            raise ValueError(f"class_names must list the foreground classes, got {class_names!r}.")
        self.class_names = [str(c) for c in class_names]

    def __call__(
        self, pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, spacing: Sequence[float] | None = None
    ) -> dict[str, dict[str, float]]:
        """The metrics of one case.

        Raises:
            ValueError: ``pred`` and ``label`` have different shapes.
        """
        p, g = _label_map(pred), _label_map(label)
        if p.shape != g.shape:
            raise ValueError(f"prediction {p.shape} and reference {g.shape} differ in shape: the prediction must be "
                             "inverted to the reference's grid.")
        out: dict[str, dict[str, float]] = {m: {} for m in METRICS}
        for i, name in enumerate(self.class_names, start=1):
            values = case_metrics(p == i, g == i, spacing)
            for binary, metric in _BINARY.items():
                out[metric][name] = float(values[binary])
        return out


def summarise(values: np.ndarray | torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """Aggregate a metric's per-case values by :data:`AGGREGATION`.

    Args:
        values: ``(cases,)`` for a metric with one value per case, ``(cases, classes)`` for a per-class metric;
            NaN (e.g. HD95 of an empty mask) is left out.
        class_names: names of the classes' columns (required for a per-class metric).

    Returns:
        one value per case: ``mean``, ``std`` (population) and ``n`` over the finite values. Per class:
        ``per_class`` (the means), ``per_class_std``, ``per_class_n``, then ``mean`` (the mean over the classes
        of the finite per-class means) and ``n`` (cases with at least one finite value). ``None`` where there is no
        finite value.

    Raises:
        ValueError: a per-class metric without one name per class.
    """
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if v.ndim == 1:
        return _stats(v)
    if v.ndim != 2 or class_names is None or len(class_names) != v.shape[1]:
        raise ValueError(f"a per-class metric of shape {v.shape} needs one class name per column, got {class_names}.")
    per_class = {str(c): _stats(v[:, j]) for j, c in enumerate(class_names)}
    means = [s["mean"] for s in per_class.values() if s["mean"] is not None]
    return {
        "mean": float(np.mean(means)) if means else None,
        "n": int(np.isfinite(v).any(axis=1).sum()),
        "per_class": {c: s["mean"] for c, s in per_class.items()},
        "per_class_std": {c: s["std"] for c, s in per_class.items()},
        "per_class_n": {c: s["n"] for c, s in per_class.items()},
    }


def _stats(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def finite_mean(values: Mapping[str, float] | Sequence[float]) -> float:
    """The mean of the finite values (NaN when there is none): a case's mean over its classes."""
    v = [float(x) for x in (values.values() if isinstance(values, Mapping) else values)]
    v = [x for x in v if math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan
