# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Reading uploaded images for the Mamba-HUNet service: type detection, safe unzip, checks, conversion to NIfTI."""

from __future__ import annotations

import logging
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.hunet.transforms import safe_stem, save_nifti_atomic

__all__ = ["UploadError", "LoadedUpload", "detect_kind", "load_upload", "safe_unzip"]

logger = logging.getLogger(__name__)

KINDS = ("nifti", "nrrd", "dicom", "dicom_zip", "png")


class UploadError(ValueError):
    """A client error on an uploaded file; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class LoadedUpload:
    """An upload converted to a single-channel NIfTI volume ``(X, Y, Z)``."""

    kind: str
    upload_path: Path
    nifti_path: Path
    array: np.ndarray
    affine: np.ndarray
    display_flip: bool  # flip rows for display (volumes in RAS); False for PNG slices


def detect_kind(path: Path, filename: str) -> str:
    """Image kind from the file name and its magic bytes; raises :class:`UploadError` (415) when unknown."""
    with open(path, "rb") as f:
        head = f.read(400)
    name = filename.lower()
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"NRRD":
        return "nrrd"
    if head[:4] == b"PK\x03\x04":
        return "dicom_zip"
    if head[128:132] == b"DICM" or name.endswith(".dcm"):
        return "dicom"
    if head[:2] == b"\x1f\x8b" or name.endswith((".nii", ".nii.gz")) or head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    raise UploadError(
        "unsupported file: expected NIfTI (.nii, .nii.gz), NRRD (.nrrd), DICOM (.dcm, or a .zip of one series) or PNG",
        status=415,
    )


def safe_unzip(zip_path: Path, out_dir: Path, max_files: int = 4000, max_bytes: int = 2 * 1024**3) -> Path:
    """Extract the regular files of a zip flat into ``out_dir`` under sanitised numbered names (no traversal)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if not members:
                raise UploadError("the zip archive holds no files")
            if len(members) > max_files or sum(m.file_size for m in members) > max_bytes:
                raise UploadError(f"the zip archive is too large (at most {max_files} files, {max_bytes} bytes)", 413)
            for i, m in enumerate(members):
                base = Path(m.filename.replace("\\", "/")).name
                if base.startswith(".") or base.startswith("__MACOSX"):
                    continue
                target = out_dir / f"{i:05d}_{safe_stem(base, 'file')}.dcm"
                with zf.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as e:
        raise UploadError(f"corrupt zip archive: {e}") from e
    return out_dir


def _read_png(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UploadError(f"corrupt PNG image: {e}") from e
    if arr.ndim == 3:
        colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        if not all(np.array_equal(colour[..., 0], colour[..., c]) for c in range(colour.shape[-1])):
            raise UploadError(f"expected a single-channel (greyscale) PNG, got a colour image (mode {mode})")
        arr = colour[..., 0]
    # (rows, cols) -> (x, y, 1) with x along the columns, as MONAI's PIL reader does
    return arr.T[..., None].astype(np.float32), np.eye(4)


def _read_monai(path: Path, reader: str) -> tuple[np.ndarray, np.ndarray]:
    from monai.transforms import LoadImage

    try:
        img = LoadImage(image_only=True, reader=reader)(str(path))
    except Exception as e:  # readers raise many types for corrupt input
        raise UploadError(f"could not read the image ({reader}): {type(e).__name__}: {e}") from e
    return np.asarray(img, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise UploadError(f"corrupt NIfTI file: {type(e).__name__}: {e}") from e
    return arr, np.asarray(img.affine, dtype=np.float64)


def load_upload(path: Path, filename: str, work_dir: Path, max_voxels: int = 512 * 512 * 400) -> LoadedUpload:
    """Check an uploaded file and convert it into ``work_dir/input.nii.gz`` (single channel, float32).

    Args:
        path: the stored upload (inside ``work_dir``).
        filename: the client's file name (only its suffix is used).
        work_dir: the request's own folder.
        max_voxels: largest accepted number of voxels.

    Raises:
        UploadError: unsupported type (415), corrupt file or wrong number of channels / dimensions (422).
    """
    kind = detect_kind(path, filename)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    suffix = {
        "nifti": ".nii.gz" if gz else ".nii",
        "nrrd": ".nrrd",
        "dicom": ".dcm",
        "dicom_zip": ".zip",
        "png": ".png",
    }[kind]
    path = path.rename(work_dir / f"upload{suffix}")  # the readers pick the format by suffix
    if kind == "png":
        arr, affine = _read_png(path)
    elif kind == "nifti":
        arr, affine = _read_nifti(path)
    elif kind == "nrrd":
        arr, affine = _read_monai(path, "NrrdReader")
    elif kind == "dicom":
        arr, affine = _read_monai(path, "PydicomReader")
    else:
        arr, affine = _read_monai(safe_unzip(path, work_dir / "dicom"), "PydicomReader")
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., None]
        if affine.shape == (3, 3):
            a = np.eye(4)
            a[:2, :2], a[:2, 3] = affine[:2, :2], affine[:2, 2]
            affine = a
    if arr.ndim != 3:
        raise UploadError(f"expected a single-channel 2D image or 3D volume, got an array of shape {arr.shape}")
    if min(arr.shape[:2]) < 2 or arr.size > max_voxels:
        raise UploadError(
            f"image size {arr.shape} is out of range (at least 2x2 in plane, at most {max_voxels} voxels)"
        )
    if not np.isfinite(arr).all():
        raise UploadError("the image holds NaN or infinite values")
    out = save_nifti_atomic(arr.astype(np.float32), affine, work_dir / "input.nii.gz")
    return LoadedUpload(
        kind=kind, upload_path=path, nifti_path=out, array=arr, affine=affine, display_flip=kind != "png"
    )
