# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Datalists: loading MSD-style JSON and checking every case before any training time is spent.

:func:`validate_datalist` (one case: :func:`check_case`) is the bundle's one datalist check: the training,
evaluation and inference configs, the lesion workflow (``configs/hunet_*.yaml``) and the planner
(:func:`scripts.planning.extract_fingerprint`, headers only) call it. Every file's header is checked against
:class:`scripts.image_guard.ImageLimits` before a reader allocates its array (:func:`scripts.image_guard.check_image`),
so a small file that declares a huge image stops the run at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.transforms import LoadImage

from scripts.image_guard import DataError, ImageHeader, ImageLimits, check_image, check_spatial_dims

__all__ = [
    "DataError", "SPLITS", "read_datalist", "load_datalist", "load_splits", "check_case", "validate_datalist",
    "skip_unavailable_dicom_decoder", "label_names", "class_names", "datalist_class_names", "check_class_names",
]

#: the lists of an MSD-style datalist, in the order they are checked
SPLITS = ("training", "validation", "test")

logger = logging.getLogger(__name__)


def skip_unavailable_dicom_decoder() -> bool:
    """Leave MONAI's nvImageCodec DICOM reader out of :class:`monai.transforms.LoadImage`'s default readers when
    nvImageCodec cannot run here (no ``nvidia-nvimgcodec``, CuPy or CUDA device).

    Every ``LoadImage`` builds each of its default readers; ``NvImgCodecPydicomReader`` then tries to register its
    GPU decoder plugin and, without nvImageCodec, logs a warning and warns that it falls back to pydicom's
    decoders, at every loader. Without nvImageCodec that reader declines every file (its ``verify_suffix`` is
    false), so leaving it out changes no read: DICOM files go to the other readers as before. Where nvImageCodec
    runs, the reader is kept. Called when this module is imported (every config imports it before any loader is
    built).

    Returns:
        whether the reader was left out (now or by an earlier call).
    """
    from monai.data.nvimgcodec_pydicom_plugin import is_nvimgcodec_available
    from monai.transforms.io.array import SUPPORTED_READERS

    if "nvimgcodecpydicomreader" not in SUPPORTED_READERS:
        return True
    if is_nvimgcodec_available():
        return False
    del SUPPORTED_READERS["nvimgcodecpydicomreader"]
    logger.debug("nvImageCodec is not available: LoadImage reads DICOM without its GPU decoder")
    return True


skip_unavailable_dicom_decoder()


def read_datalist(datalist: str | os.PathLike | Mapping) -> dict:
    """The content of an MSD-style datalist: the parsed JSON file, or a copy of a mapping given directly.

    Raises:
        DataError: the file is missing or not valid JSON, or the content is not a JSON object.
    """
    if isinstance(datalist, Mapping):
        return dict(datalist)
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
    return content


def label_names(labels: Mapping | None, source: str = "the datalist") -> dict[int, str] | None:
    """A dataset's ``labels`` mapping as ``{value: name}``, background included.

    Accepts both forms: MSD's datalist / ``dataset.json`` ``{"0": "background", "1": "liver"}`` and nnU-Net v2's
    ``dataset.json`` ``{"background": 0, "liver": 1}`` (its ``"ignore"`` label has no output class and is left
    out).

    Args:
        labels: the ``labels`` entry (``None`` or empty: no names).
        source: the file, for messages.

    Returns:
        the names by label value, or ``None`` when ``labels`` is absent or empty.

    Raises:
        DataError: region-based labels (a list of values per name), or entries that are neither form.
    """
    if labels is None or (isinstance(labels, Mapping) and not labels):
        return None
    if not isinstance(labels, Mapping):
        raise DataError(f"{source}: 'labels' must map values to names ({{\"0\": \"background\", \"1\": ...}}) or "
                        f"names to values ({{\"background\": 0, ...}}), got {labels!r}.")

    def _value(v: object) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        return int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else None

    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise DataError(f"{source}: region-based labels (a list of values per name) are not supported; the bundle "
                        "predicts one class per voxel: give one value per name.")
    keys = {k: _value(k) for k in labels}
    if all(v is not None for v in keys.values()) and all(isinstance(n, str) for n in labels.values()):
        names = {keys[k]: str(n) for k, n in labels.items()}  # MSD: value -> name
    else:
        values = {k: _value(v) for k, v in labels.items() if k != "ignore"}
        bad = [k for k, v in values.items() if v is None]
        if bad:
            raise DataError(f"{source}: 'labels' mixes forms or holds non-integer values at {bad}; use "
                            "{\"0\": \"background\", \"1\": \"name\"} or {\"background\": 0, \"name\": 1}.")
        names = {v: str(k) for k, v in values.items()}  # nnU-Net v2: name -> value
        if len(names) != len(values):
            raise DataError(f"{source}: 'labels' gives one value to several names: {dict(labels)}.")
    return dict(sorted(names.items()))


def class_names(names: Mapping[int, str] | None, out_channels: int, source: str = "the datalist") -> list[str]:
    """The names of classes ``1 .. out_channels - 1`` (no background): from ``names`` (:func:`label_names`),
    else ``class_1``, ``class_2``, ...

    Raises:
        DataError: ``names`` does not name exactly the values ``0 .. out_channels - 1``.
    """
    n = int(out_channels) - 1
    if names is None:
        return [f"class_{i}" for i in range(1, n + 1)]
    expected = list(range(n + 1))
    if sorted(names) != expected:
        raise DataError(f"{source}: 'labels' names the values {sorted(names)} but out_channels {out_channels} needs "
                        f"exactly {expected} (background and {n} classes); fix 'labels' or out_channels (configs/plan.yaml "
                        "from `python -m scripts.plan`).")
    return [names[i] for i in range(1, n + 1)]


def datalist_class_names(datalist: str | os.PathLike | Mapping, out_channels: int) -> list[str]:
    """The class names of a datalist (its ``labels``, either form of :func:`label_names`) for a network with
    ``out_channels`` outputs; ``class_1``, ``class_2``, ... when the datalist has no ``labels`` or its file does
    not exist (e.g. a bundle served by MONAI Label without its data).

    Raises:
        DataError: the datalist is not valid JSON, or its ``labels`` do not name ``out_channels`` classes.
    """
    if not isinstance(datalist, Mapping) and not Path(datalist).is_file():
        return class_names(None, out_channels)
    source = "<datalist>" if isinstance(datalist, Mapping) else str(datalist)
    return class_names(label_names(read_datalist(datalist).get("labels"), source), out_channels, source)


def check_class_names(names: Sequence[str] | None, out_channels: int) -> list[str]:
    """``names`` as a list of strings if it names every class but background (``out_channels - 1`` names).

    Raises:
        DataError: another count (one line naming the fix).
    """
    n = int(out_channels) - 1
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) != n:
        raise DataError(
            f"class_names {names!r} must list {n} name(s), one per class without background (out_channels is "
            f"{out_channels}); fix class_names in configs/plan.yaml (`python -m scripts.plan` writes the datalist's "
            "'labels') or on the command line, e.g. --class_names \"['liver', 'tumour']\"."
        )
    return [str(c) for c in names]


def load_datalist(
    datalist: str | os.PathLike | Mapping, dataset_dir: str | os.PathLike, key: str = "training"
) -> list[dict]:
    """One list (``training``, ``validation`` or ``test``) of an MSD-style datalist, with absolute paths.

    The ``image`` (a path or a list of per-channel paths) and ``label`` paths are relative to ``dataset_dir``
    (absolute paths are kept), as :func:`monai.data.load_decathlon_datalist` reads them; other entries of a case
    are kept as they are, and a ``test`` list of plain paths becomes ``[{"image": path}, ...]``. A relative path
    that leaves ``dataset_dir`` through ``..`` is logged as a warning naming the entry, not refused: users keep
    labels or extra modalities in sibling folders on purpose, and absolute paths (which MSD allows) reach any
    folder anyway, so an error would stop legitimate datalists without protecting anything; the warning shows an
    unintended escape. A missing or empty list returns ``[]``. Nothing is read but the datalist: check the cases
    with :func:`validate_datalist`.

    Args:
        datalist: path of the JSON file, or its content as a mapping.
        dataset_dir: root of the relative paths.
        key: the list to load.

    Raises:
        DataError: the datalist file is missing or not valid JSON, the list is not a list, or a case is neither an
            object nor (in ``test``) a path.
    """
    content = read_datalist(datalist)
    source = "<datalist>" if isinstance(datalist, Mapping) else str(datalist)
    if not content.get(key):  # absent, null or []
        return []
    items = content[key]
    if not isinstance(items, list):
        raise DataError(f"datalist {source}: '{key}' must be a list of {{\"image\": ..., \"label\": ...}} entries.")
    _warn_escapes(items, source, dataset_dir, key)
    return [_absolute(item, i, dataset_dir, key, source) for i, item in enumerate(items)]


def _absolute(item: object, index: int, dataset_dir: str | os.PathLike, key: str, source: str) -> dict:
    """A copy of a case with its ``image`` / ``label`` paths joined to ``dataset_dir``."""
    if isinstance(item, str) and key == "test":
        item = {"image": item}
    if not isinstance(item, Mapping):
        raise DataError(f"datalist {source}: case {index} of '{key}' must be an object with 'image' (and 'label'), "
                        f"got {item!r}.")
    root = str(dataset_dir)
    out = dict(item)
    for field in ("image", "label"):
        value = out.get(field)
        if isinstance(value, str):
            out[field] = os.path.normpath(os.path.join(root, value))
        elif isinstance(value, (list, tuple)):
            out[field] = [os.path.normpath(os.path.join(root, v)) if isinstance(v, str) else v for v in value]
    return out


def _warn_escapes(items: object, datalist: str, dataset_dir: str | os.PathLike, key: str) -> None:
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


def _headers(path, what: str, case: int, limits: ImageLimits, spatial_dims: int | None,
             series_uid: str | None = None) -> list[ImageHeader]:
    """The checked headers of an image or label (one per file), every file on the same voxel grid."""
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"case {case}: {what} file {p} does not exist; fix the path in the datalist or --dataset_dir.")
    try:
        headers = check_image(path, limits, spatial_dims, series_uid=series_uid)  # before any array is allocated
    except DataError as e:  # keeps the class, and with it the HTTP status of InputError / ImageTooLargeError
        raise type(e)(f"case {case}: {what} {e}") from e
    except Exception as e:  # readers raise many types for corrupt files
        raise _unreadable(path, what, case, e) from e
    shapes = [tuple(h.spatial_shape) for h in headers]
    if len(set(shapes)) > 1:
        raise DataError(f"case {case}: the {what} files {paths} have different spatial shapes {shapes}; every "
                        "channel file must be on the same voxel grid.")
    return headers


def _read(path, loader: LoadImage, what: str, case: int, spatial_dims: int | None):
    try:
        img = loader(path)
        check_spatial_dims(img.shape[1:], spatial_dims, str(path))  # the reader's own view (channels first)
    except DataError as e:
        raise type(e)(f"case {case}: {what} {e}") from e
    except Exception as e:
        raise _unreadable(path, what, case, e) from e
    return img


def _unreadable(path, what: str, case: int, error: Exception) -> DataError:
    return DataError(f"case {case}: {what} file {path} could not be read ({type(error).__name__}: {error}); "
                     "the file is corrupt or not a supported image (NIfTI, NRRD, DICOM series).")


def _loader(headers: Sequence[ImageHeader], limits: ImageLimits, series_uid: str | None = None) -> LoadImage:
    """A channel-first ``LoadImage``; DICOM inputs are read by :class:`scripts.dicom_io.DicomVolumeReader` (largest
    series of a folder, enhanced multi-frame images), as the configs' ``LoadImageCheckedd`` reads them."""
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    if any(h.format == "dicom" for h in headers):
        from scripts.dicom_io import DicomVolumeReader

        loader.register(DicomVolumeReader(series_uid, limits))
    return loader


def _check_case(
    item: Mapping,
    in_channels: int | None,
    num_classes: int | None,
    index: int,
    multi_label: bool,
    spatial_dims: int | None,
    limits: ImageLimits,
    read: bool,
    series_uid: str | None = None,
) -> tuple[tuple[int, ...], int]:
    """:func:`check_case`, returning (spatial shape, channels)."""
    name = item["image"]
    headers = _headers(name, "image", index, limits, spatial_dims, series_uid)
    if read:
        img = _read(name, _loader(headers, limits, series_uid), "image", index, spatial_dims)
        spatial, channels = tuple(int(s) for s in img.shape[1:]), int(img.shape[0])
    else:
        img = None
        spatial = tuple(int(s) for s in headers[0].spatial_shape)
        channels = sum(h.voxels // max(1, math.prod(h.spatial_shape)) for h in headers)
    if in_channels is not None and channels != in_channels:
        raise DataError(
            f"case {index}: image {name} has {channels} channel(s) but the network expects {in_channels}; "
            "list one file per channel in 'image' or set in_channels (the plan does this)."
        )
    if img is not None and not np.isfinite(np.asarray(img)).all():
        raise DataError(f"case {index}: image {name} contains NaN or infinite values; fix or remove it.")
    if item.get("label") is None:
        return spatial, channels
    label = item["label"]
    label_headers = _headers(label, "label", index, limits, spatial_dims)
    lab = _read(label, _loader(label_headers, limits), "label", index, spatial_dims) if read else None
    label_spatial = tuple(int(s) for s in (lab.shape[1:] if read else label_headers[0].spatial_shape))
    if label_spatial != spatial:
        raise DataError(
            f"case {index}: label {label} has shape {label_spatial} but its image {name} has {spatial}; they must "
            "be on the same voxel grid."
        )
    if lab is None:
        return spatial, channels
    values = np.unique(np.asarray(lab))
    if not np.isfinite(values).all():
        raise DataError(f"case {index}: label {label} contains NaN values.")
    if np.any(values != np.round(values)) or (values.size and values.min() < 0):
        raise DataError(f"case {index}: label {label} must hold non-negative integer classes, got {values[:10]}.")
    if num_classes is not None:
        limit = 2 if multi_label else num_classes
        if values.size and values.max() >= limit:
            raise DataError(
                f"case {index}: label {label} has class {int(values.max())} but the network predicts "
                f"{num_classes} classes (0..{num_classes - 1}); set out_channels or fix the label."
            )
    return spatial, channels


def check_case(
    item: Mapping,
    in_channels: int | None,
    num_classes: int | None,
    index: int = 0,
    multi_label: bool = False,
    spatial_dims: int | None = None,
    limits: ImageLimits | Mapping | None = None,
    read: bool = True,
    series_uid: str | None = None,
) -> tuple[int, ...]:
    """Check one ``{"image", "label"}`` entry: headers within ``limits``, files present and readable, channel files
    on one grid, 2D or 3D, channel count, label on the image grid and, when the arrays are read, NaNs and label
    values.

    Args:
        item: the datalist entry (``image`` a path or a list of per-channel paths; ``label`` optional).
        in_channels: channels the network expects; ``None`` skips.
        num_classes: classes including background (label values must be in ``[0, num_classes)``); ``None`` skips.
        index: position of the case, for messages.
        multi_label: the label holds one binary channel per class (sigmoid training) instead of class indices.
        spatial_dims: 3 refuses 2D images (``(X, Y)`` or ``(X, Y, 1)``), 2 refuses 3D volumes; ``None`` skips.
        limits: :class:`scripts.image_guard.ImageLimits`, or a mapping of its fields (a config's ``image_limits``);
            ``None``: the defaults.
        read: read the arrays (channels as the reader sees them, NaNs, label values); ``False`` checks the headers
            only (shapes and channels as the headers declare them), which is fast for large datasets.
        series_uid: the series to check in an image that is a DICOM folder holding several series (the inference
            config's ``series_uid``); ``None``: the largest, as :mod:`scripts.dicom_io` reads it.

    Returns:
        the image's spatial shape.

    Raises:
        DataError: with the file and the problem in the message (``ImageTooLargeError`` beyond ``limits``).
    """
    return _check_case(item, in_channels, num_classes, index, multi_label, spatial_dims, ImageLimits.coerce(limits),
                       read, series_uid)[0]


def validate_datalist(
    items: Sequence[dict],
    in_channels: int | None,
    num_classes: int | None,
    name: str = "training",
    multi_label: bool = False,
    spatial_dims: int | None = None,
    limits: ImageLimits | Mapping | None = None,
    require_label: bool = False,
    read: bool = True,
    series_uid: str | None = None,
) -> list[dict]:
    """Check every case of a list (see :func:`check_case`, also for ``spatial_dims``, ``limits`` and ``read``) and
    return the list unchanged. This is the bundle's one datalist check: the training and evaluation configs, the
    lesion workflow and the planner use it.

    Args:
        items: the cases, e.g. from :func:`load_datalist`.
        in_channels: channels the network expects; ``None``: whatever the first case has, the same for every case.
        num_classes: see :func:`check_case`.
        name: the list's name, for messages.
        multi_label: see :func:`check_case`.
        spatial_dims: see :func:`check_case`.
        limits: see :func:`check_case`.
        require_label: every case needs a ``label`` (training data).
        read: see :func:`check_case`.
        series_uid: see :func:`check_case`.

    Raises:
        DataError: for an empty list or the first bad case, naming the file and the fix.
    """
    items = list(items)
    if not items:
        raise DataError(f"the {name} list of the datalist is empty; add cases or point --datalist elsewhere.")
    limits = ImageLimits.coerce(limits)
    first = None
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "image" not in item:
            raise DataError(f"case {i} of the {name} list has no 'image' entry: {item}.")
        if require_label and item.get("label") is None:
            raise DataError(f"case {i} of the {name} list has no 'label' entry: {item}; every case needs an image "
                            "and its label.")
        _, channels = _check_case(item, in_channels, num_classes, i, multi_label, spatial_dims, limits, read,
                                  series_uid)
        if first is None:
            first = (channels, item["image"])
        elif channels != first[0]:
            raise DataError(
                f"case {i}: inconsistent channel counts: image {item['image']} has {channels} channel(s) but case 0 "
                f"({first[1]}) has {first[0]}; every case needs the same channels in the same order."
            )
    logger.info("checked %d %s case(s) (%s): %d channel(s)%s", len(items), name,
                "files read" if read else "headers", first[0], ", labels in range" if read else "")
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
