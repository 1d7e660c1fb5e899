# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Atomic file output: every file the bundle writes appears whole or not at all.

Each writer writes a temporary file beside the target and renames it (:func:`atomic_path`), so a reader sees the
previous file or the new one, never half of one: text, bytes, JSON (strict: NaN as ``null``), ``torch.save`` and
NIfTI; :func:`safe_stem` makes output names from input names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_path", "atomic_write_text", "atomic_write_bytes", "atomic_write_json", "json_safe", "atomic_torch_save",
    "save_nifti_atomic", "safe_stem", "remove_stale_temp_files",
]

logger = logging.getLogger(__name__)

# the random part of a name made by tempfile.mkstemp (tempfile._RandomNameSequence: 8 of [a-z0-9_])
_MKSTEMP_RANDOM = r"[a-z0-9_]{8}"

# suffixes :func:`safe_stem` removes (the first that matches, compared in lower case)
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm", ".png", ".zip", ".mha", ".gz")


def _temp_affixes(name: str) -> tuple[str, str]:
    """Prefix and suffix of the temporary files :func:`atomic_path` makes for a file called ``name``."""
    return f".{name}.", "".join(Path(name).suffixes) or ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary file name beside ``path`` (same extension, so writers that look at it still work);
    when the block ends without an error it is renamed to ``path``, otherwise it is removed.

    Example::

        with atomic_path("out/seg.nii.gz") as tmp:
            nib.save(img, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def json_safe(obj: Any) -> Any:
    """``obj`` with every value JSON can hold: NaN and infinite floats become ``None`` (``null``), NumPy and
    PyTorch scalars and arrays become Python numbers and lists, tuples become lists, mapping keys strings,
    paths strings.

    Raises:
        ValueError: for a value of another type (e.g. an object without a JSON form).
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, (np.ndarray, np.generic)):
        return json_safe(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise ValueError(f"cannot write a value of type {type(obj).__name__!r} as JSON; "
                     "convert it to numbers, strings, lists or dicts.")


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically, with a final newline.

    The values are converted by :func:`json_safe`: NaN and infinite floats are written as ``null`` (strict JSON,
    which browsers and ``jq`` read; Python's ``json`` would write the non-standard ``NaN``), NumPy / PyTorch
    numbers and arrays as numbers and lists.

    Args:
        obj: dictionaries, lists, strings, numbers, ``None``.
        path: the JSON file.
        indent: indentation of :func:`json.dumps` (``None``: one line).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: for a value without a JSON form.
    """
    return atomic_write_text(json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n", path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically: an interrupted save leaves the previous file intact.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``array`` as NIfTI (dtype kept) with ``affine`` as both qform and sform, atomically.

    Args:
        array: the voxel array, spatial axes first (a trailing axis beyond the third is NIfTI's 4th dimension).
        affine: 4 x 4 voxel-to-world matrix, written as given (permuted and oblique axes too).
        path: the output file (``.nii`` or ``.nii.gz``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import nibabel as nib

    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def safe_stem(name: str | os.PathLike, default: str = "case") -> str:
    """The stem of an input's file name for output names: no folders, no image suffix (``.nii.gz``, ``.nrrd``,
    ...), only ``[A-Za-z0-9._-]`` (other runs become ``_``), at most 100 characters.

    Args:
        name: the input's path or file name.
        default: the stem when nothing is left (e.g. ``".."``).
    """
    base = Path(str(name)).name
    for suffix in _IMAGE_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")
    return base[:100] or default


def remove_stale_temp_files(path: str | os.PathLike, min_age_s: float = 60.0) -> list[Path]:
    """Remove the temporary files an interrupted :func:`atomic_path` left beside ``path`` (e.g. a ``kill -9``
    during a checkpoint save leaves ``.model.pt.1a2b3c4d.pt``).

    Only names of exactly the form :func:`atomic_path` makes for ``path``'s file name are removed, and only if
    they were last modified at least ``min_age_s`` seconds ago: a save in progress in another process keeps
    writing its file, so it is not touched (a file of a save interrupted moments ago is removed at a later call).

    Args:
        path: the target file whose leftover temporary files are removed (it need not exist).
        min_age_s: minimum age in seconds (time since the last modification) of a file to remove.

    Returns:
        the removed files.
    """
    if min_age_s < 0:
        raise ValueError(f"min_age_s must be >= 0 seconds, got {min_age_s}.")
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix, suffix = _temp_affixes(path.name)
    pattern = re.compile(re.escape(prefix) + _MKSTEMP_RANDOM + re.escape(suffix))
    now = time.time()
    removed = []
    for candidate in path.parent.iterdir():
        if not pattern.fullmatch(candidate.name) or not candidate.is_file():
            continue
        try:
            if now - candidate.stat().st_mtime < min_age_s:
                continue
            candidate.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        removed.append(candidate)
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted save of %s: %s", len(removed), path,
                    [p.name for p in removed])
    return removed
