# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Atomic file output: every file the bundle writes appears whole or not at all.

Each writer writes a temporary file beside the target and renames it (:func:`atomic_path`), so a reader sees the
previous file or the new one, never half of one: text, bytes, JSON (strict: NaN as ``null``), ``torch.save`` and
NIfTI. Output names: :func:`safe_stem` makes a file stem from an input name, :func:`output_path` places each
input's output under the output folder at the input's path relative to the inputs' common folder
(:func:`common_root`), and :class:`OutputNames` keeps one run's names apart (a repeated name gets a number).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_path", "atomic_write_text", "atomic_write_bytes", "atomic_write_json", "json_safe", "atomic_torch_save",
    "save_nifti_atomic", "safe_stem", "common_root", "output_path", "OutputNames", "remove_stale_temp_files",
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


def _input_name(input_path: str | os.PathLike | Iterable[str | os.PathLike] | None) -> str:
    """The path naming a case: the first of several (a multi-channel input), ``""`` for none."""
    if isinstance(input_path, (list, tuple)):
        input_path = input_path[0] if input_path else None
    return "" if input_path is None else os.fspath(input_path)


def common_root(input_paths: Iterable[str | os.PathLike | Iterable[str | os.PathLike]]) -> str | None:
    """The inputs' common folder: the deepest folder holding every input (file or DICOM series folder), absolute.

    One input gives its own folder, so its output keeps the flat name ``<stem>_<postfix>``; ``a/scan.nii.gz`` and
    ``b/scan.nii.gz`` give their parent, so their outputs keep ``a/`` and ``b/``. A multi-channel input (a list of
    files) counts by its first file, as :func:`output_path` names it.

    Args:
        input_paths: the inputs (e.g. the ``image`` entries of a datalist).

    Returns:
        the folder, or ``None`` when there are no inputs or they share no folder (different drives).
    """
    parents = [os.path.dirname(os.path.abspath(name)) for name in map(_input_name, input_paths) if name]
    if not parents:
        return None
    try:
        return os.path.commonpath(parents)
    except ValueError:
        return None


def _safe_folder(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", part).strip(".") or "_"


def output_path(
    input_path: str | os.PathLike | Iterable[str | os.PathLike] | None,
    output_dir: str | os.PathLike,
    postfix: str = "seg",
    suffix: str = ".nii.gz",
    data_root_dir: str | os.PathLike | None = None,
    index: int = 1,
) -> Path:
    """The output file of an input: ``<output_dir>/<relative folder>/<stem>[_<index>][_<postfix>]<suffix>``.

    ``<stem>`` is :func:`safe_stem` of the input's name (a DICOM series folder ``study/series1/`` gives
    ``series1``); ``<relative folder>`` is the input's folder relative to ``data_root_dir`` (the inputs' common
    folder, :func:`common_root`), so ``a/scan.nii.gz`` and ``b/scan.nii.gz`` under root ``.`` give
    ``<output_dir>/a/scan_seg.nii.gz`` and ``<output_dir>/b/scan_seg.nii.gz``. Without ``data_root_dir``, or for
    an input outside it, the name is flat (``<output_dir>/<stem>_<postfix><suffix>``). Folder names are reduced to
    ``[A-Za-z0-9._-]`` like the stem. ``index`` > 1 numbers a repeated name (:class:`OutputNames`):
    ``scan_2_seg.nii.gz``.

    Args:
        input_path: the input's file or folder (a list: its first entry); ``None`` or ``""`` names it ``case``.
        output_dir: the output folder.
        postfix: appended to the stem after ``_`` (nothing when empty).
        suffix: the file extension, with its dot (e.g. ``".nii.gz"``, ``".png"``, ``".dcm"``).
        data_root_dir: the inputs' common folder.
        index: the occurrence of this name in the run, from 1.

    Returns:
        the output path (its folder is not created).

    Raises:
        ValueError: for an index below 1.
    """
    if index < 1:
        raise ValueError(f"index counts the occurrences of a name from 1, got {index}.")
    name = _input_name(input_path)
    stem = safe_stem(name)
    folders: tuple[str, ...] = ()
    if name and data_root_dir is not None:
        rel = os.path.relpath(os.path.abspath(name), os.path.abspath(data_root_dir))
        parts = Path(rel).parts[:-1]
        if rel != os.curdir and ".." not in Path(rel).parts:
            folders = tuple(_safe_folder(p) for p in parts)
    stem += f"_{index}" if index > 1 else ""
    return Path(output_dir, *folders, stem + (f"_{postfix}" if postfix else "") + suffix)


class OutputNames:
    """The output names of one run, kept apart: :meth:`claim` gives :func:`output_path`, or, when another input
    of the run already has that name (the same file given twice, or names equal after :func:`safe_stem`), the
    same name numbered ``_2``, ``_3``, ... after the stem, with a warning. An output written earlier in the run
    is never overwritten; files of earlier runs are.

    One instance serves one writer (the saver of one workflow owns one); writers that see the same inputs in the
    same order (segmentation, overlay, DICOM SEG) number the same cases alike. :meth:`reset` starts a new run.

    Args:
        output_dir: the output folder.
        data_root_dir: the inputs' common folder (:func:`common_root`); ``None``: flat names.
    """

    def __init__(self, output_dir: str | os.PathLike, data_root_dir: str | os.PathLike | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.data_root_dir = None if data_root_dir is None else os.fspath(data_root_dir)
        self._claimed: set[str] = set()

    def claim(
        self,
        input_path: str | os.PathLike | Iterable[str | os.PathLike] | None,
        postfix: str = "seg",
        suffix: str = ".nii.gz",
    ) -> Path:
        """Reserve and return the output path of ``input_path`` for this run (arguments of :func:`output_path`)."""
        index = 1
        while True:
            path = output_path(input_path, self.output_dir, postfix, suffix, self.data_root_dir, index)
            key = os.path.normcase(os.path.abspath(path))
            if key not in self._claimed:
                break
            index += 1
        self._claimed.add(key)
        if index > 1:
            first = output_path(input_path, self.output_dir, postfix, suffix, self.data_root_dir)
            logger.warning("%s: its output name %s is already used in this run; writing %s instead",
                           _input_name(input_path) or "case", first, path)
        return path

    def reset(self) -> None:
        """Forget the names claimed so far (a new run)."""
        self._claimed.clear()


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
