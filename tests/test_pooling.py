# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the layout-keeping stride pooling: same values and gradients as ``avg_pool``, channels-last kept."""

from __future__ import annotations

import unittest

import numpy as np
import torch
import torch.nn.functional as F
from parameterized import parameterized

from scripts.networks.pooling import StrideAvgPool, _channels_last_3d, stride_avg_pool

CASES = []
for stride in ((2, 2, 2), (1, 2, 2), (2, 1, 1), (2, 1, 2), (3, 2, 1), (1, 1, 1)):
    for shape in ((1, 4, 12, 8, 6), (2, 3, 6, 4, 8), (1, 1, 6, 6, 6)):
        for channels_last in (False, True):
            CASES.append((stride, shape, channels_last))
ODD_CASES = [((2, 2, 2), (1, 4, 7, 8, 8)), ((2, 2, 2), (1, 4, 8, 5, 9)), ((1, 2, 2), (2, 3, 3, 5, 4))]


def _numpy_pool(x: np.ndarray, stride) -> np.ndarray:
    """Window means in float64, written independently of torch (sizes divisible by the stride)."""
    n, c, d, h, w = x.shape
    sd, sh, sw = stride
    return x.reshape(n, c, d // sd, sd, h // sh, sh, w // sw, sw).mean(axis=(3, 5, 7))


class TestStrideAvgPool(unittest.TestCase):
    @parameterized.expand(CASES)
    def test_values_gradients_layout(self, stride, shape, channels_last):
        torch.manual_seed(0)
        x = torch.randn(shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x_new, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y = StrideAvgPool(3, stride)(x_new)
        y_ref = F.avg_pool3d(x_ref, stride, stride, ceil_mode=True)
        self.assertEqual(y.shape, y_ref.shape)
        torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(y.detach().double().numpy(), _numpy_pool(x.double().numpy(), stride), atol=1e-6)
        if channels_last and x.shape[1] > 1:
            self.assertTrue(_channels_last_3d(y), "a channels-last input must give a channels-last output")
        weight = torch.randn_like(y_ref)
        (g,) = torch.autograd.grad((y * weight).sum(), [x_new])
        (g_ref,) = torch.autograd.grad((y_ref * weight).sum(), [x_ref])
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-6)

    @parameterized.expand(ODD_CASES)
    def test_sizes_not_divisible_use_ceil_mode(self, stride, shape):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(stride_avg_pool(x, stride), F.avg_pool3d(x, stride, stride, ceil_mode=True))

    @parameterized.expand([((2, 2, 2),), ((1, 2, 2),), ((2, 1, 1),)])
    def test_channel_slice_of_channels_last(self, stride):
        """A channel slice of a channels-last map (what a concatenation's backward hands on) pools in its layout."""
        whole = torch.randn(2, 7, 6, 4, 8).contiguous(memory_format=torch.channels_last_3d)
        x = whole[:, 2:5]
        self.assertTrue(_channels_last_3d(x))
        self.assertFalse(_channels_last_3d(whole.transpose(3, 4)))
        y = stride_avg_pool(x, stride)
        torch.testing.assert_close(y, F.avg_pool3d(x.contiguous(), stride, stride, ceil_mode=True), atol=1e-6, rtol=1e-6)
        self.assertTrue(y.is_contiguous(memory_format=torch.channels_last_3d))

    def test_2d(self):
        x = torch.randn(2, 3, 8, 6).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(StrideAvgPool(2, 2)(x), F.avg_pool2d(x, 2, 2, ceil_mode=True))
        odd = x[..., :5]
        torch.testing.assert_close(StrideAvgPool(2, (1, 2))(odd), F.avg_pool2d(odd, (1, 2), (1, 2), ceil_mode=True))

    def test_no_parameters_and_repr(self):
        pool = StrideAvgPool(3, 2)
        self.assertEqual(len(pool.state_dict()), 0)
        self.assertIn("stride=(2, 2, 2)", repr(pool))

    @parameterized.expand(
        [
            (lambda: StrideAvgPool(1, 2),),
            (lambda: StrideAvgPool(3, (2, 2)),),
            (lambda: StrideAvgPool(3, 0),),
            (lambda: StrideAvgPool(3, 2)(torch.zeros(1, 1, 4, 4)),),
            (lambda: stride_avg_pool(torch.zeros(4, 4), (2,)),),
            (lambda: stride_avg_pool(torch.zeros(1, 1, 4, 4), (2, 2, 2)),),
        ]
    )
    def test_ill_arguments(self, make):
        with self.assertRaises(ValueError):
            make()


if __name__ == "__main__":
    unittest.main()
