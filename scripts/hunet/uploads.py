# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Reading uploaded images for the Mamba-HUNet service: type detection, header checks, safe unzip, conversion to NIfTI.

Every upload's header is checked by :func:`scripts.image_guard.check_image` against :data:`UPLOAD_LIMITS` (or the
service's limits) before a reader allocates its array; messages name the file by the client's file name only, never
by a server path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.image_guard import ImageLimits, InputError, check_image, safe_extract_zip
from scripts.io_utils import save_nifti_atomic

__all__ = ["UPLOAD_LIMITS", "UploadError", "LoadedUpload", "detect_kind", "load_upload", "safe_unzip"]

logger = logging.getLogger(__name__)

KINDS = ("nifti", "nrrd", "dicom", "dicom_zip", "png")

#: Limits of the lesion service's uploads: a 3D FLAIR of 512 x 512 x 400 at most, in-plane at most 4096 x 4096 (a
#: 10000 x 10000 PNG is refused: every slice is resized to the network's 256 x 256 anyway).
UPLOAD_LIMITS = ImageLimits(max_voxels=512 * 512 * 400, max_bytes=1024**3, max_slice_pixels=4096 * 4096)


class UploadError(InputError):
    """A client error on an uploaded file; ``status`` (``status_code``) is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message, status)

    @property
    def status(self) -> int:
        return self.status_code


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


def safe_unzip(
    zip_path: Path, out_dir: Path, limits: ImageLimits | Mapping | None = None, name: str = "the zip archive"
) -> Path:
    """Extract the regular files of a zip flat into ``out_dir`` under numbered names (no traversal), within the
    file-count, size and compression-ratio budget of ``limits`` (see :func:`scripts.image_guard.safe_extract_zip`)."""
    safe_extract_zip(zip_path, out_dir, UPLOAD_LIMITS if limits is None else limits, name)
    return out_dir


def _read_png(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except Image.DecompressionBombError as e:  # check_image refuses these first; never a 500
        raise UploadError(f"the PNG image is too large to decode: {e}", 413) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UploadError(f"corrupt PNG image: {type(e).__name__}") from e
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
        raise UploadError(f"could not read the image ({reader}): {type(e).__name__}") from e
    return np.asarray(img, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise UploadError(f"corrupt NIfTI file: {type(e).__name__}") from e
    return arr, np.asarray(img.affine, dtype=np.float64)


def load_upload(
    path: Path, filename: str, work_dir: Path, limits: ImageLimits | Mapping | None = None
) -> LoadedUpload:
    """Check an uploaded file's header, then convert it into ``work_dir/input.nii.gz`` (single channel, float32).

    Args:
        path: the stored upload (inside ``work_dir``).
        filename: the client's file name (its suffix picks nothing but the message name; the kind comes from the
            magic bytes).
        work_dir: the request's own folder.
        limits: size limits (:class:`scripts.image_guard.ImageLimits` or a mapping of its fields); default
            :data:`UPLOAD_LIMITS`. ``max_voxels`` also bounds the decoded array.

    Raises:
        InputError: :class:`UploadError` for an unsupported type (415), a corrupt file or wrong number of channels /
            dimensions (422); the guard's ``ImageTooLargeError`` (413) and ``InputError`` (422) before decoding.
    """
    limits = UPLOAD_LIMITS if limits is None else ImageLimits.coerce(limits)
    shown = Path(str(filename).replace("\\", "/")).name or "upload"
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
    source = safe_unzip(path, work_dir / "dicom", limits, shown) if kind == "dicom_zip" else path
    check_image(source, limits, name=shown)  # before any array is allocated
    if kind == "png":
        arr, affine = _read_png(path)
    elif kind == "nifti":
        arr, affine = _read_nifti(path)
    elif kind == "nrrd":
        arr, affine = _read_monai(path, "NrrdReader")
    else:
        arr, affine = _read_monai(source, "PydicomReader")
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
    if min(arr.shape[:2]) < 2 or arr.size > limits.max_voxels:
        raise UploadError(
            f"image size {arr.shape} is out of range (at least 2x2 in plane, at most {limits.max_voxels} voxels)",
            413 if arr.size > limits.max_voxels else 422,
        )
    if not np.isfinite(arr).all():
        raise UploadError("the image holds NaN or infinite values")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UploadError("the image has no valid geometry (e.g. a DICOM series with repeated slice positions)")
    out = save_nifti_atomic(arr.astype(np.float32), affine, work_dir / "input.nii.gz")
    return LoadedUpload(
        kind=kind, upload_path=path, nifti_path=out, array=arr, affine=affine, display_flip=kind != "png"
    )
