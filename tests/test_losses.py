# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tests of scripts/losses.py against direct implementations of Eq. 16 and MONAI's losses."""

from __future__ import annotations

import itertools
import math
import unittest
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss, TverskyLoss
from parameterized import parameterized

from scripts.losses import (
    AUTHORS_REGION_GRID, DiceCERegionTverskyLoss, MambaClinixLoss, RegionTverskyLoss, deep_supervision_weights,
)

SMOOTH = 1e-5


def _cells(length: int, regions: int) -> list[tuple[int, int]]:
    """Cells of adaptive pooling along one axis: [floor(i L / R), ceil((i + 1) L / R))."""
    return [(math.floor(i * length / regions), math.ceil((i + 1) * length / regions)) for i in range(regions)]


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.cat([(labels == c).to(torch.float64) for c in range(num_classes)], dim=1)


def reference_region_tversky(
    logits, target, grid, alpha=0.3, beta=0.4, adaptive=True, batch=True, include_background=False,
    sigmoid=False, pooling="sum", mask=None,
):
    """Eq. 16 with explicit loops over batch items, classes and cells (float64)."""
    logits = logits.to(torch.float64)
    probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1)
    truth = target.to(torch.float64) if sigmoid else _one_hot(target, logits.shape[1])
    if mask is not None:
        probs, truth = probs * mask, truth * mask
    if not include_background:
        probs, truth = probs[:, 1:], truth[:, 1:]
    spatial = probs.shape[2:]
    items = [slice(None)] if batch else [slice(b, b + 1) for b in range(probs.shape[0])]
    terms = []
    for item in items:
        for c in range(probs.shape[1]):
            for cell in itertools.product(*[_cells(n, r) for n, r in zip(spatial, grid)]):
                index = (item, c) + tuple(slice(a, b) for a, b in cell)
                p, g = probs[index], truth[index]
                tp, fp, fn = (p * g).sum(), (p * (1 - g)).sum(), ((1 - p) * g).sum()
                if pooling == "mean":
                    voxels = math.prod(b - a for a, b in cell)
                    tp, fp, fn = tp / voxels, fp / voxels, fn / voxels
                if adaptive:
                    a_r = alpha + beta * (fp + SMOOTH) / (fp + fn + SMOOTH)
                    b_r = alpha + beta * (fn + SMOOTH) / (fp + fn + SMOOTH)
                else:
                    a_r, b_r = alpha, beta
                terms.append(1 - (tp + SMOOTH) / (tp + a_r * fp + b_r * fn + SMOOTH))
    return torch.stack(terms).mean()


def authors_style_region_tversky(probs, onehot, grid, alpha=0.3, beta=0.4):
    """Average pooling by torch's AdaptiveAvgPool, batch-summed, background dropped (the authors' formulation)."""
    pool = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(grid)]
    tp = pool(probs * onehot, grid).sum(0)[1:]
    fp = pool(probs * (1 - onehot), grid).sum(0)[1:]
    fn = pool((1 - probs) * onehot, grid).sum(0)[1:]
    a = alpha + beta * (fp + SMOOTH) / (fp + fn + SMOOTH)
    b = alpha + beta * (fn + SMOOTH) / (fp + fn + SMOOTH)
    return 1 - ((tp + SMOOTH) / (tp + a * fp + b * fn + SMOOTH)).mean()


def _data(shape, sigmoid=False, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(shape, generator=gen)).to(dtype)
    if sigmoid:
        target = (torch.rand(shape, generator=gen) > 0.6).to(torch.float32)
    else:
        target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=gen)
    return logits.requires_grad_(True), target


# shapes not divisible by the grids: cells overlap by one voxel
SHAPES = [((2, 3, 7, 9), (3, 4)), ((2, 3, 5, 7, 6), (2, 3, 4))]
REFERENCE_CASES = [
    [shape, grid, batch, bg, adaptive, sigmoid]
    for (shape, grid), batch, bg, adaptive, sigmoid in itertools.product(
        SHAPES, (True, False), (True, False), (True, False), (True, False)
    )
]


class TestRegionTverskyLoss(unittest.TestCase):
    @parameterized.expand(REFERENCE_CASES)
    def test_value_and_grad_vs_reference(self, shape, grid, batch, bg, adaptive, sigmoid):
        logits, target = _data(shape, sigmoid=sigmoid, seed=len(REFERENCE_CASES) + int(batch) + 2 * int(bg))
        loss_fn = RegionTverskyLoss(
            num_regions=grid, include_background=bg, batch=batch, adaptive=adaptive,
            softmax=not sigmoid, sigmoid=sigmoid, to_onehot_y=not sigmoid, pooling="sum",
        )
        value = loss_fn(logits, target)
        (grad,) = torch.autograd.grad(value, logits)
        ref_logits = logits.detach().clone().requires_grad_(True)
        expected = reference_region_tversky(
            ref_logits, target, grid, adaptive=adaptive, batch=batch, include_background=bg, sigmoid=sigmoid
        )
        (ref_grad,) = torch.autograd.grad(expected, ref_logits)
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)
        self.assertGreater(grad.abs().sum().item(), 0.0)
        # float32 inputs: same value to float32 accuracy
        value32 = loss_fn(logits.detach().float(), target)
        self.assertEqual(value32.dtype, torch.float32)
        torch.testing.assert_close(value32.double(), expected.detach(), rtol=1e-5, atol=1e-6)

    @parameterized.expand([[(2, 3, 11, 13), (4, 5)], [(2, 3, 7, 9, 10), (3, 4, 3)]])
    def test_mean_pooling_is_adaptive_avg_pool(self, shape, grid):
        logits, target = _data(shape, seed=3)
        probs = torch.softmax(logits.detach(), 1)
        onehot = _one_hot(target, shape[1])
        ours = RegionTverskyLoss(grid, pooling="mean", softmax=False, to_onehot_y=False)(probs, onehot)
        torch.testing.assert_close(ours, authors_style_region_tversky(probs, onehot, grid), rtol=1e-10, atol=1e-12)
        expected = reference_region_tversky(logits.detach(), target, grid, pooling="mean")
        torch.testing.assert_close(RegionTverskyLoss(grid, pooling="mean")(logits, target), expected)

    @parameterized.expand([[RegionTverskyLoss], [DiceCERegionTverskyLoss], [MambaClinixLoss]])
    def test_defaults_are_the_authors(self, cls):
        # the authors' TRS trainer: AdaptiveAvgPool3d((8, 8, 14)) region statistics
        loss = cls()
        rs = loss if cls is RegionTverskyLoss else (loss.region_tversky if cls is DiceCERegionTverskyLoss
                                                    else loss.loss.region_tversky)
        self.assertEqual((rs.num_regions, rs.pooling), ((8, 8, 14), "mean"))
        self.assertEqual(AUTHORS_REGION_GRID, (8, 8, 14))

    def test_default_equals_authors_formulation(self):
        # demo patch (32, 64, 56): the default grid fits; value = AdaptiveAvgPool3d((8, 8, 14)) reference
        logits, target = _data((2, 3, 16, 16, 28), seed=11)
        probs = torch.softmax(logits.detach(), 1)
        onehot = _one_hot(target, 3)
        ours = RegionTverskyLoss(softmax=False, to_onehot_y=False)(probs, onehot)
        torch.testing.assert_close(ours, authors_style_region_tversky(probs, onehot, (8, 8, 14)), rtol=1e-10, atol=1e-12)

    @parameterized.expand(
        [[b, bg, sig, red] for b, bg, sig, red in itertools.product((True, False), (True, False), (True, False),
                                                                      ("mean", "sum", "none"))]
    )
    def test_one_region_fixed_equals_monai_tversky(self, batch, bg, sigmoid, reduction):
        logits, target = _data((3, 4, 6, 5, 4), sigmoid=sigmoid, seed=5, dtype=torch.float32)
        kwargs = dict(include_background=bg, to_onehot_y=not sigmoid, softmax=not sigmoid, sigmoid=sigmoid,
                      batch=batch, reduction=reduction)
        ours = RegionTverskyLoss(num_regions=1, alpha=0.3, beta=0.7, adaptive=False, smooth=SMOOTH, pooling="sum",
                                 **kwargs)
        monai = TverskyLoss(alpha=0.3, beta=0.7, smooth_nr=SMOOTH, smooth_dr=SMOOTH, **kwargs)
        value, expected = ours(logits, target), monai(logits, target)
        if reduction == "none":
            self.assertEqual(value.shape, expected.shape + (1, 1, 1))
            value = value.reshape(expected.shape)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        grads = [torch.autograd.grad(v.sum(), logits)[0] for v in (value, expected)]
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)

    @parameterized.expand([[True, (3, 2, 3, 4)], [False, (2, 3, 2, 3, 4)]])
    def test_reduction_none_shape(self, batch, expected_shape):
        logits, target = _data((2, 4, 5, 6, 8), seed=1)
        out = RegionTverskyLoss((2, 3, 4), batch=batch, reduction="none")(logits, target)
        self.assertEqual(tuple(out.shape), expected_shape)
        total = RegionTverskyLoss((2, 3, 4), batch=batch, reduction="sum")(logits, target)
        mean = RegionTverskyLoss((2, 3, 4), batch=batch)(logits, target)
        torch.testing.assert_close(out.sum(), total)
        torch.testing.assert_close(out.mean(), mean)

    def test_int_regions_broadcast(self):
        logits, target = _data((2, 3, 6, 7), seed=2)
        torch.testing.assert_close(RegionTverskyLoss(3)(logits, target), RegionTverskyLoss((3, 3))(logits, target))

    def test_gradcheck(self):
        logits, target = _data((2, 3, 5, 4), seed=7)
        loss_fn = RegionTverskyLoss((2, 3), batch=False)
        self.assertTrue(torch.autograd.gradcheck(lambda x: loss_fn(x, target), (logits,)))

    @parameterized.expand([[(2, 3, 8, 6)], [(1, 4, 6, 5, 7)]])
    def test_perfect_prediction(self, shape):
        _, target = _data(shape, seed=4)
        onehot = _one_hot(target, shape[1]).float()
        exact = RegionTverskyLoss((2,) * (len(shape) - 2), softmax=False, to_onehot_y=False)(onehot, onehot)
        self.assertLess(exact.item(), 1e-7)
        confident = RegionTverskyLoss((2,) * (len(shape) - 2))(60.0 * onehot, target)
        self.assertLess(confident.item(), 1e-5)
        wrong = RegionTverskyLoss((2,) * (len(shape) - 2))(60.0 * (1 - onehot), target)
        self.assertGreater(wrong.item(), 0.9)

    def test_ignore_index(self):
        logits, target = _data((2, 3, 6, 8), seed=8)
        target = target.clone()
        target[:, :, :2] = 255
        mask = (target != 255).to(torch.float64)
        loss_fn = RegionTverskyLoss((3, 2), ignore_index=255, pooling="sum")
        value = loss_fn(logits, target)
        expected = reference_region_tversky(logits, torch.where(target == 255, 0, target), (3, 2), mask=mask)
        torch.testing.assert_close(value, expected)
        (grad,) = torch.autograd.grad(value, logits)
        self.assertEqual(grad[:, :, :2].abs().max().item(), 0.0)

    @parameterized.expand([[torch.float16], [torch.bfloat16]])
    def test_half_inputs(self, dtype):
        logits, target = _data((2, 3, 16, 12, 8), seed=9, dtype=torch.float32)
        for scale in (1.0, 30.0):  # saturated softmax too
            x = (scale * logits.detach()).to(dtype).requires_grad_(True)
            value = RegionTverskyLoss((4, 4, 4))(x, target)
            (grad,) = torch.autograd.grad(value, x)
            self.assertEqual(value.dtype, torch.float32)
            self.assertTrue(torch.isfinite(value).item())
            self.assertTrue(torch.isfinite(grad).all().item())
            full = RegionTverskyLoss((4, 4, 4))(x.detach().float(), target)
            torch.testing.assert_close(value, full, rtol=0, atol=1e-6)

    def test_single_channel_warns(self):
        logits = torch.randn(2, 1, 6, 6)
        target = (torch.rand(2, 1, 6, 6) > 0.5).float()
        with self.assertWarns(UserWarning):
            RegionTverskyLoss((2, 2), sigmoid=True, softmax=False, to_onehot_y=False)(logits, target)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            RegionTverskyLoss((2, 2), sigmoid=True, softmax=False, to_onehot_y=False, include_background=True)(
                logits, target
            )


class TestCompoundLoss(unittest.TestCase):
    @parameterized.expand([[1.0, 1.0, 0.8, True], [0.5, 2.0, 0.3, False], [0.0, 0.0, 1.0, True]])
    def test_softmax_sum_of_parts(self, l_ce, l_dice, l_rs, batch):
        logits, target = _data((2, 4, 8, 6, 5), seed=11, dtype=torch.float32)
        loss = MambaClinixLoss(lambda_ce=l_ce, lambda_dice=l_dice, lambda_rs=l_rs, num_regions=(2, 3, 2), batch=batch)
        value = loss(logits, target)
        ce = nn.CrossEntropyLoss()(logits, target[:, 0])
        dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=batch)(logits, target)
        rs = RegionTverskyLoss((2, 3, 2), batch=batch)(logits, target)
        expected = l_ce * ce + l_dice * dice + l_rs * rs
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        grads = [torch.autograd.grad(v, logits)[0] for v in (value, expected)]
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-8)

    def test_sigmoid_sum_of_parts(self):
        logits, target = _data((2, 3, 8, 6), sigmoid=True, seed=12, dtype=torch.float32)
        kwargs = dict(include_background=True, to_onehot_y=False, softmax=False, sigmoid=True)
        value = MambaClinixLoss(num_regions=(4, 2), **kwargs)(logits, target)
        expected = (
            nn.BCEWithLogitsLoss()(logits, target)
            + DiceLoss(batch=True, include_background=True, sigmoid=True)(logits, target)
            + 0.8 * RegionTverskyLoss((4, 2), **kwargs)(logits, target)
        )
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)

    def test_ignore_index_masks_all_terms(self):
        logits, target = _data((2, 3, 8, 8), seed=13, dtype=torch.float32)
        target = target.clone()
        target[0, 0, :3, :] = 255
        target[1, 0, :, 5:] = 255
        ignored = (target == 255).expand_as(logits)
        loss = MambaClinixLoss(num_regions=(4, 4), ignore_index=255)
        value = loss(logits, target)
        changed = torch.where(ignored, 10 * torch.randn_like(logits), logits.detach()).requires_grad_(True)
        torch.testing.assert_close(loss(changed, target), value)
        (grad,) = torch.autograd.grad(value, logits)
        self.assertEqual(grad[ignored].abs().max().item(), 0.0)
        self.assertGreater(grad[~ignored].abs().max().item(), 0.0)
        ce_only = MambaClinixLoss(lambda_dice=0.0, lambda_rs=0.0, num_regions=(4, 4), ignore_index=255)
        expected_ce = nn.CrossEntropyLoss(ignore_index=255)(logits, target[:, 0])
        torch.testing.assert_close(ce_only(logits, target), expected_ce)
        # the Dice term matches MONAI's own ignore_index handling
        dice_only = MambaClinixLoss(lambda_ce=0.0, lambda_rs=0.0, num_regions=(4, 4), ignore_index=255)
        monai_dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, ignore_index=255)
        torch.testing.assert_close(dice_only(logits, target), monai_dice(logits, target))
        # everything ignored: finite
        self.assertTrue(torch.isfinite(loss(logits, torch.full_like(target, 255))).item())

    def test_negative_ignore_index(self):
        logits, target = _data((1, 3, 6, 6), seed=14, dtype=torch.float32)
        target = target.clone()
        target[..., 0] = -1
        value = MambaClinixLoss(num_regions=(2, 2), ignore_index=-1)(logits, target)
        self.assertTrue(torch.isfinite(value).item())
        with self.assertRaises(ValueError):
            MambaClinixLoss(num_regions=(2, 2))(logits, target)

    def test_sigmoid_ignore_index(self):
        logits, target = _data((2, 2, 6, 6), sigmoid=True, seed=15, dtype=torch.float32)
        target = target.clone()
        target[:, 1, :2] = 255  # any channel at the ignore value masks the voxel
        loss = MambaClinixLoss(
            num_regions=(2, 2), sigmoid=True, softmax=False, to_onehot_y=False, include_background=True,
            ignore_index=255,
        )
        value = loss(logits, target)
        changed = logits.detach().clone()
        changed[:, :, :2] = 7.0
        torch.testing.assert_close(loss(changed, target), value)
        self.assertTrue(torch.isfinite(value).item())

    @parameterized.expand([[torch.float16], [torch.bfloat16]])
    def test_half_deep_supervision(self, dtype):
        _, target = _data((2, 3, 16, 16, 8), seed=16)
        sizes = [(16 // 2**i, 16 // 2**i, 8 // 2**i) for i in range(3)]
        outputs = [torch.randn(2, 3, *size).to(dtype).requires_grad_(True) for size in sizes]
        value = MambaClinixLoss(num_regions=(4, 4, 4))(outputs, target)
        self.assertTrue(torch.isfinite(value).item())
        grads = torch.autograd.grad(value, outputs[:2])
        self.assertTrue(all(torch.isfinite(g.float()).all().item() for g in grads))


class TestDeepSupervision(unittest.TestCase):
    @parameterized.expand(
        [[1, [1.0]], [2, [1.0, 0.0]], [3, [2 / 3, 1 / 3, 0.0]], [4, [8 / 14, 4 / 14, 2 / 14, 0.0]],
         [5, [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0]]]
    )
    def test_weights(self, levels, expected):
        weights = deep_supervision_weights(levels)
        self.assertEqual(len(weights), levels)
        for w, e in zip(weights, expected):
            self.assertAlmostEqual(w, e, places=12)
        self.assertAlmostEqual(sum(weights), 1.0, places=12)

    def _outputs(self, levels, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(2, 3, 16 // 2**i, 12 // 2**i, 8 // 2**i, generator=gen).requires_grad_(True)
                for i in range(levels)]

    def test_four_levels(self):
        _, target = _data((2, 3, 16, 12, 8), seed=17)
        outputs = self._outputs(4)
        value = MambaClinixLoss(num_regions=(2, 2, 2))(outputs, target)
        single = DiceCERegionTverskyLoss(num_regions=(2, 2, 2))
        expected = 0.0
        for w, out in zip([8 / 14, 4 / 14, 2 / 14], outputs):  # the 4th (2x1x1) output has weight 0
            level_target = F.interpolate(target.float(), size=out.shape[2:], mode="nearest")
            expected = expected + w * single(out, level_target)
        torch.testing.assert_close(value, expected)
        # the lowest level has weight 0
        changed = outputs[:3] + [torch.randn_like(outputs[3])]
        torch.testing.assert_close(MambaClinixLoss(num_regions=(2, 2, 2))(changed, target), value)

    def test_single_level_and_explicit_weights(self):
        _, target = _data((2, 3, 16, 12, 8), seed=18)
        outputs = self._outputs(3, seed=1)
        loss = MambaClinixLoss(num_regions=(2, 2, 2))
        torch.testing.assert_close(loss([outputs[0]], target), loss(outputs[0], target))
        torch.testing.assert_close(loss((outputs[0],), target), loss(outputs[0], target))
        weighted = MambaClinixLoss(num_regions=(2, 2, 2), ds_weights=[0.5, 0.3, 0.2])(outputs, target)
        single = DiceCERegionTverskyLoss(num_regions=(2, 2, 2))
        expected = sum(
            w * single(out, F.interpolate(target.float(), size=out.shape[2:], mode="nearest"))
            for w, out in zip([0.5, 0.3, 0.2], outputs)
        )
        torch.testing.assert_close(weighted, expected)

    def test_small_levels_clip_region_grid(self):
        _, target = _data((1, 3, 16, 12, 8), seed=19)
        outputs = [o[:1].detach() for o in self._outputs(4, seed=2)]  # levels 16x12x8 ... 2x1x1
        value = MambaClinixLoss(num_regions=(4, 3, 2), ds_weights=[0, 0, 0, 1])(outputs, target)
        level_target = F.interpolate(target.float(), size=outputs[3].shape[2:], mode="nearest")
        expected = DiceCERegionTverskyLoss(num_regions=(2, 1, 1))(outputs[3], level_target)
        torch.testing.assert_close(value, expected)


class TestArguments(unittest.TestCase):
    @parameterized.expand(
        [
            [dict(alpha=-0.1)], [dict(beta=float("nan"))], [dict(alpha=0.0, beta=0.0)], [dict(smooth=0.0)],
            [dict(num_regions=0)], [dict(num_regions=(4, 0, 2))], [dict(num_regions=(2.5, 2))],
            [dict(softmax=True, sigmoid=True)], [dict(pooling="max")], [dict(ignore_index=1.5)],
        ]
    )
    def test_bad_region_tversky_args(self, kwargs):
        with self.assertRaises(ValueError):
            RegionTverskyLoss(**kwargs)

    @parameterized.expand(
        [
            [dict(lambda_ce=-1.0)], [dict(lambda_dice=float("inf"))], [dict(lambda_rs=-0.8)],
            [dict(ds_weights=[0.5, -0.5])], [dict(ds_weights=[])], [dict(ds_weights=[0.0, 0.0])],
            [dict(softmax=False, sigmoid=False)], [dict(softmax=True, sigmoid=True)], [dict(alpha=-1.0)],
        ]
    )
    def test_bad_compound_args(self, kwargs):
        with self.assertRaises(ValueError):
            MambaClinixLoss(**kwargs)

    @parameterized.expand(
        [
            ["target_channels_onehot", dict(), (2, 3, 8, 8), torch.zeros(2, 3, 8, 8)],
            ["target_channels_multi", dict(to_onehot_y=False), (2, 3, 8, 8), torch.zeros(2, 2, 8, 8)],
            ["target_no_channel", dict(), (2, 3, 8, 8), torch.zeros(2, 8, 8)],
            ["spatial", dict(), (2, 3, 8, 8), torch.zeros(2, 1, 8, 7)],
            ["batch", dict(), (2, 3, 8, 8), torch.zeros(1, 1, 8, 8)],
            ["class_too_large", dict(), (2, 3, 8, 8), torch.full((2, 1, 8, 8), 3)],
            ["class_negative", dict(), (2, 3, 8, 8), torch.full((2, 1, 8, 8), -1)],
            ["class_negative_other_ignore", dict(ignore_index=255), (2, 3, 8, 8), torch.full((2, 1, 8, 8), -1)],
            ["class_not_integer", dict(), (2, 3, 8, 8), torch.full((2, 1, 8, 8), 0.5)],
            ["regions_len", dict(num_regions=(2, 2, 2)), (2, 3, 8, 8), torch.zeros(2, 1, 8, 8)],
            ["regions_large", dict(num_regions=(9, 2)), (2, 3, 8, 8), torch.zeros(2, 1, 8, 8)],
        ]
    )
    def test_bad_inputs(self, _, kwargs, shape, target):
        logits = torch.randn(shape)
        grid = kwargs.pop("num_regions", (2, 2))
        for loss in (RegionTverskyLoss(grid, **kwargs), MambaClinixLoss(num_regions=grid, **kwargs)):
            with self.assertRaises(ValueError):
                loss(logits, target)

    def test_bad_deep_supervision_inputs(self):
        target = torch.zeros(1, 1, 8, 8)
        outputs = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)]
        with self.assertRaises(ValueError):  # ds_weights length
            MambaClinixLoss(num_regions=(2, 2), ds_weights=[0.5, 0.3, 0.2])(outputs, target)
        with self.assertRaises(ValueError):  # low resolution first
            MambaClinixLoss(num_regions=(2, 2))(outputs[::-1], target)
        with self.assertRaises(ValueError):
            MambaClinixLoss(num_regions=(2, 2))([], target)
        with self.assertRaises(ValueError):  # full resolution smaller than the grid
            MambaClinixLoss(num_regions=(16, 2))(outputs, target)
        with self.assertRaises(ValueError):  # softmax needs 2+ channels
            MambaClinixLoss(num_regions=(2, 2))(torch.randn(1, 1, 8, 8), target)
        with self.assertRaises(ValueError):
            deep_supervision_weights(0)


if __name__ == "__main__":
    unittest.main()
