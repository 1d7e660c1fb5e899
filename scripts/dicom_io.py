# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""DICOM in and out: series discovery, reading classic series and enhanced multi-frame images as one volume, and
writing the result as a DICOM Segmentation.

Discovery (:func:`discover_series`, :func:`select_series`) groups a folder's DICOM files by SeriesInstanceUID from
their headers alone (at most :attr:`scripts.image_guard.ImageLimits.max_files` files are opened) and picks the
series with the most images (frames), or the one named by ``series_uid``; the other series are logged.

Reading (:func:`read_volume`, :class:`DicomVolumeReader`) uses highdicom: ``highdicom.get_volume_from_series`` for
a series of single-frame images, ``highdicom.imread(...).get_volume()`` for a multi-frame image (per-frame
functional groups). Slices are sorted by position, the modality rescale (slope / intercept) is applied, and the
result is laid out as MONAI's own DICOM readers lay it out: array ``(columns, rows, slices)``, RAS affine, slices
in the order of InstanceNumber (frame number for a multi-frame image) where that order runs monotonically through
the volume, else along the normal of the image plane. The meta data records the series and the source of every
slice (:data:`DICOM_SOURCE_KEY`), which :class:`SaveDicomSegd` needs to reference them.

Writing (:class:`SaveDicomSegd`, :func:`write_dicom_seg`) stores a label map that is on the source's voxel grid as
a highdicom ``Segmentation`` (one segment per foreground class, named by the class names), referencing the source
series and the source image (and frame) of every segmentation frame, atomically.

Inputs that no 3D model can use are refused with :class:`scripts.image_guard.InputError` naming the file: colour
images, images without position / orientation, irregular or inconsistent series, files without
SeriesInstanceUID. pydicom and highdicom are imported when first needed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, PathLike
from monai.data import ImageReader, MetaTensor
from monai.transforms import SaveImaged
from monai.utils import ensure_tuple

from scripts.image_guard import DataError, ImageLimits, InputError

__all__ = [
    "DICOM_SOURCE_KEY",
    "OUTPUT_FORMATS",
    "COLOUR_PHOTOMETRIC",
    "DicomSeries",
    "DicomVolume",
    "is_dicom_input",
    "read_dicom_header",
    "check_greyscale",
    "discover_series",
    "select_series",
    "read_volume",
    "DicomVolumeReader",
    "write_dicom_seg",
    "SaveDicomSegd",
    "check_output_format",
]

logger = logging.getLogger(__name__)

#: meta-data key of the JSON text ``{"series_uid", "files", "frames"}``: the source file (and 1-based frame of a
#: multi-frame image, else ``None``) of each slice of the loaded volume, in array order
DICOM_SOURCE_KEY = "dicom_source"
#: values of the inference config's ``output_format``
OUTPUT_FORMATS = ("nifti", "dicom_seg")
#: PhotometricInterpretation values of colour images (besides any SamplesPerPixel > 1)
COLOUR_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")

_LOGGED: set[tuple[str, str]] = set()  # (folder, chosen uid) whose other series were logged
_WARNED_NO_HIGHDICOM: list[bool] = []


@dataclass(frozen=True)
class DicomSeries:
    """One series of a folder, from the headers of its files.

    Attributes:
        uid: SeriesInstanceUID.
        description: SeriesDescription (``""`` when absent).
        modality: Modality (``""`` when absent).
        files: its files, in name order.
        frames: images of the series (the frames of multi-frame files counted one by one).
        headers: the files' headers (no pixel data), in the order of ``files``.
    """

    uid: str
    description: str
    modality: str
    files: tuple[Path, ...]
    frames: int
    headers: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def summary(self) -> str:
        """``uid ('description', modality, N images)`` for messages."""
        return f"{self.uid} ({self.description!r}, {self.modality or 'no modality'}, {self.frames} images)"


@dataclass(frozen=True)
class DicomVolume:
    """A DICOM image read as one volume in MONAI's layout.

    Attributes:
        array: float32 ``(columns, rows, slices)``, modality rescale applied.
        affine: 4 x 4 voxel-to-world matrix in RAS (MONAI's convention).
        series_uid: SeriesInstanceUID of the source.
        files: source file of each slice, in array order.
        frames: 1-based frame of each slice in its multi-frame file, in array order; ``None`` for single-frame
            files.
    """

    array: np.ndarray
    affine: np.ndarray
    series_uid: str
    files: tuple[str, ...]
    frames: tuple[int, ...] | None

    def source_json(self) -> str:
        """The :data:`DICOM_SOURCE_KEY` meta-data text."""
        return json.dumps({"series_uid": self.series_uid, "files": list(self.files),
                           "frames": None if self.frames is None else list(self.frames)})


def is_dicom_input(path: PathLike) -> bool:
    """Whether ``path`` is read as DICOM: a folder (a series), a ``.dcm`` file or a file with the DICOM preamble."""
    p = Path(os.fspath(path))
    if p.is_dir():
        return True
    if p.name.lower().endswith(".dcm"):
        return True
    try:
        with open(p, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def read_dicom_header(path: PathLike, name: str | None = None) -> Any:
    """Read one DICOM file's header (no pixel data) with pydicom.

    Args:
        path: the file.
        name: how messages name the file (default: the path).

    Returns:
        the ``pydicom.Dataset`` without its pixel data.

    Raises:
        InputError: deflate-compressed (it would be inflated unbounded), or not readable as DICOM; for a file that
            is not DICOM at all the cause is pydicom's ``InvalidDicomError``.
    """
    import pydicom
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    name = str(path) if name is None else name
    try:
        meta = read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            raise InputError(f"{name}: deflate-compressed DICOM is not supported; send it uncompressed.")
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InputError:
        raise
    except Exception as e:  # pydicom raises InvalidDicomError, EOFError, ValueError, ...
        raise InputError(f"{name}: could not be read as DICOM ({type(e).__name__}: {e}).") from e


def _frames(ds: Any) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _is_image(ds: Any) -> bool:
    return "Rows" in ds and "Columns" in ds


def discover_series(
    folder: PathLike, limits: ImageLimits | Mapping | None = None, name: str | None = None
) -> list[DicomSeries]:
    """The DICOM image series of a folder, largest first (most images, then UID), from the files' headers.

    Files whose names start with ``.``, files that are not DICOM and DICOM files without an image (a DICOMDIR,
    a structured report) are skipped.

    Args:
        folder: the folder (its files, not its sub-folders).
        limits: :class:`scripts.image_guard.ImageLimits` or a mapping of its fields; ``max_files`` bounds the
            files opened.
        name: how messages name the folder (default: the path).

    Raises:
        ImageTooLargeError: more than ``limits.max_files`` files.
        InputError: an image file without SeriesInstanceUID, or a file pydicom can't parse.
    """
    from pydicom.errors import InvalidDicomError

    from scripts.image_guard import _too_large

    limits = ImageLimits.coerce(limits)
    folder = Path(os.fspath(folder))
    name = str(folder) if name is None else name
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(files) > limits.max_files:
        raise _too_large(name, "files in the series folder", len(files), limits.max_files, "files")
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for p in files:
        shown = f"{name}/{p.name}"
        try:
            ds = read_dicom_header(p, shown)
        except InputError as e:
            if isinstance(e.__cause__, InvalidDicomError):
                continue  # not a DICOM file (a DICOMDIR's notes, a thumbnail): the readers skip it too
            raise
        if not _is_image(ds):
            logger.debug("%s: a DICOM file without an image (%s), skipped", shown, ds.get("Modality", "?"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            raise InputError(
                f"{shown}: a DICOM image without SeriesInstanceUID (a required attribute), so its series can't be "
                "told apart; fix the file or give it on its own."
            )
        groups.setdefault(uid, []).append((p, ds))
    series = []
    for uid, members in groups.items():
        first = members[0][1]
        series.append(DicomSeries(
            uid=uid,
            description=str(first.get("SeriesDescription", "") or ""),
            modality=str(first.get("Modality", "") or ""),
            files=tuple(p for p, _ in members),
            frames=sum(_frames(ds) for _, ds in members),
            headers=tuple(ds for _, ds in members),
        ))
    return sorted(series, key=lambda s: (-s.frames, s.uid))


def select_series(
    folder: PathLike,
    series_uid: str | None = None,
    limits: ImageLimits | Mapping | None = None,
    name: str | None = None,
    log: bool = False,
) -> DicomSeries:
    """The series of ``folder`` to read: the one named ``series_uid``, else the one with the most images.

    Args:
        folder: a folder of DICOM files.
        series_uid: SeriesInstanceUID to read; ``None`` or ``""``: the largest series.
        limits, name: see :func:`discover_series`.
        log: log, once per folder and chosen series, an INFO line for each other series (uid, description,
            modality, image count).

    Raises:
        InputError: no DICOM image in the folder, or no series ``series_uid`` (the message lists the available
            ones).
        ImageTooLargeError: see :func:`discover_series`.
    """
    name = str(folder) if name is None else name
    series = discover_series(folder, limits, name)
    if not series:
        raise InputError(f"{name}: the folder holds no DICOM image files.")
    if series_uid:
        chosen = next((s for s in series if s.uid == str(series_uid)), None)
        if chosen is None:
            listing = "; ".join(s.summary() for s in series)
            raise InputError(f"{name}: no series with SeriesInstanceUID {series_uid}; the folder holds {listing}. "
                             "Pass one of these as --series_uid.")
    else:
        chosen = series[0]
    key = (os.path.abspath(os.fspath(folder)), chosen.uid)
    if log and len(series) > 1 and key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("%s: %d series; reading %s", name, len(series), chosen.summary())
        for s in series:
            if s is not chosen:
                logger.info("%s: also holds series %s (not read; choose it with --series_uid %s)", name,
                            s.summary(), s.uid)
    return chosen


def check_greyscale(ds: Any, name: str) -> None:
    """Refuse a colour DICOM image: SamplesPerPixel > 1, or a PhotometricInterpretation in
    :data:`COLOUR_PHOTOMETRIC`.

    Args:
        ds: the image's header (``pydicom.Dataset``).
        name: how the message names the file.

    Raises:
        InputError: ``"<name>: a colour image (...); send a greyscale volume."``
    """
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    if samples > 1 or photometric in COLOUR_PHOTOMETRIC:
        raise InputError(f"{name}: a colour image (PhotometricInterpretation {photometric or '?'}, {samples} "
                         "samples per pixel); send a greyscale volume.")


def _frame_positions(ds: Any, name: str) -> np.ndarray:
    """ImagePositionPatient of each frame of a multi-frame image (per-frame functional groups, else shared)."""
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    positions = []
    for i, item in enumerate(ds.get("PerFrameFunctionalGroupsSequence") or []):
        plane = item.get("PlanePositionSequence") or (shared.get("PlanePositionSequence") if shared else None)
        if not plane or "ImagePositionPatient" not in plane[0]:
            raise InputError(f"{name}: frame {i + 1} has no ImagePositionPatient, so the frames can't be placed in "
                             "space; send a multi-frame image with plane positions or a series.")
        positions.append([float(v) for v in plane[0].ImagePositionPatient])
    if len(positions) != _frames(ds):
        raise InputError(f"{name}: {_frames(ds)} frames but {len(positions)} per-frame functional groups; the "
                         "file is not a valid enhanced (multi-frame) image.")
    return np.asarray(positions, dtype=np.float64)


def _require_series_uid(ds: Any, name: str) -> None:
    if not ds.get("SeriesInstanceUID"):
        raise InputError(f"{name}: a DICOM image without SeriesInstanceUID (a required attribute); fix the file.")


def _require_geometry(ds: Any, name: str) -> None:
    _require_series_uid(ds, name)
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
    if missing:
        raise InputError(f"{name}: no {' / '.join(missing)}, so the slices can't be placed in space; send a "
                         "series (or multi-frame image) with patient positions.")


def _as_monai(volume: Any, keys: Sequence[int], sources: Sequence[str], frames: Sequence[int] | None,
              ordinals: Sequence[int] | None, uid: str, name: str) -> DicomVolume:
    """Lay a highdicom volume ``(slice, row, column)`` (LPS) out as MONAI does, given each source image's slice.

    Args:
        volume: the ``highdicom.Volume``.
        keys: per source image (file or frame), the slice it fills.
        sources, frames: per source image, its file and 1-based frame (``None``: single-frame files).
        ordinals: per source image, its InstanceNumber (frame number); ``None`` when not known for every image.
    """
    n = volume.spatial_shape[0]
    order = [-1] * n
    for i, k in enumerate(keys):
        if not 0 <= k < n or order[k] != -1:
            raise InputError(f"{name}: the images do not fill one regular volume (two images at one position or an "
                             "image between slices); send one series of distinct, regularly spaced slices.")
        order[k] = i
    if -1 in order:
        raise InputError(f"{name}: the images do not fill one regular volume; send a series without gaps.")
    # slices follow the source order (InstanceNumber / frame number) where it runs monotonically through the
    # volume, as MONAI's readers stack them; else they run along the normal of the image plane (ITK's order)
    ranks = [ordinals[i] for i in order] if ordinals is not None else []
    increasing = len(ranks) > 1 and all(a < b for a, b in zip(ranks, ranks[1:]))
    decreasing = len(ranks) > 1 and all(a > b for a, b in zip(ranks, ranks[1:]))
    normal = np.cross(volume.direction[:, 2], volume.direction[:, 1])
    if decreasing or (n > 1 and not increasing and float(volume.affine[:3, 0] @ normal) < 0):
        volume = volume.flip_spatial(0)
        order = order[::-1]
    array = np.ascontiguousarray(np.asarray(volume.array, dtype=np.float32).transpose(2, 1, 0))
    lps = np.asarray(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return DicomVolume(array=array, affine=affine, series_uid=uid, files=tuple(sources[i] for i in order),
                       frames=None if frames is None else tuple(frames[i] for i in order))


def _highdicom_error(name: str, error: Exception) -> InputError:
    return InputError(f"{name}: could not be read as one regular 3D volume ({type(error).__name__}: {error}); send "
                      "one series of parallel, regularly spaced slices of one size and spacing, uncompressed or in a "
                      "transfer syntax pydicom decodes.")


def _read_multiframe(path: Path, ds_header: Any, name: str) -> DicomVolume:
    import highdicom as hd

    _require_geometry_multiframe(ds_header, name)
    try:
        image = hd.imread(str(path))
        volume = image.get_volume(dtype=np.float32)
    except InputError:
        raise
    except Exception as e:  # highdicom raises ValueError / RuntimeError for irregular frames
        raise _highdicom_error(name, e) from e
    positions = _frame_positions(image, name)
    keys = [int(k) for k in np.rint(volume.map_reference_to_indices(positions)[:, 0])]
    frames = list(range(1, len(keys) + 1))
    return _as_monai(volume, keys, [str(path)] * len(keys), frames, frames, str(image.SeriesInstanceUID), name)


def _require_geometry_multiframe(ds: Any, name: str) -> None:
    _require_series_uid(ds, name)
    if "PerFrameFunctionalGroupsSequence" not in ds and "ImagePositionPatient" not in ds:
        raise InputError(f"{name}: a multi-frame image without plane positions (no per-frame functional groups), "
                         "so its frames can't be placed in space; send an enhanced image or a series.")


def _read_classic(files: Sequence[Path], name: str) -> DicomVolume:
    import highdicom as hd
    import pydicom

    datasets = []
    for p in files:
        try:
            ds = pydicom.dcmread(p)
        except Exception as e:  # pydicom raises several types for damaged files
            raise InputError(f"{p}: could not be read as DICOM ({type(e).__name__}: {e}).") from e
        check_greyscale(ds, str(p))
        _require_geometry(ds, str(p))
        datasets.append(ds)
    uid = str(datasets[0].SeriesInstanceUID)
    try:
        volume = hd.get_volume_from_series(datasets, dtype=np.float32)
    except Exception as e:  # ValueError for irregular series, decoding errors for damaged pixel data
        raise _highdicom_error(name, e) from e
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    keys = [int(k) for k in np.rint(volume.map_reference_to_indices(positions)[:, 0])]
    numbers = [ds.get("InstanceNumber") for ds in datasets]
    ordinals = [int(v) for v in numbers] if all(v is not None and str(v) != "" for v in numbers) else None
    if ordinals is not None and len(set(ordinals)) != len(ordinals):
        ordinals = None
    return _as_monai(volume, keys, [str(p) for p in files], None, ordinals, uid, name)


def read_volume(
    path: PathLike,
    series_uid: str | None = None,
    limits: ImageLimits | Mapping | None = None,
    name: str | None = None,
) -> DicomVolume:
    """Read a DICOM series folder, a multi-frame file or a single-frame file as one volume (see the module).

    Args:
        path: a folder (the series ``series_uid``, else the largest: :func:`select_series`) or a file.
        series_uid: see :func:`select_series` (folders only; a file is read whatever its series).
        limits: :class:`scripts.image_guard.ImageLimits` (files of a folder).
        name: how messages name the input (default: the path).

    Raises:
        InputError: a colour image, images without SeriesInstanceUID or patient positions, a series that is not
            one regular volume, or a series of several multi-frame files; see also :func:`select_series`.
    """
    path = Path(os.fspath(path))
    name = str(path) if name is None else name
    if path.is_dir():
        series = select_series(path, series_uid, limits, name, log=True)
        files, headers = list(series.files), list(series.headers)
    else:
        files, headers = [path], [read_dicom_header(path, name)]
        if not _is_image(headers[0]):
            raise InputError(f"{name}: a DICOM file without an image (no Rows / Columns).")
    for p, ds in zip(files, headers):
        check_greyscale(ds, str(p) if path.is_dir() else name)
    multi = [p for p, ds in zip(files, headers) if _frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds]
    if multi and len(files) > 1:
        raise InputError(f"{name}: the series holds {len(files)} files of which {len(multi)} are multi-frame; give "
                         f"one multi-frame file (e.g. {multi[0]}) as the input.")
    if multi:
        return _read_multiframe(files[0], headers[0], name)
    return _read_classic(files, name)


class DicomVolumeReader(ImageReader):
    """MONAI image reader for DICOM series folders and DICOM files, through :func:`read_volume` (highdicom).

    Array and affine as MONAI's own DICOM readers give them for a classic series (``(columns, rows, slices)``,
    RAS); enhanced multi-frame images come out the same way. The meta data holds ``affine``,
    ``original_affine``, ``spatial_shape``, ``space`` (RAS), ``original_channel_dim`` (none for one input, 0 for a
    list of inputs stacked as channels) and :data:`DICOM_SOURCE_KEY` (the first input's series and the source of
    each slice). :class:`scripts.label.compat.LoadImageCheckedd` registers it for DICOM inputs.

    Args:
        series_uid: SeriesInstanceUID to read from a folder holding several series; ``None``: the largest.
        limits: :class:`scripts.image_guard.ImageLimits` or a mapping of its fields (files of a folder).
    """

    def __init__(self, series_uid: str | None = None, limits: ImageLimits | Mapping | None = None) -> None:
        super().__init__()
        self.series_uid = series_uid or None
        self.limits = ImageLimits.coerce(limits)

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every input is a folder, a ``.dcm`` file or a file with the DICOM preamble, and highdicom is
        installed (without it MONAI's own readers take DICOM inputs, with a warning once)."""
        names = ensure_tuple(filename)
        if not names or not all(is_dicom_input(f) for f in names):
            return False
        if importlib.util.find_spec("highdicom") is None:
            if not _WARNED_NO_HIGHDICOM:
                _WARNED_NO_HIGHDICOM.append(True)
                logger.warning("highdicom is not installed: DICOM inputs are read by MONAI's readers (a folder must "
                               "hold one series; no multi-frame geometry); install the versions in requirements.txt")
            return False
        return True

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> list[DicomVolume]:
        """Read each input (one per channel) with :func:`read_volume`."""
        return [read_volume(f, self.series_uid, self.limits) for f in ensure_tuple(data)]

    def get_data(self, img: DicomVolume | Sequence[DicomVolume]) -> tuple[np.ndarray, dict]:
        """The array (channels stacked first when several inputs) and its meta data.

        Raises:
            InputError: inputs of one case on different voxel grids.
        """
        volumes = list(img) if isinstance(img, (list, tuple)) else [img]
        first = volumes[0]
        for v in volumes[1:]:
            if v.array.shape != first.array.shape or not np.allclose(v.affine, first.affine, atol=1e-4):
                raise InputError(f"the channel series {v.files[0]} and {first.files[0]} are on different voxel "
                                 "grids; every channel must be on the same grid.")
        array = first.array if len(volumes) == 1 else np.stack([v.array for v in volumes], axis=0)
        meta = {
            "affine": first.affine.copy(),
            "original_affine": first.affine.copy(),
            "spatial_shape": np.asarray(first.array.shape),
            "space": "RAS",
            "original_channel_dim": float("nan") if len(volumes) == 1 else 0,
            DICOM_SOURCE_KEY: first.source_json(),
        }
        return array, meta


def check_output_format(output_format: str, inputs: Sequence[Any] | None = None) -> str:
    """Check the inference config's ``output_format`` and that its inputs suit it.

    Args:
        output_format: one of :data:`OUTPUT_FORMATS`.
        inputs: the cases (paths, lists of per-channel paths or ``{"image": ...}`` entries); with ``dicom_seg``
            each must be DICOM (a series folder or a DICOM file).

    Returns:
        ``output_format``.

    Raises:
        DataError: an unknown format (a ``ValueError``).
        InputError: with ``dicom_seg``, an input that is not DICOM.
    """
    if output_format not in OUTPUT_FORMATS:
        raise DataError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}.")
    if output_format == "dicom_seg":
        for item in inputs or []:
            image = item.get("image") if isinstance(item, Mapping) else item
            first = image[0] if isinstance(image, (list, tuple)) and image else image
            if first is not None and not is_dicom_input(first):
                raise InputError(f"{first}: output_format dicom_seg needs DICOM inputs (a series folder or a .dcm "
                                 "file); run this input with --output_format nifti.")
    return output_format


def _segment_descriptions(class_names: Sequence[str], algorithm: str, version: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(name=algorithm, family=codes.cid7162.ArtificialIntelligence,
                                              version=version)
    return [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=str(label)[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )
        for i, label in enumerate(class_names, start=1)
    ]


def write_dicom_seg(
    label: np.ndarray,
    source: Mapping[str, Any] | str,
    path: PathLike,
    class_names: Sequence[str],
    segmentation_type: str = "BINARY",
    series_description: str = "MambaClinix segmentation",
    software_version: str = "MambaClinix bundle",
) -> Path:
    """Write a label map on its source's voxel grid as a DICOM Segmentation (highdicom), atomically.

    Args:
        label: class indices ``(columns, rows, slices)`` in the array order of the source volume
            (:class:`DicomVolume`), 0 for background.
        source: the :data:`DICOM_SOURCE_KEY` record (its JSON text or the decoded mapping).
        path: the output file.
        class_names: names of classes 1, 2, ...: one segment each, labelled by its name.
        segmentation_type: ``"BINARY"`` (one bit-packed frame per segment and slice, read by every SEG viewer) or
            ``"LABELMAP"`` (one frame per slice holding the classes; DICOM 2024 and later).
        series_description: the SEG series' description.
        software_version: SoftwareVersions of the SEG.

    Returns:
        ``path``.

    Raises:
        InputError: the label map does not match the source's slices, or holds a class without a name.
    """
    import highdicom as hd
    import pydicom

    from scripts.io_utils import atomic_path

    record = json.loads(source) if isinstance(source, str) else dict(source)
    files, frames = list(record["files"]), record.get("frames")
    label = np.asarray(label)
    if label.ndim != 3 or label.shape[2] != len(files):
        raise InputError(f"{files[0] if files else path}: the label map has shape {label.shape} but the source "
                         f"series has {len(files)} slices; it must be on the source's voxel grid (after Invertd).")
    top = int(label.max()) if label.size else 0
    if top > len(class_names) or label.min() < 0:
        raise InputError(f"{path}: the label map holds class {top} but {len(class_names)} class names are given "
                         f"({list(class_names)}); set class_names to one name per foreground class.")
    # (columns, rows, slices) -> (slices, rows, columns): one frame per source image / frame
    planes = np.ascontiguousarray(label.transpose(2, 1, 0)).astype(np.uint8 if len(class_names) < 256 else np.uint16)
    if frames is None:
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        pixel_array = planes
    else:
        sources = [pydicom.dcmread(files[0], stop_before_pixels=True)]
        pixel_array = np.zeros((_frames(sources[0]),) + planes.shape[1:], planes.dtype)
        pixel_array[np.asarray(frames) - 1] = planes
    first = sources[0]
    highdicom_log = logging.getLogger("highdicom")
    level = highdicom_log.level
    highdicom_log.setLevel(max(level, logging.WARNING))  # one INFO line per copied module otherwise
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixel_array,
            segmentation_type=segmentation_type,
            segment_descriptions=_segment_descriptions(class_names, "MambaClinix", software_version),
            series_instance_uid=hd.UID(),
            series_number=int(first.get("SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="MambaClinix bundle contributors",
            manufacturer_model_name="MambaClinix",
            software_versions=software_version,
            device_serial_number="0",
            series_description=series_description[:64],
        )
    finally:
        highdicom_log.setLevel(level)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return Path(path)


class SaveDicomSegd(SaveImaged):
    """Save each label map as a DICOM Segmentation referencing its DICOM source (:func:`write_dicom_seg`).

    Use it after the prediction is back on the input's grid (``Invertd``, ``AsDiscreted``). The source comes from
    the :data:`DICOM_SOURCE_KEY` meta data that :class:`DicomVolumeReader` recorded on the ``meta_key`` image; the
    file is :meth:`scripts.io_utils.OutputNames.claim` of the case's ``filename_or_obj`` with suffix ``.dcm``
    (``<output_dir>/<folder relative to data_root_dir>/<stem>_<output_postfix>.dcm``, numbered when a name repeats
    in the run, as the NIfTI saver names its files). The path is stored under ``<key>_path``.

    Subclasses :class:`monai.transforms.SaveImaged`, so MONAI Label's post-transform filter drops it.

    Args:
        keys: keys of the label maps (channel-first, class indices).
        output_dir: output folder.
        class_names: names of classes 1, 2, ... (the segments' labels).
        output_postfix: postfix of the output file name.
        meta_key: key of the loaded image whose meta data names the case and its DICOM source.
        data_root_dir: the inputs' common folder (:func:`scripts.io_utils.common_root`); ``None``: flat names.
        segmentation_type: ``"BINARY"`` or ``"LABELMAP"`` (see :func:`write_dicom_seg`).
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        ValueError: an unknown ``segmentation_type`` or no class names.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: PathLike = "./",
        class_names: Sequence[str] = (),
        output_postfix: str = "seg",
        meta_key: str = "image",
        data_root_dir: PathLike | None = None,
        segmentation_type: str = "BINARY",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, output_dir=output_dir, output_postfix=output_postfix,
                         allow_missing_keys=allow_missing_keys)
        from scripts.io_utils import OutputNames

        if str(segmentation_type).upper() not in ("BINARY", "LABELMAP"):
            raise ValueError(f"segmentation_type must be 'BINARY' or 'LABELMAP', got {segmentation_type!r}.")
        if not class_names:
            raise ValueError("class_names must name the foreground classes (one segment each).")
        self.class_names = [str(c) for c in class_names]
        self.postfix = output_postfix
        self.meta_key = meta_key
        self.segmentation_type = str(segmentation_type).upper()
        self.names = OutputNames(output_dir, data_root_dir)

    def reset_names(self) -> None:
        """Start a new run: names written before may be written again."""
        self.names.reset()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d.get(self.meta_key)
        meta = dict(getattr(image, "meta", None) or {})
        name = meta.get("filename_or_obj") or ""
        if isinstance(name, (list, tuple)):
            name = name[0] if name else ""
        source = meta.get(DICOM_SOURCE_KEY)
        if not source:
            raise InputError(f"{name or 'the input'}: output_format dicom_seg needs a DICOM input (a series folder "
                             "or a .dcm file); run NIfTI / NRRD inputs with --output_format nifti.")
        for key in self.key_iterator(d):
            label = d[key]
            arr = np.asarray(torch.as_tensor(label).detach().cpu())
            arr = arr[0] if arr.ndim == 4 else arr
            expected = tuple(int(s) for s in np.asarray(meta.get("spatial_shape", arr.shape)))
            if tuple(arr.shape) != expected:
                raise InputError(f"{name}: the label map has shape {arr.shape}, the DICOM input {expected}; save "
                                 "the DICOM SEG after Invertd, on the input's grid.")
            if isinstance(label, MetaTensor) and "original_affine" in meta and not np.allclose(
                np.asarray(label.affine, dtype=np.float64), np.asarray(meta["original_affine"], dtype=np.float64),
                atol=1e-3,
            ):
                raise InputError(f"{name}: the label map's affine differs from the DICOM input's; save the DICOM "
                                 "SEG after Invertd, on the input's grid.")
            path = self.names.claim(name, self.postfix, ".dcm")
            out = write_dicom_seg(np.rint(arr).astype(np.int64), source, path, self.class_names,
                                  self.segmentation_type)
            d[f"{key}_path"] = str(out)
            logger.info("saved %s", out)
        return d
