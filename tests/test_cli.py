# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Bad data ends every bundle command with one readable line naming the file (scripts/cli.py), not a traceback."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
from parameterized import parameterized

from scripts.cli import data_error_in_chain, report_uncaught
from scripts.data import DataError
from tests.utils import ROOT, TINY_PLAN, env_with_root, write_dataset

TRAIN = "['configs/train.yaml']"
EVALUATE = "['configs/train.yaml','configs/evaluate.yaml']"
INFER = "['configs/inference.yaml']"


def _raise_wrapped(exc: BaseException) -> BaseException:
    """``exc`` as MONAI's config parser delivers it: the cause of a RuntimeError."""
    try:
        try:
            raise exc
        except BaseException as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: $...") from inner
    except RuntimeError as outer:
        return outer


class TestReportUncaught(unittest.TestCase):
    def test_chain(self):
        err = DataError("case 0: image file a.nii.gz does not exist")
        self.assertIs(data_error_in_chain(_raise_wrapped(err)), err)
        self.assertIsNone(data_error_in_chain(_raise_wrapped(KeyError("x"))))
        self.assertIsNone(data_error_in_chain(None))

    @parameterized.expand([([], False), (["--debug", "True"], True), (["--debug=1"], True)])
    def test_one_line(self, extra_argv, traceback_shown):
        outer = _raise_wrapped(DataError("case 0: image file a.nii.gz\nis not an image; fix it."))
        stream = io.StringIO()
        handled = report_uncaught(type(outer), outer, outer.__traceback__, argv=["prog", *extra_argv], stream=stream)
        self.assertTrue(handled)
        lines = stream.getvalue().splitlines()
        self.assertEqual(lines[-1], "ERROR: case 0: image file a.nii.gz is not an image; fix it.")
        self.assertEqual("Traceback (most recent call last):" in stream.getvalue(), traceback_shown)

    def test_other_errors_left_alone(self):
        outer = _raise_wrapped(ZeroDivisionError("bug"))
        stream = io.StringIO()
        self.assertFalse(report_uncaught(type(outer), outer, outer.__traceback__, argv=["prog"], stream=stream))
        self.assertEqual(stream.getvalue(), "")


class TestBundleCommandsOnBadData(unittest.TestCase):
    """The real ``python -m monai.bundle run`` commands, each given one bad file."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _dataset(self, name: str, break_split: str, how: str) -> tuple[Path, Path, str]:
        folder = self.tmp / name
        datalist = write_dataset(folder, n_train=1, n_val=1, n_test=1)
        lists = json.loads(datalist.read_text())
        item = lists[break_split][0]
        target = folder / item["image"]
        if how == "missing":
            target.unlink()
        elif how == "not_an_image":
            target.write_bytes(b"this is not an image")
        elif how == "2d":
            nib.save(nib.Nifti1Image(np.ones((24, 22), np.float32), np.eye(4)), str(target))
        datalist.write_text(json.dumps(lists))
        return folder, datalist, str(target)

    def _run(self, run_id: str, configs: str, folder: Path, datalist: Path, *extra: str):
        args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs, "--meta_file",
                "configs/metadata.json", "--bundle_root", ".", "--dataset_dir", str(folder), "--datalist",
                str(datalist), "--ckpt_dir", str(folder / "models"), "--output_dir", str(folder / "out"),
                "--device", "cpu", "--epochs", "1", "--iterations_per_epoch", "1", "--cache_rate", "0"]
        for key in ("patch_size", "features", "strides", "kernel_sizes", "block_types", "num_regions"):
            args += [f"--{key}", json.dumps(TINY_PLAN[key])]
        return subprocess.run(args + list(extra), cwd=ROOT, env=env_with_root(), capture_output=True, text=True,
                              timeout=600)

    @parameterized.expand([
        ("train_missing_training_image", "training", TRAIN, "training", "missing", "does not exist"),
        ("train_corrupt_test_image", "training", TRAIN, "test", "not_an_image", "could not be read"),
        ("evaluate_missing_test_image", "evaluating", EVALUATE, "test", "missing", "does not exist"),
        ("infer_corrupt_image", "inference", INFER, "test", "not_an_image", "could not be read"),
    ])
    def test_one_readable_line(self, name, run_id, configs, split, how, phrase):
        folder, datalist, bad_file = self._dataset(name, split, how)
        result = self._run(run_id, configs, folder, datalist)
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        last = result.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("ERROR: "), result.stderr[-3000:])
        self.assertIn(bad_file, last)
        self.assertIn(phrase, last)
        self.assertNotIn("Traceback (most recent call last)", result.stderr + result.stdout)
        self.assertFalse((folder / "models" / "checkpoint_latest.pt").exists(), "training ran despite bad data")

    def test_planner_missing_file(self):
        folder, datalist, bad_file = self._dataset("plan", "training", "missing")
        result = subprocess.run([sys.executable, "-m", "scripts.plan", "--datalist", str(datalist), "--dataset_dir",
                                 str(folder), "--output", str(folder / "plan.yaml")], cwd=ROOT, env=env_with_root(),
                                capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 1)
        last = result.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("ERROR: ") and bad_file in last, result.stderr[-3000:])
        self.assertNotIn("Traceback (most recent call last)", result.stderr)
        self.assertFalse((folder / "plan.yaml").exists())

    def test_planner_2d_plan_of_3d_data(self):
        """A 2D plan of 3D volumes would not fit the configs: one line saying what to do instead."""
        folder = self.tmp / "plan2d"
        datalist = write_dataset(folder, n_train=1, n_val=0, n_test=0)
        result = subprocess.run([sys.executable, "-m", "scripts.plan", "--datalist", str(datalist), "--dataset_dir",
                                 str(folder), "--output", str(folder / "plan.yaml"), "--cpu", "--spatial_dims", "2"],
                                cwd=ROOT, env=env_with_root(), capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        last = result.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("ERROR: spatial_dims=2 for 3D data"), result.stderr[-3000:])
        self.assertIn("omit --spatial_dims", last)
        self.assertIn("configs/hunet_train.yaml", last)
        self.assertNotIn("Traceback (most recent call last)", result.stderr)
        self.assertFalse((folder / "plan.yaml").exists())

    def test_debug_keeps_the_traceback(self):
        folder, datalist, bad_file = self._dataset("debug", "training", "missing")
        result = self._run("training", TRAIN, folder, datalist, "--debug", "True")
        self.assertEqual(result.returncode, 1)
        self.assertIn("Traceback (most recent call last)", result.stderr)
        self.assertIn(bad_file, result.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
    unittest.main()
