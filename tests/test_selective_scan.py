# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Selective scan backends against an independent float64 step-by-step reference written here."""

from __future__ import annotations

import importlib
import math
import os
import unittest
from unittest import mock

import torch
import torch.nn.functional as F
from parameterized import parameterized
from torch.utils._python_dispatch import TorchDispatchMode

from scripts.networks.selective_scan import ENV_VAR, selective_scan

# the package re-exports the function under the module's name, so fetch the module itself for patching
SS = importlib.import_module("scripts.networks.selective_scan")


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Float64 recurrence, one time step at a time, one state vector per channel (grouped B/C by channel index)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, d, length = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    group_of_channel = torch.arange(d) // (d // B.shape[1])
    B_ch, C_ch = B[:, group_of_channel], C[:, group_of_channel]  # (batch, d, n, length)
    if delta_bias is not None:
        delta = delta + delta_bias.double()[None, :, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(-delta.abs())) + delta.clamp(min=0)  # softplus written out
    h = torch.zeros(batch, d, A.shape[1], dtype=torch.float64)
    outputs = []
    for t in range(length):
        step = delta[:, :, t].unsqueeze(-1)
        h = torch.exp(step * A) * h + step * B_ch[..., t] * u[:, :, t].unsqueeze(-1)
        y_t = torch.einsum("bdn,bdn->bd", h, C_ch[..., t])
        if D is not None:
            y_t = y_t + D.double() * u[:, :, t]
        outputs.append(y_t)
    y = torch.stack(outputs, dim=-1)
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y


def make_inputs(batch, d, n, length, groups, with_d, with_z, with_bias, seed=0, strong_decay=False):
    gen = torch.Generator().manual_seed(seed)
    bc_shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    inputs = {
        "u": torch.randn(batch, d, length, generator=gen),
        "delta": torch.rand(batch, d, length, generator=gen) * 0.5,
        "A": -torch.rand(d, n, generator=gen) * 2.0 - 0.05,
        "B": torch.randn(*bc_shape, generator=gen),
        "C": torch.randn(*bc_shape, generator=gen),
        "D": torch.randn(d, generator=gen) if with_d else None,
        "z": torch.randn(batch, d, length, generator=gen) if with_z else None,
        "delta_bias": torch.randn(d, generator=gen) * 0.5 if with_bias else None,
    }
    if strong_decay:
        inputs["A"] = torch.full((d, n), -50.0)
        inputs["delta"] = 5.0 + torch.rand(batch, d, length, generator=gen)
    return inputs


class _ComputeOpCounter(TorchDispatchMode):
    """Counts the ATen ops that compute or write (views are not counted)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable or not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# batch, d, n, length, groups (None: ungrouped B/C), D, z, delta_bias, delta_softplus, backend, chunk_size
CASES = [
    (2, 4, 3, 1, None, True, True, True, True, "chunked", 4),  # L = 1
    (1, 6, 4, 13, None, True, False, False, False, "chunked", 4),  # L not a multiple of the chunk
    (2, 4, 3, 40, None, False, True, True, True, "chunked", 8),  # several chunks
    (1, 5, 2, 17, None, True, True, False, True, "chunked", 6),  # odd d
    (2, 6, 3, 21, 2, True, True, True, True, "chunked", 4),  # grouped B/C
    (1, 6, 3, 12, 3, False, False, True, False, "chunked", 5),  # grouped, no D/z, bias without softplus
    (1, 4, 3, 9, None, False, False, False, False, "chunked", None),  # default chunk size (one chunk)
    (2, 6, 3, 11, 2, True, True, True, True, "naive", None),
    (1, 5, 2, 7, None, False, False, False, False, "naive", None),
]


class TestSelectiveScan(unittest.TestCase):
    def _check(self, inputs, backend, chunk_size, softplus, tol=1e-4):
        ref_in = {k: None if v is None else v.double().requires_grad_(True) for k, v in inputs.items()}
        our_in = {k: None if v is None else v.clone().requires_grad_(True) for k, v in inputs.items()}
        y_ref = reference_scan(**ref_in, delta_softplus=softplus)
        y = selective_scan(**our_in, delta_softplus=softplus, backend=backend, chunk_size=chunk_size)
        self.assertEqual(y.shape, y_ref.shape)
        self.assertEqual(y.dtype, torch.float32)
        self.assertTrue(torch.isfinite(y).all())
        self.assertLess(rel_err(y, y_ref), tol)
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (y_ref * weight).sum().backward()
        (y * weight.float()).sum().backward()
        for name, ref_t in ref_in.items():
            if ref_t is None:
                continue
            grad = our_in[name].grad
            self.assertIsNotNone(grad, name)
            self.assertTrue(torch.isfinite(grad).all(), name)
            self.assertLess(rel_err(grad, ref_t.grad), tol, f"gradient of {name}")

    @parameterized.expand(CASES)
    def test_values_and_gradients(self, batch, d, n, length, groups, with_d, with_z, with_bias, softplus, *backend):
        inputs = make_inputs(batch, d, n, length, groups, with_d, with_z, with_bias)
        self._check(inputs, backend[0], backend[1], softplus)

    def test_backward_in_several_groups(self):
        # a tiny state budget forces one chunk per backward group
        inputs = make_inputs(2, 4, 3, 23, 2, True, True, True)
        with mock.patch.object(SS, "BACKWARD_STATE_BUDGET", 1):
            self._check(inputs, "chunked", 5, True)

    @parameterized.expand([("chunked", 8), ("naive", None)])
    def test_strong_decay_is_finite(self, backend, chunk):
        # delta * A ~ -250 per step: exp(-cumsum(delta * A)) would overflow float32 inside a chunk
        inputs = make_inputs(1, 4, 3, 40, None, True, True, False, strong_decay=True)
        self._check(inputs, backend, chunk, False)

    def test_gradcheck_float64(self):
        inputs = make_inputs(1, 4, 2, 11, 2, True, True, True)
        args = [inputs[k].double().requires_grad_(True) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

        def fn(u, delta, A, B, C, D, z, delta_bias):
            return selective_scan(u, delta, A, B, C, D, z, delta_bias, True, backend="chunked", chunk_size=3)

        self.assertTrue(torch.autograd.gradcheck(fn, args))

    def test_bf16_input_gives_bf16_output_computed_in_float32(self):
        inputs = make_inputs(1, 4, 3, 19, None, True, True, True)
        bf16 = {k: None if v is None else v.bfloat16() for k, v in inputs.items()}
        y = selective_scan(**bf16, delta_softplus=True, chunk_size=4)
        self.assertEqual(y.dtype, torch.bfloat16)
        upcast = {k: None if v is None else v.float() for k, v in bf16.items()}
        expected = selective_scan(**upcast, delta_softplus=True, chunk_size=4).bfloat16()
        torch.testing.assert_close(y, expected, rtol=0, atol=0)

    def test_autocast_is_disabled_inside(self):
        inputs = make_inputs(1, 4, 3, 19, None, True, True, True)
        expected = selective_scan(**inputs, delta_softplus=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = selective_scan(**inputs, delta_softplus=True)
        self.assertEqual(y.dtype, torch.float32)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)

    def test_backend_from_env_var_and_argument(self):
        inputs = make_inputs(1, 4, 2, 5, None, False, False, False)
        with mock.patch.object(SS, "_scan_naive", wraps=SS._scan_naive) as naive, mock.patch.object(
            SS, "_scan_chunked", wraps=SS._scan_chunked
        ) as chunked:
            with mock.patch.dict(os.environ, {ENV_VAR: "naive"}):
                selective_scan(**inputs)
                self.assertEqual((naive.call_count, chunked.call_count), (1, 0))
                selective_scan(**inputs, backend="chunked")  # the argument wins over the variable
                self.assertEqual((naive.call_count, chunked.call_count), (1, 1))
            with mock.patch.dict(os.environ, {ENV_VAR: ""}):
                selective_scan(**inputs)  # automatic on CPU: chunked
                self.assertEqual((naive.call_count, chunked.call_count), (1, 2))

    def test_backend_is_logged_once(self):
        inputs = make_inputs(1, 4, 2, 5, None, False, False, False)
        with mock.patch.object(SS, "_LOGGED_BACKENDS", set()):
            with self.assertLogs(SS.logger, level="INFO") as logs:
                selective_scan(**inputs, backend="naive")
                selective_scan(**inputs, backend="naive")
                SS.logger.info("end")
        self.assertEqual(sum("'naive'" in line for line in logs.output), 1)

    @parameterized.expand([("arg", "fast", None), ("env", None, "fast"), ("cuda_on_cpu", "cuda", None)])
    def test_bad_backend_raises(self, _, backend, env):
        inputs = make_inputs(1, 4, 2, 5, None, False, False, False)
        with mock.patch.dict(os.environ, {ENV_VAR: env or ""}):
            with self.assertRaises(ValueError):
                selective_scan(**inputs, backend=backend)

    @parameterized.expand(
        [
            ("u_2d", {"u": torch.zeros(4, 5)}),
            ("delta_shape", {"delta": torch.zeros(1, 4, 6)}),
            ("A_channels", {"A": -torch.ones(3, 2)}),
            ("B_state", {"B": torch.zeros(1, 3, 5)}),
            ("C_length", {"C": torch.zeros(1, 2, 4)}),
            ("groups_not_dividing", {"B": torch.zeros(1, 3, 2, 5), "C": torch.zeros(1, 3, 2, 5)}),
            ("groups_differ", {"B": torch.zeros(1, 2, 2, 5), "C": torch.zeros(1, 4, 2, 5)}),
            ("D_shape", {"D": torch.zeros(5)}),
            ("z_shape", {"z": torch.zeros(1, 4, 4)}),
            ("bias_shape", {"delta_bias": torch.zeros(4, 1)}),
            ("integer_u", {"u": torch.zeros(1, 4, 5, dtype=torch.int64)}),
            ("chunk_size", {"chunk_size": 0}),
        ]
    )
    def test_ill_arguments_raise(self, _, override):
        inputs = make_inputs(1, 4, 2, 5, None, False, False, False)
        inputs.update(override)
        with self.assertRaises(ValueError):
            selective_scan(**inputs)

    @parameterized.expand([(64,), (1024,), (4096,)])
    def test_operations_grow_with_the_square_root_of_the_length(self, length):
        # on a machine whose cores are shared, each small multithreaded op waits for the others: the chunked scan
        # must cost O(sqrt(L)) ops (the two recurrences), not O(chunk) ops per step
        inputs = make_inputs(1, 8, 4, length, None, False, False, False)
        with torch.no_grad(), _ComputeOpCounter() as forward:
            selective_scan(**inputs, backend="chunked")
        leaves = {k: v.requires_grad_(True) for k, v in inputs.items() if v is not None}
        with _ComputeOpCounter() as training:
            selective_scan(**leaves, backend="chunked").sum().backward()
        root = math.sqrt(length)
        self.assertLess(forward.count, 3 * root + 40)
        self.assertLess(training.count, 8 * root + 120)

    def test_softplus_matches_torch(self):
        # guards the reference's written-out softplus against torch's
        x = torch.linspace(-30, 30, 101, dtype=torch.float64)
        torch.testing.assert_close(torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0), F.softplus(x))


if __name__ == "__main__":
    unittest.main()
