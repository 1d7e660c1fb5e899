# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Datalist checks (bad input stops with the file and the fix), intensity normalisation, mirroring TTA,
atomic outputs and the resumable-checkpoint handler."""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from parameterized import parameterized

from scripts.checks.hostile import _nifti_header, address_space_cap
from scripts.data import DataError, check_case, load_datalist, validate_datalist
from scripts.image_guard import ImageTooLargeError, InputError
from scripts.inferers import MirroringSlidingWindowInferer
from scripts.io_utils import OutputNames, atomic_path, atomic_torch_save, atomic_write_json, common_root, output_path
from scripts.transforms import AtomicSaveSegmentationd, NormalizeChannelsd, SelectFullResolutiond
from tests.utils import make_case


class TestDatalistChecks(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        image, label, affine = make_case((10, 9, 8))
        self.affine = affine
        self.image = self._save("img.nii.gz", image[0])
        self.label = self._save("lab.nii.gz", label)

    def _save(self, name, arr):
        path = self.tmp / name
        nib.save(nib.Nifti1Image(arr, self.affine), str(path))
        return str(path)

    def test_good_case(self):
        self.assertEqual(check_case({"image": self.image, "label": self.label}, 1, 3), (10, 9, 8))
        items = validate_datalist([{"image": self.image, "label": self.label}], 1, 3)
        self.assertEqual(len(items), 1)

    def test_multichannel_list_of_files(self):
        second = self._save("img2.nii.gz", np.ones((10, 9, 8), np.float32))
        self.assertEqual(check_case({"image": [self.image, second], "label": self.label}, 2, 3), (10, 9, 8))

    def _assert_error(self, item, fragments, in_channels=1, num_classes=3):
        with self.assertRaises(DataError) as ctx:
            check_case(item, in_channels, num_classes)
        for f in fragments:
            self.assertIn(f, str(ctx.exception))

    def test_missing_file(self):
        self._assert_error({"image": str(self.tmp / "nope.nii.gz"), "label": self.label}, ["nope.nii.gz", "does not exist"])

    def test_corrupt_file(self):
        bad = self.tmp / "bad.nii.gz"
        bad.write_bytes(b"\x1f\x8b not really gzip")
        self._assert_error({"image": str(bad), "label": self.label}, ["bad.nii.gz", "could not be read"])

    def test_wrong_channel_count(self):
        self._assert_error({"image": self.image, "label": self.label}, ["img.nii.gz", "expects 4"], in_channels=4)

    def test_label_shape(self):
        other = self._save("small.nii.gz", np.zeros((5, 9, 8), np.uint8))
        self._assert_error({"image": self.image, "label": other}, ["small.nii.gz", "(5, 9, 8)", "(10, 9, 8)"])

    def test_label_out_of_range(self):
        other = self._save("big.nii.gz", np.full((10, 9, 8), 7, np.uint8))
        self._assert_error({"image": self.image, "label": other}, ["big.nii.gz", "class 7", "3 classes"])

    def test_label_not_integer(self):
        other = self._save("frac.nii.gz", np.full((10, 9, 8), 0.5, np.float32))
        self._assert_error({"image": self.image, "label": other}, ["frac.nii.gz", "integer"])

    def test_nan_image(self):
        arr = np.ones((10, 9, 8), np.float32)
        arr[1, 2, 3] = np.nan
        nan = self._save("nan.nii.gz", arr)
        self._assert_error({"image": nan, "label": self.label}, ["nan.nii.gz", "NaN"])

    def test_empty_and_missing_datalist(self):
        with self.assertRaisesRegex(DataError, "empty"):
            validate_datalist([], 1, 3)
        with self.assertRaisesRegex(DataError, "does not exist"):
            load_datalist(self.tmp / "missing.json", self.tmp)
        broken = self.tmp / "broken.json"
        broken.write_text("{not json")
        with self.assertRaisesRegex(DataError, "not valid JSON"):
            load_datalist(broken, self.tmp)

    @parameterized.expand([
        ("2d", (10, 9), 3, "2D image"), ("2d_singleton", (10, 9, 1), 3, "2D image"), ("3d", (10, 9, 8), 2, "3D volume"),
    ])
    def test_spatial_dims(self, _, shape, dims, fragment):
        path = self._save("wrong_dims.nii.gz", np.ones(shape, np.float32))
        with self.assertRaises(InputError) as ctx:
            validate_datalist([{"image": path}], 1, None, "inference", spatial_dims=dims)
        self.assertIn("wrong_dims.nii.gz", str(ctx.exception))
        self.assertIn(fragment, str(ctx.exception))
        self.assertEqual(check_case({"image": path}, 1, None), shape if len(shape) == 3 else shape)

    def test_header_bomb_and_limits(self):
        bomb = self.tmp / "bomb.nii.gz"
        bomb.write_bytes(gzip.compress(_nifti_header((1500, 1500, 1500))))
        with self.assertRaises(ImageTooLargeError) as ctx, address_space_cap():
            validate_datalist([{"image": self.image, "label": str(bomb)}], 1, 3)
        self.assertIn("case 0: label", str(ctx.exception))
        self.assertIn("bomb.nii.gz", str(ctx.exception))
        self.assertEqual(ctx.exception.status_code, 413)
        with self.assertRaisesRegex(ImageTooLargeError, "voxels"):
            check_case({"image": self.image}, 1, 3, limits={"max_voxels": 10 * 9 * 8 - 1})

    def test_datalist_escapes_warn(self):
        path = self.tmp / "dl.json"
        sub = self.tmp / "data"
        sub.mkdir()
        path.write_text(json.dumps({"training": [
            {"image": "img.nii.gz", "label": "lab.nii.gz"},
            {"image": ["../img.nii.gz", "img.nii.gz"], "label": "../../elsewhere/lab.nii.gz"},
            {"image": self.image},
        ]}))
        with self.assertLogs("scripts.data", "WARNING") as logs:
            items = load_datalist(path, sub, "training")
        self.assertEqual(len(items), 3)
        self.assertEqual(len(logs.records), 2)
        self.assertIn("training case 1", logs.output[0])
        self.assertIn("'../img.nii.gz'", logs.output[0])
        self.assertIn("'../../elsewhere/lab.nii.gz'", logs.output[1])

    def test_load_datalist_relative_paths(self):
        path = self.tmp / "dl.json"
        path.write_text(json.dumps({"training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}))
        items = load_datalist(path, self.tmp, "training")
        self.assertEqual(items[0]["image"], str(self.tmp / "img.nii.gz"))
        self.assertEqual(load_datalist(path, self.tmp, "test"), [])

    def test_load_datalist_mapping_and_plain_test_paths(self):
        content = {"training": [{"image": ["a.nii.gz", "/abs/b.nii.gz"], "label": "l.nii.gz", "id": 7}],
                   "test": ["c.nii.gz"]}
        items = load_datalist(content, self.tmp, "training")
        self.assertEqual(items, [{"image": [str(self.tmp / "a.nii.gz"), "/abs/b.nii.gz"],
                                  "label": str(self.tmp / "l.nii.gz"), "id": 7}])
        self.assertEqual(load_datalist(content, self.tmp, "test"), [{"image": str(self.tmp / "c.nii.gz")}])
        with self.assertRaisesRegex(DataError, "case 0 of 'validation'"):
            load_datalist({"validation": [3]}, self.tmp, "validation")

    @parameterized.expand([("read", True), ("headers", False)])
    def test_one_check_two_depths(self, _, read):
        """The planner checks headers only (read=False); both depths find missing labels, other grids and channel
        counts that differ between cases."""
        good = {"image": self.image, "label": self.label}
        self.assertEqual(validate_datalist([good, good], None, None, read=read), [good, good])
        second = self._save("img2.nii.gz", np.ones((10, 9, 8), np.float32))
        small = self._save("small.nii.gz", np.zeros((5, 9, 8), np.float32))
        for items, fragment in [
            ([good, {"image": [self.image, second], "label": self.label}], "inconsistent channel counts"),
            ([{"image": self.image}], "no 'label' entry"),
            ([{"image": [self.image, small], "label": self.label}], "different spatial shapes"),
            ([{"image": self.image, "label": small}], "small.nii.gz has shape (5, 9, 8)"),
        ]:
            with self.subTest(fragment), self.assertRaisesRegex(DataError, fragment.replace("(", r"\(").replace(")", r"\)")):
                validate_datalist(items, None, None, require_label=True, read=read)

    def test_configs_check_their_datalists(self):
        """Every config that loads a datalist goes through scripts.data (the one check), never MONAI's loader."""
        from tests.utils import ROOT

        for config in sorted((ROOT / "configs").glob("*.yaml")):
            with self.subTest(config.name):
                self.assertNotIn("load_decathlon_datalist", config.read_text())


class TestNormalizeChannels(unittest.TestCase):
    def test_ct_and_zscore_per_channel(self):
        rng = np.random.default_rng(0)
        img = torch.as_tensor(rng.normal(50, 20, (2, 6, 6, 6)).astype(np.float32))
        out = NormalizeChannelsd("image", ["ct", "zscore"], [[0.0, 80.0, 40.0, 10.0], None])({"image": img})["image"]
        expected_ct = (img[0].clamp(0, 80) - 40) / 10
        torch.testing.assert_close(out[0], expected_ct)
        self.assertAlmostEqual(float(out[1].mean()), 0.0, places=5)
        self.assertAlmostEqual(float(out[1].std()), 1.0, places=5)

    def test_nonzero_zscore_keeps_background(self):
        img = torch.zeros(1, 4, 4, 4)
        img[0, 1:3, 1:3, 1:3] = torch.tensor([1.0, 3.0]).repeat(4)[:8].view(2, 2, 2)
        out = NormalizeChannelsd("image", "zscore", nonzero=True)({"image": img})["image"]
        self.assertTrue(bool((out[img == 0] == 0).all()))
        self.assertAlmostEqual(float(out[img != 0].mean()), 0.0, places=5)

    def test_errors(self):
        meta = MetaTensor(torch.ones(3, 4, 4, 4), meta={"filename_or_obj": "three.nii.gz"})
        with self.assertRaisesRegex(ValueError, "three.nii.gz.*3 channels"):
            NormalizeChannelsd("image", ["zscore", "zscore"])({"image": meta})
        bad = torch.ones(1, 4, 4, 4)
        bad[0, 0, 0, 0] = float("nan")
        with self.assertRaisesRegex(ValueError, "NaN"):
            NormalizeChannelsd("image", "zscore")({"image": bad})
        for img in (bad, meta):  # the 422 input error of MONAI Label, not a bare ValueError (500)
            with self.assertRaises(InputError) as ctx:
                NormalizeChannelsd("image", ["zscore", "zscore"] if img is meta else "zscore")({"image": img})
            self.assertEqual(ctx.exception.status_code, 422)
        with self.assertRaisesRegex(ValueError, "scheme"):
            NormalizeChannelsd("image", "minmax")
        with self.assertRaisesRegex(ValueError, "lower, upper, mean, std"):
            NormalizeChannelsd("image", ["ct"], [None])

    def test_select_full_resolution(self):
        a, b = torch.zeros(2, 4, 4), torch.ones(2, 2, 2)
        self.assertIs(SelectFullResolutiond("pred")({"pred": [a, b]})["pred"], a)
        self.assertIs(SelectFullResolutiond("pred")({"pred": a})["pred"], a)


class TestMirroringInferer(unittest.TestCase):
    @parameterized.expand([((0,),), ((0, 1, 2),), (None,)])
    def test_equals_manual_average(self, axes):
        torch.manual_seed(0)
        net = torch.nn.Conv3d(1, 2, 3, padding=1)
        x = torch.randn(1, 1, 12, 10, 8)
        inferer = MirroringSlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2, overlap=0.5, mode="gaussian",
                                                mirror_axes=axes)
        with torch.no_grad():
            out = inferer(x, net)
            plain = MirroringSlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2, overlap=0.5, mode="gaussian")
            flips = [()] + ([tuple(c) for r in range(1, len(axes) + 1)
                             for c in __import__("itertools").combinations(axes, r)] if axes else [])
            expected = sum(torch.flip(plain(torch.flip(x, [a + 2 for a in f]), net), [a + 2 for a in f])
                           for f in flips) / len(flips)
        torch.testing.assert_close(out, expected)

    def test_bad_axes(self):
        with self.assertRaisesRegex(ValueError, "0-based"):
            MirroringSlidingWindowInferer(roi_size=(8, 8), mirror_axes=[-1])
        with self.assertRaisesRegex(ValueError, "null"):
            MirroringSlidingWindowInferer(roi_size=(8, 8), mirror_axes="0,1")
        inferer = MirroringSlidingWindowInferer(roi_size=(8, 8), mirror_axes=[2])
        with self.assertRaisesRegex(ValueError, "exceed"):
            inferer(torch.zeros(1, 1, 8, 8), torch.nn.Identity())


class TestAtomicOutputs(unittest.TestCase):
    def test_failed_write_leaves_old_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            atomic_torch_save({"a": torch.ones(2)}, path)
            with self.assertRaises(RuntimeError):
                with atomic_path(path) as t:
                    t.write_bytes(b"half")
                    raise RuntimeError("interrupted")
            self.assertEqual(torch.load(path, weights_only=True)["a"].tolist(), [1.0, 1.0])
            self.assertEqual(sorted(os.listdir(tmp)), ["model.pt"])

    def test_json_strict(self):
        """NaN and infinities are written as null; NumPy / torch numbers and arrays as numbers and lists."""
        with tempfile.TemporaryDirectory() as tmp:
            path = atomic_write_json({"a": float("nan"), "b": [np.float32(0.5), -math.inf], "c": np.arange(2),
                                      "d": torch.tensor(3), 4: (True, None)}, Path(tmp) / "x.json")
            self.assertEqual(json.loads(path.read_text()), {"a": None, "b": [0.5, None], "c": [0, 1], "d": 3,
                                                            "4": [True, None]})
            with self.assertRaisesRegex(ValueError, "type .object. as JSON"):
                atomic_write_json({"a": object()}, path)
            self.assertEqual(sorted(os.listdir(tmp)), ["x.json"])

    @parameterized.expand([
        ("diagonal", np.diag([0.8, 0.8, 2.5, 1.0])),
        # a sagittal acquisition stored with permuted axes (MONAI's NibabelWriter calls this "not invertible")
        ("permuted", np.array([[0, 0, -2.5, 0], [0.8, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 0, 1.0]])),
        ("oblique", np.array([[0.8 * np.cos(0.3), -0.8 * np.sin(0.3), 0, 0], [0.8 * np.sin(0.3), 0.8 * np.cos(0.3), 0, 0],
                              [0, 0, 2.5, 0], [0, 0, 0, 1.0]])),
    ])
    def test_save_segmentation_geometry(self, _, affine):
        with tempfile.TemporaryDirectory() as tmp:
            affine = affine.copy()
            affine[:3, 3] = [10, -5, 3]
            pred = MetaTensor(torch.randint(0, 3, (1, 6, 5, 4)).float(), affine=torch.as_tensor(affine),
                              meta={"filename_or_obj": "/x/case7.nrrd"})
            out = AtomicSaveSegmentationd("pred", output_dir=tmp, output_postfix="seg", output_dtype=np.uint8)({"pred": pred})
            saved = nib.load(out["pred_path"])
            self.assertTrue(out["pred_path"].endswith("case7_seg.nii.gz"))
            self.assertEqual(saved.shape, (6, 5, 4))
            self.assertEqual(saved.get_data_dtype(), np.uint8)
            np.testing.assert_allclose(saved.affine, affine, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(saved.dataobj), pred[0].numpy().astype(np.uint8))
            self.assertEqual(os.listdir(tmp), ["case7_seg.nii.gz"])



def _pred(name, value=1):
    return MetaTensor(torch.full((1, 4, 3, 2), float(value)), affine=torch.eye(4), meta={"filename_or_obj": name})


class TestOutputNames(unittest.TestCase):
    """Output names: each input's folder relative to the inputs' common folder, a number for a repeated name."""

    @parameterized.expand([
        ("one_file", ["/d/a/scan.nii.gz"], ["out/scan_seg.nii.gz"]),
        ("same_folder", ["/d/x.nii.gz", "/d/y.nrrd"], ["out/x_seg.nii.gz", "out/y_seg.nii.gz"]),
        ("same_name_two_folders", ["/d/a/scan.nii.gz", "/d/b/scan.nii.gz"],
         ["out/a/scan_seg.nii.gz", "out/b/scan_seg.nii.gz"]),
        ("nested", ["/d/scan.nii.gz", "/d/p 1/s/scan.nii.gz"], ["out/scan_seg.nii.gz", "out/p_1/s/scan_seg.nii.gz"]),
        ("dicom_series_folder", ["/d/study/series1/"], ["out/series1_seg.nii.gz"]),
        ("channels_by_first_file", [["/d/a/t1.nii.gz", "/e/t2.nii.gz"], ["/d/b/t1.nii.gz", "/e/t2.nii.gz"]],
         ["out/a/t1_seg.nii.gz", "out/b/t1_seg.nii.gz"]),
    ])
    def test_relative_names(self, _, inputs, expected):
        root = common_root(inputs)
        self.assertEqual([str(output_path(i, "out", "seg", ".nii.gz", root)) for i in inputs], expected)

    def test_flat_without_root_or_outside_it(self):
        self.assertEqual(str(output_path("/d/a/scan.nii.gz", "out")), "out/scan_seg.nii.gz")
        self.assertEqual(str(output_path("/e/scan.nii.gz", "out", "", ".nii.gz", "/d")), "out/scan.nii.gz")
        self.assertEqual(str(output_path(None, "out", "overlay", ".png", index=3)), "out/case_3_overlay.png")
        self.assertIsNone(common_root([]))
        with self.assertRaisesRegex(ValueError, "from 1"):
            output_path("a.nii", "out", index=0)

    def test_claim_numbers_repeats_with_a_warning(self):
        names = OutputNames("out", "/d")
        with self.assertLogs("scripts.io_utils", "WARNING") as logs:
            got = [str(names.claim(p)) for p in ("/d/a b.nii.gz", "/d/a_b.nii.gz", "/d/a b.nii.gz", "/d/a_b_2.nii")]
        self.assertEqual(got, ["out/a_b_seg.nii.gz", "out/a_b_2_seg.nii.gz", "out/a_b_3_seg.nii.gz",
                               "out/a_b_2_2_seg.nii.gz"])
        self.assertEqual(len(logs.output), 3)
        self.assertIn("already used in this run", logs.output[0])
        self.assertEqual(str(names.claim("/d/a b.nii.gz", "overlay", ".png")), "out/a_b_overlay.png")
        names.reset()
        self.assertEqual(str(names.claim("/d/a b.nii.gz")), "out/a_b_seg.nii.gz")

    def test_saver_same_file_name_in_two_folders(self):
        with tempfile.TemporaryDirectory() as tmp:
            a, b = os.path.join(tmp, "in", "a", "scan.nii.gz"), os.path.join(tmp, "in", "b", "scan.nii.gz")
            out = os.path.join(tmp, "out")
            saver = AtomicSaveSegmentationd("pred", output_dir=out, data_root_dir=common_root([a, b]))
            paths = [saver({"pred": _pred(a, 1)})["pred_path"], saver({"pred": _pred(b, 2)})["pred_path"]]
            self.assertEqual(paths, [os.path.join(out, "a", "scan_seg.nii.gz"), os.path.join(out, "b", "scan_seg.nii.gz")])
            self.assertEqual([int(np.asarray(nib.load(p).dataobj).max()) for p in paths], [1, 2])

    def test_saver_repeated_input_never_overwrites(self):
        with tempfile.TemporaryDirectory() as tmp:
            saver = AtomicSaveSegmentationd("pred", output_dir=tmp, report=True)
            with self.assertLogs("scripts.io_utils", "WARNING"):
                outs = [saver({"pred": _pred("/x/scan.nii.gz", v)}) for v in (1, 2)]
            self.assertEqual([Path(o["pred_path"]).name for o in outs], ["scan_seg.nii.gz", "scan_2_seg.nii.gz"])
            self.assertEqual([Path(o["pred_report_path"]).name for o in outs],
                             ["scan_seg_report.json", "scan_2_seg_report.json"])
            self.assertEqual([int(np.asarray(nib.load(o["pred_path"]).dataobj).max()) for o in outs], [1, 2])
            saver.reset_names()  # a new run writes its names again
            self.assertEqual(Path(saver({"pred": _pred("/x/scan.nii.gz")})["pred_path"]).name, "scan_seg.nii.gz")


if __name__ == "__main__":
    unittest.main()
