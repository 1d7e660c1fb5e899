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


if __name__ == "__main__":
    unittest.main()
