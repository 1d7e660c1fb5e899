# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""scripts.dicom_io on DICOM files written with pydicom (tests/dicom_files.py): series discovery and choice,
classic series in several orientations against MONAI's own reader and the written geometry, enhanced multi-frame
images against the same volume as a series, refusals with one line naming the file, the DICOM SEG read back with
highdicom and pydicom, and the inference bundle end to end (tiny random model)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import unittest
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from parameterized import parameterized

from scripts.dicom_io import (
    DICOM_SOURCE_KEY,
    DicomVolumeReader,
    SaveDicomSegd,
    check_output_format,
    discover_series,
    read_volume,
    select_series,
    write_dicom_seg,
)
from scripts.image_guard import DataError, ImageTooLargeError, InputError
from scripts.label.compat import LoadImageCheckedd
from tests.dicom_files import ObliqueGeometry, lps_affine, test_volume, write_enhanced, write_rgb, write_series
from tests.utils import ROOT, TINY_PLAN, env_with_root

SPACING, ORIGIN, SLOPE, INTERCEPT = (2.5, 0.8, 0.7), (-10.0, 20.0, 30.0), 2.0, -1024.0
RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _uid(files) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _expected(vol: np.ndarray, orientation, flip_normal: bool, reversed_slices: bool):
    """Array ``(columns, rows, slices)`` and RAS affine of the written series, slices reversed or not."""
    lps = lps_affine(orientation, SPACING, ORIGIN, flip_normal)
    if reversed_slices:
        vol = vol[::-1]
        lps = lps.copy()
        lps[:3, 3] += lps[:3, 0] * (vol.shape[0] - 1)
        lps[:3, 0] *= -1
    return (vol * SLOPE + INTERCEPT).astype(np.float32).transpose(2, 1, 0), RAS @ lps[:, [2, 1, 0, 3]]


def _monai_pydicom(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = LoadImage(image_only=True, reader="PydicomReader")(str(folder))
    return np.asarray(img), np.asarray(img.affine, dtype=np.float64)


class _TmpCase(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(self.enterContext(tempfile.TemporaryDirectory()))


class TestSeriesDiscovery(_TmpCase):
    def _two_series(self):
        big = write_series(self.tmp / "s", test_volume((7, 6, 5)), prefix="A", description="big")
        small = write_series(self.tmp / "s", test_volume((4, 8, 9)), prefix="B", description="small", modality="MR")
        (self.tmp / "s" / "README.txt").write_text("not DICOM")
        return self.tmp / "s", _uid(big), _uid(small)

    def test_largest_first_and_choice(self):
        folder, big, small = self._two_series()
        series = discover_series(folder)
        self.assertEqual([(s.uid, s.frames, s.modality, s.description) for s in series],
                         [(big, 7, "CT", "big"), (small, 4, "MR", "small")])
        with self.assertLogs("scripts.dicom_io", logging.INFO) as logs:
            self.assertEqual(select_series(folder, log=True).uid, big)
        self.assertEqual(len(logs.output), 2)  # the choice, then one line per other series
        self.assertIn(small, logs.output[1])
        self.assertIn("'small', MR, 4 images", logs.output[1])
        self.assertEqual(select_series(folder, small).uid, small)
        self.assertEqual(read_volume(folder).array.shape, (5, 6, 7))
        self.assertEqual(read_volume(folder, small).array.shape, (9, 8, 4))

    def test_unknown_uid_lists_the_series(self):
        folder, big, small = self._two_series()
        with self.assertRaises(InputError) as ctx:
            select_series(folder, "1.2.3.4")
        message = str(ctx.exception)
        for fragment in (str(folder), "1.2.3.4", big, small, "--series_uid"):
            self.assertIn(fragment, message)
        self.assertEqual(len(message.splitlines()), 1)

    def test_file_limit(self):
        folder, _, _ = self._two_series()
        with self.assertRaises(ImageTooLargeError):
            discover_series(folder, {"max_files": 5})

    @parameterized.expand([
        ("no_series_uid", {"series_uid": None}, "without SeriesInstanceUID"),
        ("no_positions", {"positions": False}, "no ImagePositionPatient"),
    ])
    def test_malformed_series(self, _, kwargs, fragment):
        files = write_series(self.tmp / "s", test_volume((4, 6, 5)), **kwargs)
        with self.assertRaises(InputError) as ctx:
            read_volume(self.tmp / "s")
        self.assertIn(fragment, str(ctx.exception))
        self.assertTrue(any(str(f) in str(ctx.exception) for f in files) or str(self.tmp / "s") in str(ctx.exception))

    def test_irregular_series(self):
        files = write_series(self.tmp / "s", test_volume((6, 6, 5)))
        files[3].unlink()  # a gap
        with self.assertRaisesRegex(InputError, "could not be read as one regular 3D volume"):
            read_volume(self.tmp / "s")


class TestReadVolume(_TmpCase):
    @parameterized.expand([
        (name, orientation, flip_normal, order)
        for name, orientation in (("axial", ObliqueGeometry.AXIAL), ("flipped", ObliqueGeometry.FLIPPED),
                                  ("oblique", ObliqueGeometry.OBLIQUE), ("sagittal", ObliqueGeometry.SAGITTAL))
        for flip_normal in (False, True)
        for order in ("position", "reverse", "shuffled")
    ])
    def test_classic_geometry(self, _, orientation, flip_normal, order):
        vol = test_volume((6, 10, 8))
        write_series(self.tmp / "s", vol, orientation, SPACING, ORIGIN, flip_normal, instance_order=order)
        got = read_volume(self.tmp / "s")
        # slices follow InstanceNumber where it is monotonic, else the normal of the image plane
        reversed_slices = order == "reverse" or (order == "shuffled" and flip_normal)
        array, affine = _expected(vol, orientation, flip_normal, reversed_slices)
        np.testing.assert_array_equal(got.array, array)
        np.testing.assert_allclose(got.affine, affine, atol=1e-5)
        if order != "shuffled":  # MONAI stacks by InstanceNumber: right wherever that is monotonic
            monai_array, monai_affine = _monai_pydicom(self.tmp / "s")
            np.testing.assert_array_equal(got.array, monai_array)
            np.testing.assert_allclose(got.affine, monai_affine, atol=1e-5)
        for k, f in enumerate(got.files):  # the recorded source of each slice is the file at that position
            position = np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float)
            np.testing.assert_allclose(RAS[:3, :3] @ position, (got.affine @ [0, 0, k, 1])[:3], atol=1e-4)

    @parameterized.expand([
        ("axial", ObliqueGeometry.AXIAL, None), ("oblique", ObliqueGeometry.OBLIQUE, None),
        ("oblique_frames_shuffled", ObliqueGeometry.OBLIQUE, [3, 0, 5, 1, 4, 2]),
        ("sagittal_flipped", ObliqueGeometry.SAGITTAL, None),
    ])
    def test_enhanced_equals_series(self, _, orientation, frame_order):
        vol = test_volume((6, 10, 8))
        write_series(self.tmp / "s", vol, orientation, SPACING, ORIGIN)
        path = write_enhanced(self.tmp / "e.dcm", vol, orientation, SPACING, ORIGIN, frame_order=frame_order)
        series, enhanced = read_volume(self.tmp / "s"), read_volume(path)
        np.testing.assert_array_equal(enhanced.array, series.array)
        np.testing.assert_allclose(enhanced.affine, series.affine, atol=1e-5)
        self.assertEqual(set(enhanced.files), {str(path)})
        stored = list(range(6)) if frame_order is None else frame_order
        self.assertEqual(list(enhanced.frames), [stored.index(k) + 1 for k in range(6)])

    def test_rgb_refused(self):
        with self.assertRaisesRegex(InputError, "a colour image.*send a greyscale volume"):
            read_volume(write_rgb(self.tmp / "rgb.dcm", 8, 8, frames=4))

    def test_reader_meta(self):
        write_series(self.tmp / "s", test_volume((5, 6, 7)))
        loader = LoadImage(image_only=True, ensure_channel_first=True)
        loader.register(DicomVolumeReader())
        img = loader(str(self.tmp / "s"))
        self.assertEqual(tuple(img.shape), (1, 7, 6, 5))
        record = json.loads(img.meta[DICOM_SOURCE_KEY])
        self.assertEqual(len(record["files"]), 5)
        self.assertIsNone(record["frames"])
        np.testing.assert_allclose(img.meta["original_affine"], np.asarray(img.affine), atol=1e-6)
        self.assertFalse(DicomVolumeReader().verify_suffix(str(self.tmp / "a.nii.gz")))


class TestLoadImageCheckedd(_TmpCase):
    def test_series_and_refusals(self):
        big = write_series(self.tmp / "s", test_volume((7, 6, 5)), prefix="A")
        small = write_series(self.tmp / "s", test_volume((4, 8, 9)), prefix="B")
        load = LoadImageCheckedd("image", in_channels=1, spatial_dims=3, ensure_channel_first=True, image_only=True)
        img = load({"image": str(self.tmp / "s")})["image"]
        self.assertEqual(tuple(img.shape), (1, 5, 6, 7))
        self.assertEqual(json.loads(img.meta[DICOM_SOURCE_KEY])["series_uid"], _uid(big))
        load_small = LoadImageCheckedd("image", spatial_dims=3, series_uid=_uid(small), ensure_channel_first=True)
        self.assertEqual(tuple(load_small({"image": str(self.tmp / "s")})["image"].shape), (1, 9, 8, 4))
        write_series(self.tmp / "one", test_volume((1, 8, 8)))
        for bad, fragment in ((self.tmp / "one", "configs/hunet_inference.yaml"),
                              (write_rgb(self.tmp / "rgb.dcm", 8, 8, frames=4), "a colour image")):
            with self.assertRaises(InputError) as ctx:
                load({"image": str(bad)})
            self.assertIn(fragment, str(ctx.exception))
            self.assertTrue(str(ctx.exception).startswith(str(bad)), str(ctx.exception))

    def test_nifti_does_not_import_dicom_io(self):
        path = self.tmp / "a.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.float32), np.eye(4)), str(path))
        code = ("import sys; from scripts.label.compat import LoadImageCheckedd; "
                f"LoadImageCheckedd('image', spatial_dims=3, ensure_channel_first=True)({{'image': {str(path)!r}}}); "
                "sys.exit(1 if 'scripts.dicom_io' in sys.modules or 'highdicom' in sys.modules else 0)")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_with_root(), capture_output=True,
                                text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])


def _label(shape) -> np.ndarray:
    label = np.zeros(shape, np.int64)
    label[1:4, 2:5, 1:3] = 1
    label[3:6, 4:8, 4:6] = 2
    return label


class TestDicomSeg(_TmpCase):
    @parameterized.expand([
        (kind, seg_type) for kind in ("series", "multiframe") for seg_type in ("BINARY", "LABELMAP")
    ])
    def test_read_back(self, kind, seg_type):
        import highdicom as hd

        vol = test_volume((6, 10, 8))
        if kind == "series":
            write_series(self.tmp / "s", vol, ObliqueGeometry.OBLIQUE, SPACING, ORIGIN, instance_order="reverse")
            source = read_volume(self.tmp / "s")
        else:
            source = read_volume(write_enhanced(self.tmp / "e.dcm", vol, ObliqueGeometry.OBLIQUE, SPACING, ORIGIN,
                                                frame_order=[3, 0, 5, 1, 4, 2]))
        label = _label(source.array.shape)
        out = write_dicom_seg(label, source.source_json(), self.tmp / "out" / "case_seg.dcm", ["liver", "tumour"],
                              seg_type)
        self.assertEqual([p.name for p in out.parent.iterdir()], ["case_seg.dcm"])  # no temporary file left
        seg = hd.seg.segread(str(out))
        # LABELMAP adds segment 0 (background) itself
        self.assertEqual([s.SegmentLabel for s in seg.SegmentSequence if s.SegmentNumber > 0], ["liver", "tumour"])
        self.assertEqual(seg.SegmentationType, seg_type)
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in dict.fromkeys(source.files)]
        ref = seg.ReferencedSeriesSequence[0]
        self.assertEqual(ref.SeriesInstanceUID, source.series_uid)
        self.assertEqual({r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence},
                         {h.SOPInstanceUID for h in headers})
        raw = pydicom.dcmread(out)  # plain pydicom too
        self.assertEqual((raw.Modality, raw.StudyInstanceUID, raw.FrameOfReferenceUID),
                         ("SEG", headers[0].StudyInstanceUID, headers[0].FrameOfReferenceUID))
        if kind == "series":
            uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in source.files]
            planes = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
        else:
            planes = seg.get_pixels_by_source_frame(headers[0].SOPInstanceUID, list(source.frames),
                                                    combine_segments=True, skip_overlap_checks=True,
                                                    assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(planes.transpose(2, 1, 0), label)  # (slice, row, col) -> (col, row, slice)

    def test_mismatch(self):
        write_series(self.tmp / "s", test_volume((6, 10, 8)))
        source = read_volume(self.tmp / "s")
        with self.assertRaisesRegex(InputError, "source's voxel grid"):
            write_dicom_seg(np.zeros((8, 10, 5), int), source.source_json(), self.tmp / "x.dcm", ["a"])
        with self.assertRaisesRegex(InputError, "class_names"):
            write_dicom_seg(_label(source.array.shape), source.source_json(), self.tmp / "x.dcm", ["a"])
        self.assertFalse((self.tmp / "x.dcm").exists())

    def test_transform(self):
        write_series(self.tmp / "a" / "scan", test_volume((6, 10, 8)), instance_order="reverse")
        write_series(self.tmp / "b" / "scan", test_volume((6, 10, 8), 1))
        load = LoadImageCheckedd("image", spatial_dims=3, ensure_channel_first=True)
        saver = SaveDicomSegd("pred", self.tmp / "out", ["liver", "tumour"], data_root_dir=str(self.tmp))
        for case in ("a", "b"):
            image = load({"image": str(self.tmp / case / "scan")})["image"]
            pred = MetaTensor(torch.as_tensor(_label(image.shape[1:]))[None].float(), affine=image.affine)
            out = saver({"image": image, "pred": pred})
            self.assertEqual(out["pred_path"], str(self.tmp / "out" / case / "scan_seg.dcm"))
        nifti = self.tmp / "n.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((8, 10, 6), np.float32), np.eye(4)), str(nifti))
        image = load({"image": str(nifti)})["image"]
        with self.assertRaisesRegex(InputError, "needs a DICOM input"):
            saver({"image": image, "pred": MetaTensor(torch.zeros(1, 8, 10, 6), affine=image.affine)})
        with self.assertRaises(ValueError):
            SaveDicomSegd("pred", self.tmp, ["a"], segmentation_type="FRACTIONAL")

    def test_check_output_format(self):
        series = self.tmp / "s"
        write_series(series, test_volume((3, 4, 4)))
        nifti = self.tmp / "n.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(nifti))
        self.assertEqual(check_output_format("nifti", [{"image": str(nifti)}]), "nifti")
        self.assertEqual(check_output_format("dicom_seg", [{"image": str(series)}]), "dicom_seg")
        with self.assertRaisesRegex(InputError, "n.nii.gz: output_format dicom_seg needs DICOM inputs"):
            check_output_format("dicom_seg", [str(series), str(nifti)])
        with self.assertRaises(DataError):
            check_output_format("dicom", [])


class TestInferenceBundle(unittest.TestCase):
    """``python -m monai.bundle run inference`` on DICOM inputs with a tiny random model."""

    KEYS = ("patch_size", "features", "strides", "kernel_sizes", "block_types", "pixdim")

    @classmethod
    def setUpClass(cls):
        from scripts.networks import MambaClinix

        cls.tmp = Path(tempfile.mkdtemp())
        torch.manual_seed(0)
        net = MambaClinix(3, 1, 3, features=TINY_PLAN["features"], kernel_size=TINY_PLAN["kernel_sizes"],
                          strides=TINY_PLAN["strides"], block_types=TINY_PLAN["block_types"],
                          hgcn_orders=TINY_PLAN["hgcn_orders"], deep_supervision=False)
        (cls.tmp / "models").mkdir()
        torch.save(net.state_dict(), cls.tmp / "models" / "model.pt")
        vol = test_volume((12, 20, 18))
        cls.big = _uid(write_series(cls.tmp / "study", vol, ObliqueGeometry.OBLIQUE, SPACING, ORIGIN, prefix="A",
                                    instance_order="reverse"))
        cls.small = _uid(write_series(cls.tmp / "study", test_volume((5, 20, 18), 1), prefix="B", modality="MR"))
        cls.enhanced = write_enhanced(cls.tmp / "enhanced.dcm", vol, ObliqueGeometry.OBLIQUE, SPACING, ORIGIN)
        write_series(cls.tmp / "slice", vol[:1])
        write_rgb(cls.tmp / "rgb.dcm", 8, 8, frames=4)
        nib.save(nib.Nifti1Image(np.ones((12, 10, 8), np.float32), np.eye(4)), str(cls.tmp / "scan.nii.gz"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _run(self, inputs, out: str, *extra: str) -> subprocess.CompletedProcess:
        plan = {**TINY_PLAN, "pixdim": [1.5, 1.5, 1.5]}
        args = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
                "['configs/inference.yaml']", "--meta_file", "configs/metadata.json", "--bundle_root", ".",
                "--ckpt_dir", str(self.tmp / "models"), "--output_dir", str(self.tmp / out), "--device", "cpu",
                "--save_overlay", "False", "--tta_mirror_axes", "None", "--class_names", "['inner', 'outer']",
                "--input_files", json.dumps([str(i) for i in inputs])]
        for key in self.KEYS:
            args += [f"--{key}", json.dumps(plan[key])]
        return subprocess.run(args + list(extra), cwd=ROOT, env=env_with_root(), capture_output=True, text=True,
                              timeout=900)

    def test_series_and_multiframe_to_dicom_seg(self):
        import highdicom as hd

        result = self._run([self.tmp / "study", self.enhanced], "seg", "--output_format", "dicom_seg")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn(f"also holds series {self.small}", result.stdout + result.stderr)
        outputs = sorted(p.name for p in (self.tmp / "seg").iterdir())
        self.assertEqual(outputs, ["enhanced_seg.dcm", "study_seg.dcm"])
        masks = {}
        for name, source in (("study", self.tmp / "study"), ("enhanced", self.enhanced)):
            seg = hd.seg.segread(str(self.tmp / "seg" / f"{name}_seg.dcm"))
            self.assertEqual([s.SegmentLabel for s in seg.SegmentSequence], ["inner", "outer"])
            volume = read_volume(source)
            self.assertEqual(seg.ReferencedSeriesSequence[0].SeriesInstanceUID, volume.series_uid)
            first = pydicom.dcmread(volume.files[0], stop_before_pixels=True)
            if volume.frames is None:
                uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in volume.files]
                planes = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
            else:
                planes = seg.get_pixels_by_source_frame(first.SOPInstanceUID, list(volume.frames),
                                                        combine_segments=True, skip_overlap_checks=True,
                                                        assert_missing_frames_are_empty=True)
            masks[name] = planes.transpose(2, 1, 0)
        # the same volume as a series (slices in reverse instance order) and as a multi-frame file: one result
        np.testing.assert_array_equal(masks["study"][:, :, ::-1], masks["enhanced"])

    def test_nifti_output_keeps_the_dicom_geometry(self):
        result = self._run([self.tmp / "study", self.enhanced], "nii", "--series_uid", self.big)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        for name, source in (("study", self.tmp / "study"), ("enhanced", self.enhanced)):
            img = nib.load(str(self.tmp / "nii" / f"{name}_seg.nii.gz"))
            volume = read_volume(source)
            self.assertEqual(img.shape, volume.array.shape)
            np.testing.assert_allclose(img.affine, volume.affine, atol=1e-4)

    @parameterized.expand([
        ("rgb", "rgb.dcm", (), "a colour image"),
        ("single_slice", "slice", (), "configs/hunet_inference.yaml"),
        ("unknown_series", "study", ("--series_uid", "1.2.3"), "no series with SeriesInstanceUID 1.2.3"),
        ("nifti_to_dicom_seg", "scan.nii.gz", ("--output_format", "dicom_seg"), "needs DICOM inputs"),
    ])
    def test_refused_in_one_line(self, _, name, extra, fragment):
        result = self._run([self.tmp / name], "refused", *extra)
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        last = result.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("ERROR: "), result.stderr[-3000:])
        self.assertIn(str(self.tmp / name), last)
        self.assertIn(fragment, last)
        self.assertNotIn("Traceback (most recent call last)", result.stderr + result.stdout)
        self.assertFalse((self.tmp / "refused").exists() and any((self.tmp / "refused").iterdir()))


if __name__ == "__main__":
    unittest.main()
