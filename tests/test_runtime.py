# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""scripts/runtime.py: the glibc allocator setting, checked in fresh subprocesses (it holds for a whole process)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import unittest
from unittest import mock

from parameterized import parameterized

import scripts.runtime as runtime
from scripts.benchmark.machine import describe_machine, summarize_machine
from tests.utils import ROOT, env_with_root

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# allocate, touch and free 256 MiB in one block; report the RSS the process keeps afterwards
PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from scripts.runtime import reuse_freed_cpu_memory

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(float(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))

    calls = [reuse_freed_cpu_memory(bool(int(a))) for a in sys.argv[1:]]
    base = rss_mib()
    x = torch.ones(64 * 2**20)
    total = float(x.sum())
    del x
    kept = rss_mib() - base - 256.0
    y = torch.full((64 * 2**20,), 2.0)
    print(json.dumps({"calls": calls, "kept_mib": kept, "sum": total, "sum2": float(y.sum())}))
    """
)


def _probe(*calls: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, calls)],
        capture_output=True, text=True, cwd=ROOT, env=env_with_root(), check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@unittest.skipUnless(GLIBC, "reuse_freed_cpu_memory acts on glibc's malloc only")
class TestReuseFreedCpuMemory(unittest.TestCase):
    @parameterized.expand(
        [
            ("system", (), [], False),
            ("disabled", (0,), [False], False),
            ("reuse", (1,), [True], True),
            ("idempotent", (1, 1), [True, True], True),
            ("disable_after_enable_keeps_it", (1, 0), [True, True], True),
        ]
    )
    def test_effect(self, _, calls, expected_returns, kept):
        out = _probe(*calls)
        self.assertEqual(out["calls"], expected_returns)
        self.assertEqual(out["sum"], 64 * 2**20)  # results do not depend on the allocator
        self.assertEqual(out["sum2"], 2.0 * 64 * 2**20)
        if kept:  # the freed 256 MiB block stays with the process
            self.assertGreater(out["kept_mib"], -32.0)
        else:  # the system allocator unmapped it
            self.assertLess(out["kept_mib"], -200.0)


class TestNonGlibc(unittest.TestCase):
    def test_no_libc_is_a_no_op(self):
        from unittest import mock

        import scripts.runtime as runtime

        with mock.patch.object(runtime, "_glibc", return_value=None), mock.patch.object(runtime, "_applied", False):
            self.assertFalse(runtime.reuse_freed_cpu_memory())
            self.assertFalse(runtime._applied)


class TestOpenMPWaitPolicy(unittest.TestCase):
    @parameterized.expand(
        [
            ("unset", {}, "default"),
            ("passive", {"OMP_WAIT_POLICY": "PASSIVE"}, "passive"),
            ("lower_case", {"OMP_WAIT_POLICY": "passive"}, "passive"),
            ("active_spaced", {"OMP_WAIT_POLICY": " Active "}, "active"),
            ("unknown", {"OMP_WAIT_POLICY": "spin"}, "default"),
            ("empty", {"OMP_WAIT_POLICY": ""}, "default"),
        ]
    )
    def test_policy(self, _, environ, expected):
        self.assertEqual(runtime.openmp_wait_policy(environ), expected)

    @parameterized.expand(
        [
            ("spinning_busy", {}, 5.0, 2, True),
            ("active_busy", {"OMP_WAIT_POLICY": "ACTIVE"}, 2.5, 2, True),
            ("passive_busy", runtime.SHARED_CPU_ENVIRONMENT, 9.0, 2, False),
            ("spinning_at_core_count", {}, 2.0, 2, False),
            ("spinning_many_cores", {}, 5.0, 16, False),
        ]
    )
    def test_warning(self, _, environ, load, cores, warns):
        with mock.patch.object(runtime, "_warned_spinning", False):
            if warns:
                with self.assertLogs("scripts.runtime", "WARNING") as logs:
                    self.assertTrue(runtime.check_openmp_wait_policy(environ, load, cores))
                self.assertIn("OMP_WAIT_POLICY=PASSIVE", logs.output[0])
                self.assertIn(f"{load:.1f} on {cores} CPUs", logs.output[0])
            else:
                with self.assertNoLogs("scripts.runtime", "WARNING"):
                    self.assertFalse(runtime.check_openmp_wait_policy(environ, load, cores))

    def test_warns_once_per_process(self):
        with mock.patch.object(runtime, "_warned_spinning", False), \
                self.assertLogs("scripts.runtime", "WARNING") as logs:
            self.assertTrue(runtime.check_openmp_wait_policy({}, 8.0, 2))
            self.assertFalse(runtime.check_openmp_wait_policy({}, 8.0, 2))
        self.assertEqual(len(logs.output), 1)

    def test_no_load_average_no_check(self):
        with mock.patch.object(runtime, "_warned_spinning", False), \
                mock.patch.object(runtime.os, "getloadavg", side_effect=OSError("no load average")):
            self.assertFalse(runtime.check_openmp_wait_policy({}, None, 2))

    @parameterized.expand([("zero", 0), ("negative", -2)])
    def test_ill_cores(self, _, cores):
        with self.assertRaisesRegex(ValueError, "cores must be positive"):
            runtime.check_openmp_wait_policy({}, 1.0, cores)

    def test_machine_description_records_it(self):
        with mock.patch.dict(os.environ, runtime.SHARED_CPU_ENVIRONMENT):
            info = describe_machine("cpu", 2)
        self.assertEqual(info["openmp_wait_policy"], "passive")
        self.assertIn("(OMP_WAIT_POLICY passive)", summarize_machine(info))
        unrecorded = {k: v for k, v in info.items() if k != "openmp_wait_policy"}
        self.assertNotIn("OMP_WAIT_POLICY", summarize_machine(unrecorded))


def _libgomp_settings_under_make(environ: dict[str, str], *make_args: str) -> str:
    """What torch's OpenMP runtime reports (``OMP_DISPLAY_ENV=VERBOSE``) in a Python started by a recipe of the
    Makefile."""
    recipe = 'omp-probe: ; @OMP_DISPLAY_ENV=VERBOSE "$(PROBE_PY)" -c "import torch; torch.ones(4096).sum()"'
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", f"PROBE_PY={sys.executable}", *make_args, "--eval", recipe, "omp-probe"],
        capture_output=True, text=True, cwd=ROOT, env=environ, timeout=300,
    )
    if proc.returncode != 0:
        raise AssertionError(f"make failed: {proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


@unittest.skipUnless(shutil.which("make") and GLIBC, "needs GNU make and torch's libgomp")
class TestMakeTargetsEnvironment(unittest.TestCase):
    """What the make targets start Python with, as libgomp itself reports it: its spin count while waiting
    (``GOMP_SPINCOUNT``, 0 when threads sleep at once)."""

    def _spin_count(self, *make_args: str, **extra: str) -> int:
        env = {k: v for k, v in env_with_root().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MAKEFLAGS")}
        report = _libgomp_settings_under_make(env | extra, *make_args)
        match = re.search(r"GOMP_SPINCOUNT = '(\d+)'", report)
        if match is None:
            self.skipTest("this OpenMP runtime does not display its spin count")
        self.assertNotIn("Invalid value", report)
        return int(match.group(1))

    def test_passive_by_default(self):
        self.assertEqual(runtime.SHARED_CPU_ENVIRONMENT["OMP_WAIT_POLICY"], "PASSIVE")
        self.assertEqual(self._spin_count(), 0)

    @parameterized.expand(
        [
            ("environment_active", (), {"OMP_WAIT_POLICY": "ACTIVE"}),
            ("command_line_default", ("OMP_WAIT_POLICY=default",), {}),
            ("environment_default", (), {"OMP_WAIT_POLICY": "default"}),
        ]
    )
    def test_users_setting_kept(self, _, make_args, extra):
        self.assertGreater(self._spin_count(*make_args, **extra), 0)

if __name__ == "__main__":
    unittest.main()
