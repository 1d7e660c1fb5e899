# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""DICOM files written with pydicom for the tests: classic single-frame series in any orientation, enhanced
(multi-frame) CT images with per-frame functional groups, colour images and single slices.

Geometry follows DICOM: ``volume`` is indexed ``(slice, row, column)``; ``orientation`` is ImageOrientationPatient
(row direction, then column direction, LPS), slices advance along ``normal`` (the cross product of the two, or its
opposite with ``flip_normal``), ``spacing`` is ``(slice, row, column)`` in mm. :func:`lps_affine` gives the matching
voxel ``(slice, row, column)`` -> LPS matrix, so tests can compare readers with the geometry that was written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["ObliqueGeometry", "lps_affine", "write_series", "write_enhanced", "write_rgb", "test_volume"]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


class ObliqueGeometry:
    """Orientations used by the tests: axial, a flipped (feet-first, row direction reversed) and an oblique one."""

    AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    _c, _s = float(np.cos(np.deg2rad(20))), float(np.sin(np.deg2rad(20)))
    OBLIQUE = (_c, _s, 0.0, -_s * 0.5, _c * 0.5, float(np.sqrt(0.75)))
    SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _ds(values: Sequence[float]) -> list:
    """Decimal strings of at most 16 characters (DICOM's DS), as precise as they can be."""
    from pydicom.valuerep import DS

    return [DS(float(v), auto_format=True) for v in values]


def _normal(orientation: Sequence[float]) -> np.ndarray:
    r, c = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return np.cross(r, c)


def lps_affine(orientation: Sequence[float], spacing: Sequence[float], origin: Sequence[float],
               flip_normal: bool = False) -> np.ndarray:
    """Voxel ``(slice, row, column)`` -> LPS patient coordinates of a series written by :func:`write_series`."""
    r, c = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    n = _normal(orientation) * (-1.0 if flip_normal else 1.0)
    a = np.eye(4)
    a[:3, 0], a[:3, 1], a[:3, 2] = n * spacing[0], c * spacing[1], r * spacing[2]
    a[:3, 3] = origin
    return a


def test_volume(shape: Sequence[int] = (6, 10, 8), seed: int = 0) -> np.ndarray:
    """An int16 volume ``(slices, rows, columns)`` with a bright blob and every voxel distinct enough to tell axes
    apart."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt(sum(((idx[i] - centre[i]) / max(shape[i] / 3, 1)) ** 2 for i in range(3)))
    vol = 100 * idx[0] + 10 * idx[1] + idx[2] + np.where(r < 1.0, 500, 0) + rng.integers(0, 3, shape)
    return vol.astype(np.int16)


test_volume.__test__ = False  # a helper, not a pytest test


def _base(sop_class: str, modality: str, series_uid: str | None, study_uid: str, frame_uid: str, sop_uid: str,
          description: str = "") -> object:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, sop_uid, modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PHANTOM1", "19700101", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", "A1"
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
    ds.SeriesNumber, ds.Manufacturer, ds.SeriesDescription = 1, "pydicom", description
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
    return ds


def _pixels(ds, rows: int, cols: int, frames: int | None) -> None:
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if frames is not None:
        ds.NumberOfFrames = frames


def write_series(
    folder: str | Path,
    volume: np.ndarray,
    orientation: Sequence[float] = ObliqueGeometry.AXIAL,
    spacing: Sequence[float] = (2.5, 0.8, 0.7),
    origin: Sequence[float] = (-10.0, 20.0, 30.0),
    flip_normal: bool = False,
    series_uid: str | None = "",
    modality: str = "CT",
    description: str = "test series",
    slope: float = 2.0,
    intercept: float = -1024.0,
    instance_order: str = "position",
    prefix: str = "IM",
    study_uid: str | None = None,
    positions: bool = True,
) -> list[Path]:
    """Write ``volume`` ``(slices, rows, columns)`` (stored values) as a classic single-frame series, one file per
    slice; return the files in slice order.

    Args:
        folder: where the files go (created).
        volume: stored pixel values, int16.
        orientation, spacing, origin, flip_normal: the geometry (see the module docstring).
        series_uid: SeriesInstanceUID; ``""``: a new one; ``None``: the attribute is left out.
        modality: CT (CT Image Storage) or MR (MR Image Storage).
        slope, intercept: RescaleSlope / RescaleIntercept (CT only; real value = slope * stored + intercept).
        instance_order: ``"position"`` (InstanceNumber follows the slice index), ``"reverse"`` or ``"shuffled"``.
        prefix: file name prefix; files are written in a shuffled name order so that readers must sort.
        study_uid: StudyInstanceUID (a new one by default).
        positions: write ImagePositionPatient.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid() if series_uid == "" else series_uid
    study_uid, frame_uid = study_uid or generate_uid(), generate_uid()
    affine = lps_affine(orientation, spacing, origin, flip_normal)
    n = volume.shape[0]
    numbers = {"position": list(range(1, n + 1)), "reverse": list(range(n, 0, -1))}.get(instance_order)
    if numbers is None:
        numbers = list(np.random.default_rng(3).permutation(n) + 1)
    names = np.random.default_rng(7).permutation(n)
    paths = []
    for k in range(n):
        sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
        ds = _base(sop_class, modality, series_uid, study_uid, frame_uid, generate_uid(), description)
        ds.InstanceNumber = int(numbers[k])
        if positions:
            ds.ImagePositionPatient = _ds((affine @ [k, 0, 0, 1])[:3])
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        _pixels(ds, volume.shape[1], volume.shape[2], None)
        if modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = np.ascontiguousarray(volume[k].astype(np.int16)).tobytes()
        path = folder / f"{prefix}{int(names[k]):04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced(
    path: str | Path,
    volume: np.ndarray,
    orientation: Sequence[float] = ObliqueGeometry.AXIAL,
    spacing: Sequence[float] = (2.5, 0.8, 0.7),
    origin: Sequence[float] = (-10.0, 20.0, 30.0),
    flip_normal: bool = False,
    slope: float = 2.0,
    intercept: float = -1024.0,
    frame_order: Sequence[int] | None = None,
) -> Path:
    """Write ``volume`` as one Enhanced CT Image (multi-frame, geometry and rescale in the functional groups).

    Args:
        path: the file.
        volume, orientation, spacing, origin, flip_normal, slope, intercept: as :func:`write_series`.
        frame_order: slice index stored in each frame (default: slice order); frames may be stored out of order.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = volume.shape[0]
    order = list(range(n)) if frame_order is None else [int(i) for i in frame_order]
    ds = _base(ENHANCED_CT_IMAGE, "CT", generate_uid(), generate_uid(), generate_uid(), generate_uid(), "enhanced")
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20260101", "120000", "20260101120000"
    ds.ContentQualification, ds.BurnedInAnnotation, ds.PresentationLUTShape = "RESEARCH", "NO", "IDENTITY"
    ds.LossyImageCompression = "00"
    _pixels(ds, volume.shape[1], volume.shape[2], n)
    affine = lps_affine(orientation, spacing, origin, flip_normal)

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [float(spacing[1]), float(spacing[2])], float(spacing[0])
    plane = Dataset()
    plane.ImageOrientationPatient = _ds(orientation)
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = slope, intercept, "HU"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([plane])
    shared.PixelValueTransformationSequence = DicomSequence([rescale])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames = []
    for f, k in enumerate(order):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = _ds((affine @ [k, 0, 0, 1])[:3])
        content = Dataset()
        content.FrameAcquisitionNumber, content.StackID, content.InStackPositionNumber = f + 1, "1", k + 1
        content.DimensionIndexValues = [1, k + 1]
        item.PlanePositionSequence = DicomSequence([position])
        item.FrameContentSequence = DicomSequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    org = generate_uid()
    stack_index, position_index = Dataset(), Dataset()
    stack_index.DimensionOrganizationUID, position_index.DimensionOrganizationUID = org, org
    stack_index.DimensionIndexPointer, stack_index.FunctionalGroupPointer = 0x00209056, 0x00209111
    position_index.DimensionIndexPointer, position_index.FunctionalGroupPointer = 0x00209057, 0x00209111
    organization = Dataset()
    organization.DimensionOrganizationUID = org
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    ds.DimensionIndexSequence = DicomSequence([stack_index, position_index])
    ds.DimensionOrganizationType = "3D"
    ds.PixelData = np.ascontiguousarray(volume[order].astype(np.int16)).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_rgb(path: str | Path, rows: int = 3, cols: int = 3, frames: int | None = None,
              pixels: bytes | None = None) -> Path:
    """Write a small RGB secondary-capture image (8 bits, 3 samples per pixel); ``pixels``: the pixel data as
    given (e.g. far shorter than declared), else a ramp of the declared size."""
    from pydicom.uid import generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _base(SECONDARY_CAPTURE, "OT", generate_uid(), generate_uid(), generate_uid(), generate_uid(), "colour")
    ds.ConversionType, ds.InstanceNumber = "WSD", 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 3, "RGB"
    ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 0, 8, 8, 7, 0
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1]
    n = frames or 1
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = np.arange(rows * cols * 3 * n, dtype=np.uint8).tobytes() if pixels is None else pixels
    ds.save_as(str(path), enforce_file_format=True)
    return path
