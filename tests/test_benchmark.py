# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Smoke tests of the :mod:`scripts.benchmark` package on toy sizes (the benchmarks themselves are run with
``python -m scripts.benchmark``, ``python -m scripts.benchmark.allocator`` and ``python -m scripts.benchmark.scan``)."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import shutil
import tempfile
import unittest
from unittest import mock

import torch
from parameterized import parameterized

import scripts.benchmark
from scripts.benchmark import allocator
from scripts.benchmark.models import build_model, size_divisor
from scripts.benchmark.probes import count_flops, peak_tensor_mib
from scripts.benchmark.report import write_outputs
from scripts.benchmark.runners import fit_exponent, run_benchmark


def private_imports(package_dir: str, package: str = "scripts.benchmark") -> list[str]:
    """``file:line name`` of every private name (``_x``, not dunder) that a module under ``package_dir`` takes from
    another bundle module: ``from scripts.x import _y``, ``from .x import _y``, or ``m._y`` where ``m`` is a bundle
    module imported by ``import scripts.x as m`` / ``from scripts.benchmark import m``."""

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    found = []
    for root, _, files in os.walk(package_dir):
        for fname in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, fname)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            where = os.path.relpath(path, package_dir)
            modules: set[str] = set()  # local names bound to bundle modules
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("scripts")):
                    for alias in node.names:
                        if private(alias.name):
                            found.append(f"{where}:{node.lineno} {alias.name}")
                        elif node.module in ("scripts", package) or node.level > 0 and node.module is None:
                            modules.add(alias.asname or alias.name)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("scripts.") and alias.asname:
                            modules.add(alias.asname)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name)
                        and node.value.id in modules):
                    found.append(f"{where}:{node.lineno} {node.value.id}.{node.attr}")
    return found


class TestPackageLayout(unittest.TestCase):
    def test_no_private_imports_between_modules(self):
        self.assertEqual(private_imports(scripts.benchmark.__path__[0]), [])

    def test_every_module_imports(self):
        for info in pkgutil.iter_modules(scripts.benchmark.__path__, "scripts.benchmark."):
            __import__(info.name)

    @parameterized.expand([
        ("from scripts.benchmark.probes import _scan_flops_hooks\n", "_scan_flops_hooks"),
        ("from .report import _fmt\n", "_fmt"),
        ("from scripts.benchmark import report\nreport._readme({}, '', [], '')\n", "report._readme"),
        ("import scripts.benchmark.workload as wl\nwl._x\n", "wl._x"),
    ])
    def test_private_import_is_caught(self, line, name):
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "benchmark")
            shutil.copytree(scripts.benchmark.__path__[0], copy, ignore=shutil.ignore_patterns("__pycache__"))
            with open(os.path.join(copy, "cli.py"), "a") as f:
                f.write(line)
            found = private_imports(copy)
        self.assertEqual(len(found), 1, found)
        self.assertTrue(found[0].startswith("cli.py:") and found[0].endswith(" " + name), found)


class TestBenchmark(unittest.TestCase):
    def test_run_and_write(self):
        result = run_benchmark(
            models=("mambaclinix_demo", "segresnet"), sizes=(32,), repeats=1, warmup=1, threads=1, train_sizes=(32,),
            train_batch=1, memory=True, memory_sizes=(32,), sliding=False, scaling_sizes=(16, 32),
            scaling_models=("segresnet",), max_call_s=60.0, conv_scale=0.25, matmul_n=256,
        )
        self.assertGreater(result["peaks"]["matmul_gflops"], 0)
        self.assertGreater(result["peaks"]["conv3d_gflops"], 0)
        for name in ("mambaclinix_demo", "segresnet"):
            m = result["models"][name]
            self.assertGreater(m["params"], 0)
            e = m["sizes"]["32"]
            self.assertGreater(e["flops"]["counted"], 0)
            self.assertGreaterEqual(e["flops"]["total"], e["flops"]["counted"])
            for key in ("forward", "train"):
                self.assertGreater(e[key]["median_s"], 0)
                self.assertGreater(e[key]["cpu_median_s"], 0)
            self.assertGreater(e["forward"]["gflops_per_s"], 0)
            self.assertGreater(e["forward"]["flop_proportional_s"], 0)
            self.assertGreater(e["memory"]["train_peak_mib"], 0)
            # a toy step may reuse what the warm-up step freed, so its growth can be ~0, never below the baseline
            self.assertGreaterEqual(e["memory"]["train_peak_mib"], e["memory"]["train_baseline_mib"])
            # tensor accounting: at least the step's gradients (float32 parameters) are allocated during the step
            params_mib = sum(p.numel() for p in build_model(name).parameters()) * 4 / 2**20
            self.assertGreater(e["memory"]["train_tensor_peak_mib"], params_mib)
            self.assertGreater(e["memory"]["forward_tensor_peak_mib"], 0)
        # the analytic scan count is added for the Mamba stages only
        self.assertGreater(result["models"]["mambaclinix_demo"]["sizes"]["32"]["flops"]["scan"], 0)
        self.assertEqual(result["models"]["segresnet"]["sizes"]["32"]["flops"]["scan"], 0)
        scaling = result["scaling"]["models"]["segresnet"]
        self.assertGreater(scaling["points"]["16"]["median_s"], 0)
        self.assertIsNotNone(scaling["exponent"])
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_outputs(result, tmp, command="python -m scripts.benchmark --test")
            for fname in ("results.json", "table.md", "README.md", "scaling.png"):
                self.assertIn(os.path.join(tmp, fname), paths)
            with open(os.path.join(tmp, "results.json")) as f:
                self.assertEqual(json.load(f)["command"], "python -m scripts.benchmark --test")
            with open(os.path.join(tmp, "README.md")) as f:
                text = f.read()
            self.assertIn("| mambaclinix_demo |", text)
            self.assertIn(result["machine"]["torch"], text)
            self.assertEqual([f for f in os.listdir(tmp) if f.startswith(".")], [])  # no temporary file left

    def test_peak_tensor_mib_counts_allocations_and_frees(self):
        mib = 2**20 // 4  # float32 elements in one MiB

        def work():
            a = torch.empty(2 * mib)
            b = torch.empty(3 * mib)
            del a
            c = torch.empty(1 * mib)  # held: 3 + 1 = 4 MiB, below the earlier 5 MiB
            return b.sum() + c.sum()

        self.assertAlmostEqual(peak_tensor_mib(work), 5.0, delta=0.01)
        self.assertAlmostEqual(peak_tensor_mib(lambda: None), 0.0)

    def test_peak_tensor_mib_without_raw_events(self):
        class NoEvents:  # a profiler whose build exposes no raw events
            profiler = object()

            def __init__(self, *args, **kwargs):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        calls = []
        with mock.patch("torch.profiler.profile", NoEvents), self.assertLogs("scripts.benchmark", "WARNING"):
            self.assertIsNone(peak_tensor_mib(lambda: calls.append(1)))
        self.assertEqual(calls, [1])  # the work itself still ran

    def test_scan_flops_scale_with_tokens(self):
        model = build_model("mambaclinix_demo")
        small, large = count_flops(model, 32), count_flops(model, 64)
        self.assertAlmostEqual(large["scan"] / small["scan"], 8.0, places=6)  # linear in the number of tokens
        self.assertAlmostEqual(large["counted"] / small["counted"], 8.0, delta=0.2)

    def test_fit_exponent(self):
        edges = [32, 64, 128]
        self.assertAlmostEqual(fit_exponent(edges, [2.0 * e**3 for e in edges]), 3.0, places=6)
        self.assertIsNone(fit_exponent([32], [1.0]))

    @parameterized.expand([("mambaclinix_demo+ckpt", "step"), ("mambaclinix_demo+ckptblock", "block"), ("mambaclinix_demo", False)])
    def test_checkpointing_options(self, name, mode):
        self.assertEqual(build_model(name).gradient_checkpointing, mode)

    @parameterized.expand(
        [("swinunetr+bogus",), ("nosuchnet",), ("dynunet+naive",), ("dynunet+ckptblock",), ("mambaclinix+ckpt+ckptblock",)]
    )
    def test_bad_names(self, name):
        with self.assertRaises(ValueError):
            build_model(name)

    def test_divisor(self):
        self.assertEqual(size_divisor("mambaclinix"), 32)
        self.assertEqual(size_divisor("mambaclinix_demo+cl"), 16)

    def test_cuda_request_without_gpu(self):
        if torch.cuda.is_available():
            self.skipTest("a GPU is present")
        with self.assertRaises(ValueError):
            run_benchmark(models=("segresnet",), device="cuda")


class TestBenchAllocator(unittest.TestCase):
    def test_summarize(self):
        runs = {
            "system": [{"forward_s": 2.0, "train_peak_rss_mib": 100.0}, {"forward_s": 4.0, "train_peak_rss_mib": 300.0},
                       {"error": "subprocess failed"}],
            "reuse": [{"forward_s": 1.0, "train_peak_rss_mib": 220.0}],
        }
        out = allocator.summarize(runs)
        self.assertEqual(out["system"], {"forward_s": 3.0, "train_peak_rss_mib": 200.0})  # medians, errors left out
        self.assertAlmostEqual(out["ratio_reuse_to_system"]["forward_s"], 1.0 / 3.0)
        self.assertAlmostEqual(out["ratio_reuse_to_system"]["train_peak_rss_mib"], 1.1)
        self.assertNotIn("ratio_reuse_to_system", allocator.summarize({"system": runs["system"], "reuse": []}))

    def test_run_and_write(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "allocator.json")
            result = allocator.main(
                ["--models", "mambaclinix_demo", "--size", "32", "--train-batch", "1", "--repeats", "1",
                 "--rounds", "1", "--threads", "1", "--json", path]
            )
            with open(path) as f:
                self.assertEqual(json.load(f)["table"], result["table"])
        runs = result["models"]["mambaclinix_demo"]["runs"]
        for setting in ("system", "reuse"):
            self.assertEqual(len(runs[setting]), 1)
            case = runs[setting][0]
            self.assertNotIn("error", case)
            for key in ("forward_s", "train_s", "train_peak_rss_mib"):
                self.assertGreater(case[key], 0)
        self.assertIn("| mambaclinix_demo | reuse / system |", result["table"])

    @parameterized.expand([(["--models", "nosuchnet"],), (["--rounds", "0"],), (["--size", "0"],)])
    def test_bad_arguments(self, argv):
        with self.assertRaises(ValueError):
            allocator.main(argv)


if __name__ == "__main__":
    unittest.main()
