# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Image headers checked against size limits before any reader allocates an array.

A 54-byte NIfTI or NRRD header can declare 1500^3 voxels; MONAI's and nibabel's readers allocate (and zero-fill)
the declared array before they notice that the data isn't there. :func:`check_image` reads only the header
(nibabel's header class on the first bytes, pynrrd's ``read_header``, pydicom's ``dcmread(stop_before_pixels=True)``,
PIL's lazy ``Image.open``) and refuses, with the file's name in the message, an image whose declared voxel count,
decoded size or largest plane exceeds :class:`ImageLimits`, whose data type is not real-valued (complex, RGB
records), or whose data can't be what the header declares: an uncompressed file shorter than its data (truncated),
or a gzip / bzip2 stream that inflates beyond the declared size plus a margin (a decompression bomb). Gzip streams
are inflated chunk by chunk and counting stops at the budget, so the check runs in constant memory. Only then do
the callers hand the file to the existing readers. DICOM headers are read through :mod:`scripts.dicom_io`: a
folder's files are grouped by SeriesInstanceUID and the series that will be read is checked; colour images are
refused. The NIfTI, NRRD and PIL checks import neither it nor torch. :func:`safe_extract_zip` extracts a DICOM
series zip with a budget on files, total size and compression ratio that counts the bytes actually written.

The errors live here, free of torch and server code, so that transforms can raise them: :class:`DataError` (a
``ValueError``), :class:`InputError` (``DataError`` with an HTTP ``status_code``, 422 by default, and inside a
Starlette / FastAPI server, such as MONAI Label, also an ``HTTPException``) and :class:`ImageTooLargeError` (413).
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "InputError",
    "ImageTooLargeError",
    "INPUT_ERROR_STATUS",
    "TOO_LARGE_STATUS",
    "ImageLimits",
    "ImageHeader",
    "read_header",
    "check_image",
    "check_spatial_dims",
    "safe_extract_zip",
]

logger = logging.getLogger(__name__)

try:  # present where a web server (MONAI Label's or the lesion service's FastAPI) is installed
    from starlette.exceptions import HTTPException as _HTTPException
except ImportError:  # pragma: no cover - environments without a web server
    _HTTPException = None

#: HTTP status of :class:`InputError`: the request's input can't be processed.
INPUT_ERROR_STATUS = 422
#: HTTP status of :class:`ImageTooLargeError`: the input is beyond the configured size limits.
TOO_LARGE_STATUS = 413

_CHUNK = 1 << 20  # bytes inflated per step when counting a compressed stream
_NRRD_HEADER_MAX = 1 << 20  # longest NRRD text header read
_ZIP_BUDGET_FLOOR = 1 << 20  # small archives may inflate to this much whatever their compression ratio


class DataError(ValueError):
    """A datalist entry or input image that can't be used, with the file and the fix in the message."""


_INPUT_BASES: tuple[type, ...] = (DataError,) if _HTTPException is None else (DataError, _HTTPException)


class InputError(*_INPUT_BASES):  # type: ignore[misc]
    """An input image that can't be used: a ``ValueError`` with an HTTP ``status_code`` (422 unless given).

    Inside a Starlette / FastAPI server (MONAI Label) it is also an ``HTTPException``, so the client gets the status
    with the message as ``detail`` instead of a bare 500.
    """

    default_status = INPUT_ERROR_STATUS

    def __init__(self, message: str, status_code: int | None = None) -> None:
        code = int(status_code or self.default_status)
        DataError.__init__(self, message)
        if _HTTPException is not None:
            _HTTPException.__init__(self, status_code=code, detail=message)
        self.status_code, self.detail = code, message

    def __str__(self) -> str:
        return str(self.detail)


class ImageTooLargeError(InputError):
    """An image beyond the configured size limits (HTTP 413)."""

    default_status = TOO_LARGE_STATUS


@dataclass(frozen=True)
class ImageLimits:
    """Size limits of one input image (all channels and files together).

    The defaults take a whole-body CT (512 x 512 x 2000 int16, 1 GiB) or a 4-channel MR (4 x 512 x 512 x 512) and
    keep one float32 copy of the largest accepted image at 2 GiB, which leaves room for the pipelines' copies on a
    24 GB machine.

    Args:
        max_voxels: voxels times channels.
        max_bytes: bytes of the decoded array at its stored data type.
        max_slice_pixels: pixels of the largest plane (the two largest spatial axes; for a 2D image its pixels).
        max_files: files of a DICOM series (a folder or a zip archive).
        max_archive_bytes: total uncompressed size of a zip archive.
        max_compression_ratio: uncompressed over compressed size of a zip archive (archives up to 1 MiB
            uncompressed are exempt).
        max_header_bytes: bytes before the data (NIfTI extensions).
    """

    max_voxels: int = 512 * 512 * 2048
    max_bytes: int = 4 * 1024**3
    max_slice_pixels: int = 16384 * 16384
    max_files: int = 4000
    max_archive_bytes: int = 2 * 1024**3
    max_compression_ratio: float = 100.0
    max_header_bytes: int = 16 * 1024**2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ImageLimits.{f.name} must be a positive number, got {value!r}.")

    @classmethod
    def coerce(cls, value: ImageLimits | Mapping[str, float] | None) -> ImageLimits:
        """``value`` itself, the defaults for ``None``, or the defaults updated by a mapping (e.g. a config's
        ``image_limits: {max_voxels: 1.0e9}``); unknown keys raise ``ValueError``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"image limits must be an ImageLimits, a mapping or None, got {type(value).__name__}.")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown image limit(s) {unknown}; known: {sorted(known)}.")
        kwargs = {k: (float(v) if k == "max_compression_ratio" else int(v)) for k, v in value.items()}
        return replace(cls(), **kwargs)


@dataclass(frozen=True)
class ImageHeader:
    """What a header declares, read without the data."""

    name: str
    format: str
    shape: tuple[int, ...]
    spatial_shape: tuple[int, ...]
    dtype: np.dtype
    files: int = 1

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.voxels * self.dtype.itemsize


def _too_large(name: str, what: str, value: int, limit: float, unit: str) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{name}: the image declares {value:,} {unit} ({what}), more than the limit of {int(limit):,}; send a "
        "smaller image (crop or resample it) or raise the limit (image_limits / the service's --max_image_* flags)."
    )


def _check_declared(h: ImageHeader, limits: ImageLimits) -> ImageHeader:
    if any(s < 0 for s in h.shape):
        raise InputError(f"{h.name}: the header declares a negative size {h.shape}; the file is corrupt.")
    if h.dtype.kind == "c":
        raise InputError(
            f"{h.name}: complex-valued image (data type {h.dtype}); send the magnitude (or real part) as a real image."
        )
    if h.dtype.kind not in "biuf" or h.dtype.fields is not None:
        raise InputError(f"{h.name}: unsupported data type {h.dtype}; send a single-valued integer or float image.")
    if h.voxels > limits.max_voxels:
        raise _too_large(h.name, f"shape {h.shape}", h.voxels, limits.max_voxels, "voxels")
    if h.nbytes > limits.max_bytes:
        raise _too_large(h.name, f"shape {h.shape} of {h.dtype}", h.nbytes, limits.max_bytes, "bytes")
    plane = math.prod(sorted(h.spatial_shape)[-2:]) if h.spatial_shape else 0
    if plane > limits.max_slice_pixels:
        raise _too_large(h.name, f"largest plane of {h.spatial_shape}", plane, limits.max_slice_pixels, "pixels")
    return h


def _count_inflated(stream: io.BufferedIOBase, name: str, need: int, allowed: int) -> int:
    """Inflate ``stream`` chunk by chunk; refuse it beyond ``allowed`` bytes (a bomb) or short of ``need``."""
    total = 0
    try:
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > allowed:
                raise ImageTooLargeError(
                    f"{name}: the compressed data inflates beyond the {need:,} bytes the header declares (stopped at "
                    f"{total:,}); the file is a decompression bomb or its header is wrong."
                )
    except (OSError, EOFError, zlib.error, ValueError) as e:
        if isinstance(e, ImageTooLargeError):
            raise
        raise InputError(f"{name}: could not be read: the compressed data is corrupt or truncated ({type(e).__name__}: {e}).") from e
    if total < need:
        raise InputError(f"{name}: truncated file: the header declares {need:,} bytes of data, it holds {total:,}.")
    return total


def _check_data_length(path: Path, name: str, offset: int, nbytes: int, encoding: str) -> None:
    """The bytes of ``path`` from ``offset`` must be at least ``nbytes`` (raw), or inflate to at least ``nbytes``
    and at most ``nbytes`` plus 1 MiB and 1 % (gzip / bzip2)."""
    if encoding == "raw":
        size = path.stat().st_size
        if size < offset + nbytes:
            raise InputError(
                f"{name}: truncated file: the header declares {nbytes:,} bytes of data after byte {offset:,}, "
                f"the file has {size:,} bytes."
            )
        return
    allowed = nbytes + _CHUNK + nbytes // 100
    with open(path, "rb") as raw:
        raw.seek(offset)
        stream = gzip.GzipFile(fileobj=raw) if encoding == "gzip" else bz2.BZ2File(raw)
        with stream:
            _count_inflated(stream, name, nbytes, allowed)


def _nifti_header(path: Path, name: str, limits: ImageLimits) -> ImageHeader:
    import nibabel as nib

    gz = _is_gzip(path)
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            raw = f.read(544)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{name}: could not be read as a gzip-compressed NIfTI file ({type(e).__name__}: {e}).") from e
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")} if len(raw) >= 4 else set()
    klass = nib.Nifti1Header if 348 in sizes else nib.Nifti2Header if 540 in sizes else None
    if klass is None or len(raw) < klass.template_dtype.itemsize:
        raise InputError(f"{name}: could not be read as NIfTI (no NIfTI-1/2 header); send a NIfTI, NRRD, DICOM or PNG image.")
    size = klass.template_dtype.itemsize
    try:  # nibabel's own header parsing on the bytes read; four zero bytes: no extensions are read
        hdr = klass.from_fileobj(io.BytesIO(raw[:size] + b"\x00" * 4))
        shape, dtype = tuple(int(s) for s in hdr.get_data_shape()), hdr.get_data_dtype()
        offset, single = int(hdr.get_data_offset()), hdr["magic"].item() in (b"n+1", b"n+2")
    except Exception as e:  # nibabel raises several types for malformed headers
        raise InputError(f"{name}: could not be read: malformed NIfTI header ({type(e).__name__}: {e}).") from e
    if offset > limits.max_header_bytes:
        raise _too_large(name, "header and extensions", offset, limits.max_header_bytes, "bytes before the data")
    h = _check_declared(ImageHeader(name, "nifti", shape, shape[:3], dtype), limits)
    if single:  # the data follows the header in this file (in the inflated stream when gzipped)
        start = max(offset, size + 4)
        if gz:
            _check_data_length(path, name, 0, start + h.nbytes, "gzip")
        else:
            _check_data_length(path, name, start, h.nbytes, "raw")
    return h


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


_NRRD_CHANNEL_KINDS = {
    "list", "point", "vector", "covariant-vector", "normal", "stub", "scalar", "2-vector", "3-color", "rgb-color",
    "hsv-color", "xyz-color", "4-color", "rgba-color", "3-vector", "3-gradient", "3-normal", "4-vector", "quaternion",
    "2d-symmetric-matrix", "2d-masked-symmetric-matrix", "2d-matrix", "2d-masked-matrix", "3d-symmetric-matrix",
    "3d-masked-symmetric-matrix", "3d-matrix", "3d-masked-matrix",
}


def _nrrd_header(path: Path, name: str, limits: ImageLimits) -> ImageHeader:
    import nrrd

    with open(path, "rb") as f:
        head = io.BytesIO(f.read(_NRRD_HEADER_MAX))
    try:
        header = nrrd.read_header(head)
        offset = head.tell()
        dtype = nrrd.reader._determine_datatype(header)  # pynrrd's NRRD type -> numpy map
        shape = tuple(int(s) for s in np.atleast_1d(header["sizes"]))
    except Exception as e:  # pynrrd raises NRRDError, KeyError, ValueError for malformed headers
        raise InputError(f"{name}: could not be read: malformed NRRD header ({type(e).__name__}: {e}).") from e
    if offset >= _NRRD_HEADER_MAX and path.stat().st_size > offset:
        raise _too_large(name, "NRRD text header", offset, _NRRD_HEADER_MAX, "header bytes")
    kinds = [str(k).lower() for k in header.get("kinds", [])]
    if "complex" in kinds:
        raise InputError(f"{name}: complex-valued image (NRRD kind 'complex'); send a real image.")
    spatial = tuple(s for i, s in enumerate(shape) if not (i < len(kinds) and kinds[i] in _NRRD_CHANNEL_KINDS))
    h = _check_declared(ImageHeader(name, "nrrd", shape, spatial, dtype), limits)
    encoding = str(header.get("encoding", "raw")).lower()
    skip = int(header.get("byteskip", header.get("byte skip", 0)))
    detached = header.get("datafile", header.get("data file"))
    data_path = path
    if detached is not None:
        target = Path(os.path.normpath(path.parent / str(detached)))
        if str(detached).upper().startswith("LIST") or " " in str(detached).strip():
            raise InputError(f"{name}: NRRD data split over several files is not supported; attach the data.")
        if not target.is_relative_to(path.parent) or not target.is_file():
            raise InputError(
                f"{name}: the NRRD header points to a data file outside its own folder or to no file; "
                "keep the data file beside the header or attach the data."
            )
        data_path, offset = target, 0
    if encoding in ("raw", "gzip", "gz", "bzip2", "bz2"):
        kind = {"gz": "gzip", "bz2": "bzip2"}.get(encoding, encoding)
        start = offset + max(skip, 0)
        if skip == -1 and kind == "raw":
            start = max(data_path.stat().st_size - h.nbytes, offset)
        _check_data_length(data_path, name, start, h.nbytes, kind)
    elif encoding not in ("ascii", "text", "txt"):
        raise InputError(f"{name}: unsupported NRRD encoding {encoding!r}; use raw, gzip, bzip2 or ascii.")
    return h


def _dicom_file(path: Path, name: str, limits: ImageLimits) -> ImageHeader:
    """The checked header of one DICOM file (size first, then colour)."""
    from scripts.dicom_io import check_greyscale, read_dicom_header

    ds = read_dicom_header(path, name)
    h = _check_declared(_dicom_image_header(ds, name), limits)
    check_greyscale(ds, name)
    return h


def _dicom_image_header(ds, name: str, frames: int | None = None, files: int = 1) -> ImageHeader:
    """The declared size of one DICOM image, or of a series of ``frames`` images like it."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1) if frames is None else frames
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits, signed = int(ds.get("BitsAllocated", 16) or 16), int(ds.get("PixelRepresentation", 0) or 0)
    except AttributeError as e:
        raise InputError(f"{name}: a DICOM file without an image (no Rows / Columns).") from e
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: a DICOM file with a malformed image header ({type(e).__name__}: {e}).") from e
    itemsize = {8: 1, 16: 2, 32: 4, 64: 8}.get(bits, 1)
    dtype = np.dtype(f"{'i' if signed else 'u'}{itemsize}")
    shape = (cols, rows, frames) + ((samples,) if samples > 1 else ())
    return ImageHeader(name, "dicom", shape, (cols, rows, frames), dtype, files)


def _dicom_series(folder: Path, name: str, limits: ImageLimits, series_uid: str | None = None) -> ImageHeader:
    """The declared size of the series :func:`scripts.dicom_io.select_series` picks in ``folder`` (the largest, or
    ``series_uid``): every file's header checked, the voxels counted over the series."""
    from scripts.dicom_io import check_greyscale, select_series

    series = select_series(folder, series_uid, limits, name)
    voxels = 0
    for i, (p, ds) in enumerate(zip(series.files, series.headers)):
        shown = f"{name}/{p.name}"
        h = _check_declared(_dicom_image_header(ds, shown), limits)
        check_greyscale(ds, shown)
        voxels += h.voxels
        if voxels > limits.max_voxels:
            raise _too_large(name, f"{i + 1} DICOM files so far", voxels, limits.max_voxels, "voxels")
    first = _dicom_image_header(series.headers[0], name, frames=series.frames, files=len(series.files))
    return _check_declared(first, limits)


def _pil_header(path: Path, name: str, limits: ImageLimits) -> ImageHeader:
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(path) as im:  # lazy: reads the header only
                width, height, bands, mode = im.width, im.height, len(im.getbands()), im.mode
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: the image is too large to decode ({e}).") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: could not be read as a 2D image ({type(e).__name__}: {e}).") from e
    dtype = np.dtype({"I;16": "u2", "I;16B": "u2", "I": "i4", "F": "f4"}.get(mode, "u1"))
    shape = (width, height) + ((bands,) if bands > 1 else ())
    return _check_declared(ImageHeader(name, "pil", shape, (width, height), dtype), limits)


_PIL_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF8")


def read_header(
    path: str | os.PathLike,
    limits: ImageLimits | Mapping | None = None,
    name: str | None = None,
    series_uid: str | None = None,
) -> ImageHeader:
    """Read and check the header of one image file or DICOM series folder, without its data.

    Formats are told by their magic bytes (and ``.dcm`` / ``.nii`` suffixes): NIfTI-1/2 (``.nii``, ``.nii.gz``),
    NRRD (raw, gzip, bzip2, ascii; a detached data file must lie beside its header), DICOM files and series
    folders, and PNG / JPEG / BMP / TIFF / GIF through PIL. A folder's DICOM files are grouped by
    SeriesInstanceUID (:func:`scripts.dicom_io.select_series`) and the series that would be read is checked: the
    one named ``series_uid``, else the one with the most images. Colour DICOM images are refused.

    Args:
        path: the file or folder.
        limits: :class:`ImageLimits` (or a mapping of its fields); ``None``: the defaults.
        name: how messages name the file (default: the path); servers pass the client's file name.
        series_uid: the SeriesInstanceUID to check in a DICOM folder; ``None``: the largest series.

    Raises:
        ImageTooLargeError: beyond ``limits`` (HTTP 413).
        InputError: missing, empty, truncated, malformed, unsupported, colour, or not real-valued; a DICOM folder
            without images, without the series ``series_uid``, or with images lacking SeriesInstanceUID (HTTP 422).
    """
    limits = ImageLimits.coerce(limits)
    path = Path(path)
    name = str(path) if name is None else name
    if path.is_dir():
        return _dicom_series(path, name, limits, series_uid)
    if not path.is_file():
        raise InputError(f"{name}: the file does not exist.")
    with open(path, "rb") as f:
        head = f.read(544)
    lower = path.name.lower()
    if not head:
        raise InputError(f"{name}: the file is empty.")
    if head[:4] == b"NRRD":
        return _nrrd_header(path, name, limits)
    if head[128:132] == b"DICM" or lower.endswith(".dcm"):  # before PIL: a DICOM preamble may look like TIFF
        return _dicom_file(path, name, limits)
    if head.startswith(_PIL_MAGIC):
        return _pil_header(path, name, limits)
    if head[:2] == b"\x1f\x8b" or lower.endswith((".nii", ".nii.gz")) or head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return _nifti_header(path, name, limits)
    raise InputError(
        f"{name}: unrecognised image format; send NIfTI (.nii, .nii.gz), NRRD (.nrrd), DICOM (.dcm or a series "
        "folder) or PNG."
    )


def check_image(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    limits: ImageLimits | Mapping | None = None,
    spatial_dims: int | None = None,
    name: str | None = None,
    series_uid: str | None = None,
) -> list[ImageHeader]:
    """Check an image given as one path or a list of per-channel paths: every header and the totals.

    Args:
        path: a file, a DICOM series folder, or a list of them (one per channel).
        limits: see :func:`read_header`; the voxel and byte limits apply to the channels together.
        spatial_dims: 2 or 3 to refuse images of the other kind (see :func:`check_spatial_dims`); ``None`` skips.
        name: how messages name the image (default: the path or paths).
        series_uid: see :func:`read_header`.

    Returns:
        the headers, one per file.

    Raises:
        ImageTooLargeError, InputError: see :func:`read_header`.
    """
    limits = ImageLimits.coerce(limits)
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    if not paths:
        raise InputError(f"{name or 'image'}: an empty list of files.")
    headers = [read_header(p, limits, str(p) if name is None or len(paths) > 1 else name, series_uid) for p in paths]
    label = name or ", ".join(str(p) for p in paths)
    voxels, nbytes = sum(h.voxels for h in headers), sum(h.nbytes for h in headers)
    if voxels > limits.max_voxels:
        raise _too_large(label, f"{len(headers)} channel files", voxels, limits.max_voxels, "voxels")
    if nbytes > limits.max_bytes:
        raise _too_large(label, f"{len(headers)} channel files", nbytes, limits.max_bytes, "bytes")
    for h in headers:
        check_spatial_dims(h.spatial_shape, spatial_dims, h.name)
    return headers


def check_spatial_dims(spatial_shape: Sequence[int], spatial_dims: int | None, name: str) -> None:
    """Refuse a 2D image where a 3D volume is expected and the reverse.

    A 2D image has at most two spatial axes longer than one voxel: ``(X, Y)`` or ``(X, Y, 1)``.

    Raises:
        InputError: with ``name``, the shape and what to send instead; ``ValueError`` for ``spatial_dims`` not in
            ``(None, 2, 3)``.
    """
    if spatial_dims is None:
        return
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims!r}.")
    shape = tuple(int(s) for s in spatial_shape)
    extent = sum(s > 1 for s in shape)
    if spatial_dims == 3 and extent < 3:
        raise InputError(
            f"{name}: a 2D image (spatial shape {shape}) but this model segments 3D volumes (spatial_dims=3); "
            "send the whole volume (NIfTI, NRRD, a DICOM series folder or a multi-frame DICOM file), not a single "
            "slice; single slices go to the 2D lesion workflow (configs/hunet_inference.yaml, docs/lesion_workflow.md)."
        )
    if spatial_dims == 2 and extent > 2:
        raise InputError(
            f"{name}: a 3D volume (spatial shape {shape}) but this model takes 2D images (spatial_dims=2); "
            "send one slice, or use a 3D model."
        )


def safe_extract_zip(
    zip_path: str | os.PathLike, out_dir: str | os.PathLike, limits: ImageLimits | Mapping | None = None,
    name: str | None = None,
) -> list[Path]:
    """Extract the regular files of a zip archive flat into ``out_dir`` as ``00000.dcm``, ``00001.dcm``, ...

    Member names are not used (no path traversal). The archive is refused (413) beyond ``limits.max_files`` members,
    or when its members inflate beyond ``min(max_archive_bytes, max(1 MiB, max_compression_ratio * archive size))``:
    first by the sizes the archive declares, then by the bytes actually written, so extraction stops at the budget
    whatever the archive claims; what was extracted is then removed.

    Raises:
        ImageTooLargeError: beyond the budget (HTTP 413).
        InputError: not a zip archive, no files, encrypted or corrupt members (HTTP 422).
    """
    limits = ImageLimits.coerce(limits)
    zip_path, out = Path(zip_path), Path(out_dir)
    name = str(zip_path) if name is None else name
    budget = int(min(limits.max_archive_bytes,
                     max(_ZIP_BUDGET_FLOOR, limits.max_compression_ratio * zip_path.stat().st_size)))
    written: list[Path] = []
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            members = [m for m in members if not Path(m.filename.replace("\\", "/")).name.startswith((".", "__MACOSX"))]
            if not members:
                raise InputError(f"{name}: the zip archive holds no files.")
            if len(members) > limits.max_files:
                raise _too_large(name, "zip members", len(members), limits.max_files, "files")
            declared = sum(m.file_size for m in members)
            if declared > budget:
                raise _too_large(name, "uncompressed zip members", declared, budget, "bytes")
            out.mkdir(parents=True, exist_ok=True)
            total = 0
            for i, m in enumerate(members):
                target = out / f"{i:05d}.dcm"
                written.append(target)
                with zf.open(m) as src, open(target, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        total += len(chunk)
                        if total > budget:
                            raise _too_large(name, "uncompressed zip members", total, budget, "bytes")
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error) as e:
        _remove(written)
        raise InputError(f"{name}: corrupt, encrypted or unsupported zip archive ({type(e).__name__}: {e}).") from e
    except BaseException:
        _remove(written)
        raise
    return written


def _remove(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
