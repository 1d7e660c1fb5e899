# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Smoke tests of the :mod:`scripts.benchmark` package on toy sizes (the benchmarks themselves are run with
``python -m scripts.benchmark``, ``python -m scripts.benchmark.allocator`` and ``python -m scripts.benchmark.scan``)."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import shutil
import statistics
import sys
import tempfile
import textwrap
import unittest
from unittest import mock

import numpy as np
import torch
from parameterized import parameterized

import scripts.benchmark
from scripts.benchmark import allocator, probes
from scripts.benchmark.models import DEFAULT_FEATURES, DEFAULT_STRIDES, build_model, size_divisor
from scripts.benchmark.peers import AUTHORS_MODULE_ENV, authors_unavailable
from scripts.benchmark.probes import count_flops, peak_tensor_mib
from scripts.benchmark.report import markdown_table, write_outputs
from scripts.benchmark.rounds import rotated, round_ratios, run_rounds, spread
from scripts.benchmark.runners import fit_exponent, flop_figures, measure_machine_peaks, run_benchmark

FAKE_AUTHORS = textwrap.dedent(
    """
    import torch.nn as nn

    CALLS = []


    class MambaClinix(nn.Module):
        # the authors' constructor signature (mambaclinix/nnunetv2/nets/MambaClinix_3d.py); a one-conv network
        def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                     n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias=False, norm_op=None,
                     norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                     deep_supervision=False, block=None, bottleneck_channels=None, stem_channels=None):
            super().__init__()
            CALLS.append({"input_channels": input_channels, "n_stages": n_stages,
                          "features_per_stage": features_per_stage, "conv_op": conv_op, "kernel_sizes": kernel_sizes,
                          "strides": strides, "n_conv_per_stage": list(n_conv_per_stage), "num_classes": num_classes,
                          "deep_supervision": deep_supervision, "norm_op": norm_op, "conv_bias": conv_bias})
            print("MambaLayer: input_dim: 320")  # the authors' layers print while they are built
            self.conv = conv_op(input_channels, num_classes, 3, padding=1, bias=conv_bias)

        def forward(self, x):
            return self.conv(x)
    """
)


class FakeAuthors:
    """A stand-in for the authors' installed code: a module with their constructor, importable here and in the
    benchmark's subprocesses (``PYTHONPATH`` and :data:`AUTHORS_MODULE_ENV` set while the context is open)."""

    module = "fake_authors_mambaclinix"

    def __enter__(self):
        self.tmp = tempfile.TemporaryDirectory()
        with open(os.path.join(self.tmp.name, self.module + ".py"), "w") as f:
            f.write(FAKE_AUTHORS)
        path = os.pathsep.join(filter(None, [self.tmp.name, os.environ.get("PYTHONPATH")]))
        self.patches = [
            mock.patch.dict(os.environ, {AUTHORS_MODULE_ENV: self.module, "PYTHONPATH": path}),
            mock.patch.object(sys, "path", [self.tmp.name, *sys.path]),
        ]
        for p in self.patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in reversed(self.patches):
            p.stop()
        sys.modules.pop(self.module, None)
        self.tmp.cleanup()
        return False


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
        names = ("mambaclinix_demo", "authors")  # the authors' network: a stand-in with their constructor
        with FakeAuthors(), mock.patch("scripts.benchmark.runners.load_1min", return_value=0.0):  # a quiet machine
            result = run_benchmark(
                models=names, sizes=(32,), rounds=3, warmup=1, threads=1, train_sizes=(32,), train_batch=1,
                memory=True, memory_sizes=(32,), sliding=True, sliding_volume=48, sliding_roi=32,
                scaling_sizes=(32, 64), scaling_models=("authors",),
                max_call_s=60.0, conv_scale=0.25, matmul_n=256, reference="mambaclinix_demo",
            )
            params_mib = {n: sum(p.numel() for p in build_model(n).parameters()) * 4 / 2**20 for n in names}
        self.assertGreater(result["peaks"]["matmul_gflops"], 0)
        self.assertGreater(result["peaks"]["conv3d_gflops"], 0)
        self.assertNotIn("refused", result["peaks"])
        self.assertEqual(result["settings"]["allocator"], "reuse")  # the bundle's default
        self.assertEqual(result["unavailable"], {})
        for name in names:
            m = result["models"][name]
            self.assertGreater(m["params"], 0)
            e = m["sizes"]["32"]
            self.assertGreater(e["flops"]["counted"], 0)
            self.assertGreaterEqual(e["flops"]["total"], e["flops"]["counted"])
            for key in ("forward", "train"):
                t = e[key]
                self.assertEqual(len(t["warmup_s"]), 1)
                # one timed call per round, in the rotated order: round r starts at model r mod 2
                self.assertEqual([(c["round"], c["position"]) for c in t["measurements"]],
                                 [(r, (names.index(name) - r) % 2) for r in range(3)])
                for c in t["measurements"]:
                    self.assertGreater(c["wall_s"], 0)
                    self.assertGreater(c["cpu_s"], 0)
                    self.assertGreaterEqual(c["load_1min"], 0)
                self.assertAlmostEqual(t["median_s"], statistics.median(c["wall_s"] for c in t["measurements"]))
                self.assertLessEqual(t["min_s"], t["median_s"])
                self.assertLessEqual(t["median_s"], t["max_s"])
            self.assertGreater(e["forward"]["gflops_per_s"], 0)
            self.assertGreater(e["forward"]["flop_proportional_s"], 0)
            self.assertGreater(e["memory"]["train_peak_mib"], 0)
            # a toy step may reuse what the warm-up step freed, so its growth can be ~0, never below the baseline
            self.assertGreaterEqual(e["memory"]["train_peak_mib"], e["memory"]["train_baseline_mib"])
            # tensor accounting: at least the step's gradients (float32 parameters) are allocated during the step
            self.assertGreater(e["memory"]["train_tensor_peak_mib"], params_mib[name])
            self.assertGreater(e["memory"]["forward_tensor_peak_mib"], 0)
            self.assertGreater(m["worker_peak_rss_mib"], 0)  # the timing process's memory, recorded
        # per-round ratios of the reference to the authors' network, against the recorded calls
        for mode in ("forward", "train"):
            calls = {n: result["models"][n]["sizes"]["32"][mode]["measurements"] for n in names}
            expected = [a["wall_s"] / b["wall_s"] for a, b in zip(calls["mambaclinix_demo"], calls["authors"])]
            ratio = result["ratios"][mode]["32"]["authors"]
            np.testing.assert_allclose(ratio["per_round"], expected, rtol=1e-12)
            self.assertAlmostEqual(ratio["median"], statistics.median(expected))
            self.assertEqual((ratio["min"], ratio["max"], ratio["n"]), (min(expected), max(expected), 3))
        sliding = result["sliding_window"]
        self.assertEqual((sliding["volume"], sliding["roi"]), ([1, 1, 48, 48, 48], 32))
        for name in names:  # one round, no warm-up (the forward rounds warmed the models up)
            self.assertEqual(sliding["results"][name]["warmup_s"], [])
            self.assertGreater(sliding["results"][name]["median_s"], 0)
        # the analytic scan count is added for the Mamba stages only
        self.assertGreater(result["models"]["mambaclinix_demo"]["sizes"]["32"]["flops"]["scan"], 0)
        self.assertEqual(result["models"]["authors"]["sizes"]["32"]["flops"]["scan"], 0)
        scaling = result["scaling"]["models"]["authors"]
        self.assertIs(scaling["points"]["32"], result["models"]["authors"]["sizes"]["32"]["forward"])  # reused
        self.assertGreater(scaling["points"]["64"]["median_s"], 0)
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
            self.assertIn("Allocator of the timings: reuse (the bundle's default", text)
            self.assertIn("- Peak RSS of the timing processes (they ran side by side): mambaclinix_demo ", text)
            r = result["ratios"]["forward"]["32"]["authors"]
            self.assertIn(f"| forward 32^3 | authors | {r['median']:.2f} | {r['q1']:.2f}-{r['q3']:.2f} "
                          f"| {r['min']:.2f}-{r['max']:.2f} | 3 |", text)
            self.assertNotIn("WARNING", text)
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

    @parameterized.expand([("mambaclinix_demo+ckpt", "step"), ("mambaclinix_demo+ckptblock", "block"),
                           ("mambaclinix_demo+ckptfirst", "first_level"), ("mambaclinix_demo+ckptnone", False),
                           ("mambaclinix_demo", "light")])
    def test_checkpointing_options(self, name, mode):
        self.assertEqual(build_model(name).gradient_checkpointing, mode)

    @parameterized.expand(
        [("swinunetr+bogus",), ("nosuchnet",), ("dynunet+naive",), ("dynunet+ckptblock",), ("mambaclinix+ckpt+ckptblock",),
         ("mambaclinix+ckptblock+ckptfirst",), ("mambaclinix+ckptnone+ckpt",), ("dynunet+ckptnone",)]
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

    @parameterized.expand([({"allocator": "jemalloc"},), ({"rounds": 0},), ({"models": ("nosuchnet",)},),
                           ({"reference": "nosuchnet"},), ({"modes": ("backward",)},)])
    def test_bad_arguments(self, kwargs):
        with self.assertRaises(ValueError):
            run_benchmark(**{"models": ("segresnet",), "peaks": False, "memory": False, "sliding": False, **kwargs})

    @parameterized.expand([("reuse", True, "reuse (the bundle's default"), ("system", False, "system (glibc malloc's defaults; a variant, NOT"),
                           ("reuse", False, "requested but NOT in effect")])
    def test_allocator_named_in_readme(self, setting, in_effect, words):
        result = {
            "machine": {"date": "today", "torch": "t", "monai": "m", "python": "p", "cores": 2},
            "settings": {"train_batch": 1, "sizes": [32], "rounds": 5, "warmup": 1, "threads": 1,
                         "allocator": setting, "reuse_in_effect": in_effect},
            "models": {},
        }
        with tempfile.TemporaryDirectory() as tmp:
            write_outputs(result, tmp, plots=False)
            with open(os.path.join(tmp, "README.md")) as f:
                line = next(x for x in f if x.startswith("- Allocator of the timings: "))
        self.assertTrue(line.startswith(f"- Allocator of the timings: {setting} ("), line)
        self.assertIn(words, line)


class TestRounds(unittest.TestCase):
    @parameterized.expand([(n, r) for n in (1, 2, 3, 5) for r in range(7)])
    def test_rotated(self, n, r):
        names = [f"m{i}" for i in range(n)]
        order = rotated(names, r)
        # model i stands at position (i - r) mod n: every model once per round, each round shifted by one
        self.assertEqual(order, [names[(p + r) % n] for p in range(n)])
        self.assertEqual(sorted(order), names)

    @parameterized.expand([([3.0],), ([2.0, 1.0],), ([5.0, 1.0, 4.0, 2.0, 3.0],), ([0.3, 0.1, 0.9, 0.5, 0.7, 0.2],)])
    def test_spread(self, values):
        out = spread(values)
        q1, q3 = np.percentile(values, [25, 75])  # numpy's default (linear) is the inclusive method
        self.assertAlmostEqual(out["median"], float(np.median(values)))
        self.assertAlmostEqual(out["q1"], q1)
        self.assertAlmostEqual(out["q3"], q3)
        self.assertEqual((out["min"], out["max"], out["n"]), (min(values), max(values), len(values)))

    def test_spread_empty(self):
        with self.assertRaises(ValueError):
            spread([])

    @staticmethod
    def fake_calls(times):
        """A ``call`` returning the next of ``times[name]`` (wall) and half of it (CPU), and the log of calls."""
        log, left = [], {n: list(t) for n, t in times.items()}

        def call(name):
            log.append(name)
            t = left[name].pop(0)
            if isinstance(t, Exception):
                raise t
            return t, t / 2

        return call, log

    def test_order_warmup_and_ratios(self):
        times = {"a": [9.0, 1.0, 2.0, 3.0, 4.0], "b": [9.0, 2.0, 2.0, 2.0, 2.0], "c": [9.0, 9.0, 4.0, 8.0, 1.0, 2.0]}
        call, log = self.fake_calls(times)
        loads = iter(range(100))
        out = run_rounds(["a", "b", "c"], call, rounds=4, warmup=1, compiled=["c"], load=lambda: float(next(loads)))
        warm = ["a", "b", "c", "c"]  # a compiled model gets one more warm-up call
        self.assertEqual(log, warm + ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"])
        self.assertEqual(out["c"]["warmup_s"], [9.0, 9.0])
        self.assertEqual([m["wall_s"] for m in out["a"]["measurements"]], [1.0, 2.0, 3.0, 4.0])
        self.assertEqual([m["position"] for m in out["a"]["measurements"]], [0, 2, 1, 0])
        self.assertEqual([m["load_1min"] for m in out["a"]["measurements"]], [0.0, 5.0, 7.0, 9.0])
        self.assertEqual((out["a"]["median_s"], out["a"]["min_s"], out["a"]["max_s"]), (2.5, 1.0, 4.0))
        self.assertEqual(out["a"]["cpu_median_s"], 1.25)
        ratios = round_ratios(out, "a")
        self.assertEqual(ratios["b"]["per_round"], [0.5, 1.0, 1.5, 2.0])
        self.assertEqual(ratios["c"]["per_round"], [0.25, 0.25, 3.0, 2.0])
        self.assertEqual((ratios["c"]["median"], ratios["c"]["min"], ratios["c"]["max"]), (1.125, 0.25, 3.0))
        self.assertEqual(ratios["b"]["cpu_median"], 1.25)
        self.assertEqual(round_ratios(out, "nosuchmodel"), {})

    def test_skips_and_failures(self):
        times = {
            "slow": [50.0],  # its warm-up exceeds max_call_s
            "broken": [RuntimeError("out of memory")],  # its warm-up fails
            "late": [1.0, 1.0, 50.0, 1.0],  # too slow in round 2: no round 3
            "dies": [1.0, 1.0, ValueError("worker gone"), 1.0],  # fails in round 2
            "ok": [1.0, 1.0, 1.0, 1.0],
            "never": [],  # predicted too slow: never called
        }
        call, log = self.fake_calls(times)
        with self.assertLogs("scripts.benchmark", "WARNING"):
            out = run_rounds(list(times), call, rounds=3, warmup=1, max_call_s=10.0, predicted={"never": 11.0})
        self.assertIn("warm-up call took 50 s", out["slow"]["skipped"])
        self.assertEqual(out["broken"]["error"], "RuntimeError: out of memory")
        self.assertIn("round 2 took 50 s", out["late"]["skipped"])
        self.assertEqual(len(out["late"]["measurements"]), 2)  # the slow call is kept, the next round dropped
        self.assertEqual(out["dies"]["error"], "ValueError: worker gone")
        self.assertEqual([m["round"] for m in out["dies"]["measurements"]], [0])
        self.assertEqual(len(out["ok"]["measurements"]), 3)
        self.assertIn("predicted 11 s", out["never"]["skipped"])
        self.assertNotIn("never", log)
        # ratios only over the rounds both models ran
        self.assertEqual(round_ratios(out, "ok")["dies"]["n"], 1)

    @parameterized.expand([(0, 1), (1, -1)])
    def test_bad_rounds(self, rounds, warmup):
        with self.assertRaises(ValueError):
            run_rounds(["a"], lambda n: (1.0, 1.0), rounds=rounds, warmup=warmup)


class FakePeaksWorker:
    """Stands in for :class:`scripts.benchmark.worker.ModelWorker` in :func:`measure_machine_peaks`."""

    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def ready(self):
        return {"params": 0, "reuse": True, "pid": 0, "openmp_wait_policy": "default"}

    def request(self, op, **kwargs):
        return {"matmul_gflops": 100.0, "matmul_n": 256, "conv3d_gflops": 50.0, "conv3d_cases": [],
                "conv3d_gflops_by_layout": {"channels_first": 40.0, "channels_last": 50.0}}


class TestMachinePeaks(unittest.TestCase):
    @parameterized.expand([("quiet", -1.0, False), ("at the core count", 0.0, False), ("loaded", 0.5, True)])
    def test_refused_above_the_core_count(self, _, excess, refused):
        cores = os.cpu_count()
        with mock.patch("scripts.benchmark.runners.ModelWorker", FakePeaksWorker), \
                mock.patch("scripts.benchmark.runners.load_1min", return_value=cores + excess):
            if refused:
                with self.assertLogs("scripts.benchmark", "WARNING") as logs:
                    peaks = measure_machine_peaks("cpu", 1, "reuse")
                self.assertIn("FLOP-proportional figures refused", logs.output[0])
            else:
                peaks = measure_machine_peaks("cpu", 1, "reuse")
        self.assertEqual("refused" in peaks, refused)
        self.assertEqual(peaks["load_1min_before"], cores + excess)
        timing = {"median_s": 2.0}
        flop_figures(timing, 100e9, peaks)
        self.assertAlmostEqual(timing["gflops_per_s"], 50.0)
        if refused:  # nothing derived from the refused peaks
            self.assertEqual(set(timing), {"median_s", "gflops_per_s"})
        else:  # 100 GFLOP at 50 GFLOP/s: 2 s FLOP-proportional; at 40 (channels-first) 2.5 s
            self.assertAlmostEqual(timing["flop_proportional_s"], 2.0)
            self.assertAlmostEqual(timing["ratio_to_flop_proportional"], 1.0)
            self.assertAlmostEqual(timing["ratio_to_flop_proportional_channels_first"], 0.8)
            self.assertAlmostEqual(timing["fraction_of_matmul_peak"], 0.5)
        result = {
            "settings": {"train_batch": 1, "sizes": [32]}, "peaks": peaks,
            "models": {"m": {"params": 3e6, "sizes": {"32": {"flops": {"total": 1e11, "counted": 1e11, "scan": 0.0},
                                                               "forward": timing}}}},
        }
        table = markdown_table(result)
        self.assertEqual("WARNING: machine peaks not used" in table, refused)
        self.assertEqual("| 1.00 |" in table, not refused)  # the fwd / FLOP-prop. cell


class TestAuthorsPeer(unittest.TestCase):
    def test_absent(self):
        with mock.patch.dict(os.environ, {AUTHORS_MODULE_ENV: "no_such_authors_module"}):
            reason = authors_unavailable()
            self.assertTrue(reason.startswith("the authors' network is not installed"), reason)
            self.assertTrue(reason.endswith("; skipped"), reason)
            self.assertIn("CYB08/MambaClinix-PyTorch", reason)
            with self.assertRaises(ImportError):
                build_model("authors")
            with self.assertLogs("scripts.benchmark", "WARNING") as logs:  # the run goes on without it
                result = run_benchmark(models=("authors",), sizes=(32,), peaks=False, memory=False, sliding=False)
        self.assertEqual(logs.output, [f"WARNING:scripts.benchmark.runners:{reason}"])  # one line
        self.assertEqual(result["unavailable"], {"authors": reason})
        self.assertEqual((result["settings"]["models"], result["models"]), ([], {}))

    def test_built_with_the_default_plan(self):
        with FakeAuthors() as fake:
            self.assertIsNone(authors_unavailable())
            model = build_model("authors")
            calls = sys.modules[fake.module].CALLS
        self.assertEqual(model(torch.zeros(1, 1, 8, 8, 8)).shape, (1, 2, 8, 8, 8))
        self.assertEqual(len(calls), 1)
        n = len(DEFAULT_FEATURES)
        self.assertEqual(calls[0]["features_per_stage"], list(DEFAULT_FEATURES))
        self.assertEqual(calls[0]["strides"], [[s] * 3 for s in DEFAULT_STRIDES])
        self.assertEqual(calls[0]["kernel_sizes"], [[3, 3, 3]] * n)
        self.assertEqual(calls[0]["n_conv_per_stage"], [2] * n)  # what makes their HGCN stages
        self.assertEqual((calls[0]["input_channels"], calls[0]["num_classes"], calls[0]["n_stages"]), (1, 2, n))
        self.assertIs(calls[0]["conv_op"], torch.nn.Conv3d)
        self.assertIs(calls[0]["norm_op"], torch.nn.InstanceNorm3d)
        self.assertTrue(calls[0]["conv_bias"])
        self.assertFalse(calls[0]["deep_supervision"])

    @parameterized.expand([("authors+cf",), ("authors+naive",)])
    def test_bundle_only_options(self, name):
        with self.assertRaises(ValueError):
            build_model(name)


class TestMemoryAfterWarmup(unittest.TestCase):
    def test_each_phase_measured_on_its_second_call(self):
        calls = {"forward": 0, "train": 0}
        at_reset = []

        class FakeWorkload:
            def __init__(self, *args):
                self.optimizer = mock.Mock()

            def forward(self, size):
                return lambda: calls.__setitem__("forward", calls["forward"] + 1)

            def train_step(self, size):
                return lambda: calls.__setitem__("train", calls["train"] + 1)

        def reset():
            at_reset.append(dict(calls))
            return 100.0

        with mock.patch.object(probes, "Workload", FakeWorkload), mock.patch.object(probes, "reset_peak_rss", reset), \
                mock.patch.object(probes, "peak_rss_mib", return_value=150.0):
            out = probes.memory_case("m", 32, 1, torch.device("cpu"))
        # the peak is reset (the baseline taken) after one warm-up call of the phase, never on the first call
        self.assertEqual(at_reset, [{"forward": 1, "train": 0}, {"forward": 3, "train": 1}])
        self.assertEqual((out["forward_delta_mib"], out["train_delta_mib"]), (50.0, 50.0))


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


class TestContention(unittest.TestCase):
    @staticmethod
    def _results(cpu_by_model):
        return {"models": {m: {"params": 1, "sizes": {"64": {
            "flops": {"total": 1.0},
            "forward": {"median_s": 1.0, "measurements": [{"cpu_s": c, "wall_s": c, "load_1min": 3.0} for c in calls]},
        }}} for m, calls in cpu_by_model.items()}}

    def test_summarise(self):
        from scripts.benchmark.contention import summarise

        quiet = self._results({"a": [1.0, 2.0, 3.0], "b": [4.0, 4.0, 4.0], "c": [1.0]})
        loaded = [self._results({"a": [3.0, 4.0], "b": [4.0, 5.0]}), self._results({"a": [5.0], "b": [6.0, 4.0]})]
        rows = {r["model"]: r for r in summarise(quiet, loaded)}
        self.assertEqual(set(rows), {"a", "b"})  # c was not timed under contention
        self.assertEqual(rows["a"]["quiet_cpu"]["median"], 2.0)
        self.assertAlmostEqual(rows["a"]["worst_ratio"], 2.5)
        self.assertEqual(rows["a"]["loaded_cpu"]["median"], 4.0)
        self.assertEqual((rows["a"]["loaded_cpu"]["min"], rows["a"]["loaded_cpu"]["max"], rows["a"]["loaded_cpu"]["n"]),
                         (3.0, 5.0, 3))
        self.assertAlmostEqual(rows["a"]["ratio"], 2.0)
        self.assertAlmostEqual(rows["b"]["ratio"], 1.125)

    def test_render_names_machine_and_wait_policy(self):
        from scripts.benchmark.contention import main

        machine = {"cpu": "Test CPU", "cores": 2, "threads": 2, "device": "cpu", "cpu_flags": ["avx2"],
                   "openmp_wait_policy": "passive"}
        with tempfile.TemporaryDirectory() as tmp:
            for folder, calls in (("quiet", [1.0, 1.0]), ("copy1", [1.2]), ("copy2", [1.4])):
                os.makedirs(os.path.join(tmp, folder))
                results = self._results({"a": calls}) | ({"machine": machine} if folder == "quiet" else {})
                with open(os.path.join(tmp, folder, "results.json"), "w") as f:
                    json.dump(results, f)
            with mock.patch("sys.stdout"):
                self.assertEqual(main(["--out", tmp, "--render-only", "--", "--quick"]), 0)
            with open(os.path.join(tmp, "contention.md")) as f:
                text = f.read()
        self.assertIn("- Machine (the run alone): Test CPU, 2 cores, torch threads 2 (OMP_WAIT_POLICY passive)", text)
        self.assertIn("| a | 64^3 | forward | 1.00 [1.00-1.00] (2) | 1.30 [1.20-1.40] (2) | 1.30 |", text)

    def test_command_line_errors(self):
        from scripts.benchmark.contention import main

        with mock.patch("sys.stderr") as err:
            self.assertEqual(main(["--copies", "1", "--out", "x", "--", "--quick"]), 2)
            self.assertEqual(main(["--copies", "2"]), 2)  # no --out
            with tempfile.TemporaryDirectory() as tmp:
                self.assertEqual(main(["--out", tmp, "--render-only"]), 2)  # nothing to summarise
        self.assertIn("ERROR:", "".join(c.args[0] for c in err.write.call_args_list))


class TestOpenMPWaitOptions(unittest.TestCase):
    @parameterized.expand(
        [
            ("inherits_unset", "mambaclinix_demo", {}, None),
            ("inherits_set", "dynunet", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
            ("passive", "mambaclinix_demo+omppassive", {}, "PASSIVE"),
            ("passive_over_active", "swinunetr+omppassive", {"OMP_WAIT_POLICY": "ACTIVE"}, "PASSIVE"),
            ("spin_removes", "mambaclinix_demo+ompspin", {"OMP_WAIT_POLICY": "PASSIVE"}, None),
            ("peaks_worker", None, {"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE"),
        ]
    )
    def test_worker_env(self, _, name, environ, expected):
        from scripts.benchmark.worker import worker_env

        base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | environ
        with mock.patch.dict(os.environ, base, clear=True):
            env = worker_env(name)
        self.assertEqual(env.get("OMP_WAIT_POLICY"), expected)
        self.assertIn(scripts.benchmark.probes.BUNDLE_ROOT, env["PYTHONPATH"])

    @parameterized.expand([("both", "mambaclinix_demo+omppassive+ompspin"), ("unknown", "mambaclinix_demo+ompsleep")])
    def test_ill_names(self, _, name):
        from scripts.benchmark.worker import worker_env

        with self.assertRaises(ValueError):
            worker_env(name)

    def test_timing_process_runs_with_it(self):
        """The worker process itself reports the policy its OpenMP runtime started with."""
        from scripts.benchmark.worker import ModelWorker

        with mock.patch.dict(os.environ, {"OMP_WAIT_POLICY": "PASSIVE"}):
            workers = {n: ModelWorker(n, "cpu", 1, 1, "system") for n in ("segresnet+ompspin", "segresnet")}
        try:
            self.assertEqual(workers["segresnet+ompspin"].ready()["openmp_wait_policy"], "default")
            self.assertEqual(workers["segresnet"].ready()["openmp_wait_policy"], "passive")
        finally:
            for w in workers.values():
                w.close()


class TestNativeBackwardOption(unittest.TestCase):
    def test_nativebwd_trains_with_pytorchs_backward(self):
        from scripts.benchmark.workload import Workload
        from scripts.networks import cpu_backward

        calls = {}
        for name in ("mambaclinix_demo", "mambaclinix_demo+nativebwd"):
            torch.manual_seed(0)
            work = Workload(name, torch.device("cpu"), train_batch=2)
            with mock.patch.object(cpu_backward, "convolution", wraps=cpu_backward.convolution) as conv:
                loss = work.train_step(16)()
            self.assertTrue(torch.isfinite(loss))
            calls[name] = conv.call_count
        self.assertGreater(calls["mambaclinix_demo"], 0)
        self.assertEqual(calls["mambaclinix_demo+nativebwd"], 0)
