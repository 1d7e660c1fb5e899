# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The training recipe of the authors (nnU-Net v2's trainer under MambaClinix): gradient-norm clipping at 12,
mirroring test-time augmentation on by default, nnU-Net's default augmentation with its probabilities, 1000 epochs.

The expected values are read from nnU-Net's ``nnUNetTrainer`` (``train_step``, ``get_training_transforms``,
``configure_rotation_dummyDA_mirroring_and_inital_patch_size``) and batchgenerators' transforms it uses.
"""

from __future__ import annotations

import math
import unittest
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.transforms import AdjustContrast, RandGaussianSmooth, RandSimulateLowResolution
from parameterized import parameterized

from scripts.handlers import GradientClipping
from scripts.inferers import MirroringSlidingWindowInferer
from scripts.transforms import (
    RandGamma, RandMirrord, RandPerChanneld, RandRotateScaled, nnunet_rotation_range, nnunet_uniform,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLIP = 12.0


def _parser(*names: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in names])
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _run_one_step(max_norm, scale: float, amp_scaler: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One SupervisedTrainer step with ``loss = scale * sum(out^2)``; returns (grads after the step, reference
    grads of the same loss computed by hand without any clipping)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Conv3d(2, 2, 1))
    data = [{"image": torch.randn(2, 1, 4, 5, 6), "label": torch.zeros(2, 1, 4, 5, 6)}]

    def loss_fn(pred, _target):
        return scale * (pred**2).sum()

    ref = [torch.autograd.grad(loss_fn(net(data[0]["image"]), None), list(net.parameters()))][0]
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the step leaves the weights, grads stay readable
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net, optimizer=opt,
        loss_function=loss_fn, amp=amp_scaler, train_handlers=[GradientClipping(max_norm)],
    )
    scalers = []
    if amp_scaler:  # a CPU GradScaler that really scales (run() sets a CUDA one): the handler must unscale first

        def use_cpu_scaler(engine):
            engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            scalers.append(engine.scaler)

        trainer.add_event_handler(Events.STARTED, use_cpu_scaler)
    trainer.run()
    if amp_scaler:
        assert scalers and trainer.scaler is scalers[0] and trainer.scaler.get_scale() == 2.0**10
    return [p.grad.detach().clone() for p in net.parameters()], list(ref)


def _total_norm(grads) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class TestGradientClipping(unittest.TestCase):
    @parameterized.expand([[False], [True]])
    def test_huge_loss_clipped_to_12(self, amp_scaler):
        grads, ref = _run_one_step(CLIP, scale=1e6, amp_scaler=amp_scaler)
        ref_norm = _total_norm(ref)
        self.assertGreater(ref_norm, 1e3 * CLIP)
        self.assertLessEqual(_total_norm(grads), CLIP * (1 + 1e-5))
        # torch's rule: every gradient times max_norm / (total norm + 1e-6), the direction kept
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r * (CLIP / (ref_norm + 1e-6)), rtol=1e-4, atol=1e-6)

    @parameterized.expand([[None], [0], [0.0]])
    def test_off(self, max_norm):
        grads, ref = _run_one_step(max_norm, scale=1e6)
        self.assertGreater(_total_norm(grads), 1e3 * CLIP)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-3)

    def test_small_gradients_untouched(self):
        grads, ref = _run_one_step(CLIP, scale=1e-4)
        self.assertLess(_total_norm(ref), CLIP)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r)

    @parameterized.expand([[-1.0], [float("nan")], [float("inf")]])
    def test_bad_max_norm(self, value):
        with self.assertRaisesRegex(ValueError, "max_norm"):
            GradientClipping(value)

    def test_train_config(self):
        parser = _parser("train.yaml")
        self.assertEqual(parser.get_parsed_content("grad_clip_norm"), 12)
        handlers = parser["train#handlers"]
        clip = [h for h in handlers if h.get("_target_") == "scripts.handlers.GradientClipping"]
        self.assertEqual(len(clip), 1)
        self.assertEqual(clip[0]["max_norm"], "@grad_clip_norm")


class TestDefaults(unittest.TestCase):
    @parameterized.expand([[("inference.yaml",), "inferer"], [("train.yaml", "evaluate.yaml"), "validate#inferer"]])
    def test_tta_mirroring_on_by_default(self, names, inferer_key):
        for dims, axes in ((3, (0, 1, 2)), (2, (0, 1))):
            parser = _parser(*names, spatial_dims=dims)
            self.assertEqual(parser.get_parsed_content("tta_mirror_axes"), list(axes))
            if dims == 3:
                inferer = parser.get_parsed_content(inferer_key)
                self.assertIsInstance(inferer, MirroringSlidingWindowInferer)
                self.assertEqual(inferer.mirror_axes, axes)
        for value in ([], "null"):  # "null": what `--tta_mirror_axes null` on the command line delivers
            off = _parser(*names, tta_mirror_axes=value).get_parsed_content(inferer_key)
            self.assertEqual(off.mirror_axes, ())

    def test_training_validation_does_not_mirror(self):
        # nnU-Net's validation during training has no TTA; only evaluation and inference mirror
        self.assertEqual(_parser("train.yaml").get_parsed_content("validate#inferer").mirror_axes, ())

    def test_schedule(self):
        parser = _parser("train.yaml")
        self.assertEqual((parser["epochs"], parser["iterations_per_epoch"]), (1000, 250))
        self.assertEqual(parser["train#trainer#max_epochs"], "@epochs")
        self.assertEqual(parser["lr_scheduler"]["total_iters"], "@epochs")


def _spec(t) -> dict:
    """What nnU-Net's default augmentation fixes, read off an instantiated entry of train#random_transforms."""
    name = type(t).__name__
    if name == "RandPerChanneld":
        inner = t.transform
        spec = dict(name=f"{name}({type(inner).__name__})", p=t.prob, p_channel=t.prob_per_channel)
        if isinstance(inner, RandGaussianSmooth):
            spec.update(sigma=tuple(tuple(r) for r in (inner.sigma_x, inner.sigma_y, inner.sigma_z)), inner_p=inner.prob)
        elif isinstance(inner, RandSimulateLowResolution):
            spec.update(zoom=tuple(inner.zoom_range), down=str(inner.downsample_mode), inner_p=inner.prob)
        elif isinstance(inner, RandGamma):
            spec.update(gamma=inner.gamma, invert=inner.invert_image, retain=inner.retain_stats, inner_p=inner.prob)
        return spec
    if name == "RandRotateScaled":
        return dict(name=name, p_rot=t.prob_rotate, p_rot_axis=t.prob_rotate_per_axis, rot=t.rotate_range,
                    scale=t.scale_range, p_scale=t.prob_scale, mode=tuple(t.mode))
    if name == "RandGaussianNoised":
        return dict(name=name, p=t.prob, mean=t.rand_gaussian_noise.mean, std=t.rand_gaussian_noise.std,
                    sample_std=t.rand_gaussian_noise.sample_std)
    if name == "RandScaleIntensityd":
        return dict(name=name, p=t.prob, factors=t.scaler.factors, channel_wise=t.scaler.channel_wise)
    if name == "RandScaleIntensityFixedMeand":
        s = t.scaler
        return dict(name=name, p=t.prob, factors=s.factors, fixed_mean=s.fixed_mean, preserve=s.preserve_range,
                    channel_wise=s.channel_wise)
    if name == "RandMirrord":
        return dict(name=name, p=t.prob, axes=t.spatial_axes)
    return dict(name=name)


D30 = math.radians(30.0)
# nnUNetTrainer.get_training_transforms (3D, isotropic-enough patch), in its order
NNUNET_DEFAULTS = [
    dict(name="RandCropByPosNegLabeld"),  # nnU-Net's data loader: patch sampling (a third with foreground)
    dict(name="RandRotateScaled", p_rot=0.2, p_rot_axis=1.0, rot=[(-D30, D30)] * 3, scale=(0.7, 1.4), p_scale=0.2,
         mode=("bilinear", "nearest")),
    dict(name="RandGaussianNoised", p=0.1, mean=0.0, std=0.1, sample_std=True),  # variance (0, 0.1) used as std
    dict(name="RandPerChanneld(RandGaussianSmooth)", p=0.2, p_channel=0.5, sigma=((0.5, 1.0),) * 3, inner_p=1.0),
    dict(name="RandScaleIntensityd", p=0.15, factors=(-0.25, 0.25), channel_wise=True),  # brightness 0.75-1.25
    dict(name="RandScaleIntensityFixedMeand", p=0.15, factors=(-0.25, 0.25), fixed_mean=True, preserve=True,
         channel_wise=True),  # contrast 0.75-1.25, preserve_range
    dict(name="RandPerChanneld(RandSimulateLowResolution)", p=0.25, p_channel=0.5, zoom=(0.5, 1.0), down="nearest",
         inner_p=1.0),
    dict(name="RandPerChanneld(RandGamma)", p=0.1, p_channel=1.0, gamma=(0.7, 1.5), invert=True, retain=True,
         inner_p=1.0),
    dict(name="RandPerChanneld(RandGamma)", p=0.3, p_channel=1.0, gamma=(0.7, 1.5), invert=False, retain=True,
         inner_p=1.0),
    dict(name="RandMirrord", p=0.5, axes=None),  # every spatial axis
    dict(name="EnsureTyped"),
]


class TestAugmentationConfig(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.transforms = _parser("train.yaml").get_parsed_content("train#random_transforms")

    def test_list_matches_nnunet(self):
        self.assertEqual([_spec(t)["name"] for t in self.transforms], [e["name"] for e in NNUNET_DEFAULTS])

    @parameterized.expand([[i, e["name"]] for i, e in enumerate(NNUNET_DEFAULTS)])
    def test_entry(self, index, _name):
        got, expected = _spec(self.transforms[index]), NNUNET_DEFAULTS[index]
        for key, value in expected.items():
            if isinstance(value, float):
                self.assertAlmostEqual(got[key], value, places=12, msg=key)
            elif key == "rot":
                np.testing.assert_allclose(np.asarray(got[key]), np.asarray(value), rtol=1e-12)
            else:
                self.assertEqual(tuple(got[key]) if isinstance(value, tuple) else got[key], value, msg=key)

    def test_runs_on_a_patch(self):
        from monai.transforms import Compose

        chain = Compose(self.transforms[1:])
        chain.set_random_state(0)
        img = MetaTensor(torch.randn(2, 8, 10, 12))
        label = MetaTensor(torch.randint(0, 3, (1, 8, 10, 12)).float())
        for _ in range(20):
            out = chain({"image": img, "label": label})
            self.assertEqual(tuple(out["image"].shape), (2, 8, 10, 12))
            self.assertEqual(out["label"].dtype, torch.uint8)
            self.assertTrue(set(out["label"].unique().tolist()) <= {0, 1, 2})


class TestNnUNetSampling(unittest.TestCase):
    def test_uniform_straddling_one(self):
        rng = np.random.RandomState(0)
        draws = np.array([nnunet_uniform(rng, 0.7, 1.4) for _ in range(20000)])
        self.assertTrue(((draws >= 0.7) & (draws <= 1.4)).all())
        self.assertAlmostEqual(float((draws < 1).mean()), 0.5, delta=0.015)  # MONAI's uniform: 3/7
        below, above = draws[draws < 1], draws[draws >= 1]
        self.assertAlmostEqual(float(below.mean()), 0.85, delta=0.01)
        self.assertAlmostEqual(float(above.mean()), 1.2, delta=0.01)

    @parameterized.expand([[(0.5, 0.9)], [(1.1, 2.0)], [(1.0, 1.0)]])
    def test_uniform_one_side(self, bounds):
        rng = np.random.RandomState(1)
        draws = np.array([nnunet_uniform(rng, *bounds) for _ in range(4000)])
        self.assertTrue(((draws >= bounds[0]) & (draws <= bounds[1])).all())
        self.assertAlmostEqual(float(draws.mean()), sum(bounds) / 2, delta=0.02)

    def test_uniform_bad_range(self):
        with self.assertRaisesRegex(ValueError, "low <= high"):
            nnunet_uniform(np.random.RandomState(0), 1.4, 0.7)

    @parameterized.expand(
        [
            [(128, 128, 128), [(-D30, D30)] * 3],
            [(80, 192, 160), [(-D30, D30)] * 3],  # 192 / 80 = 2.4 <= 3
            [(40, 224, 192), [(-math.pi, math.pi), (0.0, 0.0), (0.0, 0.0)]],  # dummy 2D about the coarse axis
            [(224, 192, 40), [(0.0, 0.0), (0.0, 0.0), (-math.pi, math.pi)]],
            [(256, 256), [(-math.pi, math.pi)]],
            [(512, 256), [(-math.radians(15), math.radians(15))]],
        ]
    )
    def test_rotation_range(self, patch, expected):
        np.testing.assert_allclose(np.asarray(nnunet_rotation_range(patch)), np.asarray(expected), rtol=1e-12)

    @parameterized.expand([[(64,)], [(0, 4, 4)], [(4, 4, 4, 4)]])
    def test_rotation_range_bad(self, patch):
        with self.assertRaisesRegex(ValueError, "patch_size"):
            nnunet_rotation_range(patch)


class TestRandRotateScaled(unittest.TestCase):
    def test_probabilities_independent(self):
        t = RandRotateScaled(["image"], rotate_range=[0.5] * 3, prob_rotate=0.2, prob_scale=0.2)
        t.set_random_state(0)
        rot, scale = [], []
        for _ in range(20000):
            t.randomize()
            rot.append(t.angles is not None)
            scale.append(t.scale is not None)
        rot, scale = np.array(rot), np.array(scale)
        self.assertAlmostEqual(rot.mean(), 0.2, delta=0.01)
        self.assertAlmostEqual(scale.mean(), 0.2, delta=0.01)
        self.assertAlmostEqual((rot & scale).mean(), 0.04, delta=0.006)

    def test_per_axis_probability(self):
        t = RandRotateScaled(["image"], rotate_range=[0.5] * 3, prob_rotate=1.0, prob_rotate_per_axis=0.5,
                             prob_scale=0.0)
        t.set_random_state(3)
        nonzero = []
        for _ in range(4000):
            t.randomize()
            nonzero.append([a != 0.0 for a in t.angles])
        np.testing.assert_allclose(np.mean(nonzero, axis=0), [0.5] * 3, atol=0.03)

    def test_quarter_turn_is_rot90(self):
        # independent reference: a rotation by exactly 90 degrees about axis 0 is a voxel permutation
        img = torch.arange(5 * 5 * 5, dtype=torch.float32).reshape(1, 5, 5, 5)
        t = RandRotateScaled(["image", "label"], rotate_range=[(math.pi / 2,) * 2, (0.0, 0.0), (0.0, 0.0)],
                             prob_rotate=1.0, prob_scale=0.0, mode="nearest")
        out = t({"image": img, "label": img.clone()})
        candidates = [torch.rot90(img, k, dims=(2, 3)) for k in (1, 3)]
        self.assertTrue(any(torch.equal(torch.as_tensor(out["image"]), c) for c in candidates))
        torch.testing.assert_close(torch.as_tensor(out["label"]), torch.as_tensor(out["image"]))

    def test_isotropic_scale(self):
        # a centred cube zoomed by s keeps its centre and has the same extent along every axis
        img = torch.zeros(1, 21, 21, 21)
        img[:, 6:15, 6:15, 6:15] = 1
        t = RandRotateScaled(["image"], rotate_range=[0.0] * 3, prob_rotate=0.0, scale_range=(0.5, 0.5),
                             prob_scale=1.0, mode="nearest")
        out = torch.as_tensor(t({"image": img})["image"])[0]
        extents = [int(out.sum(dim=tuple(d for d in range(3) if d != a)).gt(0).sum()) for a in range(3)]
        self.assertEqual(len(set(extents)), 1)
        self.assertGreater(extents[0], 9)  # a factor below 1 zooms in (nnU-Net's coordinate scaling)
        self.assertEqual(out[10, 10, 10].item(), 1.0)

    def test_nothing_drawn_leaves_data(self):
        img = torch.randn(1, 4, 5, 6)
        out = RandRotateScaled(["image"], rotate_range=[0.5] * 3, prob_rotate=0.0, prob_scale=0.0)({"image": img})
        self.assertIs(out["image"], img)

    def test_2d(self):
        img = torch.randn(1, 6, 6)
        t = RandRotateScaled(["image"], rotate_range=[(math.pi, math.pi)], prob_rotate=1.0, prob_scale=0.0,
                             mode="nearest")
        torch.testing.assert_close(torch.as_tensor(t({"image": img})["image"]), torch.flip(img, (1, 2)))

    @parameterized.expand(
        [
            [dict(rotate_range=[0.5] * 2)],
            [dict(rotate_range=[(0.5, 0.1)] * 3)],
            [dict(rotate_range=[0.5] * 3, prob_rotate=1.5)],
            [dict(rotate_range=[0.5] * 3, prob_scale=-0.1)],
            [dict(rotate_range=[0.5] * 3, scale_range=(1.4, 0.7))],
            [dict(rotate_range=[0.5] * 3, scale_range=(0.0, 1.0))],
        ]
    )
    def test_bad_args(self, kwargs):
        with self.assertRaises(ValueError):
            RandRotateScaled(["image"], **kwargs)

    def test_dims_mismatch(self):
        t = RandRotateScaled(["image"], rotate_range=[0.5], prob_rotate=1.0)
        with self.assertRaisesRegex(ValueError, "spatial dims"):
            t({"image": torch.randn(1, 4, 4, 4)})


class TestRandPerChanneld(unittest.TestCase):
    def test_probabilities(self):
        t = RandPerChanneld("image", transform=lambda x: x + 1, prob=0.4, prob_per_channel=0.5)
        t.set_random_state(0)
        img = torch.zeros(3, 2, 2)
        changed = np.array([torch.as_tensor(t({"image": img})["image"])[:, 0, 0].numpy() for _ in range(20000)])
        self.assertAlmostEqual(float(changed.any(axis=1).mean()), 0.4 * (1 - 0.5**3), delta=0.012)
        np.testing.assert_allclose(changed.mean(axis=0), [0.2] * 3, atol=0.012)
        self.assertTrue(torch.equal(img, torch.zeros(3, 2, 2)))  # input untouched

    def test_each_channel_draws_its_own_parameters(self):
        inner = RandGamma(prob=1.0, gamma=(0.7, 1.5), retain_stats=False)
        t = RandPerChanneld("image", transform=inner, prob=1.0, prob_per_channel=1.0).set_random_state(5)
        ramp = torch.linspace(0, 1, 50)
        img = MetaTensor(torch.stack([ramp, ramp]).reshape(2, 5, 10), meta={"filename_or_obj": "x"})
        out = t({"image": img})["image"]
        self.assertIsInstance(out, MetaTensor)
        self.assertEqual(out.meta["filename_or_obj"], "x")
        self.assertFalse(torch.allclose(out[0], out[1]))
        for c in range(2):  # each channel is x ** gamma for some gamma in range (the min is 0 and the range 1)
            gamma = math.log(float(out[c].flatten()[25])) / math.log(float(ramp[25]))
            self.assertTrue(0.7 - 1e-4 <= gamma <= 1.5 + 1e-4, gamma)
            torch.testing.assert_close(out[c].flatten(), ramp**gamma, rtol=1e-4, atol=1e-5)

    def test_random_state_reproducible(self):
        def run(seed):
            t = RandPerChanneld("image", transform=RandGamma(prob=1.0, gamma=(0.7, 1.5)), prob=0.5)
            t.set_random_state(seed)
            return [torch.as_tensor(t({"image": torch.rand(2, 4, 4)})["image"]).sum().item() for _ in range(3)]

        torch.manual_seed(0)
        a = run(7)
        torch.manual_seed(0)
        self.assertEqual(a, run(7))

    @parameterized.expand([[dict(transform=None)], [dict(prob=2.0)], [dict(prob_per_channel=-1.0)]])
    def test_bad_args(self, kwargs):
        args = dict(transform=lambda x: x, prob=1.0, prob_per_channel=1.0)
        args.update(kwargs)
        with self.assertRaises(ValueError):
            RandPerChanneld("image", **args)


class TestRandGamma(unittest.TestCase):
    def test_draw_and_value(self):
        t = RandGamma(prob=1.0, gamma=(0.7, 1.5), invert_image=True, retain_stats=True)
        t.set_random_state(0)
        img = torch.rand(1, 6, 7)
        gammas = []
        for _ in range(4000):
            t.randomize()
            gammas.append(t.gamma_value)
        self.assertAlmostEqual(float(np.mean(np.array(gammas) < 1)), 0.5, delta=0.03)  # MONAI's draw: 0.375
        self.assertTrue(0.7 <= min(gammas) and max(gammas) <= 1.5)
        out = t(img)
        torch.testing.assert_close(out, AdjustContrast(t.gamma_value, invert_image=True, retain_stats=True)(img))

    def test_prob(self):
        t = RandGamma(prob=0.0, gamma=(0.7, 1.5))
        img = torch.rand(1, 4, 4)
        torch.testing.assert_close(t(img), img)


class TestRandMirrord(unittest.TestCase):
    @parameterized.expand([[2], [3]])
    def test_each_axis_half_the_time(self, dims):
        t = RandMirrord(["image", "label"], prob=0.5)
        t.set_random_state(0)
        img = torch.arange(2**dims, dtype=torch.float32).reshape((1,) + (2,) * dims)
        flips = []
        subsets = [[a + 1 for a in range(dims) if m >> a & 1] for m in range(2**dims)]
        for _ in range(500):
            out = t({"image": img, "label": img.clone()})
            torch.testing.assert_close(out["image"], out["label"])
            # distinct voxel values: exactly one subset of axes gives the output
            (axes,) = [s for s in subsets if torch.equal(torch.as_tensor(out["image"]), torch.flip(img, s))]
            axes = [a - 1 for a in axes]
            flips.append([a in axes for a in range(dims)])
        np.testing.assert_allclose(np.mean(flips, axis=0), [0.5] * dims, atol=0.07)
        self.assertAlmostEqual(float(np.all(flips, axis=1).mean()), 0.5**dims, delta=0.06)  # axes independent

    def test_chosen_axes(self):
        t = RandMirrord("image", prob=1.0, spatial_axes=[1])
        img = torch.randn(1, 3, 4, 5)
        torch.testing.assert_close(torch.as_tensor(t({"image": img})["image"]), torch.flip(img, (2,)))

    def test_bad_args(self):
        with self.assertRaises(ValueError):
            RandMirrord("image", prob=1.5)
        with self.assertRaises(ValueError):
            RandMirrord("image", spatial_axes=[-1])
        with self.assertRaisesRegex(ValueError, "exceed"):
            RandMirrord("image", spatial_axes=[2])({"image": torch.randn(1, 4, 4)})


if __name__ == "__main__":
    unittest.main()
