# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""scripts.experiments.ablation_loss: the loss ablation through the bundle's own train and inference workflows,
at the tiniest size (three small lesion cases in a generated dataset's layout, 2 settings, 1 seed, 1 epoch of 2
iterations)."""

from __future__ import annotations

import json
import shutil
import tempfile
import unittest
from pathlib import Path

import nrrd
import numpy as np

from scripts.experiments.ablation_loss import (
    CASES, METRICS, SETTINGS, case_lists, loss_overrides, main, pooled_counts,
)
from tests.utils import ROOT


def _write_case(folder: Path, name: str, seed: int) -> None:
    """A 40 x 40 x 12 MRI-like NRRD volume (1 x 1 x 6.5 mm, LPS like pyradiomics') with a bright ellipsoid lesion."""
    rng = np.random.default_rng(seed)
    shape = (40, 40, 12)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    centre = np.array([20.0, 20.0, 6.0]) + rng.uniform(-3, 3, 3) * [1, 1, 0.3]
    r = np.linalg.norm((grid - centre) / [7.0, 7.0, 1.5], axis=-1)
    label = (r < 1).astype(np.int16)
    image = (100 + 10 * rng.standard_normal(shape) + 80 * label).astype(np.int16)
    header = {"space": "left-posterior-superior", "space directions": np.diag([1.0, 1.0, 6.5]),
              "space origin": np.zeros(3)}
    nrrd.write(str(folder / f"{name}_image.nrrd"), image, header)
    nrrd.write(str(folder / f"{name}_label.nrrd"), label, header)


class TestAblation(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        cls.data = cls.tmp / "data"
        cls.data.mkdir()
        for i in range(3):
            _write_case(cls.data, f"brain{i + 1}", i)
        # the layout of a generated dataset (scripts.lesions.generate): two held-out volumes, pooled
        (cls.data / "datalist.json").write_text(json.dumps({
            "training": [{"image": "brain1_image.nrrd", "label": "brain1_label.nrrd"}],
            "test": [{"image": f"brain{i}_image.nrrd", "label": f"brain{i}_label.nrrd"} for i in (2, 3)]}))
        cls.output = cls.tmp / "out" / "ablation.json"
        cls.code = main(["--case", "synthetic", "--steps", "2", "--epochs", "1", "--seeds", "0", "--settings", "a",
                         "c", "--patch", "16", "16", "4", "--threads", "2", "--data-dir", str(cls.data),
                         "--work-dir", str(cls.tmp / "work"), "--output", str(cls.output)])
        cls.report = json.loads(cls.output.read_text())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_report(self):
        self.assertEqual(self.code, 0)
        report = self.report
        self.assertTrue({"config", "command", "runs", "summary", "paired", "wall_s", "machine"} <= set(report))
        self.assertTrue(report["command"].startswith("python -m scripts.experiments.ablation_loss "))
        self.assertIn("cores", report["machine"])
        cfg = report["config"]
        self.assertEqual((cfg["steps"], cfg["epochs"], cfg["iterations_per_epoch"]), (2, 1, 2))
        self.assertEqual(cfg["patch"], [16, 16, 4])
        self.assertEqual(cfg["workflows"], ["configs/train.yaml", "configs/inference.yaml"])
        self.assertEqual(sorted(cfg["settings"]), ["a", "c"])
        self.assertEqual([(r["setting"], r["seed"]) for r in report["runs"]], [("a", 0), ("c", 0)])
        for run in report["runs"]:
            self.assertTrue({"setting", "seed", "steps", "loss", "train_loss", "train_s", "test", "train_case",
                             "test_cases", "eval_s"} <= set(run))
            self.assertEqual(run["steps"], 2)
            self.assertEqual(len(run["train_loss"]), 1)  # the mean of every 50 iterations
            self.assertEqual(len(run["test_cases"]), 2)
            for part in ("test", "train_case"):
                self.assertEqual(set(run[part]), {*METRICS, "tp", "fp", "fn", "gt_lesions", "detected_lesions",
                                                  "pred_lesions", "lesion_fp"})
                self.assertEqual(run[part]["tp"] + run[part]["fn"] > 0, True)  # the label was read on its grid
            self.assertEqual(run["test"]["gt_lesions"], 2)  # one lesion per held-out case, pooled
            self.assertEqual(run["test"]["fn"], sum(c["fn"] for c in run["test_cases"]))
        self.assertEqual(set(report["summary"]), {"a", "c"})
        self.assertEqual(set(report["paired"]), {"c"})
        self.assertIn("test_dice", report["summary"]["a"])

    def test_settings_reached_the_loss(self):
        """Each run's trainer was built with its setting's loss (read from the loss object it trained with)."""
        losses = {r["setting"]: r["loss"] for r in self.report["runs"]}
        for setting, loss in losses.items():
            for key in ("lambda_rs", "alpha", "beta", "adaptive", "pooling"):
                self.assertEqual(loss[key], SETTINGS[setting][key], (setting, key))
        self.assertEqual(losses["a"]["lambda_rs"], 0.0)
        self.assertEqual(losses["c"]["lambda_rs"], 0.8)
        # the shared plan went to both workflows: the run kept its plan file and a segmentation per case
        work = self.tmp / "work"
        self.assertTrue((work / "plan.yaml").is_file())
        self.assertEqual(len(list((work / "c_seed0" / "eval").rglob("*.nii.gz"))), 3)  # 2 held-out, 1 training

    def test_markdown(self):
        text = self.output.with_suffix(".md").read_text()
        self.assertIn("| setting | loss | held-out Dice |", text)
        self.assertIn("configs/train.yaml through `monai.bundle.ConfigWorkflow`", text)
        # the documented result still renders (--markdown-only), into a copy
        copy = self.tmp / "docs_copy" / "ablation_loss.json"
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / "docs" / "ablation_loss.json", copy)
        self.assertEqual(main(["--markdown-only", "--output", str(copy)]), 0)
        self.assertIn("| a | CE + Dice (baseline) |", copy.with_suffix(".md").read_text())

    def test_pooled_counts(self):
        # two predicted lesions touch the one detected reference lesion: precision counts predicted lesions
        cases = [dict(tp=3, fp=1, fn=1, gt_lesions=2, detected_lesions=1, pred_lesions=3, lesion_fp=1),
                 dict(tp=0, fp=0, fn=4, gt_lesions=3, detected_lesions=0, pred_lesions=0, lesion_fp=0)]
        pooled = pooled_counts(cases)
        self.assertAlmostEqual(pooled["dice"], 6 / 12)
        self.assertAlmostEqual(pooled["recall"], 3 / 8)
        self.assertAlmostEqual(pooled["precision"], 3 / 4)
        self.assertAlmostEqual(pooled["lesion_recall"], 1 / 5)
        self.assertAlmostEqual(pooled["lesion_precision"], 2 / 3)
        self.assertIsNone(pooled_counts(cases[1:])["precision"])  # nothing predicted: undefined, not 0

    def test_case_lists(self):
        self.assertEqual(case_lists(CASES["brain"], self.data),
                         ([{"image": "brain1_image.nrrd", "label": "brain1_label.nrrd"}],
                          [{"image": "brain2_image.nrrd", "label": "brain2_label.nrrd"}]))
        with self.assertRaisesRegex(ValueError, "scripts.lesions.generate"):
            case_lists(CASES["synthetic"], self.tmp / "nowhere")

    def test_ill_arguments(self):
        with self.assertRaises(ValueError):
            loss_overrides("z")
        for argv in (["--steps", "3", "--epochs", "2"], ["--steps", "0"], ["--settings", "z"]):
            with self.assertRaises(SystemExit):
                main(argv + ["--output", str(self.tmp / "never.json")])
        self.assertFalse((self.tmp / "never.json").exists())


if __name__ == "__main__":
    unittest.main()
