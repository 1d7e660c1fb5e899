# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Datalists: loading MSD-style JSON and checking every case before any training time is spent.

Every file's header is checked against :class:`scripts.image_guard.ImageLimits` before a reader allocates its array
(:func:`scripts.image_guard.check_image`), so a small file that declares a huge image stops the run at once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage

from scripts.image_guard import DataError, ImageLimits, check_image, check_spatial_dims

__all__ = ["DataError", "SPLITS", "load_datalist", "load_splits", "check_case", "validate_datalist"]

#: the lists of an MSD-style datalist, in the order they are checked
SPLITS = ("training", "validation", "test")

logger = logging.getLogger(__name__)


def load_datalist(datalist: str | os.PathLike, dataset_dir: str | os.PathLike, key: str = "training") -> list[dict]:
    """Read one list (``training``, ``validation`` or ``test``) of an MSD-style datalist JSON.

    Paths in the file are relative to ``dataset_dir`` (absolute paths are kept). A relative path that leaves
    ``dataset_dir`` through ``..`` is logged as a warning naming the entry, not refused: users keep labels or extra
    modalities in sibling folders on purpose, and absolute paths (which MSD allows) reach any folder anyway, so an
    error would stop legitimate datalists without protecting anything; the warning shows an unintended escape.
    A missing or empty list returns ``[]``.

    Raises:
        DataError: the datalist file is missing, not valid JSON, or the list is not a list.
    """
    path = Path(datalist)
    if not path.is_file():
        raise DataError(f"datalist {path} does not exist; pass --datalist to a JSON file (see docs/README.md#data).")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"datalist {path} is not valid JSON: {e}.") from e
    if not isinstance(content, dict):
        raise DataError(f"datalist {path} must hold a JSON object with 'training', 'validation' and 'test' lists.")
    if not content.get(key):  # absent, null or [] (MONAI's loader fails on an empty list)
        return []
    if not isinstance(content[key], list):
        raise DataError(f"datalist {path}: '{key}' must be a list of {{\"image\": ..., \"label\": ...}} entries.")
    _warn_escapes(content[key], path, dataset_dir, key)
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(dataset_dir))


def _warn_escapes(items: object, datalist: Path, dataset_dir: str | os.PathLike, key: str) -> None:
    """Log every relative image / label path of ``items`` that leads out of ``dataset_dir`` (``../``)."""
    root = os.path.normpath(os.path.abspath(dataset_dir))
    for i, item in enumerate(items if isinstance(items, list) else []):
        for field in ("image", "label"):
            value = item.get(field) if isinstance(item, dict) else None
            for p in value if isinstance(value, list) else [value]:
                if not isinstance(p, str) or os.path.isabs(p):
                    continue
                target = os.path.normpath(os.path.join(root, p))
                if os.path.commonpath([root, target]) != root:
                    logger.warning(
                        "datalist %s, %s case %d: %s %r leads out of dataset_dir %s (to %s); fine for a sibling "
                        "folder, otherwise fix the path.", datalist, key, i, field, p, root, target,
                    )


def _load(path, loader: LoadImage, what: str, case: int, limits: ImageLimits, spatial_dims: int | None):
    paths = path if isinstance(path, (list, tuple)) else [path]
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"case {case}: {what} file {p} does not exist; fix the path in the datalist or --dataset_dir.")
    try:
        check_image(path, limits, spatial_dims)  # the headers, before any array is allocated
        img = loader(path)
        check_spatial_dims(img.shape[1:], spatial_dims, str(path))  # the reader's own view (channels first)
    except DataError as e:  # keeps the class, and with it the HTTP status of InputError / ImageTooLargeError
        raise type(e)(f"case {case}: {what} {e}") from e
    except Exception as e:  # readers raise many types for corrupt files
        raise DataError(f"case {case}: {what} file {path} could not be read ({type(e).__name__}: {e}); "
                        "the file is corrupt or not a supported image (NIfTI, NRRD, DICOM series).") from e
    return img


def check_case(
    item: dict,
    in_channels: int,
    num_classes: int | None,
    index: int = 0,
    multi_label: bool = False,
    spatial_dims: int | None = None,
    limits: ImageLimits | Mapping | None = None,
) -> tuple:
    """Check one ``{"image", "label"}`` entry: headers within ``limits``, readable files, 2D or 3D, channel count,
    label shape, label values, NaNs.

    Args:
        item: the datalist entry (``image`` a path or a list of per-channel paths; ``label`` optional).
        in_channels: channels the network expects.
        num_classes: classes including background (label values must be in ``[0, num_classes)``); ``None`` skips.
        index: position of the case, for messages.
        multi_label: the label holds one binary channel per class (sigmoid training) instead of class indices.
        spatial_dims: 3 refuses 2D images (``(X, Y)`` or ``(X, Y, 1)``), 2 refuses 3D volumes; ``None`` skips.
        limits: :class:`scripts.image_guard.ImageLimits`, or a mapping of its fields (a config's ``image_limits``);
            ``None``: the defaults.

    Returns:
        the image's spatial shape.

    Raises:
        DataError: with the file and the problem in the message (``ImageTooLargeError`` beyond ``limits``).
    """
    limits = ImageLimits.coerce(limits)
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    img = _load(item["image"], loader, "image", index, limits, spatial_dims)
    name = item["image"]
    if img.shape[0] != in_channels:
        raise DataError(
            f"case {index}: image {name} has {img.shape[0]} channel(s) but the network expects {in_channels}; "
            "list one file per channel in 'image' or set in_channels (the plan does this)."
        )
    arr = np.asarray(img)
    if not np.isfinite(arr).all():
        raise DataError(f"case {index}: image {name} contains NaN or infinite values; fix or remove it.")
    spatial = tuple(img.shape[1:])
    if "label" in item and item["label"] is not None:
        lab = _load(item["label"], loader, "label", index, limits, spatial_dims)
        if tuple(lab.shape[1:]) != spatial:
            raise DataError(
                f"case {index}: label {item['label']} has shape {tuple(lab.shape[1:])} but its image {name} has "
                f"{spatial}; they must be on the same voxel grid."
            )
        values = np.unique(np.asarray(lab))
        if not np.isfinite(values).all():
            raise DataError(f"case {index}: label {item['label']} contains NaN values.")
        if np.any(values != np.round(values)) or (values.size and values.min() < 0):
            raise DataError(f"case {index}: label {item['label']} must hold non-negative integer classes, got {values[:10]}.")
        if num_classes is not None:
            limit = 2 if multi_label else num_classes
            if values.size and values.max() >= limit:
                raise DataError(
                    f"case {index}: label {item['label']} has class {int(values.max())} but the network predicts "
                    f"{num_classes} classes (0..{num_classes - 1}); set out_channels or fix the label."
                )
    return spatial


def validate_datalist(
    items: Sequence[dict],
    in_channels: int,
    num_classes: int | None,
    name: str = "training",
    multi_label: bool = False,
    spatial_dims: int | None = None,
    limits: ImageLimits | Mapping | None = None,
) -> list[dict]:
    """Check every case of a list (see :func:`check_case`, also for ``spatial_dims`` and ``limits``) and return
    the list unchanged.

    Raises:
        DataError: for an empty list or the first bad case, naming the file and the fix.
    """
    items = list(items)
    if not items:
        raise DataError(f"the {name} list of the datalist is empty; add cases or point --datalist elsewhere.")
    limits = ImageLimits.coerce(limits)
    for i, item in enumerate(items):
        if "image" not in item:
            raise DataError(f"case {i} of the {name} list has no 'image' entry: {item}.")
        check_case(item, in_channels, num_classes, i, multi_label, spatial_dims, limits)
    logger.info("checked %d %s case(s): files readable, %d channel(s), labels in range", len(items), name, in_channels)
    return items


def load_splits(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    in_channels: int,
    num_classes: int | None,
    spatial_dims: int | None = None,
    limits: ImageLimits | Mapping | None = None,
    check: bool = True,
) -> dict[str, list[dict]]:
    """Load every list of a datalist (:data:`SPLITS`) and, with ``check``, check every case of each one before
    training starts (see :func:`check_case`): a bad validation or test file stops the run at once instead of
    after the first epoch. ``training`` must not be empty; the other lists may be empty or absent.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` with absolute paths.

    Raises:
        DataError: naming the list, the case, the file and the fix.
    """
    lists = {key: load_datalist(datalist, dataset_dir, key) for key in SPLITS}
    if not lists["training"]:
        raise DataError(f"the training list of datalist {datalist} is empty; add cases or point --datalist elsewhere.")
    if check:
        limits = ImageLimits.coerce(limits)
        for key, items in lists.items():
            if items:
                try:
                    validate_datalist(items, in_channels, num_classes, key, spatial_dims=spatial_dims, limits=limits)
                except DataError as e:  # same class (and HTTP status), the list named
                    raise type(e)(f"{key} list: {e}") from e
    return lists
