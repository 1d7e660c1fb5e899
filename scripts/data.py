# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Datalists: loading MSD-style JSON and checking every case before any training time is spent."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage

__all__ = ["DataError", "load_datalist", "check_case", "validate_datalist"]

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A datalist entry that can't be used, with the file and the fix in the message."""


def load_datalist(datalist: str | os.PathLike, dataset_dir: str | os.PathLike, key: str = "training") -> list[dict]:
    """Read one list (``training``, ``validation`` or ``test``) of an MSD-style datalist JSON.

    Paths in the file are relative to ``dataset_dir`` (absolute paths are kept). A missing list returns ``[]``.

    Raises:
        DataError: the datalist file is missing or not valid JSON.
    """
    path = Path(datalist)
    if not path.is_file():
        raise DataError(f"datalist {path} does not exist; pass --datalist to a JSON file (see docs/README.md#data).")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"datalist {path} is not valid JSON: {e}.") from e
    if key not in content:
        return []
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(dataset_dir))


def _load(path, reader_loader: LoadImage, what: str, case: int):
    paths = path if isinstance(path, (list, tuple)) else [path]
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"case {case}: {what} file {p} does not exist; fix the path in the datalist or --dataset_dir.")
    try:
        img = reader_loader(path)
    except Exception as e:  # readers raise many types for corrupt files
        raise DataError(f"case {case}: {what} file {path} could not be read ({type(e).__name__}: {e}); "
                        "the file is corrupt or not a supported image (NIfTI, NRRD, DICOM series).") from e
    return img


def check_case(item: dict, in_channels: int, num_classes: int | None, index: int = 0, multi_label: bool = False) -> tuple:
    """Check one ``{"image", "label"}`` entry: readable files, channel count, label shape, label values, NaNs.

    Args:
        item: the datalist entry (``image`` a path or a list of per-channel paths; ``label`` optional).
        in_channels: channels the network expects.
        num_classes: classes including background (label values must be in ``[0, num_classes)``); ``None`` skips.
        index: position of the case, for messages.
        multi_label: the label holds one binary channel per class (sigmoid training) instead of class indices.

    Returns:
        the image's spatial shape.

    Raises:
        DataError: with the file and the problem in the message.
    """
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    img = _load(item["image"], loader, "image", index)
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
        lab = _load(item["label"], loader, "label", index)
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
    items: Sequence[dict], in_channels: int, num_classes: int | None, name: str = "training", multi_label: bool = False
) -> list[dict]:
    """Check every case of a list (see :func:`check_case`) and return the list unchanged.

    Raises:
        DataError: for an empty list or the first bad case, naming the file and the fix.
    """
    items = list(items)
    if not items:
        raise DataError(f"the {name} list of the datalist is empty; add cases or point --datalist elsewhere.")
    for i, item in enumerate(items):
        if "image" not in item:
            raise DataError(f"case {i} of the {name} list has no 'image' entry: {item}.")
        check_case(item, in_channels, num_classes, i, multi_label)
    logger.info("checked %d %s case(s): files readable, %d channel(s), labels in range", len(items), name, in_channels)
    return items
