# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the lesion report, per-case metrics and 2D transforms of the Mamba-HUNet workflow, and of the mask saver
and metrics writer as the workflow configures them."""

from __future__ import annotations

import json
import math
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from parameterized import parameterized
from skimage.measure import label as sk_label

from scripts.handlers import MetricsJSONWriter
from scripts.hunet.locations import CSF, GREY_MATTER, INFRATENTORIAL, VENTRICLE, WHITE_MATTER
from scripts.hunet.report import METRICS, OTHER_LOCATION, case_metrics, lesion_detection, lesion_report
from scripts.hunet.transforms import EnsureVolumed, LesionBalancedIndicesd, UnsharpMask
from scripts.io_utils import safe_stem
from scripts.transforms import AtomicSaveSegmentationd


def two_lesions() -> np.ndarray:
    m = np.zeros((10, 10, 6), np.uint8)
    m[1:3, 1:3, 1:3] = 1  # 8 voxels on slices 1, 2
    m[6:9, 5:7, 4] = 1  # 6 voxels on slice 4
    m[5, 4, 3] = 1  # touches the second lesion only through a corner (26-connectivity)
    return m


class TestLesionReport(unittest.TestCase):
    @parameterized.expand([[3, 2, [7, 8]], [1, 3, [1, 6, 8]]])
    def test_components(self, connectivity, num, sizes):
        rep = lesion_report(two_lesions(), (0.5, 0.5, 2.0), connectivity=connectivity)
        self.assertEqual(rep["num_lesions"], num)
        self.assertEqual(sorted(les["num_voxels"] for les in rep["lesions"]), sizes)
        self.assertAlmostEqual(rep["voxel_volume_ml"], 0.0005)
        self.assertAlmostEqual(rep["total_volume_ml"], 15 * 0.0005)
        self.assertEqual(rep["slices_involved"], [1, 2, 3, 4])
        self.assertEqual([les["id"] for les in rep["lesions"]], list(range(1, num + 1)))

    def test_largest_first_and_slices(self):
        rep = lesion_report(two_lesions(), (1.0, 1.0, 1.0))
        self.assertEqual(rep["lesions"][0]["slices"], [1, 2])
        self.assertEqual(rep["lesions"][0]["bbox_min"], [1, 1, 1])
        self.assertEqual(rep["lesions"][1]["slices"], [3, 4])
        json.dumps(rep)

    def test_empty_and_2d(self):
        rep = lesion_report(np.zeros((4, 4, 2)), (1, 1, 1))
        self.assertEqual((rep["num_lesions"], rep["total_volume_ml"], rep["lesions"]), (0, 0.0, []))
        rep2 = lesion_report(np.eye(4), (2.0, 2.0))
        self.assertEqual(rep2["num_lesions"], 1)  # diagonal pixels join through corners (connectivity 3)

    @parameterized.expand(
        [
            [np.zeros((2, 2, 2, 2)), (1, 1, 1), 3],
            [np.zeros((2, 2, 2)), (1, 0, 1), 3],
            [np.zeros((2, 2, 2)), (1, 1, 1), 4],
        ]
    )
    def test_bad_args(self, mask, spacing, conn):
        with self.assertRaises(ValueError):
            lesion_report(mask, spacing, connectivity=conn)


def tissue_phantom() -> np.ndarray:
    """A 40 x 40 x 12 tissue map (1 mm voxels): a ventricle block in white matter, a grey matter rim at x >= 34,
    CSF at x < 2, infratentorial tissue on slices 0-1."""
    t = np.full((40, 40, 12), WHITE_MATTER, np.uint8)
    t[18:22, 18:22, 4:8] = VENTRICLE
    t[34:, :, :] = GREY_MATTER
    t[:2] = CSF
    t[:, :, :2] = INFRATENTORIAL
    return t


class TestLesionLocations(unittest.TestCase):
    @parameterized.expand([
        ("periventricular", (23, 19, 5), 1),  # 2 mm from the ventricle
        ("juxtacortical", (31, 10, 6), 1),  # 3 mm from the grey matter, 12 mm from the ventricle
        ("deep_white_matter", (10, 30, 6), 1),
        ("infratentorial", (10, 10, 0), 1),
        (OTHER_LOCATION, (37, 30, 6), 1),  # in the grey matter
        ("periventricular", (24, 20, 6), 2),  # a 5-voxel cross centred 3 mm from the ventricle
    ])
    def test_location_of_lesion(self, expected, centre, radius):
        mask = np.zeros((40, 40, 12), np.uint8)
        x, y, z = centre
        mask[x, y, z] = 1
        if radius > 1:
            mask[x - 1: x + 2, y, z] = mask[x, y - 1: y + 2, z] = 1
        rep = lesion_report(mask, (1.0, 1.0, 1.0), tissue=tissue_phantom())
        self.assertEqual(rep["lesions"][0]["location"], expected)
        self.assertEqual(rep["location_counts"][expected], 1)
        self.assertEqual(sum(rep["location_counts"].values()), 1)

    def test_spacing_changes_the_class(self):
        mask = np.zeros((40, 40, 12), np.uint8)
        mask[27, 19, 5] = 1  # 6 voxels from the ventricle: periventricular only with voxels below 5/6 mm
        self.assertEqual(lesion_report(mask, (1.0, 1.0, 1.0), tissue=tissue_phantom())["lesions"][0]["location"],
                         "deep_white_matter")
        self.assertEqual(lesion_report(mask, (0.8, 0.8, 0.8), tissue=tissue_phantom())["lesions"][0]["location"],
                         "periventricular")

    def test_curved_lesion_uses_a_voxel_inside(self):
        # an L-shaped lesion (centroid (7.6, 7.6) outside it) whose far end touches grey matter
        mask = np.zeros((40, 40, 12), np.uint8)
        mask[5:16, 5, 6] = 1
        mask[5, 5:16, 6] = 1
        tissue = tissue_phantom()
        tissue[2:8, 16:20, :] = GREY_MATTER
        rep = lesion_report(mask, (1.0, 1.0, 1.0), tissue=tissue)
        self.assertEqual(rep["lesions"][0]["location"], "deep_white_matter")  # at (5, 7) or (7, 5), not at an end

    def test_key_slices(self):
        mask = np.zeros((40, 40, 12), np.uint8)
        mask[5:8, 5:8, 3] = 1
        mask[5, 5, 2] = mask[5, 5, 4] = 1  # the largest cross-section on slice 3
        mask[30, 30, 9] = 1
        rep = lesion_report(mask, (1.0, 1.0, 1.0))
        self.assertEqual([les["key_slice"] for les in rep["lesions"]], [3, 9])
        self.assertEqual(rep["slices_to_review"], [3, 9])
        self.assertEqual(rep["slices_involved"], [2, 3, 4, 9])
        self.assertNotIn("location_counts", rep)  # no tissue map: no location claimed
        self.assertNotIn("location", rep["lesions"][0])

    @parameterized.expand([
        ("shape", np.zeros((40, 40, 11), np.uint8)),
        ("values", np.full((40, 40, 12), 9, np.uint8)),
        ("probabilities", np.full((40, 40, 12), 0.5, np.float32)),
    ])
    def test_bad_tissue(self, _, tissue):
        with self.assertRaises(ValueError):
            lesion_report(np.zeros((40, 40, 12), np.uint8), (1, 1, 1), tissue=tissue)


class TestLesionDetection(unittest.TestCase):
    @staticmethod
    def reference(pred, label, connectivity):
        """Lesion-wise counts with scikit-image's labelling and explicit loops over the components."""
        g, n_gt = sk_label(label, connectivity=connectivity, return_num=True)
        p, n_pred = sk_label(pred, connectivity=connectivity, return_num=True)
        detected = sum(bool(pred[g == i].any()) for i in range(1, n_gt + 1))
        fp = sum(not label[p == i].any() for i in range(1, n_pred + 1))
        return n_gt, n_pred, detected, fp

    @parameterized.expand([(seed, shape, conn) for seed in range(3) for shape, conn in
                           (((24, 24, 10), 3), ((24, 24, 10), 1), ((40, 40), 2), ((40, 40), 1))])
    def test_against_reference(self, seed, shape, connectivity):
        rng = np.random.default_rng(seed)
        label = rng.random(shape) > 0.93
        pred = np.logical_or(label & (rng.random(shape) > 0.5), rng.random(shape) > 0.96)
        d = lesion_detection(pred, label, connectivity)
        n_gt, n_pred, detected, fp = self.reference(pred, label, connectivity)
        self.assertGreater(n_gt, 5)
        self.assertEqual((d["gt_lesions"], d["pred_lesions"], d["detected_lesions"], d["lesion_fp"]),
                         (n_gt, n_pred, detected, fp))
        self.assertAlmostEqual(d["lesion_recall"], detected / n_gt)
        self.assertAlmostEqual(d["lesion_precision"], (n_pred - fp) / n_pred)

    def test_known_case_and_case_metrics(self):
        label = np.zeros((12, 12, 4), np.uint8)
        label[1:3, 1:3, 1] = 1  # found
        label[8, 8, 2] = 1  # missed
        label[5:7, 9:11, 0:2] = 1  # found through one voxel
        pred = np.zeros_like(label)
        pred[2, 2, 1] = pred[6, 10, 1] = 1
        pred[10, 1, 3] = 1  # false positive
        m = case_metrics(pred[None], label[None], (1.0, 1.0, 1.0))
        self.assertEqual((m["gt_lesions"], m["pred_lesions"], m["detected_lesions"], m["lesion_fp"]), (3, 3, 2, 1))
        self.assertAlmostEqual(m["lesion_recall"], 2 / 3)
        self.assertAlmostEqual(m["lesion_precision"], 2 / 3)

    def test_empty(self):
        d = lesion_detection(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))
        self.assertEqual((d["gt_lesions"], d["pred_lesions"], d["lesion_fp"]), (0, 0, 0))
        self.assertTrue(math.isnan(d["lesion_recall"]) and math.isnan(d["lesion_precision"]))

    @parameterized.expand([
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), None),
        (np.zeros((2, 4, 4, 4)), np.zeros((2, 4, 4, 4)), None),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), 4),
        (np.zeros((4, 4)), np.zeros((4, 4)), 3),
    ])
    def test_bad_args(self, pred, label, connectivity):
        with self.assertRaises(ValueError):
            lesion_detection(pred, label, connectivity)


class TestCaseMetrics(unittest.TestCase):
    def test_known_counts(self):
        label = np.zeros((1, 8, 8, 2), np.uint8)
        label[0, 2:6, 2:6, 0] = 1  # 16
        pred = np.zeros_like(label)
        pred[0, 2:6, 2:4, 0] = 1  # 8 true positives
        pred[0, 0, 0, 1] = 1  # 1 false positive
        m = case_metrics(pred, label, spacing=(1.0, 1.0, 1.0))
        self.assertEqual((m["tp"], m["fp"], m["fn"], m["tn"]), (8, 1, 8, 128 - 17))
        self.assertAlmostEqual(m["iou"], 8 / 17)
        self.assertAlmostEqual(m["dsc"], 16 / 25)
        self.assertAlmostEqual(m["sensitivity"], 0.5)
        self.assertAlmostEqual(m["specificity"], 111 / 112)
        self.assertGreater(m["hd95"], 0.0)

    def test_identical_and_empty(self):
        a = np.zeros((6, 6, 3))
        a[2:4, 2:4, 1] = 1
        m = case_metrics(torch.as_tensor(a), a, spacing=(1, 1, 1))
        self.assertEqual((m["iou"], m["dsc"], m["hd95"], m["sensitivity"], m["specificity"]), (1.0, 1.0, 0.0, 1.0, 1.0))
        e = case_metrics(np.zeros_like(a), a)
        self.assertTrue(math.isnan(e["hd95"]))
        self.assertEqual(e["dsc"], 0.0)
        with self.assertRaises(ValueError):
            case_metrics(np.zeros((3, 3)), np.zeros((3, 4)))

    def test_hd95_spacing(self):
        label = np.zeros((20, 20, 1))
        label[5:10, 5:10] = 1
        pred = np.roll(label, 2, axis=0)
        self.assertAlmostEqual(case_metrics(pred, label, (3.0, 1.0, 1.0))["hd95"], 6.0, places=4)


class TestTransforms(unittest.TestCase):
    def test_unsharp_identity_constant_and_per_slice(self):
        vol = torch.rand(1, 12, 10, 3)
        torch.testing.assert_close(UnsharpMask(amount=0.0)(vol), vol)
        const = torch.full((1, 8, 8, 2), 0.3)
        torch.testing.assert_close(UnsharpMask(sigma=2.0, amount=1.0)(const), const)
        op = UnsharpMask(sigma=1.0, amount=0.7)
        out = op(vol)
        for k in range(3):
            torch.testing.assert_close(out[..., k], op(vol[..., k]))
        self.assertGreater(float(out.std()), float(vol.std()))  # sharpening raises the contrast of noise
        clipped = UnsharpMask(amount=2.0, clip=(0.0, 1.0))(vol)
        self.assertTrue(bool((clipped >= 0).all() and (clipped <= 1).all()))

    def test_unsharp_keeps_meta(self):
        img = MetaTensor(torch.rand(1, 6, 6), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0])))
        out = UnsharpMask()(img)
        self.assertIsInstance(out, MetaTensor)
        torch.testing.assert_close(out.affine, img.affine)

    @parameterized.expand([[{"sigma": 0}], [{"amount": -1}], [{"clip": (1, 0)}]])
    def test_unsharp_bad_args(self, kw):
        with self.assertRaises(ValueError):
            UnsharpMask(**kw)

    def test_ensure_volume(self):
        img = MetaTensor(torch.rand(1, 5, 4), affine=torch.tensor([[2.0, 0, 7.0], [0, 3.0, 8.0], [0, 0, 1]]))
        out = EnsureVolumed("image")({"image": img})["image"]
        self.assertEqual(tuple(out.shape), (1, 5, 4, 1))
        np.testing.assert_allclose(out.affine.numpy(), [[2, 0, 0, 7], [0, 3, 0, 8], [0, 0, 1, 0], [0, 0, 0, 1]])
        vol = torch.rand(1, 2, 2, 2)
        self.assertIs(EnsureVolumed("image")({"image": vol})["image"], vol)

    @parameterized.expand(
        [["../../etc/passwd", "passwd"], ["a b/c?d.nii.gz", "c_d"], ["..", "case"], ["scan.dcm", "scan"]]
    )
    def test_safe_stem(self, name, expected):
        self.assertEqual(safe_stem(name), expected)

    def test_save_mask(self):
        aff = np.array([[0.8, 0, 0, -3], [0, 0.9, 0, 4], [0, 0, 2.5, 1], [0, 0, 0, 1]])
        pred = MetaTensor(torch.from_numpy(two_lesions()[None].astype(np.float32)), affine=torch.as_tensor(aff))
        image = MetaTensor(torch.zeros(1, 10, 10, 6), meta={"filename_or_obj": "/x/../my scan.nrrd"})
        with tempfile.TemporaryDirectory() as tmp:
            d = AtomicSaveSegmentationd("pred", output_dir=tmp, report=True)({"pred": pred, "image": image})
            self.assertEqual(Path(d["pred_path"]).name, "my_scan_seg.nii.gz")
            out = nib.load(d["pred_path"])
            self.assertEqual(out.get_data_dtype(), np.uint8)
            np.testing.assert_allclose(out.affine, aff, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(out.dataobj), two_lesions())
            rep = json.loads(Path(d["pred_report_path"]).read_text())
            self.assertEqual(rep["num_lesions"], 2)
            self.assertAlmostEqual(rep["total_volume_ml"], 15 * 0.8 * 0.9 * 2.5 / 1000)
            self.assertEqual(
                sorted(p.name for p in Path(tmp).iterdir()), ["my_scan_seg.nii.gz", "my_scan_seg_report.json"]
            )

    def test_save_one_slice_volume(self):
        """A PNG slice lifted to a one-slice volume (EnsureVolumed) is saved as that (H, W, 1) volume."""
        image = MetaTensor(torch.zeros(1, 5, 4), affine=torch.tensor([[2.0, 0, 7.0], [0, 3.0, 8.0], [0, 0, 1]]),
                           meta={"filename_or_obj": "/up/slice.png"})
        image = EnsureVolumed("image")({"image": image})["image"]
        pred = MetaTensor(torch.ones(1, 5, 4, 1) * 0.9999, affine=image.affine)  # float class indices
        with tempfile.TemporaryDirectory() as tmp:
            d = AtomicSaveSegmentationd("pred", output_dir=tmp, output_postfix="", report=True)({"pred": pred,
                                                                                                  "image": image})
            out = nib.load(d["pred_path"])
            self.assertEqual(Path(d["pred_path"]).name, "slice.nii.gz")
            self.assertEqual(out.shape, (5, 4, 1))
            self.assertEqual(int(np.asarray(out.dataobj).min()), 1)  # rounded, not truncated
            np.testing.assert_allclose(out.affine, image.affine.numpy(), atol=1e-6)
            self.assertEqual(json.loads(Path(d["pred_report_path"]).read_text())["num_lesions"], 1)


def _three_lesions() -> np.ndarray:
    """A (1, 12, 12, 4) label: lesions of 27, 4 and 1 voxels (26-connected)."""
    lab = np.zeros((1, 12, 12, 4), np.float32)
    lab[0, 1:4, 1:4, 0:3] = 1
    lab[0, 8, 8:10, 1:3] = 1
    lab[0, 10, 1, 3] = 1
    return lab


class TestLesionBalancedIndices(unittest.TestCase):
    """Crop-centre indices for RandCropByPosNegLabeld, checked against MONAI's FgBgToIndicesd and by counting the
    entries of each lesion."""

    @staticmethod
    def _per_lesion(fg: np.ndarray, lab: np.ndarray) -> list[int]:
        comp = sk_label(lab[0] > 0, connectivity=3).reshape(-1)  # an independent labelling (scikit-image)
        counts = np.bincount(comp[np.asarray(fg)], minlength=comp.max() + 1)[1:]
        return sorted(int(c) for c in counts)

    @parameterized.expand([[0.0, [1, 4, 27]], [0.5, [5, 10, 27]], [1.0, [27, 27, 27]]])
    def test_entries_per_lesion(self, balance, expected):
        lab = _three_lesions()
        d = LesionBalancedIndicesd("label", balance=balance)({"label": torch.from_numpy(lab)})
        fg = np.asarray(d["label_fg_indices"])
        self.assertEqual(self._per_lesion(fg, lab), expected)  # round(n ** (1 - b) * 27 ** b) entries each
        self.assertTrue(set(fg.tolist()) == set(np.flatnonzero(lab[0]).tolist()))  # every lesion voxel, only those

    def test_voxel_uniform_and_background_match_monai(self):
        from monai.transforms import FgBgToIndicesd

        lab = torch.from_numpy(_three_lesions())
        img = torch.rand(1, 12, 12, 4) - 0.3
        ours = LesionBalancedIndicesd("label", image_key="image", image_threshold=0.1, balance=0.0)(
            {"label": lab, "image": img}
        )
        ref = FgBgToIndicesd("label", image_key="image", image_threshold=0.1)({"label": lab, "image": img})
        np.testing.assert_array_equal(np.sort(ours["label_fg_indices"]), np.asarray(ref["label_fg_indices"]))
        np.testing.assert_array_equal(np.asarray(ours["label_bg_indices"]), np.asarray(ref["label_bg_indices"]))

    def test_cap_thins_large_lesions_evenly(self):
        lab = _three_lesions()
        fg = np.asarray(LesionBalancedIndicesd("label", balance=1.0, max_entries=9)({"label": lab})["label_fg_indices"])
        self.assertEqual(self._per_lesion(fg, lab), [9, 9, 9])
        big = np.zeros(lab.shape[1:], bool)
        big[1:4, 1:4, 0:3] = True
        kept = np.unravel_index(fg[np.isin(fg, np.flatnonzero(big))], big.shape)
        self.assertEqual(set(kept[2].tolist()), {0, 1, 2})  # the 9 of 27 entries span the lesion's slices

    def test_connectivity_and_one_hot(self):
        lab = np.zeros((1, 6, 6, 1), np.float32)
        lab[0, 1, 1, 0] = lab[0, 2, 2, 0] = 1  # diagonal neighbours: one lesion (8-connected) or two (4-connected)
        lab[0, 4, 4, 0] = 1
        for conn, expected in ((1, [1, 1, 1]), (2, [1, 1, 2])):
            fg = LesionBalancedIndicesd("label", balance=1.0, connectivity=conn)({"label": lab})["label_fg_indices"]
            counts = np.bincount(np.asarray(fg), minlength=36)
            self.assertEqual(sorted(counts[counts > 0].tolist()), expected)
        one_hot = np.concatenate([1 - lab, lab])
        fg = LesionBalancedIndicesd("label", balance=1.0)({"label": one_hot})["label_fg_indices"]
        self.assertEqual(sorted(set(np.asarray(fg).tolist())), [7, 14, 28])

    def test_no_lesion(self):
        d = LesionBalancedIndicesd("label")({"label": np.zeros((1, 4, 4, 2))})
        self.assertEqual(len(d["label_fg_indices"]), 0)
        self.assertEqual(len(d["label_bg_indices"]), 32)

    @parameterized.expand([[{"balance": -0.1}], [{"balance": 1.5}], [{"max_entries": 0}]])
    def test_bad_args(self, kw):
        with self.assertRaises(ValueError):
            LesionBalancedIndicesd("label", **kw)


class TestCaseMetricsWriter(unittest.TestCase):
    """MetricsJSONWriter with the lesion workflow's per-case metrics (configs/hunet_evaluate.yaml)."""

    def test_rows_summary_csv(self):
        from ignite.engine import Engine

        aff = torch.as_tensor(np.diag([2.0, 1.0, 1.0, 1.0]))
        label = np.zeros((1, 8, 8, 4), np.float32)
        label[0, 2:5, 2:5, 1:3] = 1
        pred = label.copy()
        pred[0, 5, 2:5, 1:3] = 1  # one layer too many
        cases = [
            {"pred": MetaTensor(torch.from_numpy(pred), affine=aff), "label": MetaTensor(torch.from_numpy(label),
             affine=aff), "image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": "/d/a.nii.gz"})},
            {"pred": MetaTensor(torch.zeros(1, 8, 8, 4), affine=aff), "label": MetaTensor(torch.from_numpy(label),
             affine=aff), "image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": "/d/b.nii.gz"})},
        ]
        engine = Engine(lambda e, batch: [batch])
        with tempfile.TemporaryDirectory() as tmp:
            MetricsJSONWriter(Path(tmp) / "metrics.json", csv_path=Path(tmp) / "metrics.csv", case_metrics=case_metrics,
                              metrics=list(METRICS), extra={"hd95_unit": "mm"}).attach(engine)
            engine.run(cases, max_epochs=1)
            result = json.loads((Path(tmp) / "metrics.json").read_text())
            csv_text = (Path(tmp) / "metrics.csv").read_text()
        self.assertEqual(list(result)[:4], ["hd95_unit", "aggregation", "cases", "summary"])  # the rule stated
        self.assertEqual([r["case"] for r in result["cases"]], ["a.nii.gz", "b.nii.gz"])
        self.assertEqual(result["cases"][0]["image"], "/d/a.nii.gz")
        self.assertAlmostEqual(result["cases"][0]["hd95"], 2.0)  # one voxel of 2 mm along the first axis
        self.assertIsNone(result["cases"][1]["hd95"])  # empty prediction: NaN, written as null
        self.assertEqual(set(result["summary"]), set(METRICS))
        dsc = [r["dsc"] for r in result["cases"]]
        self.assertAlmostEqual(result["summary"]["dsc"]["mean"], float(np.mean(dsc)))
        self.assertAlmostEqual(result["summary"]["dsc"]["std"], float(np.std(dsc)))
        self.assertEqual(result["summary"]["hd95"]["n"], 1)
        self.assertTrue(csv_text.startswith("case,image,iou,hd95,dsc,sensitivity,specificity,tp,fp,fn,tn"))


if __name__ == "__main__":
    unittest.main()
