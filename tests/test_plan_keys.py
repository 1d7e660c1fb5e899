# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The plan reaches the configs only through top-level key names: these tests tie :class:`scripts.planning.Plan`
to ``configs/train.yaml`` (with ``configs/evaluate.yaml``, an override of it) and ``configs/inference.yaml``, check
that the demo plan in both configs agrees, and that the architecture rules live once, in torch-free code."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import unittest

import yaml
from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import ID_SEP_KEY, MACRO_KEY
from parameterized import parameterized

from scripts import architecture
from scripts.planning import NOT_SET, PLAN_INFO_KEY, PLAN_KEYS, Plan, plan_experiment, plan_topology
from tests.test_planning import REFERENCE_FINGERPRINTS, make_fingerprint
from tests.utils import ROOT

CONFIG_DIR = ROOT / "configs"
"""Where the configs are read from (tests may point it at a scratch copy)."""

WORKFLOWS = {"train": ("train.yaml", "evaluate.yaml"), "inference": ("inference.yaml",)}
"""Each workflow: its self-contained config first, then the overrides that are merged over it."""

# the plan keys each workflow needs, written out by hand: the training workflow reads class_names in evaluation
# and tta_mirror_axes too (evaluate.yaml sets its default); the inference config needs no batch size or RS grid
# (its class names name the overlay's legend)
COMMON_KEYS = {
    "spatial_dims", "in_channels", "out_channels", "pixdim", "axcodes", "spatial_axes_order", "patch_size", "features",
    "strides", "kernel_sizes", "block_types", "hgcn_orders", "intensity_schemes", "intensity_stats",
    "intensity_nonzero",
}
NEEDS = {
    "train": COMMON_KEYS | {"batch_size", "num_regions", "class_names", "tta_mirror_axes"},
    "inference": COMMON_KEYS | {"class_names", "tta_mirror_axes"},
}
# the demo plan each self-contained config writes out as values (tta_mirror_axes is an expression of spatial_dims,
# class_names one of the datalist: its 'labels', scripts.data.datalist_class_names)
DEMO_KEYS = {
    "train": COMMON_KEYS | {"batch_size", "num_regions"},
    "inference": COMMON_KEYS,
}
# what `python -m scripts.plan` writes; the others keep the configs' defaults (RAS, no TTA change, ...)
PLANNER_KEYS = {
    "spatial_dims", "in_channels", "out_channels", "pixdim", "patch_size", "batch_size", "features", "strides",
    "kernel_sizes", "block_types", "hgcn_orders", "num_regions", "intensity_schemes", "intensity_stats",
}


def load_config(name: str) -> dict:
    with open(CONFIG_DIR / name) as f:
        return yaml.safe_load(f)


def _referenced(value, ids: set[str]) -> None:
    """Collect the top-level ids a config value refers to (``@id``, ``@id#sub``, ``$... @id ...``, ``%id``)."""
    if isinstance(value, dict):
        for v in value.values():
            _referenced(v, ids)
    elif isinstance(value, list):
        for v in value:
            _referenced(v, ids)
    elif isinstance(value, str):
        refs = list(ReferenceResolver.match_refs_pattern(value))
        if value.startswith(MACRO_KEY):  # %id, or %file#id (another file: not a key of this config)
            path, macro_id = ConfigParser.split_path_id(value[len(MACRO_KEY):])
            if not path:
                refs.append(ReferenceResolver.normalize_id(macro_id))
        ids.update(r.split(ID_SEP_KEY)[0] for r in refs)


def keys_read(workflow: str) -> set[str]:
    """Top-level ids the configs of a workflow refer to."""
    ids: set[str] = set()
    for name in WORKFLOWS[workflow]:
        _referenced(load_config(name), ids)
    return ids


def keys_defined(workflow: str) -> set[str]:
    """Top-level keys the configs of a workflow define."""
    return set().union(*(load_config(name) for name in WORKFLOWS[workflow]))


def full_plan() -> Plan:
    """The demo plan of train.yaml with every optional field set (class_names: the demo datalist's labels)."""
    demo = {k: v for k, v in load_config("train.yaml").items() if k != "class_names"}
    return dataclasses.replace(Plan.from_config(demo), class_names=["grey_matter", "white_matter"],
                               tta_mirror_axes=[0, 1, 2])


class TestPlanKeys(unittest.TestCase):
    def test_plan_holds_what_the_configs_need(self):
        self.assertEqual(set(PLAN_KEYS), NEEDS["train"] | NEEDS["inference"])
        self.assertNotIn(PLAN_INFO_KEY, PLAN_KEYS)

    def test_every_emitted_key_is_read(self):
        emitted = full_plan().to_config()
        self.assertEqual(set(emitted) - {PLAN_INFO_KEY}, set(PLAN_KEYS), "Plan.to_config() leaves out a plan key")
        read = keys_read("train") | keys_read("inference")
        self.assertEqual(set(emitted) - {PLAN_INFO_KEY} - read, set(), "plan keys no config reads")
        self.assertNotIn(PLAN_INFO_KEY, read)

    @parameterized.expand([("train",), ("inference",)])
    def test_config_reads_and_defines_its_plan_keys(self, workflow):
        self.assertEqual(keys_defined(workflow) & set(PLAN_KEYS), NEEDS[workflow], "plan keys the config defines")
        self.assertEqual(NEEDS[workflow] - keys_read(workflow), set(), "plan keys the config does not read")

    def test_planner_writes_its_keys(self):
        written = plan_experiment(make_fingerprint(**REFERENCE_FINGERPRINTS["abd"]), gpu_memory_gb=8).to_config()
        self.assertEqual(set(written), PLANNER_KEYS | {PLAN_INFO_KEY})
        self.assertNotIn("ds_weights", written)


class TestDemoPlan(unittest.TestCase):
    def test_train_and_inference_agree(self):
        train, inference = load_config("train.yaml"), load_config("inference.yaml")
        for key in DEMO_KEYS["train"] & DEMO_KEYS["inference"]:
            with self.subTest(key):
                self.assertEqual(inference[key], train[key])

    @parameterized.expand([("train",), ("inference",)])
    def test_demo_plan_is_a_valid_plan(self, workflow):
        config = load_config(WORKFLOWS[workflow][0])
        demo = {k: config[k] for k in DEMO_KEYS[workflow]}
        plan = Plan.from_config(demo, strict=True)
        self.assertEqual(plan.to_config(), {k: demo[k] for k in PLAN_KEYS if k in demo})  # round trip, field order
        others = {k: v for k, v in config.items() if k not in PLAN_KEYS}  # hyper-parameters, paths, ...: ignored
        self.assertEqual(Plan.from_config({**others, **demo}), plan)


class TestPlanValidation(unittest.TestCase):
    @parameterized.expand([
        ("spatial_dims", {"spatial_dims": 4}),
        ("strides", {"strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]}),  # 3 stages for 4 features
        ("kernel_sizes", {"kernel_sizes": [[3, 3], [3, 3], [3, 3], [3, 3]]}),  # 2 axes in 3D
        ("block_types", {"block_types": ["hgcn", "hgcn", "mamba", "conv"]}),
        ("hgcn_orders", {"hgcn_orders": [2]}),  # 2 HGCN stages
        ("patch_size", {"patch_size": [32, 64, 60]}),  # 60 is not a multiple of 8
        ("pixdim", {"pixdim": [2.0, 2.0, 0.0]}),
        ("class_names", {"class_names": ["grey_matter"]}),  # out_channels 3: two names
        ("spatial_axes_order", {"spatial_axes_order": [0, 0, 1]}),
        ("intensity_schemes", {"intensity_schemes": ["minmax"]}),
        ("intensity_stats", {"intensity_schemes": ["ct"]}),  # ct needs [lower, upper, mean, std]
        ("batch_size", {"batch_size": 1.5}),
        ("tta_mirror_axes", {"tta_mirror_axes": [0, 3]}),
        ("features", {"features": [16], "strides": [[1, 1, 1]], "kernel_sizes": [[3, 3, 3]], "block_types": ["hgcn"],
                      "hgcn_orders": [2]}),
    ])
    def test_bad_value(self, key, change):
        with self.assertRaisesRegex(ValueError, f"'{key}'"):
            dataclasses.replace(full_plan(), **change)

    def test_from_config(self):
        demo = full_plan().to_config()
        with self.assertRaisesRegex(ValueError, "misses.*'hgcn_orders'"):
            Plan.from_config({k: v for k, v in demo.items() if k != "hgcn_orders"})
        with self.assertRaisesRegex(ValueError, "unknown plan key.*'ds_weights'"):
            Plan.from_config({**demo, "ds_weights": [1.0, 0.0]}, strict=True)
        minimal = Plan.from_config({k: v for k, v in demo.items() if k not in ("batch_size", "axcodes")})
        self.assertIs(minimal.batch_size, NOT_SET)
        self.assertNotIn("axcodes", minimal.to_config())
        self.assertIsNone(dataclasses.replace(minimal, axcodes=None).to_config()["axcodes"])  # null is a value

    def test_frozen_and_plain_types(self):
        plan = full_plan()
        with self.assertRaises(dataclasses.FrozenInstanceError):
            plan.batch_size = 4  # type: ignore[misc]
        self.assertEqual(yaml.safe_load(yaml.safe_dump(plan.to_config())), plan.to_config())


class TestArchitecture(unittest.TestCase):
    @parameterized.expand([("scripts.architecture",), ("scripts.planning",)])
    def test_torch_free(self, module):
        code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, f"importing {module} imports torch\n{result.stderr[-2000:]}")

    @parameterized.expand([
        (6, ["hgcn"] * 3 + ["mamba"] * 3, [2, 3, 4]),
        (5, ["hgcn"] * 3 + ["mamba"] * 2, [2, 3, 4]),
        (4, ["hgcn"] * 2 + ["mamba"] * 2, [2, 3]),
        (2, ["hgcn", "mamba"], [2]),
        (13, ["hgcn"] * 7 + ["mamba"] * 6, [2, 3, 4, 5, 6, 6, 6]),  # orders clipped at 6
    ])
    def test_stage_layout(self, n, blocks, orders):
        self.assertEqual(architecture.default_block_types(n), blocks)
        self.assertEqual(architecture.default_hgcn_orders(blocks), orders)

    def test_deep_supervision_weights(self):
        expected = [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0]  # 1/2**i, lowest level 0, normalised
        for w, e in zip(architecture.deep_supervision_weights(5), expected, strict=True):
            self.assertAlmostEqual(w, e, places=12)
        self.assertEqual(architecture.deep_supervision_weights(1), [1.0])
        with self.assertRaises(ValueError):
            architecture.deep_supervision_weights(0)

    def test_one_definition(self):
        """The network, the loss and the planner use the rules of scripts.architecture."""
        import scripts.losses
        import scripts.networks

        self.assertIs(scripts.networks.default_block_types, architecture.default_block_types)
        self.assertIs(scripts.networks.default_hgcn_orders, architecture.default_hgcn_orders)
        self.assertIs(scripts.losses.deep_supervision_weights, architecture.deep_supervision_weights)
        self.assertIs(scripts.losses.AUTHORS_REGION_GRID, architecture.AUTHORS_REGION_GRID)
        topology = plan_topology((1.0, 1.0, 1.0), (128, 128, 128))
        self.assertEqual(topology["block_types"], architecture.default_block_types(topology["num_stages"]))
        net = scripts.networks.MambaClinix(3, 1, 2, features=(16, 16, 16, 16, 16, 16))
        self.assertEqual((net.block_types, net.hgcn_orders), (topology["block_types"], topology["hgcn_orders"]))
        loss = scripts.losses.MambaClinixLoss()
        self.assertEqual(loss.get_weights(5), architecture.deep_supervision_weights(5))
        self.assertEqual(loss.loss.region_tversky.num_regions, architecture.AUTHORS_REGION_GRID)


if __name__ == "__main__":
    unittest.main()
