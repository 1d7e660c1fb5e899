# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Mamba block: mamba-ssm parameter layout and initialisation, slow-path parity, autograd, autocast and tracing."""

from __future__ import annotations

import importlib
import io
import math
import unittest
import warnings
from unittest import mock

import torch
import torch.nn.functional as F
from parameterized import parameterized

from scripts.networks.mamba import Mamba

SS = importlib.import_module("scripts.networks.selective_scan")

# constructor kwargs, expected state_dict {name: shape} as in mamba_ssm.modules.mamba_simple.Mamba
STATE_DICT_CASES = [
    (
        {"d_model": 16, "d_state": 8},
        {
            "A_log": (32, 8),
            "D": (32,),
            "in_proj.weight": (64, 16),
            "conv1d.weight": (32, 1, 4),
            "conv1d.bias": (32,),
            "x_proj.weight": (1 + 16, 32),
            "dt_proj.weight": (32, 1),
            "dt_proj.bias": (32,),
            "out_proj.weight": (16, 32),
        },
    ),
    (
        {"d_model": 20, "d_state": 4, "d_conv": 3, "expand": 3, "dt_rank": 5, "bias": True, "conv_bias": False},
        {
            "A_log": (60, 4),
            "D": (60,),
            "in_proj.weight": (120, 20),
            "in_proj.bias": (120,),
            "conv1d.weight": (60, 1, 3),
            "x_proj.weight": (5 + 8, 60),
            "dt_proj.weight": (60, 5),
            "dt_proj.bias": (60,),
            "out_proj.weight": (20, 60),
            "out_proj.bias": (20,),
        },
    ),
    (
        {"d_model": 40},
        {
            "A_log": (80, 16),
            "D": (80,),
            "in_proj.weight": (160, 40),
            "conv1d.weight": (80, 1, 4),
            "conv1d.bias": (80,),
            "x_proj.weight": (3 + 32, 80),  # dt_rank auto = ceil(40 / 16) = 3
            "dt_proj.weight": (80, 3),
            "dt_proj.bias": (80,),
            "out_proj.weight": (40, 80),
        },
    ),
]


def slow_mamba(module: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Independent float64 forward of the mamba-ssm slow path on the module's weights."""
    w = {k: v.detach().double() for k, v in module.state_dict().items()}
    x = x.double()
    d_inner, n, r, k_conv = module.d_inner, module.d_state, module.dt_rank, module.d_conv
    length = x.shape[1]
    xz = x @ w["in_proj.weight"].T + w.get("in_proj.bias", 0.0)
    xs, z = xz[..., :d_inner], xz[..., d_inner:]  # (b, l, d_inner)
    padded = F.pad(xs, (0, 0, k_conv - 1, 0))  # causal: k_conv - 1 zeros before the first step
    conv = sum(padded[:, j : j + length] * w["conv1d.weight"][:, 0, j] for j in range(k_conv))
    xs = F.silu(conv + w.get("conv1d.bias", 0.0))
    x_dbl = xs @ w["x_proj.weight"].T
    dt = F.softplus(x_dbl[..., :r] @ w["dt_proj.weight"].T + w["dt_proj.bias"])
    b_mat, c_mat = x_dbl[..., r : r + n], x_dbl[..., r + n :]
    A = -torch.exp(w["A_log"])
    h = torch.zeros(x.shape[0], d_inner, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * xs[:, t])[..., None] * b_mat[:, t, None, :]
        ys.append((h * c_mat[:, t, None, :]).sum(-1) + w["D"] * xs[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ w["out_proj.weight"].T + w.get("out_proj.bias", 0.0)


class TestMamba(unittest.TestCase):
    @parameterized.expand(STATE_DICT_CASES)
    def test_state_dict_layout(self, kwargs, expected):
        module = Mamba(**kwargs)
        self.assertEqual({k: tuple(v.shape) for k, v in module.state_dict().items()}, expected)
        clone = Mamba(**kwargs)
        clone.load_state_dict(module.state_dict())  # strict round trip
        x = torch.randn(2, 5, kwargs["d_model"])
        torch.testing.assert_close(clone(x), module(x))

    @parameterized.expand([(0.001, 0.1, 1.0, "random"), (0.01, 0.05, 2.0, "constant")])
    def test_initialisation(self, dt_min, dt_max, dt_scale, dt_init):
        module = Mamba(24, d_state=6, dt_min=dt_min, dt_max=dt_max, dt_scale=dt_scale, dt_init=dt_init)
        expected_a = torch.log(torch.arange(1, 7, dtype=torch.float32)).repeat(48, 1)
        torch.testing.assert_close(module.A_log.detach(), expected_a)
        torch.testing.assert_close(module.D.detach(), torch.ones(48))
        dt = F.softplus(module.dt_proj.bias.detach())
        self.assertGreaterEqual(dt.min().item(), dt_min * (1 - 1e-4))
        self.assertLessEqual(dt.max().item(), dt_max * (1 + 1e-4))
        std = module.dt_rank**-0.5 * dt_scale
        weights = module.dt_proj.weight.detach()
        if dt_init == "constant":
            torch.testing.assert_close(weights, torch.full_like(weights, std))
        else:
            self.assertLessEqual(weights.abs().max().item(), std)
        self.assertTrue(module.A_log._no_weight_decay and module.D._no_weight_decay)
        self.assertTrue(module.dt_proj.bias._no_reinit)
        self.assertEqual(module.dt_rank, math.ceil(24 / 16))

    @parameterized.expand(
        [({"d_model": 16, "d_state": 8}, 13), ({"d_model": 12, "d_state": 4, "d_conv": 2, "bias": True}, 1)]
    )
    def test_matches_slow_path(self, kwargs, length):
        torch.manual_seed(0)
        module = Mamba(**kwargs).eval()
        with torch.no_grad():  # non-trivial D and biases so that every term is exercised
            module.D.uniform_(-1, 1)
            for p in module.parameters():
                if p.dim() == 1 and p is not module.D and p is not module.dt_proj.bias:
                    p.normal_()
        x = torch.randn(2, length, kwargs["d_model"])
        out = module(x)
        expected = slow_mamba(module, x)
        self.assertEqual(out.shape, x.shape)
        err = ((out.double() - expected).norm() / expected.norm()).item()
        self.assertLess(err, 1e-4)

    def test_backward(self):
        module = Mamba(16, d_state=4)
        x = torch.randn(2, 9, 16, requires_grad=True)
        module(x).square().mean().backward()
        for name, p in list(module.named_parameters()) + [("input", x)]:
            self.assertIsNotNone(p.grad, name)
            self.assertTrue(torch.isfinite(p.grad).all(), name)
            self.assertGreater(p.grad.abs().sum().item(), 0.0, name)

    def test_bf16_autocast_keeps_scan_float32(self):
        torch.manual_seed(0)
        module = Mamba(16, d_state=4)
        x = torch.randn(2, 9, 16)
        seen = []

        def spy(*args, **kwargs):
            seen.append(([a.dtype for a in args[:5]], torch.is_autocast_enabled("cpu")))
            return real(*args, **kwargs)

        real = SS._scan_chunked
        with mock.patch.object(SS, "_scan_chunked", side_effect=spy):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x)
                out.float().sum().backward()
        self.assertEqual(out.dtype, torch.bfloat16)
        self.assertEqual(seen, [([torch.float32] * 5, False)])
        reference = module(x)
        self.assertLess(((out.float() - reference).norm() / reference.norm()).item(), 5e-2)
        self.assertTrue(all(torch.isfinite(p.grad).all() for p in module.parameters()))

    def test_trace(self):
        module = Mamba(16, d_state=4).eval()
        x = torch.randn(2, 10, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, x)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), module(x))

    @parameterized.expand(
        [
            ("d_model", {"d_model": 0}),
            ("d_state", {"d_model": 8, "d_state": 0}),
            ("dt_init", {"d_model": 8, "dt_init": "xavier"}),
            ("dt_range", {"d_model": 8, "dt_min": 0.2, "dt_max": 0.1}),
            ("dt_rank", {"d_model": 8, "dt_rank": 0}),
        ]
    )
    def test_ill_arguments(self, _, kwargs):
        with self.assertRaises(ValueError):
            Mamba(**kwargs)

    def test_ill_input(self):
        with self.assertRaises(ValueError):
            Mamba(8)(torch.zeros(2, 5, 7))


if __name__ == "__main__":
    unittest.main()
