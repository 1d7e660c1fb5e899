# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the self-configuration: topology (Table 2 of MambaClinix), experiment plan, fingerprint and CLI.

The plan's keys against the configs and the Plan type itself: tests/test_plan_keys.py."""

from __future__ import annotations

import json
import math
import os
import tempfile
import unittest

import nibabel as nib
import numpy as np
import yaml
from parameterized import parameterized

from scripts.data import DataError
from scripts.plan import main
from scripts.planning import (
    Plan, estimate_training_memory_gb, extract_fingerprint, plan_experiment, plan_topology, region_grid,
)

H, M = "hgcn", "mamba"

# (spacing, patch, pool_per_axis, block_types, hgcn_orders): the 4 cases of Table 2 with pooling, plus 2D cases
TOPOLOGY_CASES = [
    ((1.25, 0.77, 0.77), (80, 192, 160), [4, 5, 5], [H, H, H, M, M, M], [2, 3, 4]),  # PCD
    ((1.22, 0.76, 0.76), (64, 192, 192), [4, 5, 5], [H, H, H, M, M, M], [2, 3, 4]),  # LiverT
    ((2.5, 0.8, 0.8), (40, 224, 192), [3, 5, 5], [H, H, H, M, M, M], [2, 3, 4]),  # ABD
    ((1.0, 1.0, 1.0), (128, 128, 128), [5, 5, 5], [H, H, H, M, M, M], [2, 3, 4]),  # BraTS
    ((1.0, 1.0), (256, 256), [6, 6], [H, H, H, H, M, M, M], [2, 3, 4, 5]),  # capped by max_pool_per_axis=6
    ((0.5, 1.0), (512, 256), [6, 5], [H, H, H, H, M, M, M], [2, 3, 4, 5]),  # axis 1 waits one stage (spacing)
    ((1.0, 1.0), (64, 48), [3, 3], [H, H, M, M], [2, 3]),  # 8 voxels left on axis 0 alone: single-axis rule
]

REFERENCE_FINGERPRINTS = {
    "brats": dict(spacing=(1.0, 1.0, 1.0), shape=(138, 169, 138), ch=4, mods=["MR"] * 4, ncls=4, n=876),
    "abd": dict(spacing=(2.5, 0.8, 0.8), shape=(80, 512, 512), ch=1, mods=["CT"], ncls=14, n=40),
}


def make_fingerprint(spacing, shape, ch=1, mods=("CT",), ncls=2, n=20, jitter=0.0):
    rng = np.random.default_rng(0)
    spacings = [[s * (1 + jitter * rng.uniform(-1, 1)) for s in spacing] for _ in range(n)]
    return {
        "n_cases": n,
        "spatial_dims": len(spacing),
        "channels": ch,
        "modalities": list(mods),
        "spacings": spacings,
        "shapes": [list(shape)] * n,
        "median_spacing": [float(v) for v in np.median(spacings, 0)],
        "median_shape": list(shape),
        "foreground_intensity": [{"mean": 80.0, "std": 40.0, "percentile_00_5": -50.0, "percentile_99_5": 250.0}] * ch,
        "labels": list(range(ncls)),
        "num_classes": ncls,
    }


def write_case(folder, name, shape=(32, 32, 24), spacing=(1.0, 1.0, 2.5), channels=1, label_shape=None, seed=0):
    rng = np.random.default_rng(seed)
    affine = np.diag(list(spacing) + [1.0])
    label = np.zeros(label_shape or shape, np.uint8)
    label[8:20, 8:20, 5:12] = 1
    label[10:14, 10:14, 6:9] = 2
    nib.save(nib.Nifti1Image(label, affine), os.path.join(folder, f"{name}_seg.nii.gz"))
    images = []
    for c in range(channels):
        img = (rng.normal(0, 1, shape) * 20 + 100 * (c + 1)).astype(np.float32)
        img[8:20, 8:20, 5:12] += 50
        nib.save(nib.Nifti1Image(img, affine), os.path.join(folder, f"{name}_{c}.nii.gz"))
        images.append(f"{name}_{c}.nii.gz")
    return {"image": images if channels > 1 else images[0], "label": f"{name}_seg.nii.gz"}


class TestTopology(unittest.TestCase):
    @parameterized.expand(TOPOLOGY_CASES)
    def test_table2(self, spacing, patch, pools, blocks, orders):
        t = plan_topology(spacing, patch)
        self.assertEqual(t["pool_per_axis"], pools)
        self.assertEqual(t["num_stages"], max(pools) + 1)
        self.assertEqual(t["block_types"], blocks)
        self.assertEqual(t["hgcn_orders"], orders)
        self.assertEqual(t["patch_size"], list(patch))
        self.assertEqual(t["strides"][0], [1] * len(spacing))
        self.assertEqual(len(t["strides"]), t["num_stages"])
        self.assertEqual(len(t["kernel_sizes"]), t["num_stages"])
        self.assertEqual([sum(s[a] == 2 for s in t["strides"]) for a in range(len(spacing))], pools)
        self.assertEqual(len(t["stop_reasons"]), len(spacing))

    def test_anisotropic_kernels(self):
        t = plan_topology((2.5, 0.8, 0.8), (40, 224, 192))
        self.assertEqual(t["kernel_sizes"][0], [1, 3, 3])  # 2.5 / 0.8 > 2: no 3-kernel along the coarse axis yet
        self.assertEqual(t["strides"][1], [1, 2, 2])
        self.assertTrue(all(k == [3, 3, 3] for k in t["kernel_sizes"][1:]))
        t = plan_topology((0.5, 1.0), (512, 256))
        self.assertEqual(t["kernel_sizes"][0], [3, 1])

    @parameterized.expand([((1.0, 1.0, 1.0), (100, 90, 77)), ((3.0, 0.7, 0.7), (37, 201, 155)), ((0.8, 0.8), (300, 190))])
    def test_padding_divisible(self, spacing, patch):
        t = plan_topology(spacing, patch)
        for p, p0, d, n in zip(t["patch_size"], patch, t["divisor"], t["pool_per_axis"]):
            self.assertEqual(d, 2**n)
            self.assertEqual(p % d, 0)
            self.assertTrue(p0 <= p < p0 + d)

    def test_limits(self):
        t = plan_topology((1.0, 1.0), (256, 256), max_num_stages=3, hgcn_order_range=(2, 3))
        self.assertEqual((t["num_stages"], t["pool_per_axis"], t["hgcn_orders"]), (3, [2, 2], [2, 3]))
        t = plan_topology((1.0, 1.0), (256, 256), hgcn_order_range=(2, 4))
        self.assertEqual(t["hgcn_orders"], [2, 3, 4, 4])
        t = plan_topology((1.0, 1.0, 1.0), (8, 8, 8))
        self.assertEqual((t["num_stages"], t["block_types"], t["hgcn_orders"]), (2, [H, M], [2]))
        t = plan_topology((1.0, 1.0, 1.0), (7, 7, 7))
        self.assertEqual(t["num_stages"], 1)

    def test_bad_arguments(self):
        with self.assertRaises(ValueError):
            plan_topology((1.0, 1.0, 1.0), (64, 64))
        with self.assertRaises(ValueError):
            plan_topology((1.0, 0.0, 1.0), (64, 64, 64))
        with self.assertRaises(ValueError):
            plan_topology((1.0,), (64,))


class TestPlanExperiment(unittest.TestCase):
    def test_brats_table2(self):
        """The BraTS fingerprint at 24 GB (the authors' RTX 4090) gives Table 2's 128^3 patch, batch 2, H,H,H,M,M,M."""
        p = plan_experiment(make_fingerprint(**REFERENCE_FINGERPRINTS["brats"]), gpu_memory_gb=24)
        self.assertIsInstance(p, Plan)
        self.assertEqual(p.patch_size, [128, 128, 128])
        self.assertEqual(p.batch_size, 2)
        self.assertEqual(p.block_types, [H, H, H, M, M, M])
        self.assertEqual(p.features, [32, 64, 128, 256, 320, 320])
        self.assertEqual(p.intensity_schemes, ["zscore"] * 4)
        self.assertEqual(p.intensity_stats, [None] * 4)
        self.assertEqual(p.num_regions, [8, 8, 14])  # the authors' RS grid
        self.assertLessEqual(p.plan_info["estimated_memory_gb"], 24)

    def test_keys_and_values(self):
        p = plan_experiment(make_fingerprint(**REFERENCE_FINGERPRINTS["abd"]), gpu_memory_gb=8).to_config()
        keys = ["spatial_dims", "in_channels", "out_channels", "pixdim", "patch_size", "batch_size", "features", "strides",
                "kernel_sizes", "block_types", "hgcn_orders", "num_regions", "intensity_schemes", "intensity_stats",
                "plan_info"]
        self.assertEqual(list(p), keys)  # the deep-supervision weights follow from the stages: not a plan key
        self.assertEqual((p["spatial_dims"], p["in_channels"], p["out_channels"]), (3, 1, 14))
        n = len(p["features"])
        self.assertEqual([len(p[k]) for k in ("strides", "kernel_sizes", "block_types")], [n, n, n])
        self.assertEqual(len(p["hgcn_orders"]), math.ceil(n / 2))
        self.assertEqual(p["intensity_schemes"], ["ct"])
        self.assertEqual(p["intensity_stats"], [[-50.0, 250.0, 80.0, 40.0]])
        self.assertEqual(p["num_regions"], region_grid(p["patch_size"]))
        self.assertTrue(all(1 <= r <= max(1, s // 4) for r, s in zip(p["num_regions"], p["patch_size"])))
        self.assertTrue(all(f <= 320 for f in p["features"]))
        self.assertGreaterEqual(p["batch_size"], 2)
        for s, d in zip(p["patch_size"], p["plan_info"]["pool_per_axis"]):
            self.assertEqual(s % 2**d, 0)

    def test_deterministic(self):
        fp = make_fingerprint((3.0, 0.7, 0.7), (90, 400, 380), n=30, jitter=0.2)
        self.assertEqual(plan_experiment(fp, gpu_memory_gb=11), plan_experiment(fp, gpu_memory_gb=11))

    @parameterized.expand([("brats",), ("abd",)])
    def test_budget_monotone(self, name):
        fp = make_fingerprint(**REFERENCE_FINGERPRINTS[name])
        previous = None
        for gb in (3, 4, 6, 8, 11, 16, 24, 32, 48, 80):
            p = plan_experiment(fp, gpu_memory_gb=gb).to_config()
            self.assertLessEqual(p["plan_info"]["estimated_memory_gb"], gb)
            if previous is not None:
                self.assertTrue(all(a >= b for a, b in zip(p["patch_size"], previous["patch_size"])), (gb, p["patch_size"]))
                self.assertGreaterEqual(p["batch_size"], previous["batch_size"])
            previous = p

    def test_cpu_and_max_features(self):
        fp = make_fingerprint(**REFERENCE_FINGERPRINTS["brats"])
        p = plan_experiment(fp, cpu=True, max_features=64).to_config()
        self.assertLessEqual(math.prod(p["patch_size"]), 64**3)
        self.assertEqual(p["batch_size"], 2)
        self.assertEqual(max(p["features"]), 64)
        self.assertLessEqual(p["plan_info"]["estimated_memory_gb"], 1.5)
        self.assertEqual(p["plan_info"]["device"], "cpu")

    def test_anisotropic_target_spacing(self):
        fp = make_fingerprint((10.0, 1.5, 1.5), (9, 256, 216), n=50, jitter=0.3)
        p = plan_experiment(fp, gpu_memory_gb=8).to_config()
        z = [s[0] for s in fp["spacings"]]
        self.assertAlmostEqual(p["pixdim"][0], float(np.percentile(z, 10)), places=4)
        self.assertLess(p["pixdim"][0], float(np.median(z)))
        self.assertIn("anisotropic", " ".join(p["plan_info"]["reasons"]))

    def test_2d(self):
        p = plan_experiment(make_fingerprint((1.0, 1.0), (512, 512), n=200), gpu_memory_gb=8)
        self.assertEqual((p.spatial_dims, len(p.patch_size), p.strides[0]), (2, 2, [1, 1]))
        self.assertLessEqual(max(p.features), 512)
        self.assertEqual(p.num_regions, region_grid(p.patch_size))
        self.assertEqual(len(p.num_regions), 2)

    @parameterized.expand([((3.0, 0.8, 0.8), (60, 512, 512), 2, "lesion workflow"), ((1.0, 1.0), (512, 512), 3, "2D data")])
    def test_other_dims_than_the_data(self, spacing, shape, dims, fragment):
        """A plan of another dimensionality than the data would not fit the configs: refused, saying what to do."""
        with self.assertRaisesRegex(ValueError, f"spatial_dims={dims}.*omit --spatial_dims") as ctx:
            plan_experiment(make_fingerprint(spacing, shape), gpu_memory_gb=8, spatial_dims=dims)
        self.assertIn(fragment, str(ctx.exception))

    def test_bad_budgets(self):
        fp = make_fingerprint(**REFERENCE_FINGERPRINTS["brats"])
        with self.assertRaisesRegex(ValueError, "too small for the minimum network"):
            plan_experiment(fp, gpu_memory_gb=0.5)
        with self.assertRaisesRegex(ValueError, "not both"):
            plan_experiment(fp, gpu_memory_gb=8, cpu=True)

    def test_memory_estimate_grows(self):
        t = plan_topology((1.0, 1.0, 1.0), (64, 64, 64))
        args = (4, 4, [32, 64, 128, 256, 320], t["strides"], t["kernel_sizes"], t["block_types"])
        one = estimate_training_memory_gb((64, 64, 64), 1, *args)
        two = estimate_training_memory_gb((64, 64, 64), 2, *args)
        self.assertAlmostEqual(two["total"] - one["total"], one["per_sample"])
        self.assertGreater(estimate_training_memory_gb((64, 64, 64), 2, *args, device="cpu")["per_sample"], two["per_sample"])


class TestRegionGrid(unittest.TestCase):
    """The RS region grid: the authors' fixed (8, 8, 14) (nnUNetTrainerMambaClinixTRS), reduced only on axes too
    short for 4 voxels per cell."""

    @parameterized.expand(
        [[patch, [8, 8, 14]] for _, patch, *_ in TOPOLOGY_CASES[:4]]  # every patch of Table 2
        + [
            [(96, 160, 160), [8, 8, 14]],  # LungT
            [(32, 64, 56), [8, 8, 14]],  # the demo's patch
            [(16, 64, 40), [4, 8, 10]],
            [(2, 3, 100), [1, 1, 14]],
            [(256, 256), [8, 14]],  # 2D: the authors' in-plane pair
            [(24, 20), [6, 5]],
        ]
    )
    def test_grid(self, patch, expected):
        self.assertEqual(region_grid(patch), expected)

    def test_demo_default_fits_its_patch(self):
        cfg = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "train.yaml")))
        self.assertEqual(cfg["num_regions"], region_grid(cfg["patch_size"]))

    @parameterized.expand([[(64,)], [(8, 8, 8, 8)], [(0, 8, 8)], [()]])
    def test_bad_patch(self, patch):
        with self.assertRaisesRegex(ValueError, "patch_size"):
            region_grid(patch)


class TestFingerprintAndCLI(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.root = cls._tmp.name
        cls.cases = [write_case(cls.root, f"case{i}", channels=2, seed=i) for i in range(3)]
        write_case(cls.root, "other_grid", shape=(30, 32, 24))  # not in the datalist
        cls.datalist = os.path.join(cls.root, "datalist.json")
        with open(cls.datalist, "w") as f:
            json.dump({"modality": {"0": "CT", "1": "MR"}, "training": cls.cases, "validation": [], "test": []}, f)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_cli_end_to_end(self):
        out = os.path.join(self.root, "out", "plan.yaml")
        plan = main(["--datalist", self.datalist, "--dataset_dir", self.root, "--output", out, "--cpu", "--max_features", "64"])
        self.assertEqual(os.listdir(os.path.dirname(out)), ["plan.yaml"])  # atomic write leaves no temporary file
        with open(out) as f:
            loaded = yaml.safe_load(f)
        self.assertEqual(loaded, plan.to_config())
        self.assertEqual(Plan.from_config(loaded, strict=True), plan)
        self.assertEqual((loaded["in_channels"], loaded["out_channels"], loaded["spatial_dims"]), (2, 3, 3))
        self.assertEqual(loaded["pixdim"], [1.0, 1.0, 2.5])
        self.assertEqual(loaded["intensity_schemes"], ["ct", "zscore"])
        lower, upper, mean, std = loaded["intensity_stats"][0]
        self.assertTrue(lower < mean < upper and 100 < mean < 200 and std > 0)
        self.assertIsNone(loaded["intensity_stats"][1])
        self.assertTrue(all(a <= b for a, b in zip(loaded["patch_size"], [32, 32, 24])))
        info = loaded["plan_info"]["fingerprint"]
        self.assertEqual(info["labels"], [0, 1, 2])
        self.assertAlmostEqual(info["target_ratio"][1]["mean"], (12 * 12 * 7 - 4 * 4 * 3) / (32 * 32 * 24), places=5)
        self.assertAlmostEqual(info["target_ratio"][2]["mean"], 4 * 4 * 3 / (32 * 32 * 24), places=5)

    @parameterized.expand([
        ("msd", {"0": "background", "1": "liver", "2": "tumour"}),
        ("nnunet", {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}),
    ])
    def test_class_names_from_the_datalist_labels(self, _, labels):
        datalist = os.path.join(self.root, f"datalist_{_}.json")
        with open(datalist, "w") as f:
            json.dump({"labels": labels, "training": self.cases[:1]}, f)
        out = os.path.join(self.root, f"plan_{_}.yaml")
        main(["--datalist", datalist, "--dataset_dir", self.root, "--output", out, "--cpu", "--max_features", "32"])
        with open(out) as f:
            self.assertEqual(yaml.safe_load(f)["class_names"], ["liver", "tumour"])

    def test_labels_that_miss_a_class(self):
        with self.assertRaisesRegex(ValueError, r"names the values \[0, 1\] but out_channels 3"):
            plan_experiment(make_fingerprint((1, 1, 1), (64, 64, 64), ncls=3) | {"label_names": {0: "bg", 1: "a"}})

    def test_no_labels_no_class_names(self):
        self.assertNotIn("class_names", plan_experiment(make_fingerprint((1, 1, 1), (64, 64, 64))).to_config())

    def test_modality_override(self):
        fp = extract_fingerprint(self.datalist, self.root, modality="MR", max_cases=2)
        self.assertEqual(fp["modalities"], ["MR", "MR"])
        self.assertEqual((fp["n_cases"], fp["n_cases_analyzed"]), (3, 2))
        self.assertEqual((fp["channels"], fp["median_shape"], fp["median_spacing"]), (2, [32.0, 32.0, 24.0], [1.0, 1.0, 2.5]))
        self.assertLess(fp["foreground_intensity"][0]["mean"], fp["foreground_intensity"][1]["mean"])

    @parameterized.expand([
        ("empty", lambda cases: [], "training list of the datalist is empty"),
        ("missing_file", lambda cases: [{"image": "missing_0.nii.gz", "label": "case0_seg.nii.gz"}],
         "missing_0.nii.gz does not exist"),
        ("channels", lambda cases: [cases[0], {"image": "case1_0.nii.gz", "label": "case1_seg.nii.gz"}],
         "inconsistent channel counts.*case1_0.nii.gz"),
        ("no_label", lambda cases: [{"image": "case0_0.nii.gz"}], "no 'label' entry"),
        ("channel_grids", lambda cases: [{"image": ["case0_0.nii.gz", "other_grid_0.nii.gz"], "label": "case0_seg.nii.gz"}],
         "different spatial shapes"),
    ])
    def test_bad_datalist(self, _, training, pattern):
        """The fingerprint checks the datalist with the bundle's one check (scripts.data), from the headers."""
        with self.assertRaisesRegex(DataError, pattern):
            extract_fingerprint({"training": training(self.cases)}, self.root)

    def test_bad_files(self):
        with self.assertRaisesRegex(DataError, "nope.json"):
            extract_fingerprint(os.path.join(self.root, "nope.json"), self.root)
        with tempfile.TemporaryDirectory() as tmp:
            bad = write_case(tmp, "bad", label_shape=(32, 32, 20))
            with self.assertRaisesRegex(DataError, "bad_seg.nii.gz.*shape"):
                extract_fingerprint({"training": [bad]}, tmp)
            with self.assertRaisesRegex(DataError, "voxels"):
                extract_fingerprint({"training": [bad]}, tmp, limits={"max_voxels": 1000})


if __name__ == "__main__":
    unittest.main()
