# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""scripts.checks.hostile: the hostile-input suite in-process (bundle) and against a lesion service it starts."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from monai.utils import optional_import

from scripts.checks import hostile
from scripts.checks.hostile import CASES, main
from tests.utils import ROOT, start_lesion_service, stop_process

httpx, has_httpx = optional_import("httpx")
_, has_fastapi = optional_import("fastapi")
_, has_uvicorn = optional_import("uvicorn")

TINY = ["img_size=32", "embed_dims=[8,16,32,64]", "depths=[1,1,1,1]", "d_state=4", "sw_batch_size=4"]


class TestBundleTarget(unittest.TestCase):
    def test_all_cases_pass(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "report.json"
            code = main(["--target", "bundle", "--bomb_mb", "16", "--out", str(out)])
            report = json.loads(out.read_text())
        failed = [r for r in report if not r["ok"]]
        self.assertEqual(failed, [])
        self.assertEqual(code, 0)
        self.assertEqual({r["case"] for r in report}, {c.name for c in CASES})
        self.assertEqual({r["request"] for r in report}, {"data check", "inference loader"})
        for r in report:
            self.assertEqual(r["outcome"], "refused", r)
            self.assertIsNotNone(r["rss_growth_mb"])

    def test_failure_exits_non_zero(self):
        cases = [dataclasses.replace(c, expect={**c.expect, "bundle": (200,)}) if c.name == "nan_image" else c
                 for c in CASES if c.name in ("nan_image", "empty_file")]
        with mock.patch.object(hostile, "CASES", cases):
            self.assertEqual(main(["--target", "bundle", "--bomb_mb", "1"]), 1)

    def test_ill_arguments(self):
        for argv in (["--target", "hunet"], ["--target", "bundle", "--cases", "no_such_case"], ["--target", "x"]):
            with self.assertRaises(SystemExit):
                main(argv)


@unittest.skipUnless(has_httpx and has_fastapi and has_uvicorn, "httpx, fastapi and uvicorn are needed")
class TestHUNetTarget(unittest.TestCase):
    """``--target hunet`` against ``python -m scripts.hunet.service`` started here (random tiny weights)."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        args = ["--bundle_root", str(ROOT), "--work_dir", str(Path(cls._tmp.name) / "work"), "--device", "cpu",
                "--allow_untrained", "--max_upload_mb", "8"]
        for o in TINY:
            args += ["--override", o]
        try:
            cls.proc, cls.url = start_lesion_service(args, Path(cls._tmp.name) / "service.log")
        except RuntimeError:
            cls._tmp.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        stop_process(cls.proc)
        cls._tmp.cleanup()

    def test_all_cases_pass(self):
        out = Path(self._tmp.name) / "report.json"
        code = main(["--target", "hunet", "--url", self.url, "--server_pid", str(self.proc.pid), "--bomb_mb", "64",
                     "--out", str(out)])
        report = json.loads(out.read_text())
        self.assertEqual([r for r in report if not r["ok"]], [])
        self.assertEqual(code, 0)
        bombs = {c.name for c in CASES if c.bomb}
        for r in report:
            self.assertIsNotNone(r["rss_growth_mb"], r)
            if r["case"] in bombs:
                self.assertEqual(r["status"], 413 if r["case"] != "gzip_of_zeros" else 422, r)
                self.assertLess(r["rss_growth_mb"], 100, r)


if __name__ == "__main__":
    unittest.main()
