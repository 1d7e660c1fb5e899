# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""``python -m scripts.import_nnunet`` on a synthetic nnU-Net v2 training output (no nnU-Net needed; seconds).

The synthetic set: the authors' weights of the 4-stage fixture (``tests/data/authors_mambaclinix_fixture.pt``, see
``test_authors_fixture.py``) in a checkpoint laid out as nnU-Net's ``nnUNetTrainer.save_checkpoint`` writes it
(``network_weights``, ``init_args``, ``trainer_name``, ``inference_allowed_mirroring_axes``, numpy scalars in
``logging``), an ``nnUNetPlans.json`` with an anisotropic 3d_fullres configuration in the older format the
authors' code reads (``pool_op_kernel_sizes``, ``conv_kernel_sizes``) and in nnU-Net >= 2.5's
(``architecture.arch_kwargs``), ``transpose_forward`` [1, 0, 2], and a ``dataset.json``.

The NIfTI cases have non-RAS affines (axes permuted and flipped, or flipped; spacing 0.8 x 3 x 1 mm) whose array as nnU-Net
builds it (SimpleITK: the voxel grid as (z, y, x), then ``transpose_forward``) is the fixture's input, so the
network output must be the fixture's reference (the authors' network on that array).
"""

from __future__ import annotations

import copy
import json
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from monai.bundle import ConfigParser
from parameterized import parameterized

from scripts.import_nnunet import main, nnunet_plan
from scripts.networks import MambaClinix
from scripts.planning import Plan

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "authors_mambaclinix_fixture.pt"
TRANSPOSE_FORWARD = [1, 0, 2]  # nnU-Net puts the coarsest axis first
NNUNET_SPACING = [3.0, 1.0, 0.8]  # in the network's order
AFFINE = np.array([[0.0, 0.0, -1.0, 10.0], [-0.8, 0.0, 0.0, 5.0], [0.0, 3.0, 0.0, -7.0], [0.0, 0.0, 0.0, 1.0]])
# flipped (LPS-like), not permuted: the saver (scripts.transforms.AtomicSaveSegmentationd -> MONAI NibabelWriter
# with resample=False) fails on affines with permuted axes, whatever the plan; the full run uses this one
FLIPPED_AFFINE = np.diag([-0.8, -3.0, 1.0, 1.0])
FLIPPED_AFFINE[:3, 3] = [10.0, 5.0, -7.0]
PLAN_KEYS = {
    "spatial_dims", "in_channels", "out_channels", "class_names", "axcodes", "spatial_axes_order", "pixdim",
    "patch_size", "features", "strides", "kernel_sizes", "block_types", "hgcn_orders", "intensity_schemes",
    "intensity_stats", "intensity_nonzero", "tta_mirror_axes",
}


def nnunet_array(file_array: np.ndarray, transpose_forward=TRANSPOSE_FORWARD) -> np.ndarray:
    """(C, x, y, z) voxel grid of a file -> nnU-Net's network array: SimpleITK's (z, y, x), then transpose_forward."""
    sitk = file_array.transpose(0, 3, 2, 1)
    return sitk.transpose(0, *[1 + t for t in transpose_forward])


def file_array_from_nnunet(array: np.ndarray, transpose_forward=TRANSPOSE_FORWARD) -> np.ndarray:
    sitk = array.transpose(0, *[1 + int(t) for t in np.argsort(transpose_forward)])
    return sitk.transpose(0, 3, 2, 1)


def synthetic_set(case: dict, new_format: bool = False) -> tuple[dict, dict, dict]:
    """(checkpoint, plans, dataset.json) of an nnU-Net training of the authors' network."""
    plan = case["plan"]
    stats = {"max": 1e4, "mean": 0.0, "median": 0.0, "min": -1e4, "percentile_00_5": -1e4, "percentile_99_5": 1e4, "std": 1.0}
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(case["input"].shape[2:]), "median_image_size_in_voxels": [8.0, 16.0, 24.0],
        "spacing": NNUNET_SPACING, "normalization_schemes": ["CTNormalization"] * 2, "use_mask_for_norm": [False] * 2,
        "resampling_fn_data": "resample_data_or_seg_to_shape", "batch_dice": True,
    }
    if new_format:
        config["architecture"] = {
            "network_class_name": "MambaClinix_3d", "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            "arch_kwargs": {"n_stages": 4, "features_per_stage": plan["features"], "kernel_sizes": plan["kernel_sizes"],
                            "strides": plan["strides"], "n_conv_per_stage": [2] * 4, "n_conv_per_stage_decoder": [2] * 3},
        }
    else:
        config.update({
            "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 4, "n_conv_per_stage_encoder": [2] * 4,
            "n_conv_per_stage_decoder": [2] * 3, "num_pool_per_axis": [2, 3, 3], "unet_max_num_features": 320,
            "pool_op_kernel_sizes": plan["strides"], "conv_kernel_sizes": plan["kernel_sizes"],
        })
    plans = {
        "dataset_name": "Dataset999_Synthetic", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": NNUNET_SPACING, "original_median_shape_after_transp": [8, 16, 24],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": TRANSPOSE_FORWARD,
        "transpose_backward": [int(i) for i in np.argsort(TRANSPOSE_FORWARD)],
        "configurations": {"3d_fullres": config, "3d_fullres_bs4": {"inherits_from": "3d_fullres", "batch_size": 4}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": stats, "1": dict(stats)},
    }
    dataset = {"channel_names": {"0": "CT", "1": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
               "numTraining": 1, "file_ending": ".nii.gz"}
    checkpoint = {
        "network_weights": case["state_dict"], "optimizer_state": {"state": {}, "param_groups": []},
        "grad_scaler_state": None, "logging": {"train_losses": [np.float64(0.5)], "mean_fg_dice": [np.float32(0.3)]},
        "_best_ema": np.float64(0.3), "current_epoch": 1000,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainerMambaClinix", "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    return checkpoint, plans, dataset


class TestImportNnunet(unittest.TestCase):
    case: dict

    @classmethod
    def setUpClass(cls) -> None:
        cls.case = torch.load(FIXTURE, weights_only=True)["cases"]["stages4"]

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(__import__("shutil").rmtree, self.tmp, True)

    def _import(self, checkpoint, plans, dataset, configuration="3d_fullres") -> tuple[Plan, list[str]]:
        torch.save(checkpoint, self.tmp / "checkpoint_final.pth")
        (self.tmp / "nnUNetPlans.json").write_text(json.dumps(plans))
        (self.tmp / "dataset.json").write_text(json.dumps(dataset))
        argv = ["--checkpoint", str(self.tmp / "checkpoint_final.pth"), "--plans", str(self.tmp / "nnUNetPlans.json"),
                "--dataset_json", str(self.tmp / "dataset.json"), "--configuration", configuration,
                "--output_dir", str(self.tmp / "out")]
        return main(argv), argv

    def _config(self, **overrides) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / "inference.yaml"), str(self.tmp / "out" / "configs" / "plan.yaml")])
        parser.update({"bundle_root": str(ROOT), "ckpt_dir": str(self.tmp / "out" / "models"), **overrides})
        return parser

    @parameterized.expand([("authors_plans", False, "3d_fullres"), ("nnunet_2_5_plans", True, "3d_fullres_bs4")])
    def test_writes_weights_and_plan(self, _, new_format, configuration):
        written = self._import(*synthetic_set(self.case, new_format), configuration=configuration)[0]
        plan = yaml.safe_load((self.tmp / "out" / "configs" / "plan.yaml").read_text())
        self.assertEqual(plan, written.to_config())
        self.assertEqual(Plan.from_config(plan, strict=True), written)
        self.assertEqual(set(plan) - {"batch_size", "plan_info"}, PLAN_KEYS)
        inference = yaml.safe_load((ROOT / "configs" / "inference.yaml").read_text())
        train = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())
        self.assertEqual(PLAN_KEYS - set(inference) - set(train), set(), "plan keys no config reads")
        self.assertLessEqual({"axcodes", "spatial_axes_order", "pixdim", "patch_size", "intensity_stats"}, set(inference))
        self.assertEqual(plan["batch_size"], 4 if configuration.endswith("bs4") else 2)
        self.assertEqual(plan["spatial_axes_order"], [1, 2, 0])  # network axes = our (y, z, x)
        self.assertEqual(plan["pixdim"], [0.8, 3.0, 1.0])  # our (x, y, z) order: the file's voxel spacing
        self.assertIsNone(plan["axcodes"])
        self.assertEqual(plan["patch_size"], [8, 16, 24])
        self.assertEqual(plan["class_names"], ["liver", "tumour"])
        self.assertEqual(plan["intensity_schemes"], ["ct", "ct"])
        self.assertEqual(plan["intensity_stats"], [[-1e4, 1e4, 0.0, 1.0]] * 2)
        self.assertEqual(plan["tta_mirror_axes"], [0, 1, 2])
        weights = torch.load(self.tmp / "out" / "models" / "model.pt", weights_only=True)
        net = self._config().get_parsed_content("network_def")
        self.assertIsInstance(net, MambaClinix)
        net.load_state_dict(weights, strict=True)

    def test_zscore_and_mask(self):
        checkpoint, plans, dataset = synthetic_set(self.case)
        config = plans["configurations"]["3d_fullres"]
        config["normalization_schemes"], config["use_mask_for_norm"] = ["ZScoreNormalization", "CTNormalization"], [True, False]
        plan, _ = nnunet_plan(checkpoint, plans, dataset)
        self.assertEqual(plan.intensity_schemes, ["zscore", "ct"])
        self.assertEqual(plan.intensity_stats[0], None)
        self.assertTrue(plan.intensity_nonzero)
        config["use_mask_for_norm"] = [False, False]
        self.assertFalse(nnunet_plan(checkpoint, plans, dataset)[0].intensity_nonzero)

    def test_inference_matches_nnunet_array_and_geometry(self):
        """Our preprocessing feeds the network nnU-Net's array; the segmentation is the authors' network's, in the
        input file's geometry."""
        self._import(*synthetic_set(self.case))
        reference_input = self.case["input"][0].numpy()  # (2, 8, 16, 24) in the network's order
        file_array = file_array_from_nnunet(reference_input)
        np.testing.assert_array_equal(nnunet_array(file_array), reference_input)
        paths = {}
        for name, affine in (("permuted", AFFINE), ("flipped", FLIPPED_AFFINE)):
            paths[name] = self.tmp / f"{name}.nii.gz"
            nib.save(nib.Nifti1Image(np.ascontiguousarray(file_array.transpose(1, 2, 3, 0)), affine), str(paths[name]))
        path = paths["flipped"]
        parser = self._config(output_dir=str(self.tmp / "pred"), input_files=[str(path)], save_overlay=False,
                              tta_mirror_axes=None, device="$torch.device('cpu')", amp=False)
        for name in paths:
            fed = parser.get_parsed_content("preprocessing")({"image": str(paths[name])})["image"]
            np.testing.assert_array_equal(np.asarray(fed), nnunet_array(file_array), err_msg=name)

        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load(self.tmp / "out" / "models" / "model.pt", weights_only=True), strict=True)
        with torch.no_grad():
            logits = net.eval()(torch.as_tensor(np.asarray(fed))[None]).double()[0]
        reference = self.case["outputs"][0][0]
        torch.testing.assert_close(logits, reference, atol=1e-2 * reference.abs().max().item(), rtol=0.0)

        parser.get_parsed_content("evaluator").run()
        seg_file = next((self.tmp / "pred").rglob("*.nii.gz"))
        seg = nib.load(str(seg_file))
        np.testing.assert_allclose(seg.affine, FLIPPED_AFFINE, atol=1e-5)
        self.assertEqual(seg.shape[:3], file_array.shape[1:])
        expected = file_array_from_nnunet(reference.argmax(0)[None].numpy())[0]
        top2 = reference.topk(2, dim=0).values
        sure = file_array_from_nnunet(((top2[0] - top2[1]) > 1e-2 * reference.abs().max())[None].numpy())[0]
        got = np.asarray(seg.dataobj).reshape(expected.shape)
        self.assertGreater(sure.mean(), 0.9)
        np.testing.assert_array_equal(got[sure], expected[sure])

    def test_errors_name_the_file(self):
        checkpoint, plans, dataset = synthetic_set(self.case)
        other = dict(checkpoint, network_weights=MambaClinix(3, 2, 3, features=(4, 8, 8, 16), strides=self.case["plan"]["strides"]).state_dict())
        no_config = copy.deepcopy(plans)
        del no_config["configurations"]["3d_fullres"], no_config["configurations"]["3d_fullres_bs4"]
        one_channel = dict(dataset, channel_names={"0": "CT"})
        for args, name, pattern in [
            ((other, plans, dataset), "checkpoint_final.pth", "not a state dict of the authors' MambaClinix"),
            ((checkpoint, no_config, dataset), "nnUNetPlans.json", "no configuration '3d_fullres'"),
            ((checkpoint, plans, one_channel), "dataset.json", "1 input channel.*2 input"),
        ]:
            with self.subTest(name), self.assertRaisesRegex(ValueError, pattern) as ctx:
                self._import(*args)
            message = str(ctx.exception)
            self.assertTrue(message.startswith(str(self.tmp / name)), message)
            self.assertNotIn("\n", message)


if __name__ == "__main__":
    unittest.main()
