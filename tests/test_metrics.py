# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Evaluation metrics a clinic can check: per-class Dice / IoU / HD95 in mm / sensitivity / specificity against an
independent computation, the one aggregation rule, class names from the datalist's labels (MSD and nnU-Net forms)
in every output, a class-name count that does not fit out_channels as a one-line error, and the evaluation's
geometry (the prediction inverted to the input grid, the reference as stored)."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from parameterized import parameterized
from scipy.ndimage import binary_erosion

from scripts.data import DataError, check_class_names, class_names, datalist_class_names, label_names
from scripts.handlers import MetricsJSONWriter
from scripts.metrics import AGGREGATION, METRICS, SegmentationMetrics, summarise
from tests.utils import ROOT, TINY_PLAN, env_with_root, make_case, write_dataset

NAMES = ["liver", "tumour"]


def _edges(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its erosion (zero outside the array)."""
    padded = np.pad(mask, 1)
    return (padded ^ binary_erosion(padded))[1:-1, 1:-1, 1:-1]


def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """HD95 in mm from every pair of surface voxels: the larger of the two directed 95th percentiles."""
    pa = np.argwhere(_edges(a)) * np.asarray(spacing, dtype=np.float64)
    pb = np.argwhere(_edges(b)) * np.asarray(spacing, dtype=np.float64)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95)))


def independent(pred: np.ndarray, label: np.ndarray, spacing) -> dict:
    """Every metric of every class with numpy and the brute-force HD95."""
    out = {m: {} for m in METRICS}
    for i, name in enumerate(NAMES, start=1):
        p, g = pred == i, label == i
        tp, fp, fn = (p & g).sum(), (p & ~g).sum(), (~p & g).sum()
        tn = p.size - tp - fp - fn
        out["dice"][name] = 2 * tp / (2 * tp + fp + fn)
        out["iou"][name] = tp / (tp + fp + fn)
        out["sensitivity"][name] = tp / (tp + fn)
        out["specificity"][name] = tn / (tn + fp)
        out["hd95"][name] = brute_force_hd95(p, g, spacing) if p.any() and g.any() else math.nan
    return out


def _blobs(shape, seed, shift=(0, 0, 0)):
    """Two nested boxes with random extents (classes 1 and 2), optionally shifted."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, np.uint8)
    lo = rng.integers(1, 4, 3) + np.asarray(shift)
    hi = np.asarray(shape) - rng.integers(1, 4, 3) + np.asarray(shift)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    c = (lo + hi) // 2
    m[c[0] - 2:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 1] = 2
    return m


class TestSegmentationMetrics(unittest.TestCase):
    def test_known_hd95_anisotropic(self):
        """One voxel each: HD95 is the distance between them in mm (spacing 0.5 x 1 x 3 mm)."""
        pred, label = np.zeros((6, 6, 6), np.uint8), np.zeros((6, 6, 6), np.uint8)
        pred[2, 2, 2], label[2, 2, 4] = 1, 1  # two slices apart along the 3 mm axis: 6 mm
        pred[1, 2, 0], label[3, 3, 0] = 2, 2  # (2 x 0.5, 1 x 1) mm apart: sqrt(2) mm
        m = SegmentationMetrics(NAMES)(pred[None], label[None], (0.5, 1.0, 3.0))
        self.assertAlmostEqual(m["hd95"]["liver"], 6.0, places=5)
        self.assertAlmostEqual(m["hd95"]["tumour"], math.sqrt(2.0), places=5)
        self.assertEqual((m["dice"]["liver"], m["sensitivity"]["tumour"]), (0.0, 0.0))

    @parameterized.expand([
        ("isotropic", (1.0, 1.0, 1.0), (0, 0, 0)),
        ("anisotropic", (0.7, 1.3, 4.0), (1, 0, 0)),
        ("anisotropic_shift_coarse", (0.7, 1.3, 4.0), (0, 1, 1)),
    ])
    def test_against_independent_computation(self, _, spacing, shift):
        label = _blobs((14, 12, 10), 0)
        pred = _blobs((14, 12, 10), 1, shift)
        got = SegmentationMetrics(NAMES)(torch.as_tensor(pred[None]), torch.as_tensor(label[None]), spacing)
        expected = independent(pred, label, spacing)
        for metric in METRICS:
            for name in NAMES:
                with self.subTest(metric=metric, name=name):
                    self.assertAlmostEqual(got[metric][name], float(expected[metric][name]), places=4)

    def test_empty_masks(self):
        label = np.zeros((1, 5, 5, 5), np.uint8)
        label[0, 1:3, 1:3, 1:3] = 1  # no tumour in the reference
        pred = np.zeros_like(label)
        pred[0, 3, 3, 3] = 2  # nor liver in the prediction, a false tumour voxel
        m = SegmentationMetrics(NAMES)(pred, label, (1.0, 1.0, 1.0))
        self.assertEqual(m["dice"]["liver"], 0.0)
        self.assertTrue(math.isnan(m["hd95"]["liver"]) and math.isnan(m["hd95"]["tumour"]))
        self.assertTrue(math.isnan(m["sensitivity"]["tumour"]))
        self.assertEqual(SegmentationMetrics(NAMES)(label, label)["dice"], {"liver": 1.0, "tumour": 1.0})

    def test_shapes_must_agree(self):
        with self.assertRaisesRegex(ValueError, "inverted to the reference's grid"):
            SegmentationMetrics(NAMES)(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 5)))


class TestAggregation(unittest.TestCase):
    def test_per_class_then_over_classes(self):
        # liver in both cases, tumour only in the second (NaN in the first, e.g. HD95 of an absent class)
        table = np.array([[1.0, np.nan], [0.0, 0.8]])
        s = summarise(table, NAMES)
        self.assertEqual(s["per_class"], {"liver": 0.5, "tumour": 0.8})
        self.assertEqual(s["per_class_n"], {"liver": 2, "tumour": 1})
        self.assertAlmostEqual(s["mean"], 0.65)  # not the mean of all values (0.6), nor of the case means (0.7)
        self.assertEqual(s["n"], 2)
        self.assertEqual(summarise(np.array([1.0, np.nan, 0.5])), {"mean": 0.75, "std": 0.25, "n": 2})
        self.assertEqual(summarise(np.full((2, 2), np.nan), NAMES)["mean"], None)
        with self.assertRaisesRegex(ValueError, "one class name per column"):
            summarise(table, ["liver"])

    def _run_writer(self, cases, tmp, **kwargs):
        engine = Engine(lambda e, batch: [batch])
        MetricsJSONWriter(Path(tmp) / "metrics.json", csv_path=Path(tmp) / "metrics.csv",
                          summary_path=Path(tmp) / "summary.json", **kwargs).attach(engine)
        engine.run(cases, max_epochs=1)
        return (json.loads((Path(tmp) / "metrics.json").read_text()),
                list(csv.DictReader(io.StringIO((Path(tmp) / "metrics.csv").read_text()))),
                json.loads((Path(tmp) / "summary.json").read_text()))

    def test_writer_with_class_names_and_mm(self):
        spacing = (0.7, 1.3, 4.0)
        aff = torch.as_tensor(np.diag([*spacing, 1.0]))
        label = _blobs((14, 12, 10), 0)
        preds = [_blobs((14, 12, 10), 1, (1, 0, 0)), label.copy()]
        preds[1][preds[1] == 2] = 0  # the second case misses the tumour: HD95 undefined there
        cases = [{"pred": MetaTensor(torch.as_tensor(p[None]), affine=aff),
                  "label": MetaTensor(torch.as_tensor(label[None]), affine=aff),
                  "image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": f"/d/case{i}.nii.gz"})}
                 for i, p in enumerate(preds)]
        with tempfile.TemporaryDirectory() as tmp, self.assertLogs("scripts.handlers", "INFO") as logs:
            result, rows, summary = self._run_writer(cases, tmp, case_metrics=SegmentationMetrics(NAMES),
                                                     extra={"hd95_unit": "mm"})
        expected = [independent(p, label, spacing) for p in preds]
        self.assertEqual(result["aggregation"], AGGREGATION)
        self.assertEqual(summary["aggregation"], AGGREGATION)
        for metric in METRICS:
            for name in NAMES:
                # no tumour predicted in case 1: its HD95 is left out (null in the row)
                values = [float(e[metric][name]) for e in expected if math.isfinite(e[metric][name])]
                with self.subTest(metric=metric, name=name):
                    self.assertAlmostEqual(result["summary"][metric]["per_class"][name], float(np.mean(values)), 4)
                    self.assertAlmostEqual(float(rows[0][f"{metric}_{name}"]), float(expected[0][metric][name]), 4)
            per_class = result["summary"][metric]["per_class"]
            self.assertAlmostEqual(result["summary"][metric]["mean"], float(np.mean(list(per_class.values()))))
        self.assertIsNone(result["cases"][1]["hd95_tumour"])
        self.assertEqual(rows[1]["hd95_tumour"], "nan")
        self.assertEqual(result["mean_dice"], result["summary"]["dice"]["mean"])
        self.assertEqual(summary["mean_dice"], result["mean_dice"])
        self.assertEqual(list(rows[0])[:5], ["case", "image", "dice_liver", "dice_tumour", "dice_mean"])
        text = "\n".join(logs.output)
        self.assertIn("hd95: mean over 2 classes", text)
        self.assertIn(" mm; per class {'liver'", text)

    def test_writer_from_handler_details(self):
        engine = Engine(lambda e, batch: [batch])
        cases = [{"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": f"/d/c{i}.nii.gz"})} for i in range(2)]
        details = torch.tensor([[1.0, float("nan")], [0.0, 0.75]])

        def _details(e):
            e.state.metric_details = {"val_mean_dice": details}

        engine.add_event_handler(Events.EPOCH_COMPLETED, _details)
        with tempfile.TemporaryDirectory() as tmp:
            writer = MetricsJSONWriter(Path(tmp) / "m.json", class_names=None)
            writer.attach(engine)
            engine.run(cases, max_epochs=1)
            result = json.loads((Path(tmp) / "m.json").read_text())
        self.assertEqual(result["summary"]["val_mean_dice"]["per_class"], {"class_1": 0.5, "class_2": 0.75})
        self.assertAlmostEqual(result["mean_dice"], 0.625)
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine(lambda e, batch: [batch])
            engine.add_event_handler(Events.EPOCH_COMPLETED, _details)
            MetricsJSONWriter(Path(tmp) / "m.json", class_names=["grey_matter"]).attach(engine)
            with self.assertRaisesRegex(ValueError, "name 1 classes but val_mean_dice has 2"):
                engine.run(cases, max_epochs=1)


class TestClassNames(unittest.TestCase):
    @parameterized.expand([
        ("msd", {"0": "background", "1": "liver", "2": "tumour"}),
        ("nnunet", {"background": 0, "liver": 1, "tumour": 2}),
        ("nnunet_ignore", {"background": 0, "tumour": 2, "liver": 1, "ignore": 3}),
    ])
    def test_both_forms(self, _, labels):
        self.assertEqual(class_names(label_names(labels), 3), NAMES)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "datalist.json"
            path.write_text(json.dumps({"labels": labels, "training": []}))
            self.assertEqual(datalist_class_names(path, 3), NAMES)
            with self.assertRaisesRegex(DataError, r"names the values \[0, 1, 2\] but out_channels 4"):
                datalist_class_names(path, 4)

    def test_without_labels(self):
        self.assertEqual(datalist_class_names({"training": []}, 3), ["class_1", "class_2"])
        self.assertEqual(datalist_class_names("/no/such/datalist.json", 3), ["class_1", "class_2"])
        self.assertIsNone(label_names({}))

    @parameterized.expand([
        ("regions", {"background": 0, "tumour": [1, 2]}, "region-based"),
        ("mixed", {"0": "background", "liver": 1}, "mixes forms"),
        ("duplicate", {"background": 0, "a": 1, "b": 1}, "one value to several names"),
    ])
    def test_bad_labels(self, _, labels, fragment):
        with self.assertRaisesRegex(DataError, fragment):
            label_names(labels, "x.json")

    def test_count_must_fit_out_channels(self):
        self.assertEqual(check_class_names(("a", "b"), 3), ["a", "b"])
        for bad in (["a"], "ab", None, ["a", "b", "c"]):
            with self.assertRaises(DataError) as ctx:
                check_class_names(bad, 3)
            self.assertNotIn("\n", str(ctx.exception))
            self.assertIn("must list 2 name(s)", str(ctx.exception))


class TestClassNamesInBundleCommands(unittest.TestCase):
    """``--class_names`` with the wrong count stops train, evaluate and inference at start with one line."""

    @parameterized.expand([
        ("train", "training", "['configs/train.yaml']"),
        ("evaluate", "evaluating", "['configs/train.yaml','configs/evaluate.yaml']"),
        ("inference", "inference", "['configs/inference.yaml']"),
    ])
    def test_one_line(self, _, run_id, configs):
        with tempfile.TemporaryDirectory() as tmp:
            datalist = write_dataset(Path(tmp), n_train=1, n_val=1, n_test=1)
            args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs, "--meta_file",
                    "configs/metadata.json", "--bundle_root", ".", "--dataset_dir", tmp, "--datalist", str(datalist),
                    "--ckpt_dir", str(Path(tmp) / "models"), "--output_dir", str(Path(tmp) / "out"), "--device",
                    "cpu", "--class_names", "['only_one']", "--epochs", "1", "--iterations_per_epoch", "1",
                    "--cache_rate", "0"]
            for key in ("patch_size", "features", "strides", "kernel_sizes", "block_types", "num_regions"):
                args += [f"--{key}", json.dumps(TINY_PLAN[key])]
            result = subprocess.run(args, cwd=ROOT, env=env_with_root(), capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        last = result.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("ERROR: class_names ['only_one'] must list 2 name(s)"), result.stderr[-3000:])
        self.assertNotIn("Traceback (most recent call last)", result.stderr + result.stdout)


class TestEvaluationGeometry(unittest.TestCase):
    """evaluate.yaml's post-processing: the prediction back on the input's grid, the reference as stored."""

    def test_prediction_inverted_reference_as_stored(self):
        from monai.bundle import ConfigParser

        with tempfile.TemporaryDirectory() as tmp:
            image, label, affine = make_case((24, 22, 20), 0, spacing=(0.9, 1.1, 2.5))
            affine = affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS on disk: Orientationd flips it to RAS
            nib.save(nib.Nifti1Image(image[0], affine), f"{tmp}/img.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), f"{tmp}/lab.nii.gz")
            parser = ConfigParser()
            parser.read_config([str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "evaluate.yaml")])
            parser.update({**TINY_PLAN, "pixdim": [1.5, 1.5, 1.5], "bundle_root": str(ROOT)})
            pre = parser.get_parsed_content("validate#preprocessing")
            post = parser.get_parsed_content("validate#postprocessing")
            item = pre({"image": f"{tmp}/img.nii.gz", "label": f"{tmp}/lab.nii.gz"})
            self.assertNotEqual(tuple(item["label"].shape[1:]), label.shape)  # resampled to 1.5 mm and padded
            # a perfect network on the resampled grid: the one-hot resampled label
            onehot = torch.nn.functional.one_hot(item["label"][0].long(), 3).permute(3, 0, 1, 2).float() * 10
            item["pred"] = MetaTensor(onehot, meta=item["image"].meta, applied_operations=item["image"].applied_operations)
            out = post(item)
            self.assertEqual(tuple(out["pred"].shape), (1, *label.shape))
            np.testing.assert_array_equal(np.asarray(out["label"][0]), label)  # the file as stored
            np.testing.assert_allclose(np.asarray(out["pred"].affine), affine, atol=1e-5)
            m = SegmentationMetrics(["inner", "outer"])(out["pred"], out["label"], (0.9, 1.1, 2.5))
            self.assertGreater(min(m["dice"].values()), 0.8)  # back on the input grid, up to the resampling
