# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Unit tests of the MONAI Label compatibility pieces and of the served model folder (no MONAI Label needed;
seconds)."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest
from unittest import mock
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from monai.transforms import LoadImaged, Spacingd
from parameterized import parameterized

from scripts.handlers import LatestCheckpoint, MainProcessOnly, loads_checkpoint
from scripts.label.app import (
    LABEL_CONFIGS,
    OFFLINE_CONF,
    TOOLING,
    copy_bundle,
    init_model,
    prepare_app,
    server_command,
    set_plan,
)
from scripts.label.compat import (
    InputError,
    LoadImageCheckedd,
    SafeSpacingd,
    non_mapping_companions,
)

ROOT = Path(__file__).resolve().parents[1]


def _save(path: Path, arr: np.ndarray, spacing: float = 1.0) -> Path:
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


class TestSafeSpacingd(unittest.TestCase):
    def test_keeps_string_companions(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = _save(Path(tmp) / "img.nii.gz", np.random.rand(8, 10, 12))
            data = LoadImaged("image", ensure_channel_first=True, image_only=False)({"image": str(path)})
            expected = Spacingd("image", pixdim=(2.0, 2.0, 2.0))(dict(data))["image"]
            data["image_path"] = str(path)  # what MONAI Label adds
            spacing = SafeSpacingd("image", pixdim=(2.0, 2.0, 2.0))
            out = spacing(data)
        self.assertEqual(out["image_path"], str(path))
        self.assertEqual(tuple(out["image"].shape), tuple(expected.shape))
        torch.testing.assert_close(torch.as_tensor(out["image"]), torch.as_tensor(expected))
        self.assertIsInstance(out["image_meta_dict"], dict)
        inverted = spacing.inverse(out)
        self.assertEqual(tuple(inverted["image"].shape[1:]), (8, 10, 12))

    def test_companions(self):
        d = {"image": 0, "image_path": "a", "image_meta_dict": {}, "label_path": "b", "other": "c"}
        self.assertEqual(non_mapping_companions(d, ("image",)), ["image_path"])
        self.assertEqual(sorted(non_mapping_companions(d, ("image", "label"))), ["image_path", "label_path"])


class TestLoadImageCheckedd(unittest.TestCase):
    def test_good_image(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = _save(Path(tmp) / "img.nii.gz", np.random.rand(6, 7, 8))
            out = LoadImageCheckedd("image", in_channels=1, ensure_channel_first=True)({"image": str(path)})
        self.assertEqual(tuple(out["image"].shape), (1, 6, 7, 8))

    @parameterized.expand([("not_image",), ("two_channels",)])
    def test_bad_input(self, case):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "x.nii.gz"
            if case == "not_image":
                path.write_text("not an image\n")
                expected = "could not be read"
            else:
                _save(path, np.random.rand(6, 7, 8, 2))
                expected = "2 channel(s)"
            with self.assertRaises(InputError) as ctx:
                LoadImageCheckedd("image", in_channels=1, ensure_channel_first=True)({"image": str(path)})
        self.assertIsInstance(ctx.exception, ValueError)
        self.assertEqual(ctx.exception.status_code, 422)
        self.assertIn(expected, str(ctx.exception))
        self.assertIn(str(path), str(ctx.exception))

    @parameterized.expand([
        ("header_bomb", 413, "3,375,000,000 voxels"), ("two_d", 422, "2D image"), ("complex", 422, "complex"),
        ("small_limit", 413, "limit of 100"),
    ])
    def test_guarded(self, case, status, fragment):
        from scripts.checks.hostile import _nifti_header, address_space_cap

        limits = {"max_voxels": 100} if case == "small_limit" else None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{case}.nii.gz"
            if case == "header_bomb":
                path.write_bytes(gzip.compress(_nifti_header((1500, 1500, 1500))))
            elif case == "complex":
                nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.complex64), np.eye(4)), str(path))
            else:
                _save(path, np.random.rand(12, 10) if case == "two_d" else np.random.rand(6, 7, 8))
            loader = LoadImageCheckedd("image", in_channels=1, spatial_dims=3, limits=limits, ensure_channel_first=True)
            # refused from the header: the reader is never called (and can't exhaust the machine)
            with self.assertRaises(InputError) as ctx, address_space_cap(), \
                    mock.patch.object(LoadImaged, "__call__", side_effect=AssertionError("read")):
                loader({"image": str(path), "image_path": str(path)})
        self.assertEqual(ctx.exception.status_code, status)
        self.assertIn(fragment, str(ctx.exception))
        self.assertIn(path.name, str(ctx.exception))

    def test_ill_argument(self):
        with self.assertRaises(ValueError):
            LoadImageCheckedd("image", in_channels=0)
        with self.assertRaises(ValueError):
            LoadImageCheckedd("image", spatial_dims=4)
        with self.assertRaises(ValueError):
            LoadImageCheckedd("image", limits={"max_voxels": -1})


class TestHandlers(unittest.TestCase):
    def test_main_process_only(self):
        attached = []

        class H:
            def attach(self, engine):
                attached.append(engine)

        engine = Engine(lambda e, b: None)
        MainProcessOnly(H()).attach(engine)  # no process group: this is the main process
        self.assertEqual(attached, [engine])
        with mock.patch("scripts.handlers._is_main_process", return_value=False):
            MainProcessOnly(H()).attach(engine)
        self.assertEqual(attached, [engine])
        with self.assertRaises(ValueError):
            MainProcessOnly("@validate#best_model_saver")

    @parameterized.expand([(False,), (True,)])
    def test_resume_unless_fine_tuning(self, fine_tune):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            net = torch.nn.Linear(2, 2)
            trainer = Engine(lambda e, b: None)
            LatestCheckpoint(tmp / "latest.pt", {"model": net}).attach(trainer)
            trainer.run([0], max_epochs=2)  # writes the state after 2 epochs
            saved = {k: v.clone() for k, v in net.state_dict().items()}
            torch.save(net.state_dict(), tmp / "model.pt")

            net2 = torch.nn.Linear(2, 2)
            trainer2 = Engine(lambda e, b: None)
            epochs = []
            if fine_tune:  # MONAI Label prepends a CheckpointLoader of models/model.pt
                CheckpointLoader(str(tmp / "model.pt"), {"model": net2}).attach(trainer2)
            LatestCheckpoint(tmp / "latest.pt", {"model": net2}).attach(trainer2)
            trainer2.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.epoch))
            self.assertEqual(loads_checkpoint(trainer2), fine_tune)
            trainer2.run([0], max_epochs=2)
        # resumed: nothing left to do; fine-tuning: both epochs run from the loaded weights
        self.assertEqual(epochs, [1, 2] if fine_tune else [])
        for k, v in net2.state_dict().items():
            torch.testing.assert_close(v, saved[k])


class TestAppHelpers(unittest.TestCase):
    def test_server_command_offline(self):
        cmd = server_command("app", "studies", "mambaclinix", port=8123, python="py")
        self.assertEqual(cmd[:4], ["py", "-m", "scripts.label.server", "--app"])  # MONAI Label behind the guard
        joined = " ".join(cmd)
        for k, v in OFFLINE_CONF:
            self.assertIn(f"--conf {k} {v}", joined)
        self.assertIn("--host 127.0.0.1", joined)
        self.assertIn("--conf models mambaclinix", joined)
        with self.assertRaises(ValueError):
            server_command("app", "studies", "../x")

    def test_copy_and_set_plan(self):
        with tempfile.TemporaryDirectory() as tmp:
            dst = copy_bundle(ROOT, Path(tmp) / "b")
            self.assertTrue((dst / "configs" / "inference.yaml").is_file())
            self.assertTrue((dst / "scripts" / "label" / "compat.py").is_file())
            self.assertFalse(list(dst.rglob("__pycache__")))
            self.assertEqual(_tooling_in(dst / "scripts"), [])
            set_plan(dst, {"patch_size": [32, 32, 32], "kernel_sizes": [[3, 3, 3]] * 2, "not_a_key": 1})
            for name in ("inference.yaml", "train.yaml"):
                text = (dst / "configs" / name).read_text()
                self.assertNotIn("&id", text)  # no YAML anchors
                config = yaml.safe_load(text)
                self.assertEqual(config["patch_size"], [32, 32, 32])
                self.assertEqual(config["kernel_sizes"], [[3, 3, 3]] * 2)
                self.assertNotIn("not_a_key", config)


    def test_prepare_app_merges_the_plan(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            bundle = copy_bundle(ROOT, tmp / "b")
            plan = {"features": [8, 16, 32], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "kernel_sizes": 3,
                    "block_types": ["hgcn", "mamba", "mamba"], "hgcn_orders": [2], "plan_info": {"n": 1}}
            (bundle / "configs" / "plan.yaml").write_text(yaml.safe_dump(plan))
            app = tmp / "app"
            app.mkdir()
            (app / "main.py").write_text("")  # an app copied before: no monailabel needed here
            served = prepare_app(app, bundle, "mc")
            self.assertEqual(served, app / "model" / "mc")
            self.assertTrue((served / "models").is_symlink())  # MONAI Label's training rewrites the bundle's
            self.assertEqual((served / "models").resolve(), (bundle / "models").resolve())
            self.assertFalse((served / "scripts").is_symlink())
            self.assertEqual((served / "scripts" / "losses.py").resolve(), (bundle / "scripts" / "losses.py").resolve())
            self.assertFalse((served / "configs" / "plan.yaml").exists())
            for name in ("inference.yaml", "train.yaml"):
                config = yaml.safe_load((served / "configs" / name).read_text())
                self.assertEqual(config["features"], [8, 16, 32])
                self.assertNotIn("plan_info", config)
            # the initial weights follow the plan too, and load into the served inference network
            path = init_model(bundle)
            from monai.bundle import ConfigParser

            parser = ConfigParser()
            parser.read_config(str(served / "configs" / "inference.yaml"))
            net = parser.get_parsed_content("network_def")
            weights = torch.load(path, map_location="cpu", weights_only=True)
            missing, _ = net.load_state_dict(weights, strict=False)
            self.assertEqual(missing, [])
            with self.assertRaises(ValueError):
                prepare_app(app, bundle, "mc", plan=tmp / "missing.yaml")


# tooling that must never be served: the subpackages of scripts.label.app.TOOLING, the benchmark modules beside
# them and the old names of the demo data, hostile-input and ablation modules
_TOOLING_NAME = re.compile(
    r"^(benchmark|bench_\w+|experiments|ablation\w*|demo|demo_data|lesions|checks|check_\w+|gpu_check)(\.py)?$"
)
_SCRIPTS_REF = re.compile(r"(?<![\w.])scripts(?:\.[A-Za-z_]\w*)+")


def _tooling_in(scripts_dir: Path) -> list[str]:
    """Paths under a served ``scripts/`` folder (links followed) that are tooling."""
    found = []
    for folder, dirs, files in os.walk(scripts_dir, followlinks=True):
        for name in dirs + files:
            if _TOOLING_NAME.match(name):
                found.append(str((Path(folder) / name).relative_to(scripts_dir)))
    return sorted(found)


def _config_references(config_dir: Path, names=LABEL_CONFIGS) -> set[str]:
    """Every dotted ``scripts.xxx`` name in the values of the configs (``$import``, ``_target_``, expressions)."""
    refs: set[str] = set()

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            refs.update(_SCRIPTS_REF.findall(value))

    for name in names:
        walk(yaml.safe_load((config_dir / name).read_text()))
    return refs


# run in a fresh, isolated interpreter (-I: no PYTHONPATH, no working folder on sys.path) with only the served model
# folder on sys.path: each reference imported (the longest importable module prefix, then attributes)
_RESOLVE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
errors = {}
for ref in json.loads(sys.argv[2]):
    parts = ref.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
            break
        except ModuleNotFoundError as e:
            if n == 1 or not (e.name or "").startswith(".".join(parts[:n])):
                errors[ref] = repr(e)
                break
    else:
        continue
    if ref in errors:
        continue
    try:
        for attr in parts[n:]:
            obj = getattr(obj, attr)
    except AttributeError as e:
        errors[ref] = repr(e)
files = {k: getattr(m, "__file__", None) for k, m in sys.modules.items() if k == "scripts" or k.startswith("scripts.")}
print(json.dumps({"errors": errors, "files": files}))
"""


class TestServedModel(unittest.TestCase):
    """The model folder MONAI Label serves holds the code the configs import and none of the tooling."""

    def _prepare(self, tmp: Path) -> Path:
        app = tmp / "app"
        app.mkdir(exist_ok=True)
        (app / "main.py").write_text("")  # an app copied before: no monailabel needed here
        return prepare_app(app, ROOT, "mc", plan=None)

    def test_no_tooling_served(self):
        self.assertEqual(set(TOOLING), {"benchmark", "experiments", "demo", "lesions", "checks", "gpu_check"})
        with tempfile.TemporaryDirectory() as tmp:
            served = self._prepare(Path(tmp))
            listing = sorted(p.name for p in (served / "scripts").iterdir())
            self.assertEqual(_tooling_in(served / "scripts"), [], listing)
            self.assertIn("networks", listing)
            self.assertIn("label", listing)
            for name in TOOLING:
                self.assertTrue((ROOT / "scripts" / name).is_dir(), f"scripts/{name} left the bundle?")
            # a tooling name missing from the list is served, and caught
            without = tuple(t for t in TOOLING if t != "benchmark")
            with mock.patch("scripts.label.app.TOOLING", without):
                served = self._prepare(Path(tmp))
            self.assertIn("benchmark", _tooling_in(served / "scripts"))

    def test_config_references_resolve(self):
        refs = _config_references(ROOT / "configs")
        self.assertIn("scripts.label.compat.LoadImageCheckedd", refs)
        self.assertIn("scripts.networks.MambaClinix", refs)
        with tempfile.TemporaryDirectory() as tmp:
            served = self._prepare(Path(tmp))
            out = subprocess.run([sys.executable, "-I", "-c", _RESOLVE, str(served), json.dumps(sorted(refs))],
                                 cwd=tmp, capture_output=True, text=True, timeout=300)
            self.assertEqual(out.returncode, 0, out.stderr[-2000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
        self.assertEqual(result["errors"], {})
        self.assertIn("scripts.label.compat", result["files"])
        for module, path in result["files"].items():  # from the served folder only, and no tooling imported
            self.assertTrue(path is None or Path(path).is_relative_to(served / "scripts"), (module, path))
            self.assertIsNone(_TOOLING_NAME.match(module.split(".")[1] if "." in module else ""), module)


class TestBundleContract(unittest.TestCase):
    """What the monaibundle app reads from the configs."""

    def test_configs(self):
        from monai.bundle import ConfigParser

        train = ConfigParser()
        train.read_config(str(ROOT / "configs" / "train.yaml"))
        for key in ("network", "network_def", "run", "train#handlers", "validate#dataset#data",
                    "train#dataset#data", "train#trainer#max_epochs"):
            self.assertIn(key, train, key)
        handlers = train.get("train#handlers")
        self.assertTrue(all(isinstance(h, dict) and "_target_" in h for h in handlers),
                        "MONAI Label needs every train#handlers entry to be a dict with _target_")
        infer = ConfigParser()
        infer.read_config(str(ROOT / "configs" / "inference.yaml"))
        for key in ("network_def", "preprocessing", "inferer", "postprocessing"):
            self.assertIn(key, infer, key)
        targets = [t["_target_"] for t in infer.get("preprocessing#transforms")]
        self.assertNotIn("Spacingd", targets, "use scripts.label.compat.SafeSpacingd (monai 1.6 + image_path)")
        meta = ConfigParser.load_config_file(str(ROOT / "configs" / "metadata.json"))
        channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        self.assertEqual(len(channels), train.get("out_channels"))
        self.assertEqual(len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]), train.get("spatial_dims"))


if __name__ == "__main__":
    unittest.main()
