# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""scripts/runtime.py: the glibc allocator setting, checked in fresh subprocesses (it holds for a whole process)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
import unittest

from parameterized import parameterized

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


if __name__ == "__main__":
    unittest.main()
