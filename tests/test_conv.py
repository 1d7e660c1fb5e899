# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the oneDNN-dispatching convolutions: same results, gradients and state dict as ``nn.ConvNd``."""

from __future__ import annotations

import unittest

import torch
import torch.nn as nn
from parameterized import parameterized
from torch.utils.flop_counter import FlopCounterMode

from scripts.networks.conv import OneDNNConv2d, OneDNNConv3d, _bf16_depth2_weight_grad, _use_onednn, conv_layer

CASES = []
for dims in (2, 3):
    for in_ch, out_ch, kernel, stride, groups in (
        (1, 4, 3, 1, 1),  # the stem of a 1-channel image
        (8, 8, 3, 2, 1),  # strided down-sampling
        (6, 6, 5, 1, 6),  # depthwise
        (8, 3, 1, 1, 1),  # 1x1 head
    ):
        for batch in (1, 2):
            for channels_last in (False, True):
                CASES.append((dims, in_ch, out_ch, kernel, stride, groups, batch, channels_last))


class TestOneDNNConv(unittest.TestCase):
    @parameterized.expand(CASES)
    def test_matches_torch_conv(self, dims, in_ch, out_ch, kernel, stride, groups, batch, channels_last):
        torch.manual_seed(0)
        ref_cls = nn.Conv3d if dims == 3 else nn.Conv2d
        ref = ref_cls(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups)
        conv = conv_layer(dims)(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups)
        self.assertEqual(list(conv.state_dict()), list(ref.state_dict()))
        conv.load_state_dict(ref.state_dict())
        x = torch.randn(batch, in_ch, *(9,) * dims)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)
        x_ref, x_new = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_ref, y = ref(x_ref), conv(x_new)
        self.assertEqual(y.shape, y_ref.shape)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        weight = torch.randn_like(y_ref)
        grads_ref = torch.autograd.grad((y_ref * weight).sum(), [x_ref, ref.weight, ref.bias])
        grads = torch.autograd.grad((y * weight).sum(), [x_new, conv.weight, conv.bias])
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)

    def test_dispatch_rule(self):
        conv = OneDNNConv3d(4, 4, 3, padding=1)
        x = torch.randn(1, 4, 8, 8, 8)
        expected = torch.backends.mkldnn.is_available()
        self.assertEqual(_use_onednn(conv, x), expected)
        self.assertFalse(_use_onednn(conv, torch.randn(2, 4, 8, 8, 8)))  # PyTorch already uses oneDNN there
        self.assertFalse(_use_onednn(conv, x.double()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            self.assertFalse(_use_onednn(conv, x))  # autocast casts inside F.conv3d: keep PyTorch's path
        reflect = OneDNNConv3d(4, 4, 3, padding=1, padding_mode="reflect")
        self.assertFalse(_use_onednn(reflect, x))
        same = OneDNNConv2d(4, 4, 3, padding="same")
        self.assertFalse(_use_onednn(same, torch.randn(1, 4, 8, 8)))
        with FlopCounterMode(display=False) as counter:  # a dispatch mode sees the standard convolution op
            self.assertFalse(_use_onednn(conv, x))
            conv(x)
        self.assertEqual(counter.get_total_flops(), 2 * 27 * 4 * 4 * 8**3)

    def test_trace_uses_standard_op(self):
        conv = OneDNNConv3d(2, 3, 3, padding=1).eval()
        x = torch.randn(1, 2, 6, 6, 6)
        with torch.no_grad():
            traced = torch.jit.trace(conv, x)
            torch.testing.assert_close(traced(x), conv(x), atol=1e-5, rtol=1e-5)
        self.assertNotIn("mkldnn_convolution", str(traced.graph))

    def test_bad_spatial_dims(self):
        with self.assertRaisesRegex(ValueError, "spatial_dims must be 2 or 3"):
            conv_layer(1)


BF16_CASES = [
    (shape, batch, mode)
    for shape in ((2, 2, 2), (2, 8, 8), (4, 4, 4))  # depth 2 (oneDNN's faulty case) and a control
    for batch in (1, 2)
    for mode in ("autocast", "bf16_tensors")
]


class TestBFloat16DepthTwo(unittest.TestCase):
    """bfloat16 3D convolutions on depth-2 inputs: oneDNN's weight gradient is wrong there (see scripts/networks/conv.py)."""

    @parameterized.expand(BF16_CASES)
    def test_gradients_match_float64(self, shape, batch, mode):
        torch.manual_seed(0)
        conv = OneDNNConv3d(32, 32, 3, padding=1)
        x = torch.randn(batch, 32, *shape).bfloat16()
        w = torch.randn(batch, 32, *shape).bfloat16()
        # the reference: the same bfloat16-rounded values, float64 maths
        weight64 = conv.weight.detach().bfloat16().double().requires_grad_(True)
        x64 = x.double().requires_grad_(True)
        y64 = torch.nn.functional.conv3d(x64, weight64, conv.bias.detach().bfloat16().double(), padding=1)
        ref = [y64, *torch.autograd.grad((y64 * w.double()).sum(), [x64, weight64])]
        if mode == "bf16_tensors":
            conv = conv.bfloat16()
        x_in = x.float().requires_grad_(True) if mode == "autocast" else x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            y = conv(x_in)
        self.assertEqual(y.dtype, torch.bfloat16)
        got = [y, *torch.autograd.grad((y * w).sum(), [x_in, conv.weight])]
        for name, g, r in zip(("output", "input gradient", "weight gradient"), got, ref):
            error = ((g.double() - r).abs().max() / r.abs().max()).item()
            self.assertLess(error, 2e-2, f"{name}: relative error {error:.3g}")

    def test_guard_rule(self):
        conv = OneDNNConv3d(4, 4, 3, padding=1)
        depth2 = torch.randn(1, 4, 2, 8, 8)
        self.assertFalse(_bf16_depth2_weight_grad(depth2, conv.weight))  # float32: oneDNN is right
        self.assertTrue(_bf16_depth2_weight_grad(depth2.bfloat16(), conv.weight))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            self.assertTrue(_bf16_depth2_weight_grad(depth2, conv.weight))
            self.assertFalse(_bf16_depth2_weight_grad(torch.randn(1, 4, 3, 8, 8), conv.weight))
            self.assertFalse(_bf16_depth2_weight_grad(torch.randn(1, 4, 8, 8), conv.weight))  # 2D
            with torch.no_grad():  # no weight gradient: bfloat16 stays
                self.assertFalse(_bf16_depth2_weight_grad(depth2, conv.weight))


if __name__ == "__main__":
    unittest.main()
