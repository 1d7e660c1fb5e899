# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the MambaClinix network and its blocks."""

from __future__ import annotations

import math
import unittest

import torch
import torch.nn.functional as F
from parameterized import parameterized

from scripts.networks import MambaClinix, default_block_types, default_hgcn_orders
from scripts.networks.blocks import ChannelLayerNorm, HgConv, HGCNBlock, ResidualMambaLayer, UpsampleBlock

TINY = {"features": (8, 16, 16, 32), "strides": (1, 2, 2, 2), "drop_path_rate": 0.1}

SHAPE_CASES = []
for dims in (2, 3):
    for (in_ch, out_ch), batch in (((1, 2), 1), ((3, 5), 2)):
        for ds in (False, True):
            SHAPE_CASES.append((dims, in_ch, out_ch, batch, ds))


class TestMambaClinixShapes(unittest.TestCase):
    @parameterized.expand(SHAPE_CASES)
    def test_train_and_eval_shapes(self, dims, in_ch, out_ch, batch, ds):
        torch.manual_seed(0)
        net = MambaClinix(dims, in_ch, out_ch, deep_supervision=ds, **TINY)
        size = (16,) * dims
        x = torch.randn(batch, in_ch, *size)
        net.train()
        out = net(x)
        if ds:
            self.assertIsInstance(out, list)
            self.assertEqual(len(out), len(TINY["features"]) - 1)
            for level, o in enumerate(out):  # full resolution first, halving per level
                self.assertEqual(tuple(o.shape), (batch, out_ch) + tuple(s // 2**level for s in size))
            loss = sum(o.float().mean() for o in out)
        else:
            self.assertEqual(tuple(out.shape), (batch, out_ch) + size)
            loss = out.mean()
        loss.backward()
        num_heads = len(net.heads)
        unused = set() if ds else {f"heads.{i}." for i in range(num_heads - 1)}  # only the full-res head is used
        for name, p in net.named_parameters():
            if any(name.startswith(u) for u in unused):
                self.assertIsNone(p.grad, name)
            else:
                self.assertTrue(p.grad is not None and torch.isfinite(p.grad).all(), name)
        net.eval()
        with torch.no_grad():
            y = net(x)
        self.assertIsInstance(y, torch.Tensor)
        self.assertEqual(tuple(y.shape), (batch, out_ch) + size)

    def test_anisotropic_plan(self):
        net = MambaClinix(
            3, 1, 2, features=(8, 16, 16, 32), kernel_size=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], deep_supervision=True,
        )
        x = torch.randn(1, 1, 8, 32, 16)
        out = net.train()(x)
        self.assertEqual([tuple(o.shape[2:]) for o in out], [(8, 32, 16), (8, 16, 8), (4, 8, 4)])
        self.assertEqual(net.size_divisible, (4, 8, 8))

    @parameterized.expand([("add",), ("mul",)])
    def test_options(self, gating):
        net = MambaClinix(
            3, 2, 3, features=(8, 16, 16), strides=(1, 2, 2), hgcn_gating=gating, mamba_scan="bidirectional",
            gradient_checkpointing=True, norm="batch", act="relu",
        )
        x = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
        net.train()(x).sum().backward()
        self.assertIsNotNone(x.grad)

    @parameterized.expand([(False, 0.0, True), (True, 0.3, True), (False, 0.0, "block"), (True, 0.3, "block"),
                           (False, 0.0, "first_level"), (True, 0.3, "first_level"), (False, 0.0, "light"),
                           (True, 0.3, "light")])
    def test_checkpointing_matches(self, deep_supervision, drop_path_rate, mode):
        kwargs = {"features": (8, 16, 16), "strides": (1, 2, 2), "drop_path_rate": drop_path_rate,
                  "deep_supervision": deep_supervision}
        torch.manual_seed(1)
        a = MambaClinix(3, 1, 2, gradient_checkpointing=False, **kwargs)
        b = MambaClinix(3, 1, 2, gradient_checkpointing=mode, **kwargs)
        b.load_state_dict(a.state_dict())
        x = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
        outputs = []
        for net in (a, b):
            torch.manual_seed(2)  # the same drop-path draws in both nets (checkpointing replays the RNG state)
            y = net.train()(x)
            y = y if isinstance(y, list) else [y]
            loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in y)
            outputs.append((y, torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)))
        (ya, ga), (yb, gb) = outputs
        for u, v in zip(ya, yb):
            torch.testing.assert_close(u, v)
        for u, v in zip(ga, gb):
            self.assertEqual(u is None, v is None)
            if u is not None:
                torch.testing.assert_close(u, v)

    def test_checkpointing_keeps_less(self):
        """The bytes that autograd keeps for backward (saved-tensor hooks): none > "light" > "first_level" > "block";
        with "light" the stem and the hgConv branches keep only their inputs, with "first_level" the first level's
        blocks (stem, first stage, the decoder's last level) too."""
        kwargs = {"features": (8, 16, 16), "strides": (1, 2, 2), "deep_supervision": True}
        torch.manual_seed(1)
        x = torch.randn(1, 1, 16, 16, 16)
        kept = {}
        for mode in (False, "light", "first_level", "block"):
            net = MambaClinix(3, 1, 2, gradient_checkpointing=mode, **kwargs).train()
            total = [0]

            def pack(t, total=total):
                total[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                net(x)
            kept[mode] = total[0]
        self.assertLess(kept["light"], 0.9 * kept[False])
        self.assertLess(kept["first_level"], 0.8 * kept["light"])
        self.assertGreater(kept["first_level"], kept["block"])

    def test_checkpointing_switch_reaches_blocks(self):
        from scripts.networks.blocks import ResidualBlock

        net = MambaClinix(3, 1, 2, **TINY)
        blocks = [m for m in net.modules() if isinstance(m, (ResidualBlock, HGCNBlock))]
        hgcn = [[b for b in stage if isinstance(b, HGCNBlock)] for stage in net.encoder]
        self.assertEqual(net.gradient_checkpointing, "light")  # the default: the hgConv branches, not whole blocks
        self.assertTrue(blocks and not any(b.gradient_checkpointing for b in blocks))
        self.assertTrue(len(hgcn[0]) == 1 and all(b.gated_checkpointing for stage in hgcn for b in stage))
        net.gradient_checkpointing = "block"  # the network checkpoints whole blocks, the blocks not their steps
        self.assertEqual(net.gradient_checkpointing, "block")
        self.assertFalse(any(b.gradient_checkpointing or getattr(b, "gated_checkpointing", False) for b in blocks))
        net.gradient_checkpointing = "first_level"  # whole blocks on the first level, hgConv branches deeper
        self.assertFalse(any(b.gradient_checkpointing for b in blocks))
        self.assertEqual([b.gated_checkpointing for stage in hgcn for b in stage],
                         [level > 0 for level, stage in enumerate(hgcn) for _ in stage])
        net.gradient_checkpointing = False
        self.assertFalse(any(b.gradient_checkpointing or getattr(b, "gated_checkpointing", False) for b in blocks))
        for text, mode in (("false", False), ("True", "step"), ("Block", "block"), ("FIRST_LEVEL", "first_level"),
                           ("Light", "light")):
            net.gradient_checkpointing = text
            self.assertEqual(net.gradient_checkpointing, mode)
        net.gradient_checkpointing = True
        self.assertEqual(net.gradient_checkpointing, "step")
        self.assertTrue(all(b.gradient_checkpointing for b in blocks))
        x = torch.randn(2, 1, 16, 16, 16)
        net.train()(x).mean().backward()
        last_head = f"heads.{len(net.heads) - 1}."  # without deep supervision only the full-resolution head runs
        for name, p in net.named_parameters():
            if not name.startswith("heads.") or name.startswith(last_head):
                self.assertIsNotNone(p.grad, name)

    @parameterized.expand([(2, True), (3, True), (3, None)])  # None: the default, channels-last for 3D on CPU
    def test_memory_format_same_function(self, dims, channels_last):
        torch.manual_seed(3)
        ref = MambaClinix(dims, 2, 3, channels_last=False, **TINY)
        net = MambaClinix(dims, 2, 3, channels_last=channels_last, **TINY)
        net.load_state_dict(ref.state_dict())
        x = torch.randn(2, 2, *(16,) * dims)
        with torch.no_grad():
            y, y_ref = net.eval()(x), ref.eval()(x)
        self.assertTrue(y.is_contiguous())
        # float32 rounding relative to the output scale: the He-initialised network's logits reach ~20 here, and
        # the channels-last group-norm kernel rounds differently (measured max error 1.4e-5 * max|y|)
        torch.testing.assert_close(y, y_ref, atol=5e-5 * y_ref.abs().max().item(), rtol=0.0)
        self.assertEqual(net._memory_format(x), torch.channels_last if dims == 2 else torch.channels_last_3d)
        self.assertEqual(ref._memory_format(x), torch.contiguous_format)

class TestMambaClinixPaper(unittest.TestCase):
    def test_parameter_count_paper(self):
        """The 6-stage 3D network with 4 input and 3 output channels has the authors' parameters: their network
        counts 48,877,586, of which 3 are the unused ``skip_scale`` of their Mamba layers (not in ours)."""
        net = MambaClinix(3, 4, 3)
        count = sum(p.numel() for p in net.parameters())
        self.assertEqual(count, 48_877_586 - 3)
        self.assertEqual(net.block_types, ["hgcn", "hgcn", "hgcn", "mamba", "mamba", "mamba"])
        self.assertEqual(net.hgcn_orders, [2, 3, 4])

    @parameterized.expand([(1, ["hgcn"], [2]), (4, ["hgcn", "hgcn", "mamba", "mamba"], [2, 3]),
                           (5, ["hgcn", "hgcn", "hgcn", "mamba", "mamba"], [2, 3, 4]),
                           (13, ["hgcn"] * 7 + ["mamba"] * 6, [2, 3, 4, 5, 6, 6, 6])])
    def test_eq11_layout(self, n, types, orders):
        self.assertEqual(default_block_types(n), types)
        self.assertEqual(default_hgcn_orders(types), orders)

    def test_layer_norm_before_last_hgcn(self):
        net = MambaClinix(3, 1, 2)
        kinds = [[type(m).__name__ for m in stage] for stage in net.encoder]
        self.assertEqual(kinds[2], ["ResidualBlock", "ChannelLayerNorm", "HGCNBlock"])
        self.assertEqual(kinds[0], ["ResidualBlock", "HGCNBlock"])
        self.assertEqual(kinds[3], ["ResidualBlock", "ResidualMambaLayer"])


class TestAuthorsDesign(unittest.TestCase):
    """The blocks as the authors' MambaClinix_3d.py builds them (the numbers are checked against their outputs in
    tests/test_authors_fixture.py). An earlier version had a norm + activation in the HGCN stem, no second
    LayerNorm in the HGCN block, a norm on the decoder's 1x1 shortcut and a bias on the encoder's skip conv."""

    def test_hgcn_block_layout(self):
        block = HGCNBlock(3, 16, order=3)
        self.assertEqual([type(m).__name__ for m in block.stem], ["OneDNNConv3d"])  # plain 1x1 conv
        self.assertIsNotNone(block.stem.conv.bias)
        self.assertIsInstance(block.norm2, ChannelLayerNorm)
        self.assertEqual(block.norm2.eps, 1e-6)
        self.assertEqual([type(m).__name__ for m in block.out_conv1], ["OneDNNConv3d", "LeakyReLU"])
        self.assertEqual([type(m).__name__ for m in block.out_conv2], ["OneDNNConv3d"])

    def test_hgcn_block_formula(self):
        """out = x + conv2(act(conv1(LN2(h)))) with h = t + gamma * hgConv(LN1(t)), t = conv1x1(x)."""
        torch.manual_seed(0)
        block = HGCNBlock(2, 8, order=2).eval()
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.3 * torch.randn_like(p))
            x = torch.randn(2, 8, 6, 6)
            t = block.stem.conv(x)
            h = t + block.gamma.view(1, -1, 1, 1) * block.hgconv(block.norm(t))
            expected = x + block.out_conv2.conv(F.leaky_relu(block.out_conv1.conv(block.norm2(h)), 0.01))
            torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)

    def test_projections(self):
        net = MambaClinix(3, 1, 2, **TINY)
        encoder_skip = net.encoder[1][0].skip[-1]  # BasicBlockD: avg-pool, 1x1 conv without bias, norm
        self.assertIsNone(encoder_skip.conv.bias)
        self.assertEqual([n for n, _ in encoder_skip.named_children()], ["conv", "norm"])
        fuse_skip = net.fuse_blocks[0].skip[0]  # the authors' BasicResBlock: plain 1x1 conv with bias
        self.assertIsNotNone(fuse_skip.conv.bias)
        self.assertEqual([n for n, _ in fuse_skip.named_children()], ["conv"])

    def test_he_initialisation(self):
        """nnU-Net's InitWeights_He(1e-2) by default: convs He-normal with zero bias; Mamba's conv1d, the linear
        layers and the norms keep their own initialisation; ``he_init=False`` keeps PyTorch's defaults."""
        torch.manual_seed(0)
        net = MambaClinix(3, 1, 2, features=(32, 64, 64, 64), strides=(1, 2, 2, 2))
        gain = math.sqrt(2.0 / (1 + 1e-2**2))
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.Conv3d):
                fan_in = m.weight[0].numel()
                if m.weight.numel() >= 4096:
                    self.assertAlmostEqual(m.weight.std().item() * math.sqrt(fan_in) / gain, 1.0, delta=0.1, msg=name)
                if m.bias is not None:
                    self.assertEqual(m.bias.abs().max().item(), 0.0, name)
        mamba = net.encoder[3][1].mamba
        self.assertGreater(mamba.conv1d.bias.abs().max().item(), 0.0)  # PyTorch's default, as in the authors' net
        self.assertLessEqual(mamba.conv1d.weight.abs().max().item(), 1 / math.sqrt(mamba.d_conv))  # uniform bound
        default = MambaClinix(3, 1, 2, he_init=False, **TINY)
        self.assertGreater(default.stem.conv.bias.abs().max().item(), 0.0)

    def test_deep_supervision_outputs_in_eval(self):
        net = MambaClinix(3, 1, 2, **TINY).eval()
        x = torch.randn(1, 1, 16, 16, 16)
        with torch.no_grad():
            levels = net.deep_supervision_outputs(x)
            torch.testing.assert_close(levels[0], net(x))
        self.assertEqual([tuple(o.shape[2:]) for o in levels], [(16, 16, 16), (8, 8, 8), (4, 4, 4)])

    def test_float64(self):
        """The whole network runs in float64 (the Mamba layer upcasts half precision only)."""
        net = MambaClinix(3, 1, 2, **TINY).double().eval()
        with torch.no_grad():
            y = net(torch.randn(1, 1, 16, 16, 16, dtype=torch.float64))
        self.assertEqual(y.dtype, torch.float64)


class TestBlocks(unittest.TestCase):
    def test_channel_layer_norm_matches_layernorm(self):
        torch.manual_seed(0)
        ln = ChannelLayerNorm(6)
        torch.nn.init.normal_(ln.weight)
        torch.nn.init.normal_(ln.bias)
        ref = torch.nn.LayerNorm(6, eps=ln.eps)
        ref.load_state_dict({"weight": ln.weight.detach(), "bias": ln.bias.detach()})
        x = torch.randn(2, 6, 3, 4, 5)
        expected = ref(x.movedim(1, -1)).movedim(-1, 1)
        torch.testing.assert_close(ln(x), expected, atol=1e-5, rtol=1e-5)

    @parameterized.expand(
        [(dims, scale, cl) for dims in (2, 3) for scale in (2, (1, 2, 2)[-dims:], 1) for cl in (False, True)]
    )
    def test_upsample_block_equals_upsample_then_conv(self, dims, scale, channels_last):
        """Convolving first on the coarse map gives what the paper's order (up-sample, then 1x1 conv) gives."""
        torch.manual_seed(0)
        block = UpsampleBlock(dims, 8, 4, scale)
        x = torch.randn(2, 8, *(3,) * dims)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)
        x_ref = x.clone().requires_grad_(True)
        conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
        factor = (scale,) * dims if isinstance(scale, int) else scale
        upsampled = torch.nn.functional.interpolate(x_ref, scale_factor=factor, mode="nearest")
        expected = conv(upsampled, block.conv.weight, block.conv.bias)
        y = block(x.requires_grad_(True))
        self.assertEqual(y.shape, (2, 4, *(3 * f for f in factor)))
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        weight = torch.randn_like(y)
        grads = torch.autograd.grad((y * weight).sum(), [x, block.conv.weight])
        grads_ref = torch.autograd.grad((expected * weight).sum(), [x_ref, block.conv.weight])
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)

    @parameterized.expand(
        [("fraction", 1.5), ("zero", 0), ("one axis fractional", (1, 2, 2.5)), ("too few axes", (2, 2))]
    )
    def test_upsample_block_bad_scale(self, _, scale):
        with self.assertRaisesRegex(ValueError, "scale_factor"):
            UpsampleBlock(3, 8, 4, scale)

    @parameterized.expand(
        [("int", 2, (2, 2, 2)), ("integral float", 2.0, (2, 2, 2)), ("per axis", (1, 2.0, 4), (1, 2, 4))]
    )
    def test_upsample_block_integer_scale(self, _, scale, expected):
        self.assertEqual(UpsampleBlock(3, 8, 4, scale).scale_factor, expected)

    @parameterized.expand([(2, 1), (2, 3), (3, 2), (3, 4)])
    def test_hgconv_recursion(self, dims, order):
        """hgConv equals an explicit re-computation of Eqs. 4-6 (additive gating) from its own weights."""
        torch.manual_seed(0)
        channels = 16
        m = HgConv(dims, channels, order)
        x = torch.randn(2, channels, *(5,) * dims)
        conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
        fused = conv(x, m.proj_in.weight, m.proj_in.bias)
        widths = [channels // 2 ** (order - 1 - j) for j in range(order)]
        self.assertEqual(sum(widths) + widths[0], 2 * channels)
        base, rest = fused[:, : widths[0]], fused[:, widths[0]:]
        dw = conv(rest, m.dwconv.weight, m.dwconv.bias, padding=1, groups=rest.shape[1])
        parts, start = [], 0
        for w in widths:
            parts.append(dw[:, start:start + w])
            start += w
        u = base + parts[0]
        for j in range(1, order):
            u = conv(u, m.pws[j - 1].weight, m.pws[j - 1].bias) + parts[j]
        expected = conv(u, m.proj_out.weight, m.proj_out.bias)
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)

    def test_hgcn_block_starts_as_identity_plus_conv(self):
        """With gamma ~ 1e-6 the hgConv branch is negligible at init (layer scale)."""
        block = HGCNBlock(3, 16, order=3).eval()
        self.assertTrue(torch.allclose(block.gamma, torch.full_like(block.gamma, 1e-6)))
        x = torch.randn(1, 16, 6, 6, 6)
        self.assertEqual(block(x).shape, x.shape)

    def test_mamba_layer_float32_island(self):
        layer = ResidualMambaLayer(8)
        x = torch.randn(1, 8, 4, 4, 4).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer.to(torch.float32)(x)
        self.assertEqual(y.dtype, torch.bfloat16)
        self.assertTrue(torch.isfinite(y.float()).all())

    @parameterized.expand([(2,), (3,)])
    def test_mamba_layer_raster_order_any_memory_format(self, dims):
        torch.manual_seed(4)
        layer = ResidualMambaLayer(8).eval()
        x = torch.randn(2, 8, *(4,) * dims)
        with torch.no_grad():  # reference: the tokens of the channels-first tensor in raster (C-order) order
            tokens = x.flatten(2).transpose(1, 2)
            y = layer.proj(layer.norm(layer.mamba(layer.norm(tokens))))
            expected = x + y.transpose(1, 2).reshape(x.shape)
            fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
            for inp in (x, x.contiguous(memory_format=fmt)):
                torch.testing.assert_close(layer(inp), expected, atol=1e-5, rtol=1e-5)

    def test_bf16_autocast_network(self):
        net = MambaClinix(3, 1, 2, **TINY)
        x = torch.randn(1, 1, 16, 16, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net.train()(x)
        y.float().mean().backward()
        self.assertTrue(all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None))


class TestExport(unittest.TestCase):
    def test_trace(self):
        net = MambaClinix(3, 1, 2, deep_supervision=True, **TINY).eval()
        x = torch.randn(1, 1, 16, 16, 16)
        with torch.no_grad():
            traced = torch.jit.trace(net, x, check_trace=False)
            torch.testing.assert_close(traced(x), net(x), atol=1e-4, rtol=1e-4)

    def test_export(self):
        net = MambaClinix(2, 1, 2, **TINY).eval()
        x = torch.randn(1, 1, 16, 16)
        program = torch.export.export(net, (x,))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), net(x), atol=1e-4, rtol=1e-4)


class TestIllArguments(unittest.TestCase):
    @parameterized.expand(
        [
            ({"spatial_dims": 4}, "spatial_dims"),
            ({"features": (8,)}, "at least 2 stages"),
            ({"strides": (1, 2)}, "one entry per stage"),
            ({"kernel_size": [[3, 3], 3, 3, 3]}, "3 values"),
            ({"block_types": ["hgcn", "mamba"]}, "block_types"),
            ({"block_types": ["hgcn", "conv", "mamba", "mamba"]}, "block_types"),
            ({"hgcn_orders": [2, 3, 4]}, "hgcn_orders"),
            ({"hgcn_gating": "max"}, "gating"),
            ({"features": (8, 16, 16, 30), "hgcn_orders": [2, 5]}, "divisible"),
            ({"drop_path_rate": 1.5}, "drop_path_rate"),
            ({"kernel_size": 4}, "odd"),
            ({"gradient_checkpointing": "stage"}, "gradient_checkpointing"),
        ]
    )
    def test_bad_arguments(self, kwargs, message):
        args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, **TINY}
        args.update(kwargs)
        with self.assertRaisesRegex(ValueError, message):
            MambaClinix(**args)

    def test_indivisible_input_names_the_multiple(self):
        net = MambaClinix(3, 1, 2, **TINY)
        with self.assertRaisesRegex(ValueError, r"divisible by \(8, 8, 8\)"):
            net(torch.randn(1, 1, 16, 12, 16))

    def test_wrong_channels(self):
        net = MambaClinix(3, 4, 2, **TINY)
        with self.assertRaisesRegex(ValueError, "4 input channels"):
            net(torch.randn(1, 1, 16, 16, 16))

    def test_wrong_rank(self):
        net = MambaClinix(3, 1, 2, **TINY)
        with self.assertRaisesRegex(ValueError, "spatial dims"):
            net(torch.randn(1, 1, 16, 16))


if __name__ == "__main__":
    unittest.main()
