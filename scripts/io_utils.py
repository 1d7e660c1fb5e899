# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Atomic file output: every file the bundle writes appears whole or not at all."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "atomic_path", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "save_nifti_atomic",
    "remove_stale_temp_files",
]

logger = logging.getLogger(__name__)

# the random part of a name made by tempfile.mkstemp (tempfile._RandomNameSequence: 8 of [a-z0-9_])
_MKSTEMP_RANDOM = r"[a-z0-9_]{8}"


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


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(json.dumps(obj, indent=2), path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically: an interrupted save leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``array`` as NIfTI (dtype kept) with ``affine`` (4 x 4, as given: permuted and oblique axes too)
    as both qform and sform, atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


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
