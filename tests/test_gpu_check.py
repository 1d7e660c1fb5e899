# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""``python -m scripts.gpu_check`` on this CPU at tiny sizes, its parity comparison, its time budget and section
statuses, and its refusal of bad arguments (the check itself is run on GPU machines; it is a script, not a test)."""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from parameterized import parameterized

from scripts.benchmark.machine import summarize_machine
from scripts.gpu_check.budget import Budget
from scripts.gpu_check.cli import main
from scripts.gpu_check.distributed import distributed_command, make_dataset, run_distributed
from scripts.gpu_check.errors import SectionSkipped
from scripts.gpu_check.parity import TOLERANCES, compare, mamba_case, scan_case, scan_inputs
from scripts.gpu_check.report import JSON_NAME, MARKDOWN_NAME, render_markdown
from scripts.gpu_check.runner import SECTIONS, Settings, run_checks
from scripts.label.app import TOOLING, served_scripts
from scripts.networks.mamba import Mamba
from scripts.networks.selective_scan import selective_scan
from tests.utils import ROOT, env_with_root

STATUSES = ("ok", "failed", "error", "skipped")
CPU = torch.device("cpu")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tiny_settings(out: str, budget_s: float = 50.0, sections: tuple[str, ...] = SECTIONS) -> Settings:
    return Settings(device="cpu", plan="demo", size=16, amp_size=16, amp_steps=2, amp_batch=1, train_batch=1,
                    sliding_size=24, warmup=0, repeats=1, budget_s=budget_s, sections=sections, out=out)


class TestCommand(unittest.TestCase):
    """The command in a subprocess, every section on tiny sizes."""

    def test_tiny_run_writes_every_section(self):
        with tempfile.TemporaryDirectory() as tmp:
            args = ["--out", tmp, "--device", "cpu", "--size", "16", "--amp-size", "16", "--amp-steps", "2",
                    "--sliding-size", "24", "--warmup", "0", "--repeats", "1", "--budget-s", "150"]
            proc = subprocess.run([sys.executable, "-m", "scripts.gpu_check", *args], cwd=ROOT, env=env_with_root(),
                                  capture_output=True, text=True, timeout=600)
            self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
            report = json.loads((Path(tmp) / JSON_NAME).read_text())
            markdown = (Path(tmp) / MARKDOWN_NAME).read_text()
        self.assertIn("wrote", proc.stdout)
        self.assertEqual(list(report["sections"]), list(SECTIONS))
        for name, entry in report["sections"].items():
            self.assertIn(entry["status"], STATUSES, name)
        statuses = {name: entry["status"] for name, entry in report["sections"].items()}
        self.assertEqual(statuses, {"environment": "ok", "parity": "ok", "amp_training": "ok", "timing": "ok",
                                    "sliding_window": "ok", "distributed": "skipped"}, report["sections"])
        self.assertTrue(report["sections"]["distributed"]["reason"].startswith("skipped: 0 GPU(s)"))
        self.assertEqual(report["exit_status"], 0)
        env = report["sections"]["environment"]["result"]
        self.assertEqual(env["scan_backend"], "chunked")
        self.assertIn("mamba_ssm.ops.selective_scan_interface", env["imports"])
        parity = report["sections"]["parity"]["result"]
        self.assertEqual({c["case"] for c in parity["cases"]},
                         {"scan chunked", "scan naive", "mamba pure (chunked scan)"})
        self.assertEqual({s["case"] for s in parity["skipped"]}, {"scan cuda", "mamba fused"})
        amp = report["sections"]["amp_training"]["result"]
        self.assertEqual((amp["autocast"], amp["steps"], len(amp["losses"])), ("bfloat16", "2/2", 2))
        self.assertLess(amp["losses"][-1], amp["losses"][0])
        cases = report["sections"]["timing"]["result"]["cases"]
        self.assertGreater(cases["mambaclinix[chunked]"]["forward"]["median_s"], 0)
        self.assertGreater(cases["dynunet"]["train"]["median_s"], 0)
        self.assertIn("skipped", cases["swinunetr"])  # 16^3 leaves it less than one voxel at the bottleneck
        sliding = report["sections"]["sliding_window"]["result"]
        self.assertEqual((sliding["volume"], sliding["roi"], sliding["windows"]), (24, 16, 8))
        self.assertIn(summarize_machine(report["machine"]), markdown)
        for name in SECTIONS:
            self.assertIn(f"| {name} | {statuses[name]} |", markdown)
        self.assertIn("## parity", markdown)

    def test_bad_size_is_one_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--out", f"{tmp}/o", "--device", "cpu",
                                   "--size", "30"], cwd=ROOT, env=env_with_root(), capture_output=True, text=True,
                                  timeout=300)
            self.assertFalse(Path(tmp, "o").exists())
        self.assertEqual(proc.returncode, 2)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertTrue(lines[0].startswith("ERROR: --size 30 does not suit the demo plan"), lines[0])
        self.assertIn("multiple of 8", lines[0])
        self.assertNotIn("Traceback", proc.stderr)


class TestArguments(unittest.TestCase):
    @parameterized.expand([
        ("size", ["--size", "30"], "multiple of 8"),
        ("size_one_voxel", ["--size", "8"], "at least 16"),
        ("amp_size", ["--amp-size", "20"], "--amp-size 20"),
        ("default_plan", ["--plan", "default", "--size", "48"], "multiple of 32"),
        ("steps", ["--amp-steps", "1"], "--amp-steps must be at least 2"),
        ("repeats", ["--repeats", "0"], "--repeats must be at least 1"),
        ("sliding", ["--size", "32", "--sliding-size", "16"], "--sliding-size 16"),
        ("budget", ["--budget-s", "0"], "--budget-s must be positive"),
        ("section", ["--sections", "parity", "nope"], "invalid choice: 'nope'"),
        ("plan", ["--plan", "huge"], "invalid choice: 'huge'"),
        ("not_a_number", ["--size", "x"], "invalid int value"),
        ("device", ["--device", "tpu"], "--device"),
    ])
    def test_refused_in_one_line(self, _, args, expected):
        with tempfile.TemporaryDirectory() as tmp:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                status = main(["--out", f"{tmp}/o", *(["--device", "cpu"] if "--device" not in args else []), *args])
            self.assertFalse(Path(tmp, "o").exists())
        self.assertEqual(status, 2)
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, err.getvalue())
        self.assertTrue(lines[0].startswith("ERROR: "), lines[0])
        self.assertIn(expected, lines[0])

    def test_out_missing_or_a_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "f").write_text("")
            for args, expected in (([], "--out"), (["--out", f"{tmp}/f"], "is a file")):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    self.assertEqual(main(["--device", "cpu", *args]), 2)
                self.assertIn(expected, err.getvalue())
                self.assertEqual(len(err.getvalue().splitlines()), 1)

    @unittest.skipIf(torch.cuda.is_available(), "CUDA is available here")
    def test_cuda_without_cuda(self):
        err = io.StringIO()
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(err):
            self.assertEqual(main(["--out", tmp, "--device", "cuda"]), 2)
        self.assertIn("use --device cpu", err.getvalue())


class TestParity(unittest.TestCase):
    @parameterized.expand([(6e-4, 2e-3), (3e-2, 5e-2), (0.0, 1e-3)])
    def test_compare_figures(self, rtol, atol):
        rng = np.random.default_rng(0)
        ref = rng.normal(size=(3, 50))
        got = ref + rng.normal(scale=1e-3, size=ref.shape)
        result = compare({"y": torch.from_numpy(ref)}, {"y": torch.from_numpy(got).float()}, rtol, atol)
        got32 = got.astype(np.float32).astype(np.float64)  # what the float32 result holds
        err = np.abs(got32 - ref)
        out = result["outputs"]["y"]
        self.assertAlmostEqual(out["max_abs_err"], err.max(), places=12)
        self.assertAlmostEqual(out["max_rel_err"], err.max() / np.abs(ref).max(), places=12)
        ratio = (err / (atol + rtol * np.abs(ref))).max()
        self.assertAlmostEqual(out["ratio"], ratio, places=9)
        self.assertEqual(result["passed"], bool(np.allclose(got32, ref, rtol=rtol, atol=atol)))
        self.assertEqual(result["passed"], ratio <= 1)

    @parameterized.expand([(6e-4, 2e-3, 1e-3), (3e-2, 5e-2, 3e-2), (3e-3, 5e-3, 2e-2)])
    def test_compare_normwise(self, rtol, atol, noise):
        rng = np.random.default_rng(1)
        ref = rng.normal(scale=30.0, size=(16, 8))
        got = ref + rng.normal(scale=noise * 30.0, size=ref.shape)
        names = {"grad_w": torch.from_numpy(ref), "y": torch.from_numpy(ref)}
        result = compare(names, {k: torch.from_numpy(got) for k in names}, rtol, atol, normwise=["grad_w"])
        norm = np.linalg.norm(got - ref) / (atol * np.sqrt(ref.size) + rtol * np.linalg.norm(ref))
        elementwise = (np.abs(got - ref) / (atol + rtol * np.abs(ref))).max()
        self.assertEqual(result["outputs"]["grad_w"]["criterion"], "normwise")
        self.assertAlmostEqual(result["outputs"]["grad_w"]["ratio"], norm, places=9)
        self.assertAlmostEqual(result["outputs"]["y"]["ratio"], elementwise, places=9)
        self.assertEqual(result["passed"], max(norm, elementwise) <= 1)
        self.assertLess(norm, elementwise)  # the norm-wise form never exceeds the elementwise one

    def test_non_finite_fails(self):
        ref = {"y": torch.zeros(4), "grad_u": torch.ones(4)}
        got = {"y": torch.tensor([0.0, float("nan"), 0.0, 0.0]), "grad_u": torch.ones(4)}
        result = compare(ref, got, 1e-3, 1e-3)
        self.assertFalse(result["passed"])
        self.assertEqual(result["worst"], "y")
        self.assertIsNone(result["max_abs_err"])
        self.assertEqual(result["outputs"]["grad_u"]["max_abs_err"], 0.0)

    def test_compare_refuses_mismatches(self):
        with self.assertRaisesRegex(ValueError, "same tensors"):
            compare({"y": torch.zeros(2)}, {"z": torch.zeros(2)}, 1e-3, 1e-3)
        with self.assertRaisesRegex(ValueError, "shape"):
            compare({"y": torch.zeros(2)}, {"y": torch.zeros(3)}, 1e-3, 1e-3)

    @parameterized.expand([(backend, dtype) for backend in ("chunked", "naive")
                           for dtype in (torch.float32, torch.bfloat16)])
    def test_backends_pass(self, backend, dtype):
        inputs = scan_inputs(2, 8, 4, 70, dtype, CPU)
        case = scan_case(f"scan {backend}", functools.partial(selective_scan, backend=backend), inputs)
        self.assertTrue(case["passed"], case)
        self.assertEqual((case["rtol"], case["atol"]), TOLERANCES[dtype])
        self.assertEqual(set(case["outputs"]), {"y", "grad_u", "grad_delta", "grad_A", "grad_B", "grad_C", "grad_D",
                                                "grad_z", "grad_delta_bias"})

    @parameterized.expand([
        ("scaled_output", lambda **kw: 1.01 * selective_scan(**kw, backend="chunked"), "y"),
        ("no_bias", lambda delta_bias, **kw: selective_scan(**kw, delta_bias=0.0 * delta_bias), "grad_delta_bias"),
        ("no_gate", lambda z, **kw: selective_scan(**kw, z=torch.ones_like(z) * 20 + 0 * z), "grad_z"),
    ])
    def test_wrong_backend_fails(self, _, wrong, wrong_output):
        inputs = scan_inputs(2, 8, 4, 70, torch.float32, CPU)
        case = scan_case("wrong", wrong, inputs)
        self.assertFalse(case["passed"])
        self.assertGreater(case["outputs"][case["worst"]]["ratio"], 1.0)
        self.assertGreater(case["outputs"][wrong_output]["ratio"], 1.0)

    @parameterized.expand([(None,), (torch.bfloat16,)])
    def test_mamba_pure_path_passes(self, autocast):
        torch.manual_seed(0)
        module = Mamba(8, d_state=4)
        x = torch.randn(2, 40, 8)
        case = mamba_case("mamba pure", module, False, x, autocast)
        self.assertTrue(case["passed"], case)
        self.assertIn("grad_A_log", case["outputs"])
        self.assertTrue(module.use_fast_path)  # the case runs copies: the module given is left as it was
        self.assertTrue(all(p.grad is None and p.dtype == torch.float32 for p in module.parameters()))


    def test_a_case_that_raises_fails_and_the_others_run(self):
        from scripts.gpu_check.parity import run_parity
        from scripts.gpu_check.report import _parity

        with mock.patch("scripts.gpu_check.parity.mamba_case", side_effect=RuntimeError("kernel refused\ndetail")):
            result = run_parity(CPU, small=True)
        self.assertFalse(result["passed"])
        errors = [c for c in result["cases"] if "error" in c]
        self.assertEqual([(c["case"], c["dtype"]) for c in errors],
                         [("mamba pure (chunked scan)", "float32"), ("mamba pure (chunked scan)", "bfloat16")])
        self.assertEqual(errors[0]["error"], "RuntimeError: kernel refused")
        self.assertTrue(all(c["passed"] for c in result["cases"] if "error" not in c))
        self.assertEqual(len(result["cases"]), 6)
        self.assertIn("FAIL: RuntimeError: kernel refused", "\n".join(_parity(result)))


class TestRunner(unittest.TestCase):
    """Statuses, the time budget and the files written after every section, with stand-in sections."""

    def test_budget_skips_the_remaining_sections(self):
        clock, called = FakeClock(), []

        def slow(settings, budget, done):
            clock.now += 60.0
            called.append("slow")
            return {"passed": True}

        def never(settings, budget, done):
            called.append("never")
            return {}

        with tempfile.TemporaryDirectory() as tmp:
            sections = {name: never for name in SECTIONS} | {"parity": slow}
            report = run_checks(tiny_settings(tmp), "cmd", sections, Budget(50.0, clock))
            written = json.loads(Path(tmp, JSON_NAME).read_text())
        self.assertEqual(called, ["never", "slow"])  # environment, then parity overdraws the budget
        self.assertEqual(written, json.loads(json.dumps(report)))
        for name in SECTIONS[2:]:
            self.assertEqual(report["sections"][name]["status"], "skipped")
            self.assertEqual(report["sections"][name]["reason"], "skipped: time budget of 50 s: 0 s left")
        self.assertEqual(report["exit_status"], 0)

    def test_statuses_exit_status_and_partial_files(self):
        seen = {}

        def read_back(settings, budget, done):  # the files hold every earlier section when a section starts
            seen.update(json.loads(Path(settings.out, JSON_NAME).read_text())["sections"])
            return {"median_s": 1.0}

        def raises(settings, budget, done):
            raise RuntimeError("CUDA error: an illegal memory access\nmore")

        def skips(settings, budget, done):
            raise SectionSkipped("1 GPU(s)")

        sections = {"environment": lambda s, b, d: {"torch": "x"}, "parity": lambda s, b, d: {"passed": False},
                    "amp_training": raises, "timing": read_back, "sliding_window": skips,
                    "distributed": lambda s, b, d: {"passed": True}}
        with tempfile.TemporaryDirectory() as tmp:
            settings = tiny_settings(tmp, sections=tuple(n for n in SECTIONS if n != "distributed"))
            report = run_checks(settings, "cmd", sections, Budget(50.0, FakeClock()))
            markdown = Path(tmp, MARKDOWN_NAME).read_text()
        statuses = {name: entry["status"] for name, entry in report["sections"].items()}
        self.assertEqual(statuses, {"environment": "ok", "parity": "failed", "amp_training": "error", "timing": "ok",
                                    "sliding_window": "skipped", "distributed": "skipped"})
        error = report["sections"]["amp_training"]["error"]
        self.assertEqual(error, "RuntimeError: CUDA error: an illegal memory access")
        self.assertEqual(report["sections"]["sliding_window"]["reason"], "skipped: 1 GPU(s)")
        self.assertEqual(report["sections"]["distributed"]["reason"], "skipped: not in --sections")
        self.assertEqual({k: v["status"] for k, v in seen.items()},
                         {"environment": "ok", "parity": "failed", "amp_training": "error", "timing": "pending",
                          "sliding_window": "pending", "distributed": "pending"})
        self.assertEqual(report["exit_status"], 1)
        self.assertIn(summarize_machine(report["machine"]), markdown)
        self.assertIn("| amp_training | error |", markdown)

    @parameterized.expand([("parity", "failed", 1), ("amp_training", "error", 1), ("distributed", "failed", 1),
                           ("timing", "error", 0), ("sliding_window", "error", 0), ("parity", "skipped", 0)])
    def test_exit_status(self, section, status, expected):
        from scripts.gpu_check.runner import exit_status

        report = {"sections": {name: {"status": "ok"} for name in SECTIONS}}
        report["sections"][section]["status"] = status
        self.assertEqual(exit_status(report), expected)

    def test_budget(self):
        clock = FakeClock()
        budget = Budget(10.0, clock)
        clock.now = 4.0
        self.assertEqual((budget.elapsed(), budget.remaining()), (4.0, 6.0))
        self.assertTrue(budget.allows(6.0))
        self.assertFalse(budget.allows(6.5))
        self.assertEqual(budget.spent_reason(7.0), "time budget of 10 s: 6 s left, about 7 s needed")
        for bad in (0.0, -1.0, float("nan")):
            with self.assertRaisesRegex(ValueError, "positive"):
                Budget(bad)

    def test_timing_stops_at_the_budget(self):
        from scripts.gpu_check.timing import run_timing

        clock = FakeClock()
        budget = Budget(5.0, clock)
        with mock.patch("scripts.gpu_check.timing.measure_call",
                                 side_effect=lambda fn, device: (setattr(clock, "now", clock.now + 3.0),
                                                                 {"s": 3.0, "peak_mib": None,
                                                                  "peak_above_baseline_mib": None})[1]):
            result = run_timing(CPU, "demo", 16, 1, 3, 0, 2, budget)
        self.assertIn("in round 1 of 2", result["stopped"])
        cases = result["cases"]
        self.assertEqual(cases["mambaclinix[chunked]"]["forward"]["runs_s"], [3.0])
        self.assertEqual(cases["mambaclinix[chunked]"]["train"]["runs_s"], [3.0])  # 6 s: over the budget after it
        self.assertEqual(cases["dynunet"]["forward"]["runs_s"], [])

    def test_markdown_names_machine_and_sections(self):
        report = {"command": "cmd", "machine": {"cpu": "Test CPU", "cores": 3, "threads": 2, "device": "cpu"},
                  "sections": {name: {"status": "skipped", "reason": f"skipped: because {name}"} for name in SECTIONS}}
        markdown = render_markdown(report)
        self.assertIn("# GPU check: Test CPU, 3 cores, torch threads 2, device cpu", markdown)
        for name in SECTIONS:
            self.assertIn(f"| {name} | skipped | n/a | skipped: because {name} |", markdown)


class TestDistributed(unittest.TestCase):
    """The torchrun section's set-up (the 2-process run itself needs 2 GPUs; tests/test_resume.py runs the same
    configs with gloo)."""

    def test_dataset_and_command(self):
        with tempfile.TemporaryDirectory() as tmp:
            datalist = make_dataset(Path(tmp, "data"))
            lists = json.loads(datalist.read_text())
            self.assertEqual((len(lists["training"]), len(lists["validation"])), (2, 1))
            for item in lists["training"] + lists["validation"]:
                self.assertEqual(len(item["image"]), 4)
                self.assertTrue(all(Path(tmp, "data", f).is_file() for f in item["image"] + [item["label"]]))
            command = distributed_command(Path(tmp), datalist)
        self.assertEqual(command[1:3], ["-m", "torch.distributed.run"])
        self.assertIn("--nproc_per_node=2", command)
        self.assertIn("['configs/train.yaml','configs/multi_gpu_train.yaml']", command)
        values = dict(zip(command[command.index("training") + 1::2], command[command.index("training") + 2::2]))
        self.assertEqual(ast.literal_eval(values["--intensity_stats"]), [None] * 4)  # fire reads Python literals
        self.assertEqual(ast.literal_eval(values["--patch_size"]), [32, 32, 32])
        self.assertEqual(values["--ckpt_dir"], f"{tmp}/models")

    def test_skipped_without_two_gpus_or_time(self):
        with self.assertRaisesRegex(SectionSkipped, "the 2-process NCCL run needs 2 GPUs"):
            run_distributed(CPU, 600.0)
        with mock.patch("torch.cuda.is_available", return_value=True), \
                mock.patch("torch.cuda.device_count", return_value=2):
            with self.assertRaisesRegex(SectionSkipped, "30 s of the time budget left"):
                run_distributed(torch.device("cuda"), 30.0)


class TestTooling(unittest.TestCase):
    def test_not_served(self):
        self.assertIn("gpu_check", TOOLING)
        self.assertNotIn("gpu_check", [p.name for p in served_scripts(ROOT / "scripts")])


if __name__ == "__main__":
    unittest.main()
