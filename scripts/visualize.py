# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Pictures a reader can use: a segmentation over its image in three planes, and a per-case Dice bar chart (PNG).

:func:`overlay_figure` draws the axial, coronal and sagittal planes through the centre of the largest connected
structure of a label map, on the image's own voxel grid (the input's resolution), with the voxel spacing as aspect
ratio, orientation letters on every side and a legend of class names and colours; :class:`SaveOverlayd` writes it
per case after the prediction is inverted to the input's geometry. :func:`dice_chart_figure` draws the per-case,
per-class Dice of an evaluation's ``metrics.json`` (:class:`scripts.handlers.MetricsJSONWriter`);
:func:`save_dice_chart` writes it, :class:`DiceChartWriter` when an evaluation ends. The figures are built with
:class:`matplotlib.figure.Figure` (Agg, no display, no global ``pyplot`` state) and written atomically
(:func:`scripts.io_utils.atomic_path`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform

from .hunet.report import lesion_report
from .io_utils import OutputNames, atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PLANES", "display_orientation", "structure_centre", "overlay_figure", "save_overlay", "SaveOverlayd",
    "dice_columns", "dice_chart_figure", "save_dice_chart", "DiceChartWriter",
]

logger = logging.getLogger(__name__)

PLANES = ("axial", "coronal", "sagittal")
"""The panels of :func:`overlay_figure`, left to right."""

# per plane of an array in RAS order: (axis held fixed, axis along the rows, axis along the columns)
_PLANE_AXES = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}
# letters of the (negative, positive) end of each RAS axis
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ALPHA = 0.45
_DPI = 100


def _class_colour(index: int) -> tuple[float, float, float]:
    """The colour of class ``index`` (from 1): matplotlib's ``tab10``, repeated after ten classes."""
    from matplotlib import colormaps

    return tuple(float(c) for c in colormaps["tab10"]((index - 1) % 10)[:3])  # type: ignore[return-value]


def _names(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    """The names of classes ``1 .. n_classes``: ``class_names``, then ``class_<i>`` for those it leaves out."""
    names = [str(c) for c in class_names or []]
    return [names[i] if i < len(names) else f"class_{i + 1}" for i in range(n_classes)]


def display_orientation(
    volume: np.ndarray, affine: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, str, str]]:
    """``volume`` with its voxel axes permuted and flipped to the closest of RAS (x to the patient's right, y to
    anterior, z to superior), for display.

    Args:
        volume: a 3D array (spatial axes only), in the grid of ``affine``.
        affine: its 4 x 4 voxel-to-world matrix in RAS world coordinates; ``None``: the identity.

    Returns:
        the reoriented array, its affine, and the axis codes of the input grid (e.g. ``("L", "P", "S")``); an
        oblique grid is reoriented to its closest RAS axes (the codes name them).

    Raises:
        ValueError: when ``volume`` is not 3D or ``affine`` is not 4 x 4.
    """
    import nibabel as nib

    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume (spatial axes only), got shape {volume.shape}.")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4 x 4 affine, got shape {affine.shape}.")
    ornt = nib.orientations.io_orientation(affine)
    codes = tuple(nib.orientations.ornt2axcodes(ornt))
    ras = nib.orientations.apply_orientation(volume, ornt)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    return ras, ras_affine, codes  # type: ignore[return-value]


def structure_centre(label: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[tuple[int, ...], int]:
    """The voxel at the centre of the largest connected foreground structure of ``label``.

    The structure is the largest 26-connected component of the non-zero voxels (all classes together,
    :func:`scripts.hunet.report.lesion_report`); its centre is its centroid rounded to a voxel. A component's
    extent along each axis has no gaps, so every axis-aligned plane through the centre cuts the structure.

    Args:
        label: a 3D label map.
        spacing: voxel size in mm per axis (for the volume of the structure).

    Returns:
        the centre voxel (the volume's centre when nothing is labelled) and the structure's number of voxels (0
        when nothing is labelled).
    """
    label = np.asarray(label)
    report = lesion_report(label, spacing)
    if not report["lesions"]:
        return tuple(int(s) // 2 for s in label.shape), 0
    largest = report["lesions"][0]
    centre = tuple(int(round(c)) for c in largest["centroid_voxel"])
    return centre, int(largest["num_voxels"])


def _plane(ras: np.ndarray, plane: str, index: int, radiological: bool) -> np.ndarray:
    """One plane of an RAS-ordered array as displayed: rows top to bottom, columns left to right."""
    fixed, _, col_axis = _PLANE_AXES[plane]
    # the two remaining axes keep their order (column axis first): transpose, then superior / anterior on top
    shown = np.take(ras, index, axis=fixed).T[::-1, :]
    # x: the patient's right on the image's left in radiological convention; y: anterior on the left
    return shown[:, ::-1] if col_axis == 1 or radiological else shown


def _column_letters(plane: str, radiological: bool) -> tuple[str, str]:
    """Letters at the (left, right) side of a panel."""
    col_axis = _PLANE_AXES[plane][2]
    neg, pos = _AXIS_LETTERS[col_axis]
    return (pos, neg) if col_axis == 1 or radiological else (neg, pos)


def overlay_figure(
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
    radiological: bool = True,
) -> Figure:
    """The axial, coronal and sagittal planes of ``image`` through the centre of the largest structure of
    ``label`` (:func:`structure_centre`), with the label map drawn over it.

    Both arrays are on the same voxel grid, the input's (no resampling: the picture shows the input's
    resolution). For display the grid is reoriented to its closest RAS axes (:func:`display_orientation`); each
    panel shows voxels at the aspect ratio of their spacing (from ``affine``) and the orientation letters on its
    four sides. Radiological convention puts the patient's right on the image's left (``radiological=False``:
    neurological, right on the right); sagittal planes show anterior on the left. The legend lists each class's
    colour, name and predicted volume in ml.

    Args:
        image: a 3D image (spatial axes), or a 2D one (one slice).
        label: its class-index map, same shape (0 is background).
        affine: the voxel-to-world matrix (RAS world), giving spacing and orientation; ``None``: the identity.
        class_names: names of classes 1, 2, ... (``class_<i>`` for those missing).
        title: the figure's first title line (e.g. the case's name).
        radiological: radiological (True) or neurological (False) convention.

    Returns:
        the figure, with one axes per plane (titled by :data:`PLANES`) and a figure legend.

    Raises:
        ValueError: when the arrays differ in shape or are neither 2D nor 3D.
    """
    from matplotlib import patheffects
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    if image.shape != label.shape:
        raise ValueError(f"image {image.shape} and label {label.shape} must have the same shape to overlay; "
                         "draw the label map after it is inverted to the image's grid (Invertd).")
    if image.ndim == 2:
        image, label = image[..., None], label[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected a 2D or 3D image (spatial axes only), got shape {image.shape}.")
    ras_image, ras_affine, codes = display_orientation(image, affine)
    ras_label = display_orientation(label, affine)[0].astype(np.int64, copy=False)
    spacing = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    centre, n_voxels = structure_centre(ras_label, spacing)

    sample = ras_image if ras_image.size <= 2**23 else ras_image[::2, ::2, ::2]
    vmin, vmax = (np.percentile(sample, (0.5, 99.5)) if sample.size else (0.0, 1.0))
    vmax = vmax if vmax > vmin else vmin + 1.0
    n_classes = max(int(ras_label.max(initial=0)), len(class_names or []), 1)
    names = _names(class_names, n_classes)
    colours = np.array([(0.0, 0.0, 0.0)] + [_class_colour(c) for c in range(1, n_classes + 1)], dtype=np.float32)

    extents = {p: (ras_image.shape[_PLANE_AXES[p][2]] * spacing[_PLANE_AXES[p][2]],
                   ras_image.shape[_PLANE_AXES[p][1]] * spacing[_PLANE_AXES[p][1]]) for p in PLANES}
    # panels of one height (in mm: the tallest plane), widths in proportion, so one mm is as long in every panel
    height = max(h for _, h in extents.values())
    ratios = [w / height for w, _ in extents.values()]
    panel_in, top_in, bottom_in = 3.6, 1.3, 0.6  # inches: panel height, title lines, legend
    width_in = max(8.0, panel_in * (sum(ratios) + 0.3) + 0.6)
    fig_h = panel_in + top_in + bottom_in
    fig = Figure(figsize=(width_in, fig_h), dpi=_DPI)
    grid = fig.add_gridspec(1, 3, width_ratios=ratios, left=0.3 / width_in, right=1 - 0.3 / width_in,
                            top=1 - top_in / fig_h, bottom=bottom_in / fig_h, wspace=0.1)
    for i, plane in enumerate(PLANES):
        fixed, row_axis, col_axis = _PLANE_AXES[plane]
        ax = fig.add_subplot(grid[0, i])
        aspect = float(spacing[row_axis] / spacing[col_axis])
        lab = _plane(ras_label, plane, centre[fixed], radiological)
        rgba = np.zeros(lab.shape + (4,), dtype=np.float32)
        rgba[..., :3] = colours[np.clip(lab, 0, n_classes)]
        rgba[..., 3] = np.where(lab > 0, _ALPHA, 0.0)
        ax.imshow(_plane(ras_image, plane, centre[fixed], radiological), cmap="gray", vmin=vmin, vmax=vmax,
                  aspect=aspect, interpolation="nearest")
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        ax.set_title(f"{plane} (slice {centre[fixed] + 1}/{ras_image.shape[fixed]})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        left, right = _column_letters(plane, radiological)
        top = _AXIS_LETTERS[row_axis][1]
        bottom = _AXIS_LETTERS[row_axis][0]
        style = {"transform": ax.transAxes, "fontsize": 10, "fontweight": "bold", "color": "yellow",
                 "path_effects": [patheffects.withStroke(linewidth=2, foreground="black")]}
        ax.text(0.01, 0.5, left, ha="left", va="center", **style)
        ax.text(0.99, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.99, top, ha="center", va="top", **style)
        ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)

    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = np.bincount(ras_label.ravel().clip(0, n_classes), minlength=n_classes + 1)[1:] * voxel_ml
    handles = [Patch(facecolor=(*colours[c + 1], _ALPHA + 0.3), edgecolor="black", linewidth=0.5,
                     label=f"{names[c]} ({volumes[c]:.1f} ml)") for c in range(n_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(n_classes, 6), fontsize=9, frameon=False)
    world = (ras_affine @ np.array([*centre, 1.0]))[:3]
    convention = ("radiological: patient's right on the image's left" if radiological
                  else "neurological: patient's right on the image's right")
    where = (f"planes through the centre of the largest structure ({n_voxels * voxel_ml:.1f} ml) at "
             f"({world[0]:.1f}, {world[1]:.1f}, {world[2]:.1f}) mm RAS" if n_voxels
             else "nothing segmented: planes through the image centre")
    file_spacing = np.sqrt((np.asarray(affine if affine is not None else np.eye(4))[:3, :3] ** 2).sum(axis=0))
    grid_line = (f"input grid {' x '.join(str(s) for s in image.shape)} voxels of "
                 f"{' x '.join(f'{s:.2f}' for s in file_spacing)} mm, axes {''.join(codes)}")
    lines = [title] if title else []
    lines += [where, convention, grid_line]
    fig.suptitle("\n".join(lines), fontsize=9)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, format="png")
    return path


def save_overlay(
    image: np.ndarray,
    label: np.ndarray,
    path: str | os.PathLike,
    affine: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
    radiological: bool = True,
) -> Path:
    """Write :func:`overlay_figure` of ``image`` and ``label`` to the PNG ``path`` atomically.

    Args:
        image: a 3D (or 2D) image.
        label: its class-index map, same shape.
        path: the PNG file (its folder is created).
        affine: the voxel-to-world matrix (RAS world); ``None``: the identity.
        class_names: names of classes 1, 2, ...
        title: the figure's first title line.
        radiological: radiological (True) or neurological (False) convention.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: as :func:`overlay_figure`.
    """
    return _save_figure(overlay_figure(image, label, affine, class_names, title, radiological), path)


class SaveOverlayd(MapTransform):
    """Save a PNG of each case's label map over its image in three planes (:func:`overlay_figure`).

    Place it after the prediction is inverted to the input's geometry (``Invertd``, then ``AsDiscreted``) and
    give it the image as loaded (e.g. a copy made by ``CopyItemsd`` before any spatial preprocessing): both are
    then on the input's voxel grid, and the picture shows the input's resolution and orientation. The PNG is
    :func:`scripts.io_utils.output_path` of the image's ``filename_or_obj`` with postfix ``overlay``
    (``<output_dir>/<folder relative to data_root_dir>/<stem>_overlay.png``), the segmentation's naming rule; the
    transform owns its run's names (:class:`scripts.io_utils.OutputNames`), so a repeated input name gets the same
    number as its segmentation. The path is stored in the data under ``<key>_overlay_path``.

    Args:
        keys: key of the label map (channel-first: class indices in one channel, or per-class probabilities
            whose argmax is drawn).
        image_key: key of the image in the label map's grid (its first channel is drawn).
        output_dir: the output folder.
        class_names: names of classes 1, 2, ... for the legend.
        data_root_dir: the inputs' common folder (:func:`scripts.io_utils.common_root`); ``None``: flat names.
        radiological: radiological (True) or neurological (False) convention.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        output_dir: str | os.PathLike = "./",
        class_names: Sequence[str] | None = None,
        data_root_dir: str | os.PathLike | None = None,
        radiological: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.class_names = list(class_names) if class_names else None
        self.data_root_dir = data_root_dir
        self.radiological = radiological
        self.names = OutputNames(output_dir, data_root_dir)

    def reset_names(self) -> None:
        """Start a new run: names written before may be written again."""
        self.names.reset()

    def _case(self, image: Any) -> str:
        name = (getattr(image, "meta", None) or {}).get("filename_or_obj") or ""
        if isinstance(name, (list, tuple)):  # several files of one case (channels)
            name = name[0] if name else ""
        return str(name)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key]).detach().cpu()
            label = pred.argmax(0) if pred.shape[0] > 1 else pred[0]
            image = d[self.image_key]
            affine = getattr(image, "affine", None)
            affine = np.eye(4) if affine is None else to_affine_nd(3, np.asarray(torch.as_tensor(affine).cpu(),
                                                                                 dtype=np.float64))
            if str((getattr(image, "meta", None) or {}).get("space", "RAS")).upper() == "LPS":
                affine = _LPS_TO_RAS @ affine
            name = self._case(image)
            title = name or "case"
            if name and self.data_root_dir is not None:
                rel = os.path.relpath(os.path.abspath(name), os.path.abspath(self.data_root_dir))
                title = rel if not rel.startswith("..") else name
            path = self.names.claim(name, "overlay", ".png")
            img = torch.as_tensor(image).detach().cpu()[0].float().numpy()
            save_overlay(img, label.numpy().astype(np.int64), path, affine, self.class_names, title,
                         self.radiological)
            d[f"{key}_overlay_path"] = str(path)
            logger.info("saved %s", path)
        return d


def dice_columns(metrics: Mapping[str, Any], metric: str | None = None) -> tuple[str, list[str]]:
    """The Dice metric of a ``metrics.json`` (:class:`scripts.handlers.MetricsJSONWriter`) and its class names.

    Args:
        metrics: the parsed JSON (``cases`` rows and a ``summary`` with ``per_class`` means).
        metric: the metric's name (e.g. ``val_mean_dice``); ``None``: the summary's metric whose name contains
            ``dice`` and has per-class values (or columns ``<metric>_<class>``).

    Returns:
        the metric's name and its class names, in the order of its columns ``<metric>_<class>``.

    Raises:
        ValueError: when there is no such metric.
    """
    summary = metrics.get("summary") or {}
    candidates = [metric] if metric else [k for k in summary if "dice" in k.lower()]
    for name in candidates:
        per_class = (summary.get(name) or {}).get("per_class") if isinstance(summary.get(name), Mapping) else None
        if per_class:
            return name, [str(c) for c in per_class]
    rows = metrics.get("cases") or []
    for name in candidates or sorted({c.rsplit("_", 1)[0] for r in rows for c in r if "dice" in c.lower()}):
        classes = [c[len(name) + 1:] for c in (rows[0] if rows else {}) if c.startswith(f"{name}_")
                   and c != f"{name}_mean"]
        if classes:
            return name, classes
    raise ValueError(f"no per-class Dice {'metric ' + repr(metric) if metric else 'metric'} in the metrics "
                     f"(summary: {sorted(summary)}); evaluate with a Dice metric and MetricsJSONWriter.")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def dice_chart_figure(metrics: Mapping[str, Any], metric: str | None = None, title: str = "") -> Figure:
    """A horizontal bar chart of the Dice of every case and class of an evaluation's metrics.

    One group of bars per case (top to bottom in the order of ``cases``), one bar per class in the class's
    colour (the overlay's, :func:`overlay_figure`), a vertical line at the summary's mean (the metrics'
    aggregation rule, :data:`scripts.metrics.AGGREGATION`: per class over the cases, then the mean over the
    classes; computed by that rule from the rows when the summary has none), and ``n/a`` where a value is
    missing (``null``). The figure grows with the number of cases, so tens of cases stay readable.

    Args:
        metrics: the parsed ``metrics.json`` (:func:`dice_columns`).
        metric: the Dice metric's name; ``None``: found by :func:`dice_columns`.
        title: the chart's title (default: the metric's name).

    Returns:
        the figure (one axes; its legend lists the classes and the mean).

    Raises:
        ValueError: when the metrics hold no per-class Dice or no case.
    """
    from matplotlib.figure import Figure

    name, classes = dice_columns(metrics, metric)
    rows = list(metrics.get("cases") or [])
    if not rows:
        raise ValueError("the metrics hold no case: nothing to chart.")
    values = np.array([[_number(r.get(f"{name}_{c}")) for c in classes] for r in rows], dtype=np.float64)
    summary = (metrics.get("summary") or {}).get(name)
    overall = _number(summary.get("mean")) if isinstance(summary, Mapping) else math.nan
    if not math.isfinite(overall):  # no summary: the same rule, per class over the cases, then over the classes
        per_class = [col[np.isfinite(col)].mean() for col in values.T if np.isfinite(col).any()]
        overall = float(np.mean(per_class)) if per_class else math.nan
    labels = [str(r.get("case") or Path(str(r.get("image", f"case {i}"))).name) for i, r in enumerate(rows)]

    n_cases, n_cls = values.shape
    bar = 0.8 / n_cls
    height = 1.4 + n_cases * max(0.3, 0.14 * n_cls)  # inches: title, axis and legend, then the bars
    fig = Figure(figsize=(8.0, height), dpi=_DPI)
    ax = fig.add_subplot(1, 1, 1)
    ys = np.arange(n_cases)
    for c in range(n_cls):
        pos = ys - 0.4 + bar * (c + 0.5)
        ok = np.isfinite(values[:, c])
        ax.barh(pos[ok], values[ok, c], height=bar * 0.95, color=_class_colour(c + 1), label=classes[c])
        for y in pos[~ok]:
            ax.text(0.005, y, "n/a", va="center", ha="left", fontsize=7, color="grey")
    if math.isfinite(overall):
        ax.axvline(overall, color="black", linestyle="--", linewidth=1,
                   label=f"mean {overall:.3f} (per class, then over the classes)")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(n_cases - 0.5, -0.5)  # first case at the top
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("Dice")
    ax.grid(axis="x", alpha=0.3)
    shown_name = "Dice" if name == "dice" else name
    ax.set_title(title or f"{shown_name} per case and class ({n_cases} case{'s' if n_cases != 1 else ''})", fontsize=10)
    fig.legend(loc="lower center", ncol=min(n_cls + 1, 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0.0, 0.35 / height, 1.0, 1.0))
    return fig


def save_dice_chart(
    metrics_path: str | os.PathLike, output_path: str | os.PathLike | None = None, metric: str | None = None
) -> Path:
    """Write :func:`dice_chart_figure` of the ``metrics.json`` at ``metrics_path`` to a PNG, atomically.

    Args:
        metrics_path: the JSON written by :class:`scripts.handlers.MetricsJSONWriter`.
        output_path: the PNG file; ``None``: ``dice_per_case.png`` beside the JSON.
        metric: the Dice metric's name; ``None``: found by :func:`dice_columns`.

    Returns:
        the PNG's path.

    Raises:
        ValueError: when the file is missing or not JSON, or holds no per-class Dice or no case.
    """
    metrics_path = Path(metrics_path)
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"metrics file {metrics_path} does not exist; run the evaluation first.") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"metrics file {metrics_path} is not valid JSON: {e}.") from e
    path = Path(output_path) if output_path else metrics_path.with_name("dice_per_case.png")
    _save_figure(dice_chart_figure(metrics, metric), path)
    logger.info("saved %s", path)
    return path


class DiceChartWriter:
    """Write the per-case Dice bar chart (:func:`save_dice_chart`) of an evaluation when its run completes.

    It reads the ``metrics.json`` that :class:`scripts.handlers.MetricsJSONWriter` writes at the same event, so
    list it after that writer in the evaluator's handlers (handlers of one event run in the order they are
    attached).

    Args:
        metrics_path: the writer's JSON file, e.g. ``eval/metrics.json``.
        output_path: the PNG file; ``None``: ``dice_per_case.png`` beside the JSON.
        metric: the Dice metric's name; ``None``: found by :func:`dice_columns`.
    """

    def __init__(
        self, metrics_path: str | os.PathLike, output_path: str | os.PathLike | None = None, metric: str | None = None
    ) -> None:
        self.metrics_path = Path(metrics_path)
        self.output_path = Path(output_path) if output_path else None
        self.metric = metric

    def attach(self, engine: Any) -> None:
        """Draw the chart at the end of each of ``engine``'s runs (ignite's ``EPOCH_COMPLETED``)."""
        from monai.utils import optional_import

        events, _ = optional_import("ignite.engine", name="Events")
        engine.add_event_handler(events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any = None) -> Path:
        return save_dice_chart(self.metrics_path, self.output_path, self.metric)
