# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the cheaper CPU backward passes (scripts.networks.cpu_backward): values and gradients against float64
references computed by PyTorch's own convolution and group norm, where they take over and where they do not, and a
whole MambaClinix training step against PyTorch's backward."""

from __future__ import annotations

import unittest

import torch
import torch.nn as nn
import torch.nn.functional as F
from parameterized import parameterized
from torch.utils.flop_counter import FlopCounterMode

from scripts.networks import MambaClinix, cpu_backward
from scripts.networks.blocks import InstanceGroupNorm, ResidualBlock, norm_act_conv
from scripts.networks.conv import conv_layer


def _memory_format(dims: int):
    return torch.channels_last_3d if dims == 3 else torch.channels_last


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node reachable from ``t``."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def _gradients_near_reference(test: unittest.TestCase, gen: torch.Generator, ours, reference, native):
    """Backpropagate one random float64 upstream gradient through ``ours``, the float64 ``reference`` and PyTorch's
    float32 ``native`` computation (each ``(output, inputs)``, ``None`` inputs skipped); check that every gradient of
    ours is no further from the reference than PyTorch's own float32 backward, up to float32 rounding of the result.

    Returns:
        ``(ours, reference)`` gradient pairs.
    """
    upstream = torch.randn(reference[0].shape, generator=gen, dtype=torch.float64)

    def grads(out, inputs, grad):
        return torch.autograd.grad(out, [t for t in inputs if t is not None], grad)

    pairs = list(zip(grads(*ours, upstream.float()), grads(*reference, upstream)))
    for (g, g_ref), g_native in zip(pairs, grads(*native, upstream.float())):
        error, native_error = (g.double() - g_ref).abs().max(), (g_native.double() - g_ref).abs().max()
        test.assertLessEqual(error, 2 * native_error + 1e-5 * g_ref.abs().max())
    return pairs


CONV_CASES = []
for dims in (2, 3):
    for in_ch, out_ch, kernel, stride, padding, groups in (
        (1, 4, 3, 1, 1, 1),  # a 1-channel stem
        (4, 6, 3, 2, 1, 1),  # strided down-sampling
        (6, 6, 3, 1, 1, 6),  # depthwise, same padding: input gradient by the flipped-kernel convolution
        (6, 6, 5, 1, 1, 6),  # depthwise, padding below k // 2
        (6, 6, 3, 1, 0, 6),  # depthwise, no padding
        (6, 6, 3, 2, 1, 6),  # depthwise, strided: oneDNN's backward
        (6, 12, 3, 1, 1, 3),  # grouped, not depthwise
        (8, 3, 1, 1, 0, 1),  # 1x1 head
    ):
        for batch in (1, 2):
            for channels_last in (False, True):
                CONV_CASES.append((dims, in_ch, out_ch, kernel, stride, padding, groups, batch, channels_last))


class TestConvolution(unittest.TestCase):
    @parameterized.expand(CONV_CASES)
    def test_values_and_gradients(self, dims, in_ch, out_ch, kernel, stride, padding, groups, batch, channels_last):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, in_ch, *(7,) * dims, generator=gen)
        weight = torch.randn(out_ch, in_ch // groups, *(kernel,) * dims, generator=gen)
        bias = torch.randn(out_ch, generator=gen)
        if channels_last:
            x, weight = (t.contiguous(memory_format=_memory_format(dims)) for t in (x, weight))
        args = ((stride,) * dims, (padding,) * dims, (1,) * dims, groups)
        ins = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        self.assertTrue(cpu_backward.applies(*ins))
        y = cpu_backward.convolution(*ins, *args)
        self.assertIn("_ConvolutionBackward", _grad_fn_names(y))
        refs = [t.double().requires_grad_(True) for t in (x, weight, bias)]
        y_ref = torch.convolution(refs[0], refs[1], refs[2], *args[:3], False, (0,) * dims, groups)
        torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
        upstream = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad(y, ins, upstream.float())
        grads_ref = torch.autograd.grad(y_ref, refs, upstream)
        for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
            self.assertEqual(g.shape, g_ref.shape, name)
            torch.testing.assert_close(g.double(), g_ref, atol=1e-4, rtol=1e-5, msg=name)

    @parameterized.expand([("input only", (True, False, False)), ("weight and bias", (False, True, True))])
    def test_partial_gradients(self, _, needs):
        x, weight, bias = torch.randn(2, 4, 6, 6, 6), torch.randn(4, 1, 3, 3, 3), torch.randn(4)
        ins = [t.requires_grad_(n) for t, n in zip((x, weight, bias), needs)]
        y = cpu_backward.convolution(*ins, (1,) * 3, (1,) * 3, (1,) * 3, 4)
        wanted = [t for t in ins if t.requires_grad]
        grads = torch.autograd.grad(y.square().sum(), wanted)
        refs = [t.detach().double().requires_grad_(t.requires_grad) for t in ins]
        y_ref = F.conv3d(refs[0], refs[1], refs[2], 1, 1, 1, 4)
        grads_ref = torch.autograd.grad(y_ref.square().sum(), [t for t in refs if t.requires_grad])
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g.double(), g_ref, atol=1e-3, rtol=1e-5)

    def test_conv_layers_take_it_only_when_it_applies(self):
        conv = conv_layer(3)(4, 4, 3, padding=1)
        x = torch.randn(2, 4, 6, 6, 6)
        self.assertIn("_ConvolutionBackward", _grad_fn_names(conv(x)))
        with cpu_backward.native_backward():
            self.assertNotIn("_ConvolutionBackward", _grad_fn_names(conv(x)))
        self.assertNotIn("_ConvolutionBackward", _grad_fn_names(conv.double()(x.double())))
        conv.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            self.assertNotIn("_ConvolutionBackward", _grad_fn_names(conv(x)))
        with torch.no_grad():
            self.assertIsNone(conv(x).grad_fn)
        reflect = conv_layer(3)(4, 4, 3, padding=1, padding_mode="reflect")
        self.assertNotIn("_ConvolutionBackward", _grad_fn_names(reflect(x)))
        with FlopCounterMode(display=False) as counter:
            conv(x)
        self.assertGreater(counter.get_total_flops(), 0)  # the counter sees aten.convolution, not our function

    def test_applies(self):
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        self.assertTrue(cpu_backward.applies(x, None))
        self.assertFalse(cpu_backward.applies(x.detach()))  # nothing requires a gradient
        self.assertFalse(cpu_backward.applies(x.double()))
        with torch.no_grad():
            self.assertFalse(cpu_backward.applies(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            self.assertFalse(cpu_backward.applies(x))
        with cpu_backward.native_backward():
            self.assertFalse(cpu_backward.applies(x))
        self.assertTrue(cpu_backward.applies(x))  # switched back on after the block


DEPTHWISE_3D_CASES = [
    # kernel, padding, depth: the weight gradient by 2D planes for every depth offset of the kernel
    ((3, 3, 3), (1, 1, 1), 5),
    ((1, 3, 3), (0, 1, 1), 4),  # one depth offset
    ((3, 1, 1), (1, 0, 0), 6),
    ((3, 3, 1), (2, 1, 0), 4),  # depth padding k - 1: the outer offsets meet one plane at either end
    ((5, 3, 3), (1, 1, 1), 3),  # offsets whose planes fall outside the input on one side
    ((3, 3, 3), (1, 1, 1), 1),  # a depth of one plane: only the middle offset meets it
    ((3, 3, 3), (0, 0, 0), 3),  # no padding: one output plane
]


class TestDepthwise3dWeightGradient(unittest.TestCase):
    @parameterized.expand([(*case, batch, layout) for case in DEPTHWISE_3D_CASES for batch in (1, 2)
                           for layout in ("first", "last", "channel slice")])
    def test_matches_float64_reference(self, kernel, padding, depth, batch, layout):
        gen = torch.Generator().manual_seed(0)
        channels = 5
        x = torch.randn(batch, 2 * channels, depth, 6, 7, generator=gen)
        if layout != "first":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = x[:, channels:] if layout == "channel slice" else x[:, :channels].contiguous(
            memory_format=torch.contiguous_format if layout == "first" else torch.channels_last_3d)
        weight = torch.randn(channels, 1, *kernel, generator=gen)
        args = ((1, 1, 1), padding, (1, 1, 1), channels)
        w = weight.clone().requires_grad_(True)
        y = cpu_backward.convolution(x, w, None, *args)
        upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        (g,) = torch.autograd.grad(y, [w], upstream.float())
        w_ref = weight.double().requires_grad_(True)
        y_ref = torch.convolution(x.double(), w_ref, None, *args[:3], False, (0, 0, 0), channels)
        (g_ref,) = torch.autograd.grad(y_ref, [w_ref], upstream)
        torch.testing.assert_close(g.double(), g_ref, atol=1e-5 * g_ref.abs().max().item(), rtol=1e-5)

    def test_no_3d_weight_gradient_call(self):
        """oneDNN's 3D depthwise weight gradient (its generic grouped kernel) is not called; 2D ones are."""
        x = torch.randn(2, 8, 6, 6, 6).contiguous(memory_format=torch.channels_last_3d)
        w = torch.randn(8, 1, 3, 3, 3, requires_grad=True)
        y = cpu_backward.convolution(x, w, None, (1, 1, 1), (1, 1, 1), (1, 1, 1), 8)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            y.backward(torch.ones_like(y))
        ranks = [len(e.input_shapes[1]) for e in prof.events() if e.name == "aten::convolution_backward"]
        self.assertTrue(ranks)
        self.assertNotIn(5, ranks)


UPSAMPLE_CASES = []
for dims in (2, 3):
    for scale in ((2,) * dims, (1,) + (2,) * (dims - 1), (4,) + (1,) * (dims - 1)):
        for batch in (1, 2):
            UPSAMPLE_CASES.append((dims, scale, batch))


class TestUpsampleNearest(unittest.TestCase):
    @parameterized.expand(UPSAMPLE_CASES)
    def test_values_gradients_layout(self, dims, scale, batch):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, *range(3, 3 + dims), generator=gen).contiguous(memory_format=_memory_format(dims))
        x_in = x.clone().requires_grad_(True)
        y = cpu_backward.upsample_nearest(x_in, scale)
        self.assertIn("_UpsampleNearestBackward", _grad_fn_names(y))
        x_ref = x.double().requires_grad_(True)
        y_ref = F.interpolate(x_ref, scale_factor=[float(s) for s in scale], mode="nearest")
        torch.testing.assert_close(y.double(), y_ref, atol=0, rtol=0)  # the forward copies voxels
        # the upstream gradient as a channel concatenation's backward hands it on: a channel slice, channels-last
        upstream = torch.randn(batch, 7, *y.shape[2:], generator=gen).contiguous(memory_format=_memory_format(dims))
        upstream = upstream[:, 2:5]
        (g,) = torch.autograd.grad(y, [x_in], upstream)
        (g_ref,) = torch.autograd.grad(y_ref, [x_ref], upstream.double())
        torch.testing.assert_close(g.double(), g_ref, atol=1e-6, rtol=1e-6)
        self.assertTrue(g.is_contiguous(memory_format=_memory_format(dims)), "the gradient stays channels-last")

    @parameterized.expand([
        ("channels-first", lambda x: x.contiguous(), (2, 2, 2)),
        ("factor 3", lambda x: x, (3, 1, 1)),
        ("float64", lambda x: x.double(), (2, 2, 2)),
        ("no gradient", lambda x: x.detach(), (2, 2, 2)),
    ])
    def test_falls_back(self, _, prepare, scale):
        x = prepare(torch.randn(2, 3, 4, 3, 5).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True))
        y = cpu_backward.upsample_nearest(x, scale)
        self.assertNotIn("_UpsampleNearestBackward", _grad_fn_names(y) if y.grad_fn else set())
        torch.testing.assert_close(y, F.interpolate(x, scale_factor=[float(s) for s in scale], mode="nearest"))

    @parameterized.expand([("fraction", (1.5, 2, 2)), ("zero", (0, 2, 2)), ("too few", (2, 2)), ("too many", (2,) * 4)])
    def test_ill_argument(self, _, scale):
        with self.assertRaisesRegex(ValueError, "integer factor"):
            cpu_backward.upsample_nearest(torch.randn(1, 2, 4, 4, 4), scale)


NORM_CASES = []
for dims in (2, 3):
    for channels in (3, 16):
        for affine in (True, False):
            for batch in (1, 2):
                NORM_CASES.append((dims, channels, affine, batch, 0.0))
    NORM_CASES.append((dims, 8, True, 2, 40.0))  # a large mean against a unit spread


class TestInstanceNorm(unittest.TestCase):
    @parameterized.expand(NORM_CASES)
    def test_values_and_gradients(self, dims, channels, affine, batch, offset):
        gen = torch.Generator().manual_seed(1)
        x = (torch.randn(batch, channels, *(6,) * dims, generator=gen) + offset).contiguous(
            memory_format=_memory_format(dims)
        )
        weight = torch.rand(channels, generator=gen) + 0.5 if affine else None
        bias = torch.randn(channels, generator=gen) if affine else None
        ins = [t if t is None else t.clone().requires_grad_(True) for t in (x, weight, bias)]
        y = cpu_backward.group_norm_forward(ins[0], channels, ins[1], ins[2], 1e-5)
        self.assertIn("_InstanceNormBackward", _grad_fn_names(y))
        self.assertTrue(cpu_backward.is_channels_last(y))
        refs = [t if t is None else t.double().requires_grad_(True) for t in (x, weight, bias)]
        y_ref = F.group_norm(refs[0], channels, refs[1], refs[2], 1e-5)
        natives = [t if t is None else t.clone().requires_grad_(True) for t in (x, weight, bias)]
        y_native = F.group_norm(natives[0], channels, natives[1], natives[2], 1e-5)  # PyTorch's float32 path
        torch.testing.assert_close(y, y_native)
        for g, g_ref in _gradients_near_reference(self, gen, (y, ins), (y_ref, refs), (y_native, natives)):
            if offset == 0.0:
                torch.testing.assert_close(g.double(), g_ref, atol=1e-4, rtol=1e-4)

    def test_channels_first_upstream_gradient(self):
        x = torch.randn(2, 4, 5, 5, 5).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
        y = cpu_backward.instance_norm(x, None, None, 1e-5)
        upstream = torch.randn(2, 4, 5, 5, 5)  # channels-first, as some upstream nodes hand it over
        (grad,) = torch.autograd.grad(y, [x], upstream)
        x_ref = x.detach().double().requires_grad_(True)
        (grad_ref,) = torch.autograd.grad(F.group_norm(x_ref, 4, eps=1e-5), [x_ref], upstream.double())
        torch.testing.assert_close(grad.double(), grad_ref, atol=1e-5, rtol=1e-5)

    def test_falls_back(self):
        norm = InstanceGroupNorm(4, 4)
        cl = torch.randn(2, 4, 5, 5, 5).contiguous(memory_format=torch.channels_last_3d)
        self.assertIn("_InstanceNormBackward", _grad_fn_names(norm(cl)))
        for x in (cl.contiguous(), torch.randn(2, 1, 5, 5, 5)):  # channels-first; one channel
            self.assertNotIn("_InstanceNormBackward", _grad_fn_names(InstanceGroupNorm(x.shape[1], x.shape[1])(x)))
        self.assertNotIn("_InstanceNormBackward", _grad_fn_names(InstanceGroupNorm(2, 4)(cl)))  # two groups
        with cpu_backward.native_backward():
            self.assertNotIn("_InstanceNormBackward", _grad_fn_names(norm(cl)))

    def test_ill_argument(self):
        with self.assertRaisesRegex(ValueError, "spatial"):
            cpu_backward.instance_norm(torch.randn(2, 3), None, None, 1e-5)


class TestChannelSums(unittest.TestCase):
    @parameterized.expand([(n, chunk) for n in (1, 216, 1000) for chunk in (1, 7, 216, 4096)])
    def test_matches_float64_reference(self, n, chunk):
        gen = torch.Generator().manual_seed(2)
        grad_rows, rows = torch.randn(2, n, 5, generator=gen), torch.randn(2, n, 5, generator=gen) + 3.0
        sum_dy, sum_dy_x = cpu_backward._channel_sums(grad_rows, rows, chunk)
        self.assertEqual((sum_dy.shape, sum_dy_x.shape), ((2, 1, 5), (2, 1, 5)))
        g, r = grad_rows.double(), rows.double()
        torch.testing.assert_close(sum_dy.double(), g.sum(1, keepdim=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sum_dy_x.double(), (g * r).sum(1, keepdim=True), atol=1e-4, rtol=1e-5)

    def test_no_matrix_product_in_norm_backward(self):
        """The instance norm's backward takes its sums by products of matching elements, not a C x C matrix."""
        x = torch.randn(2, 8, 6, 6, 6).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
        y = cpu_backward.instance_norm(x, None, None, 1e-5)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y.backward(torch.ones_like(y))
        names = {e.name for e in prof.events()}
        self.assertIn("aten::mul", names)
        self.assertFalse(names & {"aten::bmm", "aten::mm", "aten::matmul"})

    def test_ill_argument(self):
        with self.assertRaisesRegex(ValueError, "chunk"):
            cpu_backward._channel_sums(torch.randn(1, 4, 2), torch.randn(1, 4, 2), 0)


NORM_ACT_CONV_CASES = []
for dims in (2, 3):
    for slope, affine, out_ch, stride, groups, batch in (
        (0.01, True, 6, 1, 1, 2),  # the residual blocks' LeakyReLU
        (0.0, True, 6, 1, 1, 1),  # ReLU
        (0.2, False, 5, 2, 1, 2),  # strided, a norm without affine parameters
        (0.01, True, 4, 1, 4, 1),  # depthwise: input gradient by the flipped-kernel convolution
    ):
        NORM_ACT_CONV_CASES.append((dims, slope, affine, out_ch, stride, groups, batch))


class TestNormActConvolution(unittest.TestCase):
    @parameterized.expand(NORM_ACT_CONV_CASES)
    def test_values_and_gradients(self, dims, slope, affine, out_ch, stride, groups, batch):
        channels = 4
        gen = torch.Generator().manual_seed(3)
        x = (torch.randn(batch, channels, *(7,) * dims, generator=gen) * 2 + 0.5).contiguous(
            memory_format=_memory_format(dims)
        )
        norm_w = torch.rand(channels, generator=gen) + 0.5 if affine else None
        norm_b = torch.randn(channels, generator=gen) if affine else None
        weight = torch.randn(out_ch, channels // groups, *(3,) * dims, generator=gen) * 0.3
        bias = torch.randn(out_ch, generator=gen)
        conf = ([stride] * dims, [1] * dims, [1] * dims, groups)

        def three_steps(t, nw, nb, w, b):  # the norm, the activation and the convolution one after the other
            return torch.convolution(F.leaky_relu(F.group_norm(t, channels, nw, nb, 1e-5), slope), w, b, conf[0],
                                     conf[1], conf[2], False, [0] * dims, groups)

        tensors = (x, norm_w, norm_b, weight, bias)
        ins = [t if t is None else t.clone().requires_grad_(True) for t in tensors]
        y = cpu_backward.norm_act_convolution(ins[0], ins[1], ins[2], 1e-5, slope, ins[3], ins[4], *conf)
        self.assertIn("_NormActConvolutionBackward", _grad_fn_names(y))
        refs = [t if t is None else t.double().requires_grad_(True) for t in tensors]
        natives = [t if t is None else t.clone().requires_grad_(True) for t in tensors]
        y_ref, y_native = three_steps(*refs), three_steps(*natives)
        torch.testing.assert_close(y, y_native, atol=1e-5, rtol=1e-5)
        for g, g_ref in _gradients_near_reference(self, gen, (y, ins), (y_ref, refs), (y_native, natives)):
            torch.testing.assert_close(g.double(), g_ref, atol=1e-4 * g_ref.abs().max(), rtol=1e-4)

    @parameterized.expand([(1, 8, 8), (2, 4, 8)])
    def test_residual_block_keeps_one_map_less(self, stride, in_ch, out_ch):
        """A residual block in a CPU training step keeps its first convolution's output, not its activation: one
        ``out_ch`` map less than with PyTorch's backward, and the same outputs and gradients."""
        torch.manual_seed(0)
        block = ResidualBlock(3, in_ch, out_ch, 3, stride).train()
        x = torch.randn(2, in_ch, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)

        def run():
            storages = {}

            def pack(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = block(x)
            grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum(),
                                        [x, *block.parameters()])
            return y, grads, sum(storages.values()), _grad_fn_names(y)

        y, grads, kept, names = run()
        with cpu_backward.native_backward():
            y_native, grads_native, kept_native, names_native = run()
        self.assertIn("_NormActConvolutionBackward", names)
        self.assertNotIn("_NormActConvolutionBackward", names_native)
        one_map = 2 * out_ch * (8 // stride) ** 3 * 4  # batch 2, float32
        self.assertLessEqual(one_map - (kept_native - kept), 4 * out_ch)  # what it saves besides: the norm's bias
        torch.testing.assert_close(y, y_native)
        scale = max(g.abs().max().item() for g in grads_native)
        for g, g_native in zip(grads, grads_native):
            torch.testing.assert_close(g, g_native, atol=1e-5 * scale, rtol=1e-4)

    def test_falls_back(self):
        conv, norm = conv_layer(3)(4, 4, 3, padding=1), InstanceGroupNorm(4, 4)
        cl = torch.randn(2, 4, 5, 5, 5).contiguous(memory_format=torch.channels_last_3d)
        self.assertIn("_NormActConvolutionBackward", _grad_fn_names(norm_act_conv(norm, nn.LeakyReLU(), conv, cl)))
        self.assertIn("_NormActConvolutionBackward", _grad_fn_names(norm_act_conv(norm, nn.ReLU(), conv, cl)))
        cases = [
            (norm, nn.LeakyReLU(), conv, cl.contiguous()),  # channels-first
            (norm, nn.GELU(), conv, cl),  # not a (leaky) ReLU
            (norm, nn.LeakyReLU(-0.1), conv, cl),  # a negative slope cannot be recomputed from the output
            (InstanceGroupNorm(2, 4), nn.LeakyReLU(), conv, cl),  # two groups
            (norm, nn.LeakyReLU(), nn.Conv3d(4, 4, 3, padding=1), cl),  # not one of the bundle's layers
            (norm, nn.LeakyReLU(), conv_layer(3)(4, 4, 3, padding="same"), cl),
        ]
        for case in cases:
            y = norm_act_conv(*case)
            self.assertNotIn("_NormActConvolutionBackward", _grad_fn_names(y))
            torch.testing.assert_close(y, case[2](case[1](case[0](case[3]))))
        with cpu_backward.native_backward():
            self.assertNotIn("_NormActConvolutionBackward", _grad_fn_names(norm_act_conv(norm, nn.ReLU(), conv, cl)))
        with torch.no_grad():
            self.assertIsNone(norm_act_conv(norm, nn.ReLU(), conv, cl).grad_fn)

    def test_ill_argument(self):
        w = torch.randn(4, 4, 3, 3, 3)
        with self.assertRaisesRegex(ValueError, "spatial"):
            cpu_backward.norm_act_convolution(torch.randn(2, 3), None, None, 1e-5, 0.01, w, None, [1], [1], [1], 1)
        with self.assertRaisesRegex(ValueError, "slope"):
            cpu_backward.norm_act_convolution(
                torch.randn(1, 4, 5, 5, 5), None, None, 1e-5, -0.1, w, None, [1] * 3, [1] * 3, [1] * 3, 1
            )


class TestTrainingStep(unittest.TestCase):
    def test_mambaclinix_gradients_match_pytorch_backward(self):
        torch.manual_seed(0)
        net = MambaClinix(
            3, 1, 3, features=(8, 16, 32, 32), strides=(1, 2, 2, 2), block_types=("hgcn", "hgcn", "mamba", "mamba"),
            hgcn_orders=(2, 3), deep_supervision=True,
        )
        x = torch.randn(2, 1, 16, 16, 16)
        target = torch.randint(0, 3, (2, 16, 16, 16))

        def grads():
            net.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same stochastic-depth draws in both runs
            outputs = net(x)
            loss = sum(F.cross_entropy(o, F.interpolate(target[:, None].float(), o.shape[2:]).long()[:, 0])
                       for o in outputs)
            loss.backward()
            return outputs, loss, {n: p.grad.clone() for n, p in net.named_parameters()}

        outputs, loss, fast = grads()
        names = _grad_fn_names(loss)
        self.assertIn("_ConvolutionBackward", names)
        self.assertIn("_InstanceNormBackward", names)
        self.assertIn("_NormActConvolutionBackward", names)
        self.assertIn("_UpsampleNearestBackward", names)
        with cpu_backward.native_backward():
            outputs_ref, loss_ref, native = grads()
        self.assertNotIn("_ConvolutionBackward", _grad_fn_names(loss_ref))
        for o, o_ref in zip(outputs, outputs_ref):
            torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
        self.assertEqual(set(fast), set(native))
        # float32 rounding: relative to the largest gradient (a bias before a norm has a true gradient of 0, which
        # both backward passes give as rounding noise)
        scale = max(g.abs().max().item() for g in native.values())
        for name in native:
            torch.testing.assert_close(fast[name], native[name], atol=1e-5 * scale, rtol=1e-3, msg=name)


if __name__ == "__main__":
    unittest.main()
