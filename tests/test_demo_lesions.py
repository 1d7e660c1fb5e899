# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""scripts.demo.lesions: the summary of ``make demo-lesions`` from evaluation files."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import unittest
from pathlib import Path

from parameterized import parameterized

from scripts.demo.lesions import main, summarise_cases

ROWS = [
    {"case": "test_000.nii.gz", "dsc": 0.5, "iou": 0.3, "hd95": 10.0, "sensitivity": 0.6, "specificity": 0.999,
     "lesion_recall": 0.5, "lesion_precision": 1.0, "lesion_fp": 0, "gt_lesions": 4, "detected_lesions": 2,
     "pred_lesions": 2},
    {"case": "test_001.nii.gz", "dsc": 0.7, "iou": 0.5, "hd95": None, "sensitivity": 0.8, "specificity": 0.998,
     "lesion_recall": 1.0, "lesion_precision": 0.5, "lesion_fp": 3, "gt_lesions": 1, "detected_lesions": 1,
     "pred_lesions": 6},
    {"case": "test_002.nii.gz", "dsc": 1.0, "iou": 1.0, "hd95": None, "sensitivity": None, "specificity": 1.0,
     "lesion_recall": None, "lesion_precision": None, "lesion_fp": 0, "gt_lesions": 0, "detected_lesions": 0,
     "pred_lesions": 0},
]


class TestDemoLesionSummary(unittest.TestCase):
    def test_means_and_pooled_counts(self):
        s = summarise_cases(ROWS)
        self.assertEqual(s["cases"], 3)
        self.assertAlmostEqual(s["dsc"], (0.5 + 0.7 + 1.0) / 3)
        self.assertAlmostEqual(s["hd95"], 10.0)  # undefined values (null) are left out of the mean
        self.assertAlmostEqual(s["lesion_recall"], 0.75)
        self.assertAlmostEqual(s["pooled_lesion_recall"], 3 / 5)
        self.assertEqual((s["gt_lesions"], s["detected_lesions"], s["pred_lesions"], s["fp_lesions"]), (5, 3, 8, 3))
        self.assertAlmostEqual(s["lesion_fp"], 1.0)

    def test_command_with_loads(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "metrics.json").write_text(json.dumps({"cases": ROWS}))
            (tmp / "datalist.json").write_text(json.dumps({"test": [
                {"image": f"images/test_00{i}.nii.gz", "lesion_load": load}
                for i, load in enumerate(("low", "high", "low"))]}))
            with contextlib.redirect_stdout(io.StringIO()) as out:
                code = main(["--set", f"synthetic test={tmp / 'metrics.json'}", "--datalist",
                             str(tmp / "datalist.json"), "--output", str(tmp / "out")])
            self.assertEqual(code, 0)
            summary = json.loads((tmp / "out" / "summary.json").read_text())
            self.assertEqual(summary["synthetic test"]["by_lesion_load"]["low"]["cases"], 2)
            self.assertEqual(summary["synthetic test"]["by_lesion_load"]["high"]["fp_lesions"], 3)
            table = (tmp / "out" / "summary.md").read_text()
            self.assertEqual(table, out.getvalue())
            self.assertIn("| synthetic test, low load | 2 |", table)
            self.assertIn("0.750; 0.600 (3/5)", table)

    @parameterized.expand([
        ("no_equals", ["--set", "nothing"]),
        ("missing_file", ["--set", "a=/nonexistent/metrics.json"]),
        ("no_set", []),
    ])
    def test_ill_arguments(self, _, argv):
        with tempfile.TemporaryDirectory() as tmp:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main([*argv, "--output", tmp])
            self.assertEqual(code, 2)
            self.assertTrue(err.getvalue().startswith("ERROR: "), err.getvalue())
            self.assertEqual(len(err.getvalue().strip().splitlines()), 1)


if __name__ == "__main__":
    unittest.main()
