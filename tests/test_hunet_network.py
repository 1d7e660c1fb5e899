# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tests of scripts.networks.mamba_hunet (shapes, gradients, SS2D against a per-direction reference, errors, trace)."""

from __future__ import annotations

import io
import unittest

import torch
import torch.nn.functional as F
from parameterized import parameterized

from scripts.networks.mamba_hunet import SS2D, MambaHUNet, VSSBlock, cross_merge, cross_scan

TINY = {"embed_dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "d_state": 4}

SHAPE_CASES = [
    [{"img_size": 32, "patch_size": 4, **TINY}, (2, 1, 32, 32), 2],
    [{"img_size": 64, "patch_size": 4, "in_channels": 2, "out_channels": 3, **TINY}, (1, 2, 64, 64), 3],
    [
        {"img_size": 32, "patch_size": 2, "embed_dims": (8, 16, 32), "depths": (1, 2, 1), "d_state": 4},
        (1, 1, 32, 32),
        2,
    ],
    [
        {"img_size": (16, 48), "patch_size": 1, "embed_dims": (8, 16), "depths": (1, 1), "hierarchical": False},
        (2, 1, 16, 48),
        2,
    ],
    [
        {"img_size": 48, "patch_size": 3, "embed_dims": (8, 12, 16), "depths": (0, 1, 1), "depths_decoder": (2, 0)},
        (1, 1, 48, 48),
        2,
    ],
    [
        {
            "img_size": 32,
            "drop_rate": 0.2,
            "drop_path_rate": 0.2,
            "norm": "instance",
            "act": ("leakyrelu", {"negative_slope": 0.1}),
            **TINY,
        },
        (2, 1, 32, 32),
        2,
    ],
]

BAD_ARGS = [
    [{"img_size": 30, **TINY}],  # not divisible by 4 * 2**3
    [{"img_size": 32, "patch_size": 0, **TINY}],
    [{"img_size": 32, "embed_dims": (8,), "depths": (1,)}],
    [{"img_size": 32, "embed_dims": (8, 16), "depths": (1,)}],
    [{"img_size": 32, **TINY, "depths_decoder": (1, 1)}],
    [{"img_size": 32, **TINY, "d_conv": 4}],
    [{"img_size": 32, **TINY, "drop_rate": 1.0}],
    [{"img_size": 32, "in_channels": 0, **TINY}],
]


def ref_scan_1d(u, delta, a, b, c, d, delta_bias):
    """Plain recurrence of one direction: u, delta (B, D, L); a (D, N); b, c (B, N, L); d, delta_bias (D,)."""
    delta = F.softplus(delta + delta_bias[None, :, None])
    state = u.new_zeros(u.shape[0], u.shape[1], a.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        da = torch.exp(delta[:, :, t, None] * a[None])
        state = da * state + (delta[:, :, t] * u[:, :, t])[..., None] * b[:, None, :, t]
        ys.append((state * c[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1) + u * d[None, :, None]


def ref_ss2d(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D computed direction by direction on explicitly flipped / transposed sequences."""
    bsz, h, w, _ = x.shape
    xz = m.in_proj(x)
    xi, z = xz.chunk(2, dim=-1)
    xi = m.act(m.conv2d(xi.permute(0, 3, 1, 2)))  # (B, D, H, W)
    dd, n, r = m.d_inner, m.d_state, m.dt_rank
    a = -torch.exp(m.A_logs).reshape(4, dd, n)
    ds, bias = m.Ds.reshape(4, dd), m.dt_projs_bias
    row_major = xi.reshape(bsz, dd, h * w)
    col_major = xi.permute(0, 1, 3, 2).reshape(bsz, dd, w * h)
    seqs = [row_major, col_major, torch.flip(row_major, [-1]), torch.flip(col_major, [-1])]
    total = torch.zeros_like(row_major)
    for k, seq in enumerate(seqs):
        proj = torch.einsum("cd,bdl->bcl", m.x_proj_weight[k], seq)
        dt = torch.einsum("dr,brl->bdl", m.dt_projs_weight[k], proj[:, :r])
        y = ref_scan_1d(seq, dt, a[k], proj[:, r : r + n], proj[:, r + n :], ds[k], bias[k])
        if k >= 2:
            y = torch.flip(y, [-1])
        if k % 2 == 1:  # column-major back to row-major
            y = y.reshape(bsz, dd, w, h).permute(0, 1, 3, 2).reshape(bsz, dd, h * w)
        total = total + y
    out = m.out_norm(total.permute(0, 2, 1).reshape(bsz, h, w, dd)) * F.silu(z)
    return m.out_proj(out)


class TestCrossScan(unittest.TestCase):
    def test_order_and_inverse(self):
        x = torch.arange(6.0).reshape(1, 1, 2, 3)
        xs = cross_scan(x)
        self.assertEqual(xs[0, 0, 0].tolist(), [0, 1, 2, 3, 4, 5])
        self.assertEqual(xs[0, 1, 0].tolist(), [0, 3, 1, 4, 2, 5])
        self.assertEqual(xs[0, 2, 0].tolist(), [5, 4, 3, 2, 1, 0])
        self.assertEqual(xs[0, 3, 0].tolist(), [5, 2, 4, 1, 3, 0])
        torch.testing.assert_close(cross_merge(xs, 2, 3), 4 * x.flatten(2))


class TestSS2D(unittest.TestCase):
    @parameterized.expand([[(2, 3, 5, 6), 4, 3], [(1, 4, 4, 8), 2, 5], [(1, 1, 7, 4), 3, 1]])
    def test_against_per_direction_reference(self, shape, d_state, d_conv):
        torch.manual_seed(0)
        bsz, h, w, c = shape
        m = SS2D(c, d_state=d_state, d_conv=d_conv, dt_rank=2).double().eval()
        x = torch.randn(bsz, h, w, c, dtype=torch.double)
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref_ss2d(m, x), rtol=1e-5, atol=1e-6)

    def test_vss_block_residual(self):
        blk = VSSBlock(6, d_state=3).eval()
        x = torch.randn(2, 4, 4, 6)
        with torch.no_grad():
            torch.testing.assert_close(blk(x), x + blk.mixer(blk.norm(x)))

    def test_initialisation(self):
        """Time steps, A and D initialised as in Mamba (scripts.networks.initialization), one set per direction."""
        m = SS2D(24, d_state=5, dt_rank=3, dt_min=0.01, dt_max=0.05, dt_init_floor=0.02)
        dt = F.softplus(m.dt_projs_bias.detach())
        self.assertEqual(tuple(dt.shape), (4, m.d_inner))
        self.assertGreaterEqual(dt.min().item(), 0.02 * (1 - 1e-4))  # the floor
        self.assertLessEqual(dt.max().item(), 0.05 * (1 + 1e-4))
        self.assertLessEqual(m.dt_projs_weight.abs().max().item(), 3**-0.5)
        torch.testing.assert_close(m.A_logs.detach(), torch.log(torch.arange(1.0, 6.0)).repeat(4 * m.d_inner, 1))
        torch.testing.assert_close(m.Ds.detach(), torch.ones(4 * m.d_inner))
        self.assertTrue(m.A_logs._no_weight_decay and m.Ds._no_weight_decay and m.dt_projs_bias._no_reinit)

    @parameterized.expand(
        [[{"d_model": 0}], [{"d_model": 4, "d_conv": 2}], [{"d_model": 4, "dt_min": 0.2, "dt_max": 0.1}]]
    )
    def test_bad_args(self, kw):
        with self.assertRaises(ValueError):
            SS2D(**kw)


class TestMambaHUNet(unittest.TestCase):
    @parameterized.expand(SHAPE_CASES)
    def test_shape(self, kw, in_shape, out_ch):
        torch.manual_seed(0)
        net = MambaHUNet(**kw).eval()
        with torch.no_grad():
            out = net(torch.randn(*in_shape))
        self.assertEqual(tuple(out.shape), (in_shape[0], out_ch, *in_shape[2:]))
        self.assertTrue(torch.isfinite(out).all())

    def test_gradients_reach_every_parameter(self):
        torch.manual_seed(0)
        net = MambaHUNet(img_size=64, **TINY).train()  # 2x2 tokens at the bottleneck, so A acts there too
        out = net(torch.randn(2, 1, 64, 64))
        F.cross_entropy(out, torch.randint(0, 2, (2, 64, 64))).backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        self.assertEqual(missing, [])
        zero = [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]
        self.assertEqual(zero, [])

    def test_no_weight_decay_tags(self):
        net = MambaHUNet(img_size=32, **TINY)
        tagged = [n for n, p in net.named_parameters() if getattr(p, "_no_weight_decay", False)]
        self.assertEqual(len(tagged), 2 * sum(TINY["depths"]) + 2 * 3)  # A_logs and Ds of encoder + decoder blocks

    @parameterized.expand(BAD_ARGS)
    def test_ill_arguments(self, kw):
        with self.assertRaises(ValueError):
            MambaHUNet(**kw)

    @parameterized.expand([[(1, 1, 40, 32)], [(1, 2, 32, 32)], [(1, 32, 32)]])
    def test_bad_input(self, shape):
        net = MambaHUNet(img_size=32, **TINY).eval()
        with self.assertRaises(ValueError):
            net(torch.randn(*shape))

    def test_trace(self):
        torch.manual_seed(0)
        net = MambaHUNet(img_size=32, **TINY).eval()
        x = torch.randn(1, 1, 32, 32)
        with torch.no_grad():
            traced = torch.jit.trace(net, x, check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
            buf.seek(0)
            loaded = torch.jit.load(buf)
            torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    unittest.main()
