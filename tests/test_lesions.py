# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""scripts.lesions: the synthetic FLAIR lesion generator.

The rules are checked against independent references (explicit per-voxel rules, brute-force distances, analytic
ellipsoid volumes) on small arrays; the generated volumes come from a 2 mm copy of the MNI152 maps (every second
voxel of data/mni/raw, skipped when it is absent) on grids of about 2 mm or 48 x 56 x 40 voxels, so each test takes
seconds.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import subprocess
import sys
import tempfile
import unittest
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
from parameterized import parameterized
from scipy import ndimage as ndi

from scripts.data import load_datalist, validate_datalist
from scripts.io_utils import save_nifti_atomic
from scripts.lesions.acquisition import (
    _profile_sigma, field_of_view, sample_deformation, sample_grid, template_coordinates, warp_anatomy,
)
from scripts.lesions.anatomy import (
    BACKGROUND, CSF, GREY_MATTER, INFRATENTORIAL, MNI_NAMES, REGION_INFRATENTORIAL, REGION_VENTRICLE, VENTRICLE,
    WHITE_MATTER, Anatomy, build_anatomy, infratentorial_mask, load_anatomy, tissue_labels,
)
from scripts.lesions.appearance import bias_field
from scripts.lesions.generate import generate_dataset, main, synthesize_volume, volume_rng
from scripts.lesions.lesions import LESION_LOADS, LesionLoad, render_shape
from scripts.hunet.locations import JUXTACORTICAL_MM, PERIVENTRICULAR_MM, location_at, location_maps
from tests.utils import ROOT

MNI_RAW = ROOT / "data" / "mni" / "raw"
HAS_MNI = all((MNI_RAW / name).is_file() for name in MNI_NAMES.values())
needs_mni = unittest.skipUnless(HAS_MNI, f"MNI maps missing under {MNI_RAW}: python -m scripts.demo.data --which mni")
_TMP = tempfile.TemporaryDirectory()


def tearDownModule():
    _TMP.cleanup()


@functools.lru_cache(maxsize=None)
def _mni_copy() -> Path:
    """A 2 mm copy of the MNI152 T1 and tissue maps (every second voxel), written as the generator reads them."""
    folder = Path(_TMP.name) / "mni2"
    for name in MNI_NAMES.values():
        img = nib.load(str(MNI_RAW / name))
        affine = img.affine.copy()
        affine[:3, :3] *= 2
        save_nifti_atomic(np.asarray(img.dataobj)[::2, ::2, ::2], affine, folder / name)
    return folder


@functools.lru_cache(maxsize=None)
def _anatomy():
    return load_anatomy(_mni_copy())


def _reference_location(tissue: np.ndarray, spacing, centre) -> str | None:
    """The location class of a voxel by brute force: distances to every ventricle / grey matter voxel."""
    centre = tuple(int(c) for c in centre)
    if tissue[centre] == INFRATENTORIAL:
        return "infratentorial"
    if tissue[centre] != WHITE_MATTER:
        return None

    def nearest(value):
        points = np.argwhere(tissue == value)
        if not len(points):
            return np.inf
        return float(np.sqrt((((points - np.array(centre)) * np.asarray(spacing)) ** 2).sum(1)).min())

    if nearest(VENTRICLE) <= PERIVENTRICULAR_MM:
        return "periventricular"
    if nearest(GREY_MATTER) <= JUXTACORTICAL_MM:
        return "juxtacortical"
    return "deep_white_matter"


class TestTissueRules(unittest.TestCase):
    @parameterized.expand([(0,), (1,), (2,)])
    def test_tissue_labels_against_per_voxel_rule(self, seed):
        rng = np.random.default_rng(seed)
        shape = (6, 5, 4)
        brain = rng.uniform(0, 1, shape).astype(np.float32)
        gm = (brain * rng.uniform(0, 1, shape)).astype(np.float32)
        wm = ((brain - gm) * rng.uniform(0, 1, shape)).astype(np.float32)
        region = rng.integers(0, 3, shape).astype(np.uint8)
        labels = tissue_labels(brain, gm, wm, region)
        for index in np.ndindex(shape):
            probs = {BACKGROUND: 1 - brain[index], CSF: brain[index] - gm[index] - wm[index], GREY_MATTER: gm[index],
                     WHITE_MATTER: wm[index]}
            expected = max(probs, key=lambda k: (probs[k], -k))
            if expected == CSF and region[index] == REGION_VENTRICLE:
                expected = VENTRICLE
            if expected in (GREY_MATTER, WHITE_MATTER) and region[index] == REGION_INFRATENTORIAL:
                expected = INFRATENTORIAL
            self.assertEqual(labels[index], expected, index)

    @parameterized.expand([
        ("brainstem_pons", (0, -30, -30), True), ("midbrain", (5, -25, -12), True), ("vermis", (0, -60, -20), True),
        ("cerebellar_hemisphere", (35, -65, -40), True), ("medulla", (0, -42, -55), True),
        ("thalamus", (10, -20, 5), False), ("temporal_lobe", (45, -20, -30), False),
        ("occipital_pole", (10, -95, 5), False), ("hypothalamus", (4, -8, -10), False),
        ("fusiform_gyrus", (40, -50, -18), False), ("corpus_callosum", (0, 0, 25), False),
        ("lingual_gyrus", (5, -80, -8), False),
    ])
    def test_infratentorial_rule(self, _, point, expected):
        x, y, z = (np.array([float(v)]) for v in point)
        self.assertEqual(bool(infratentorial_mask(x, y, z)[0]), expected)

    @parameterized.expand([((1.0, 1.0, 1.0),), ((1.0, 1.0, 3.0),), ((2.0, 1.5, 5.0),)])
    def test_location_maps_against_brute_force(self, spacing):
        rng = np.random.default_rng(int(sum(spacing) * 10))
        tissue = rng.choice([CSF, GREY_MATTER, WHITE_MATTER, WHITE_MATTER, WHITE_MATTER], size=(14, 12, 6))
        tissue[5:8, 4:7, 2:4] = VENTRICLE
        tissue[0, :, :] = INFRATENTORIAL
        tissue = tissue.astype(np.uint8)
        maps = location_maps(tissue, spacing)
        for index in np.ndindex(tissue.shape):
            self.assertEqual(location_at(maps, index), _reference_location(tissue, spacing, index), index)

    def test_location_ill_arguments(self):
        with self.assertRaisesRegex(ValueError, "3D"):
            location_maps(np.zeros((4, 4), np.uint8), (1.0, 1.0))
        with self.assertRaisesRegex(ValueError, "positive"):
            location_maps(np.zeros((4, 4, 4), np.uint8), (1.0, 0.0, 1.0))
        with self.assertRaisesRegex(ValueError, "unknown location"):
            location_maps(np.zeros((4, 4, 4), np.uint8), (1.0, 1.0, 1.0)).zone("cortical")

    def test_anatomy_ill_arguments(self):
        t1 = np.ones((8, 8, 8), np.float32)
        with self.assertRaisesRegex(ValueError, "one grid"):
            build_anatomy(t1, np.zeros((8, 8, 7)), np.zeros((8, 8, 8)), np.eye(4))
        with self.assertRaisesRegex(ValueError, "non-negative"):
            build_anatomy(t1, -np.ones((8, 8, 8)), np.zeros((8, 8, 8)), np.eye(4))
        with self.assertRaisesRegex(ValueError, "empty"):
            build_anatomy(t1, np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), np.eye(4))
        with tempfile.TemporaryDirectory() as tmp, self.assertRaisesRegex(ValueError, "scripts.demo.data"):
            load_anatomy(tmp)


class TestShapes(unittest.TestCase):
    @parameterized.expand([
        ((4.0, 3.0, 2.5), (1.0, 1.0, 1.0)), ((8.0, 5.0, 4.0), (1.0, 1.0, 3.0)), ((12.0, 9.0, 6.0), (2.0, 2.0, 5.0)),
        ((2.0, 1.5, 1.2), (0.9, 0.9, 1.0)),
    ])
    def test_ellipsoid_volume(self, semi_axes, spacing):
        rng = np.random.default_rng(0)
        rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        share, half = render_shape(rng, "ellipsoid", np.array(semi_axes), rotation, spacing)
        self.assertEqual(share.shape, tuple(2 * h + 1 for h in half))
        self.assertTrue((share >= 0).all() and (share <= 1).all())
        self.assertAlmostEqual(share.sum() * np.prod(spacing) / (4 / 3 * np.pi * np.prod(semi_axes)), 1.0, delta=0.1)
        # partial volume: the covered share of each voxel, against 8 x 8 x 8 sample points per voxel
        n = 8
        points = np.stack(np.meshgrid(*[((np.arange((2 * h + 1) * n) + 0.5) / n - h - 0.5) * s
                                        for h, s in zip(half, spacing)], indexing="ij"), -1)
        covered = (((points @ rotation) / np.array(semi_axes)) ** 2).sum(-1) <= 1
        reference = covered.reshape(share.shape[0], n, share.shape[1], n, share.shape[2], n).mean(axis=(1, 3, 5))
        edge = (reference > 0) & (reference < 1)
        self.assertLess(float(np.abs(share - reference)[edge].mean()), 0.08)
        self.assertLess(float(np.abs(share - reference).max()), 0.3)

    @parameterized.expand([("lobulated",), ("irregular",)])
    def test_irregular_shapes_within_ellipsoid_box(self, kind):
        rng = np.random.default_rng(1)
        semi_axes = np.array([6.0, 4.0, 3.0])
        share, half = render_shape(rng, kind, semi_axes, np.eye(3), (1.0, 1.0, 2.0))
        grid = np.stack(np.meshgrid(*[(np.arange(2 * h + 1) - h) * s for h, s in zip(half, (1.0, 1.0, 2.0))],
                                    indexing="ij"), -1)
        outside = (((np.abs(grid) - np.array([0.5, 0.5, 1.0])).clip(0) / semi_axes) ** 2).sum(-1) > 1
        self.assertEqual(float(share[outside].max(initial=0)), 0.0)  # nothing beyond the bounding ellipsoid
        ellipsoid = 4 / 3 * np.pi * semi_axes.prod()
        self.assertTrue(0.2 * ellipsoid < share.sum() * 2.0 < ellipsoid, share.sum() * 2.0)

    def test_shape_and_load_ill_arguments(self):
        with self.assertRaisesRegex(ValueError, "unknown lesion shape"):
            render_shape(np.random.default_rng(0), "star", np.ones(3), np.eye(3), (1.0, 1.0, 1.0))
        with self.assertRaisesRegex(ValueError, "count range"):
            LesionLoad("bad", count=(-1, 3), volume_ml=(0.01, 1.0))
        with self.assertRaisesRegex(ValueError, "volume range"):
            LesionLoad("bad", count=(1, 3), volume_ml=(0.0, 1.0))
        with self.assertRaisesRegex(ValueError, "weights"):
            LesionLoad("bad", count=(1, 3), volume_ml=(0.01, 1.0), weights={"cortical": 1.0})


class TestAcquisition(unittest.TestCase):
    @parameterized.expand([
        ("ras_2mm", np.diag([2.0, 2.0, 2.0, 1.0]), (0.0, 0.0, 0.0)),
        ("lps_flipped", np.diag([-1.5, -1.5, 2.5, 1.0]), (0.0, 0.0, 0.0)),
        ("constant_displacement", np.diag([2.0, 2.0, 2.0, 1.0]), (3.0, -2.0, 1.5)),
    ])
    def test_coordinates_of_a_plain_deformation(self, _, template_affine, displacement):
        template_affine = template_affine.copy()
        template_affine[:3, 3] = [-20.0, 30.0, -10.0]
        grid = sample_grid(np.random.default_rng(0), (20, 24, 16), template_affine, shape=(10, 12, 8))
        rng = np.random.default_rng(1)
        deformation = sample_deformation(rng, grid)
        control = np.broadcast_to(np.array(displacement)[:, None, None, None], deformation.control.shape)
        plain = replace(deformation, matrix=np.eye(3), shift=np.zeros(3), control=np.array(control))
        coords = template_coordinates(plain, grid, template_affine)
        # reference: world position of each output voxel plus the displacement, through the template's inverse
        idx = np.indices(grid.shape).reshape(3, -1)
        world = grid.affine[:3, :3] @ idx + grid.affine[:3, 3:4] + np.array(displacement)[:, None]
        inverse = np.linalg.inv(template_affine)
        expected = (inverse[:3, :3] @ world + inverse[:3, 3:4]).reshape(3, *grid.shape)
        np.testing.assert_allclose(coords, expected, atol=1e-4)

    @parameterized.expand([("same_spacing", (24, 22, 20)), ("thick_slices", (16, 18, 8))])
    def test_warp_equals_plain_interpolation(self, _, shape):
        rng = np.random.default_rng(2)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = [-24.0, -22.0, -20.0]
        centre = np.array([12.0, 11.0, 10.0])
        r = np.linalg.norm(np.indices((24, 22, 20)).transpose(1, 2, 3, 0) - centre, axis=-1)
        brain = np.clip(8.5 - r, 0, 1).astype(np.float32)
        gm = (brain * np.clip(r - 4, 0, 1) * 0.7).astype(np.float32)
        wm = (brain * np.clip(5 - r, 0, 1) * 0.9).astype(np.float32)
        region = (r < 3).astype(np.uint8)
        anatomy = Anatomy(brain=brain, gm=gm, wm=wm, region=region, affine=affine)
        grid = sample_grid(rng, anatomy.shape, affine, shape=shape)
        deformation = sample_deformation(rng, grid)
        warped = warp_anatomy(anatomy, grid, deformation)
        # reference: every output voxel interpolated, no support mask
        coords = template_coordinates(deformation, grid, affine)
        sigma = _profile_sigma(affine, grid.spacing)
        expected = {}
        for name, volume in (("brain", brain), ("gm", gm), ("wm", wm)):
            if sigma.max() > 0.05:
                volume = ndi.gaussian_filter(volume, sigma, truncate=3.0)
            expected[name] = np.clip(ndi.map_coordinates(volume, coords, order=1, prefilter=False), 0, 1)
        expected["brain"] = np.maximum(expected["brain"], np.minimum(expected["gm"] + expected["wm"], 1))
        for name in ("brain", "gm", "wm"):
            np.testing.assert_allclose(getattr(warped, name), expected[name], atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(warped.region, ndi.map_coordinates(region, coords, order=0, prefilter=False))
        self.assertTrue(((expected["brain"] > 0) & (expected["brain"] < 0.5)).any())  # a soft edge was compared

    @parameterized.expand([(1.0,), (2.0,), (3.0,)])
    def test_grid_covers_the_field_of_view(self, downsample):
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        affine[:3, 3] = [-98.0, -134.0, -72.0]
        for seed in range(8):
            grid = sample_grid(np.random.default_rng(seed), (197, 233, 189), affine, downsample)
            spacing = np.array(grid.spacing)
            self.assertTrue(0.9 * downsample - 1e-9 <= spacing[0] == spacing[1] <= 1.2 * downsample + 1e-9)
            self.assertTrue(spacing[0] <= spacing[2] <= max(5.0, spacing[0]))
            lower, upper = field_of_view(grid.shape, grid.affine)
            np.testing.assert_allclose(lower, [-98.5, -134.5, -72.5], atol=spacing.max() / 2 + 1e-6)
            np.testing.assert_allclose(upper, [98.5, 98.5, 116.5], atol=spacing.max() / 2 + 1e-6)
        grid = sample_grid(np.random.default_rng(0), (197, 233, 189), affine, shape=(48, 56, 40))
        self.assertEqual(grid.shape, (48, 56, 40))
        with self.assertRaisesRegex(ValueError, "--downsample"):
            sample_grid(np.random.default_rng(0), (197, 233, 189), affine, 0.5)
        with self.assertRaisesRegex(ValueError, "--shape"):
            sample_grid(np.random.default_rng(0), (197, 233, 189), affine, shape=(48, 56))

    @parameterized.expand([(0.05,), (0.35,)])
    def test_bias_field_amplitude(self, amplitude):
        field = bias_field(np.random.default_rng(0), (20, 24, 10), amplitude)
        self.assertAlmostEqual(float(np.abs(np.log(field)).max()), amplitude, places=5)
        self.assertTrue((field > 0).all())
        np.testing.assert_array_equal(bias_field(np.random.default_rng(0), (4, 4, 4), 0.0), np.ones((4, 4, 4)))


@needs_mni
class TestAnatomy(unittest.TestCase):
    def test_mni_anatomy(self):
        anatomy = _anatomy()
        tissue = anatomy.tissue()
        voxel_ml = float(np.prod(anatomy.spacing)) / 1000
        self.assertTrue(1300 < (anatomy.brain >= 0.5).sum() * voxel_ml < 2200)
        ventricles = np.argwhere(tissue == VENTRICLE)
        self.assertTrue(5 < len(ventricles) * voxel_ml < 40, len(ventricles) * voxel_ml)
        world = ventricles @ anatomy.affine[:3, :3].T + anatomy.affine[:3, 3]
        self.assertLess(abs(world[:, 0].mean()), 5.0)  # both lateral ventricles, around the midline
        self.assertTrue((world[:, 0] < -5).any() and (world[:, 0] > 5).any())
        infra = np.argwhere(tissue == INFRATENTORIAL) @ anatomy.affine[:3, :3].T + anatomy.affine[:3, 3]
        self.assertTrue(100 < len(infra) * voxel_ml < 300)
        self.assertLess(infra[:, 2].max(), 0.0)  # below the AC-PC plane
        self.assertLess(infra[:, 1].max(), -10.0)  # behind the anterior commissure


def _components(label: np.ndarray) -> np.ndarray:
    return ndi.label(label, structure=np.ones((3, 3, 3)))[0]


@needs_mni
class TestGeneratedVolume(unittest.TestCase):
    @parameterized.expand([(load, grid) for load in LESION_LOADS for grid in ("downsample", "shape")])
    def test_volume_rules(self, load_name, grid):
        load = LESION_LOADS[load_name]
        options = {"downsample": 2.0} if grid == "downsample" else {"shape": (48, 56, 40)}
        volume = synthesize_volume(_anatomy(), volume_rng(3, "training", len(load_name)), load, **options)
        image, label, tissue, record = volume.image, volume.label, volume.tissue, volume.record
        spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
        voxel_ml = float(np.prod(spacing)) / 1000
        self.assertEqual(label.dtype, np.uint8)
        self.assertEqual(set(np.unique(label)) - {0, 1}, set())
        self.assertTrue(np.isin(tissue[label > 0], [GREY_MATTER, WHITE_MATTER, INFRATENTORIAL]).all())  # in brain
        self.assertGreater(record["lesion_count"], 0)
        self.assertLessEqual(record["lesion_count"], load.count[1])
        # each recorded lesion is one connected component of the mask, with the recorded voxels
        components = _components(label)
        self.assertEqual(components.max(), record["lesion_count"])
        self.assertEqual(sum(r["voxels"] for r in record["lesions"]), int(label.sum()))
        white = []
        for lesion in record["lesions"]:
            centre = tuple(lesion["centre_voxel"])
            self.assertEqual(lesion["location"], _reference_location(tissue, spacing, centre), lesion)
            own = components == components[centre]
            self.assertGreater(components[centre], 0)
            self.assertEqual(int(own.sum()), lesion["voxels"])
            low, high = load.volume_range(voxel_ml, lesion["location"])
            self.assertGreaterEqual(lesion["voxels"], load.min_voxels)
            self.assertLessEqual(lesion["voxels"] * voxel_ml, high + 1e-9)
            self.assertTrue(load.contrast[0] <= lesion["contrast"] <= load.contrast[1])
            if lesion["location"] in ("periventricular", "deep_white_matter"):
                white.append((tissue[own] == WHITE_MATTER).mean())
        self.assertGreaterEqual(min(white, default=1.0), 0.8)
        # FLAIR-like order of the medians: CSF < white matter < grey matter < lesions
        medians = [np.median(image[np.isin(tissue, v) & (label == 0)]) for v in ([CSF, VENTRICLE], [WHITE_MATTER],
                                                                                 [GREY_MATTER])]
        medians.append(np.median(image[label > 0]))
        self.assertTrue(medians[0] < medians[1] < medians[2] < medians[3], medians)
        self.assertTrue(np.isfinite(image).all() and image.min() >= 0)
        self.assertEqual(image.dtype, np.float32)
        # the computed box holds the whole brain: no tissue on a side of it that is inside the grid
        for axis, (start, stop) in enumerate(record["brain_region"]):
            profile = (tissue > 0).any(axis=tuple(b for b in range(3) if b != axis))
            self.assertFalse(profile[:start].any() or profile[stop:].any())
            self.assertFalse(start > 0 and profile[start], (axis, start))
            self.assertFalse(stop < tissue.shape[axis] and profile[stop - 1], (axis, stop))


def _arrays(folder: Path, entry: dict) -> list[np.ndarray]:
    return [np.asarray(nib.load(str(folder / entry[k])).dataobj) for k in ("image", "label", "tissue")]


@needs_mni
class TestDataset(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        cls.args = ["--mni_dir", str(_mni_copy()), "--train", "1", "--val", "1", "--test", "2", "--shape", "40", "48",
                    "40"]
        for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
            with contextlib.redirect_stdout(io.StringIO()):
                code = main([*cls.args, "--seed", seed, "--output", str(cls.tmp / name)])
            assert code == 0, name

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _datalist(self, name: str) -> dict:
        return json.loads((self.tmp / name / "datalist.json").read_text())

    def test_reproducible(self):
        a, b, c = (self._datalist(n) for n in "abc")
        for split in ("training", "validation", "test"):
            for ea, eb, ec in zip(a[split], b[split], c[split]):
                arrays = [_arrays(self.tmp / name, e) for name, e in (("a", ea), ("b", eb), ("c", ec))]
                for x, y, z in zip(*arrays):
                    self.assertEqual(x.dtype, y.dtype)
                    self.assertEqual(x.tobytes(), y.tobytes())  # same seed: byte-identical arrays
                    self.assertFalse(x.shape == z.shape and np.array_equal(x, z))  # other seed: other volume
                sidecar = [json.loads((self.tmp / n / e["lesions"]).read_text()) for n, e in (("a", ea), ("b", eb))]
                self.assertEqual(sidecar[0], sidecar[1])

    def test_volume_independent_of_dataset_size(self):
        volume = synthesize_volume(_anatomy(), volume_rng(0, "test", 1), LESION_LOADS["high"], shape=(40, 48, 40))
        entry = self._datalist("a")["test"][1]
        self.assertEqual(entry["lesion_load"], "high")
        image, label, _ = _arrays(self.tmp / "a", entry)
        np.testing.assert_array_equal(image, volume.image)
        np.testing.assert_array_equal(label, volume.label)

    def test_datalist(self):
        datalist = self._datalist("a")
        self.assertIn("synthetic", datalist["description"].lower())
        self.assertEqual(datalist["labels"], {"0": "background", "1": "lesion"})
        folder = self.tmp / "a"
        for split in ("training", "validation", "test"):
            items = load_datalist(folder / "datalist.json", folder, split)
            validate_datalist(items, 1, 2, split, spatial_dims=3, require_label=True)
            for entry in datalist[split]:
                self.assertTrue((folder / entry["tissue"]).is_file() and (folder / entry["lesions"]).is_file())
                record = json.loads((folder / entry["lesions"]).read_text())
                self.assertTrue(record["synthetic"])
                self.assertEqual(record["lesion_load"], entry["lesion_load"])
        entries = [e for split in ("training", "validation", "test") for e in datalist[split]]
        seeds = {tuple(json.loads((folder / e["lesions"]).read_text())["seed"]) for e in entries}
        self.assertEqual(len(seeds), 4)  # every volume its own seed
        train_load = datalist["training"][0]["lesion_load"]
        self.assertEqual(train_load, "mixed")
        self.assertNotIn(train_load, {e["lesion_load"] for e in datalist["test"]})  # test loads unseen in training

    def test_report_locations_agree_with_the_generator(self):
        """A lesion report given the tissue map finds the location class the generator recorded for each lesion."""
        from scripts.hunet.report import lesion_report

        agree = total = 0
        folder = self.tmp / "a"
        for entry in self._datalist("a")["test"]:
            _, label, tissue = _arrays(folder, entry)
            spacing = nib.load(str(folder / entry["label"])).header.get_zooms()[:3]
            report = lesion_report(label, spacing, tissue=tissue)
            for lesion in json.loads((folder / entry["lesions"]).read_text())["lesions"]:
                c = lesion["centre_voxel"]
                found = [r for r in report["lesions"]
                         if all(lo <= v <= hi for lo, v, hi in zip(r["bbox_min"], c, r["bbox_max"]))]
                total += 1
                agree += bool(found) and found[0]["location"] == lesion["location"]
        self.assertGreater(total, 10)
        self.assertGreaterEqual(agree / total, 0.8, f"{agree} of {total}")

    @parameterized.expand([
        ("negative_train", ["--train", "-1"], "--train"), ("zero_train", ["--train", "0"], "--train"),
        ("negative_test", ["--test", "-2"], "--test"), ("negative_val", ["--val", "-1"], "--val"),
        ("missing_maps", ["--mni_dir", "{tmp}/nowhere"], "scripts.demo.data"),
        ("downsample", ["--downsample", "0.5"], "--downsample"), ("shape", ["--shape", "4", "4", "4"], "--shape"),
        ("load", ["--lesion_load", "huge"], "lesion_load"), ("not_a_number", ["--train", "two"], "--train"),
    ])
    def test_cli_ill_arguments(self, _, extra, expected):
        extra = [e.format(tmp=self.tmp) for e in extra]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["--mni_dir", str(_mni_copy()), "--output", str(self.tmp / "bad"), *extra])
        self.assertEqual(code, 2)
        lines = stderr.getvalue().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("ERROR: ") and expected in lines[0], lines[0])
        self.assertFalse((self.tmp / "bad" / "datalist.json").exists())

    def test_cli_process_one_line_error(self):
        out = subprocess.run([sys.executable, "-m", "scripts.lesions.generate", "--train", "-1", "--output",
                              str(self.tmp / "bad")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 2)
        self.assertNotIn("Traceback", out.stderr)
        self.assertEqual([line for line in out.stderr.splitlines() if line.startswith("ERROR:")],
                         [out.stderr.strip()])

    def test_api_ill_arguments(self):
        for kwargs, message in (({"train": -1}, "--train"), ({"test": -1}, "--test"), ({"val": 1.5}, "--val"),
                                ({"lesion_load": "huge"}, "unknown lesion load")):
            args = {"train": 1, "test": 0, **kwargs}
            with self.subTest(kwargs=kwargs), self.assertRaisesRegex(ValueError, message):
                generate_dataset(_anatomy(), self.tmp / "bad", **args)


if __name__ == "__main__":
    unittest.main()
