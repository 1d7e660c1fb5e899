# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Mamba-HUNet bundle configs end to end on tiny generated volumes: train -> evaluate -> inference."""

from __future__ import annotations

import csv
import json
import os
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import run

BUNDLE = Path(__file__).resolve().parents[1]
META = str(BUNDLE / "configs" / "hunet_metadata.json")
TINY = {
    "img_size": 32,
    "embed_dims": [8, 16, 32, 64],
    "depths": [1, 1, 1, 1],
    "d_state": 4,
    "device": "cpu",
    "sw_batch_size": 4,
}


def make_case(path: Path, seed: int, shape=(40, 36, 5), spacing=(0.9, 0.8, 3.0)) -> tuple[str, str, np.ndarray]:
    """A noisy volume with a bright ellipsoid lesion on the middle slices, and its mask."""
    rng = np.random.default_rng(seed)
    zz = np.indices(shape).astype(np.float32)
    centre = np.array([shape[0] / 2 + seed, shape[1] / 2 - seed, shape[2] // 2])
    r = (zz - centre[:, None, None, None]) / np.array([7.0, 6.0, 1.2])[:, None, None, None]
    mask = ((r**2).sum(0) <= 1.0).astype(np.uint8)
    img = 100 + 10 * rng.standard_normal(shape).astype(np.float32) + 120 * mask
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    img_p, lab_p = path / f"case{seed}_img.nii.gz", path / f"case{seed}_seg.nii.gz"
    nib.save(nib.Nifti1Image(img, affine), img_p)
    nib.save(nib.Nifti1Image(mask, affine), lab_p)
    return str(img_p), str(lab_p), affine


class TestHUNetWorkflow(unittest.TestCase):
    def test_train_evaluate_infer(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = tmp / "data"
            data.mkdir()
            cases = [make_case(data, s) for s in (1, 2)]
            datalist = {
                "training": [{"image": os.path.basename(i), "label": os.path.basename(l)} for i, l, _ in cases[:1]],
                "validation": [{"image": os.path.basename(i), "label": os.path.basename(l)} for i, l, _ in cases[1:]],
            }
            (data / "datalist.json").write_text(json.dumps(datalist))
            common = dict(
                meta_file=META,
                bundle_root=str(BUNDLE),
                dataset_dir=str(data),
                datalist=str(data / "datalist.json"),
                ckpt_dir=str(tmp / "models"),
                **TINY,
            )
            train_cfg = str(BUNDLE / "configs" / "hunet_train.yaml")
            run("training", config_file=train_cfg, epochs=2, batch_size=3, output_dir=str(tmp / "runs"), **common)
            self.assertTrue((tmp / "models" / "hunet_model.pt").is_file())

            eval_cfgs = [train_cfg, str(BUNDLE / "configs" / "hunet_evaluate.yaml")]
            run("evaluating", config_file=eval_cfgs, output_dir=str(tmp / "eval"), **common)
            with open(tmp / "eval" / "metrics.csv") as f:
                rows = list(csv.DictReader(f))
            self.assertEqual(len(rows), 1)
            self.assertEqual(rows[0]["case"], "case2_img.nii.gz")
            for k in ("iou", "hd95", "dsc", "sensitivity", "specificity"):
                self.assertIn(k, rows[0])
            self.assertTrue(0.0 <= float(rows[0]["dsc"]) <= 1.0)
            summary = json.loads((tmp / "eval" / "metrics.json").read_text())
            self.assertEqual(summary["cases"][0]["case"], "case2_img.nii.gz")
            self.assertTrue((tmp / "eval" / "case2_img_seg_report.json").is_file())

            infer_cfg = str(BUNDLE / "configs" / "hunet_inference.yaml")
            common.pop("datalist")
            run("inference", config_file=infer_cfg, output_dir=str(tmp / "infer"), image_glob="*_img.nii.gz", **common)
            for img_p, _, affine in cases:
                stem = Path(img_p).name.replace(".nii.gz", "")
                out = nib.load(tmp / "infer" / f"{stem}_seg.nii.gz")
                self.assertEqual(out.shape, nib.load(img_p).shape)
                self.assertEqual(out.get_data_dtype(), np.uint8)
                np.testing.assert_allclose(out.affine, affine, atol=1e-5)
                self.assertTrue(set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1})
                report = json.loads((tmp / "infer" / f"{stem}_seg_report.json").read_text())
                self.assertEqual(report["shape"], list(out.shape))
            self.assertEqual([p.name for p in (tmp / "infer").iterdir() if p.name.startswith(".")], [])


class TestTrainingSamples(unittest.TestCase):
    """configs/hunet_train.yaml's samples with crops smaller than the slice (train_patch < img_size)."""

    def _samples(self, tmp: Path, lab: np.ndarray | None = None, rounds: int = 12, **override) -> list[dict]:
        from monai.bundle import ConfigParser

        rng = np.random.default_rng(0)
        img = (100 + 10 * rng.standard_normal((64, 64, 4))).astype(np.float32)
        if lab is None:  # a one-voxel lesion in the middle: a crop centred on it always has it at its centre
            lab = np.zeros((64, 64, 4), np.uint8)
            lab[31, 30, 2] = 1
        img[lab > 0] = 250
        img_p, lab_p = str(tmp / "img.nii.gz"), str(tmp / "lab.nii.gz")
        nib.save(nib.Nifti1Image(img, np.diag([1.0, 1.0, 3.0, 1.0])), img_p)
        nib.save(nib.Nifti1Image(lab, np.diag([1.0, 1.0, 3.0, 1.0])), lab_p)
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "hunet_train.yaml"))
        parser.update({"bundle_root": str(BUNDLE), "img_size": 64, "train_patch": 32, "batch_size": 8, "pos_ratio": 1,
                       **override})
        transform = parser.get_parsed_content("train#preprocessing")
        transform.set_random_state(seed=0)
        return [s for _ in range(rounds) for s in transform({"image": img_p, "label": lab_p})]

    def test_lesions_not_always_at_the_crop_centre(self):
        with tempfile.TemporaryDirectory() as tmp:
            samples = self._samples(Path(tmp))
        self.assertEqual({tuple(s["image"].shape) for s in samples}, {(1, 32, 32)})
        centres = {tuple(np.round(np.argwhere(np.asarray(s["label"][0]) > 0).mean(0)).astype(int))
                   for s in samples if s["label"].sum() > 0}
        self.assertGreater(len(centres), 10)  # the lesion lies at many places in the crops
        self.assertGreater(max(abs(c[0] - 16) + abs(c[1] - 16) for c in centres), 8)

    def test_small_lesions_drawn_as_often_as_large_ones(self):
        """lesion_balance 1: a one-voxel lesion is the crop centre as often as a 300-voxel one; 0: once per voxel."""
        lab = np.zeros((64, 64, 4), np.uint8)
        lab[10:20, 10:20, 0:3] = 1  # 300 voxels on slices 0-2
        lab[50, 50, 3] = 1  # one voxel on slice 3: a crop shows it only when centred on it
        shares = {}
        for balance in (0.0, 1.0):
            with tempfile.TemporaryDirectory() as tmp:
                samples = self._samples(Path(tmp), lab, rounds=25, lesion_balance=balance, pos_ratio=9)
            with_lesion = [int(s["label"].sum()) for s in samples if s["label"].sum() > 0]
            shares[balance] = sum(n == 1 for n in with_lesion) / len(with_lesion)
        self.assertLess(shares[0.0], 0.1)  # expected 1/301
        self.assertGreater(shares[1.0], 0.3)  # expected 1/2

    def test_whole_slices_by_default(self):
        with tempfile.TemporaryDirectory() as tmp:
            samples = self._samples(Path(tmp), train_patch="@img_size")
        self.assertEqual({tuple(s["image"].shape) for s in samples}, {(1, 64, 64)})

    def test_bright_voxels_not_clipped(self):
        """FLAIR lesions are the brightest voxels: intensity_clip false keeps them above the upper percentile."""
        from monai.bundle import ConfigParser
        from monai.transforms import Compose, ScaleIntensityRangePercentilesd

        with tempfile.TemporaryDirectory() as tmp:
            img_p, lab_p, _ = make_case(Path(tmp), 1, shape=(64, 64, 4), spacing=(1.0, 1.0, 3.0))
            highest = []
            for clip in (False, True):
                parser = ConfigParser()
                parser.read_config(str(BUNDLE / "configs" / "hunet_train.yaml"))
                parser.update({"bundle_root": str(BUNDLE), **({"intensity_clip": True} if clip else {})})
                steps = parser.get_parsed_content("train#deterministic_transforms")
                last = next(i for i, t in enumerate(steps) if isinstance(t, ScaleIntensityRangePercentilesd))
                out = Compose(steps[: last + 1])({"image": img_p, "label": lab_p})
                highest.append(float(out["image"].max()))
        self.assertGreater(highest[0], 1.05)
        self.assertLessEqual(highest[1], 1.0)

    def test_patch_training_records_its_configuration(self):
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = tmp / "data"
            data.mkdir()
            cases = [make_case(data, s, shape=(40, 36, 5)) for s in (1, 2)]
            (data / "datalist.json").write_text(json.dumps({
                "description": "two generated cases", "synthetic": True,
                "training": [{"image": os.path.basename(i), "label": os.path.basename(l)} for i, l, _ in cases[:1]],
                "validation": [{"image": os.path.basename(i), "label": os.path.basename(l)} for i, l, _ in cases[1:]]}))
            common = dict(meta_file=META, bundle_root=str(BUNDLE), dataset_dir=str(data),
                          datalist=str(data / "datalist.json"), ckpt_dir=str(tmp / "models"),
                          **{**TINY, "img_size": 64, "train_patch": 32})
            train_cfg = str(BUNDLE / "configs" / "hunet_train.yaml")
            run("training", config_file=train_cfg, epochs=1, batch_size=2, output_dir=str(tmp / "runs"), **common)
            ckpt = torch.load(tmp / "models" / "hunet_model.pt", weights_only=True)
            self.assertEqual(sorted(ckpt), ["config", "model"])
            self.assertEqual((ckpt["config"]["train_patch"], ckpt["config"]["img_size"]), (32, 64))
            self.assertEqual((ckpt["config"]["training_data"], ckpt["config"]["synthetic_training_data"]),
                             ("two generated cases", True))
            run("evaluating", config_file=[train_cfg, str(BUNDLE / "configs" / "hunet_evaluate.yaml")],
                output_dir=str(tmp / "eval"), **common)  # the checkpoint loads; windows of 32 x 32
            row = json.loads((tmp / "eval" / "metrics.json").read_text())["cases"][0]
            self.assertEqual(row["gt_lesions"], 1)
            self.assertIn("lesion_recall", row)


if __name__ == "__main__":
    unittest.main()
