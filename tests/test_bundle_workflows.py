# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Model-zoo style bundle tests: ConfigWorkflow train -> resume -> evaluate -> inference on small generated
volumes, the bundle tools (verify_metadata, verify_net_in_out, ckpt_export)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow

from tests.utils import ROOT, TINY_PLAN, env_with_root, make_case, write_dataset

CONFIGS = ROOT / "configs"
META = str(CONFIGS / "metadata.json")


def _workflow(configs, run_id, workflow_type, **override):
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs], meta_file=META, logging_file=None,
        workflow_type=workflow_type, run_id=run_id, init_id="initialize", final_id="finalize", **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


class TestBundleWorkflows(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        cls.data = cls.tmp / "data"
        cls.datalist = write_dataset(cls.data)
        cls.common = dict(
            TINY_PLAN, bundle_root=str(ROOT), dataset_dir=str(cls.data), datalist=str(cls.datalist),
            ckpt_dir=str(cls.tmp / "models"), device="cpu",
        )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _train(self, epochs, **extra):
        args = dict(self.common, output_dir=str(self.tmp / "runs"), epochs=epochs, iterations_per_epoch=2,
                    val_interval=1, cache_rate=0.0, drop_path_rate=0.0)
        args.update(extra)
        return _workflow(["train.yaml"], "training", "train", **args)

    def test_1_train_resume_evaluate_infer(self):
        wf = self._train(1)
        models = self.tmp / "models"
        self.assertTrue((models / "model.pt").is_file())
        self.assertTrue((models / "checkpoint_latest.pt").is_file())
        state = torch.load(models / "checkpoint_latest.pt", weights_only=True)
        self.assertEqual(set(state), {"model", "optimizer", "lr_scheduler", "best_model", "trainer"})
        self.assertEqual(state["trainer"]["iteration"], 2)  # 1 epoch of 2 iterations
        self.assertEqual(wf.trainer.state.epoch, 1)

        # resume: a second run with more epochs continues after epoch 1 instead of starting over
        with self.assertLogs("scripts.handlers", level=logging.INFO) as logs:
            wf2 = self._train(3)
        self.assertTrue(any("resumed from" in m and "after epoch 1" in m for m in logs.output), logs.output)
        self.assertEqual(wf2.trainer.state.epoch, 3)
        self.assertEqual(wf2.trainer.state.iteration, 3 * 2)
        curves = json.loads((self.tmp / "runs" / "training_curves.json").read_text())
        self.assertEqual(curves["epoch"], [1, 2, 3])
        self.assertTrue((self.tmp / "runs" / "training_curves.png").is_file())
        no_tmp = [p for p in models.iterdir() if p.name.startswith(".")]
        self.assertEqual(no_tmp, [], "temporary checkpoint files left behind")

        # evaluate: per-case and summary metrics
        eval_dir = self.tmp / "eval"
        _workflow(["train.yaml", "evaluate.yaml"], "evaluating", "eval", **self.common, eval_dir=str(eval_dir),
                  output_dir=str(self.tmp / "runs"), cache_rate=0.0)
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        self.assertEqual(len(metrics["cases"]), 1)
        self.assertIn("mean_dice", metrics)
        self.assertIn("mean over the classes", metrics["aggregation"])
        self.assertEqual((metrics["hd95_unit"], metrics["geometry"][:26]), ("mm", "each case's original image"))
        for name in ("dice", "iou", "hd95", "sensitivity", "specificity"):
            self.assertIn(name, metrics["summary"])
            self.assertEqual(set(metrics["summary"][name]["per_class"]), {"inner", "outer"})
        self.assertAlmostEqual(metrics["mean_dice"], float(np.mean(list(metrics["summary"]["dice"]["per_class"].values()))))
        summary = json.loads((eval_dir / "summary.json").read_text())
        self.assertTrue(0.0 <= summary["mean_dice"] <= 1.0)
        header = (eval_dir / "metrics.csv").read_text().splitlines()[0].split(",")  # the same rows, the same names
        self.assertEqual(header[:5], ["case", "image", "dice_inner", "dice_outer", "dice_mean"])
        self.assertFalse(any(c.startswith("class") for c in header))

        # inference: segmentation in the input's geometry, uint8, with an overlay picture
        out_dir = self.tmp / "inference"
        test_image = self.data / "images" / "case3.nii.gz"
        _workflow(["inference.yaml"], "inference", "infer", **{k: v for k, v in self.common.items() if k not in (
            "num_regions", "batch_size", "class_names")}, output_dir=str(out_dir), input_files=[str(test_image)],
            tta_mirror_axes=[0, 1])
        seg = nib.load(str(out_dir / "case3_seg.nii.gz"))
        src = nib.load(str(test_image))
        self.assertEqual(seg.shape, src.shape)
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
        self.assertEqual(seg.get_data_dtype(), np.uint8)
        self.assertTrue(set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2})
        self.assertTrue((out_dir / "case3_overlay.png").is_file())

    def test_2_bad_data_stops_before_training(self):
        bad = self.tmp / "bad"
        datalist = write_dataset(bad, n_train=1, n_val=0, n_test=0)
        with open(bad / "images" / "case0.nii.gz", "wb") as f:
            f.write(b"this is not a nifti file")
        with self.assertRaises(Exception) as ctx:
            self._train(1, dataset_dir=str(bad), datalist=str(datalist), ckpt_dir=str(bad / "models"))
        text = "".join(str(e) for e in _chain(ctx.exception))
        self.assertIn("case0.nii.gz", text)
        self.assertIn("could not be read", text)
        self.assertFalse((bad / "models" / "model.pt").exists())

    def test_3_small_image_is_padded(self):
        small = self.tmp / "small"
        datalist = write_dataset(small, n_train=1, n_val=1, n_test=0, shape=(12, 10, 9))
        self._train(1, dataset_dir=str(small), datalist=str(datalist), ckpt_dir=str(small / "models"),
                    output_dir=str(small / "runs"))
        self.assertTrue((small / "models" / "model.pt").is_file())


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


class TestBundleTools(unittest.TestCase):
    def _run(self, args, timeout=300):
        result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, env=env_with_root(),
                                capture_output=True, text=True, timeout=timeout)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        return result

    def test_verify_metadata_offline(self):
        result = self._run(["verify_metadata", "--meta_file", "configs/metadata.json",
                            "--filepath", "configs/schema/metadata_schema.json"])
        self.assertIn("metadata is verified with no error", result.stdout + result.stderr)

    def test_verify_net_in_out_and_ckpt_export(self):
        with tempfile.TemporaryDirectory() as tmp:
            overrides = ["--features", "[8,16,16,32]", "--device", "cpu"]
            self._run(["verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                       "--config_file", "configs/inference.yaml", "--n", "2", *overrides])
            from scripts.networks import MambaClinix

            torch.manual_seed(0)
            net = MambaClinix(3, 1, 3, features=[8, 16, 16, 32], strides=[1, 2, 2, 2],
                              block_types=["hgcn", "hgcn", "mamba", "mamba"], hgcn_orders=[2, 3])
            torch.save(net.state_dict(), os.path.join(tmp, "model.pt"))
            self._run(["ckpt_export", "network_def", "--filepath", os.path.join(tmp, "model.ts"),
                       "--ckpt_file", os.path.join(tmp, "model.pt"), "--meta_file", "configs/metadata.json",
                       "--config_file", "configs/inference.yaml", "--key_in_ckpt", "", "--use_trace", "True",
                       "--input_shape", "[1, 1, 32, 32, 32]", *overrides])
            ts = torch.jit.load(os.path.join(tmp, "model.ts"))
            x = torch.randn(1, 1, 32, 32, 32)
            with torch.no_grad():
                y = net.eval()(x)
                # He-initialised logits reach ~20; the traced graph may pick other convolution kernels, whose float32
                # rounding, through 4 stages and the norms, reaches ~1e-4 of the output range on a few voxels
                torch.testing.assert_close(ts(x), y, atol=5e-4 * float(y.abs().max()), rtol=1e-4)


    def test_inference_same_file_names_in_one_run(self):
        """``python -m monai.bundle run inference`` on ``a/scan``, ``b/scan`` and ``a/scan`` again (a tmp bundle copy
        with a tiny random model): three outputs, none overwritten."""
        from scripts.networks import MambaClinix

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            bundle = tmp / "bundle"
            shutil.copytree(CONFIGS, bundle / "configs")
            shutil.copytree(ROOT / "scripts", bundle / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
            plan = {k: v for k, v in TINY_PLAN.items() if k not in ("num_regions", "batch_size", "class_names")}
            (bundle / "configs" / "plan.yaml").write_text(json.dumps(plan))  # JSON is YAML
            net = MambaClinix(3, 1, 3, features=plan["features"], kernel_size=plan["kernel_sizes"],
                              strides=plan["strides"], block_types=plan["block_types"], hgcn_orders=plan["hgcn_orders"])
            (bundle / "models").mkdir()
            torch.save(net.state_dict(), bundle / "models" / "model.pt")
            inputs = []
            for seed, folder in enumerate(("a", "b")):
                image, _, affine = make_case((20, 18, 16), seed)
                (tmp / "in" / folder).mkdir(parents=True)
                inputs.append(str(tmp / "in" / folder / "scan.nii.gz"))
                nib.save(nib.Nifti1Image(image[0], affine), inputs[-1])
            out = tmp / "out"
            result = subprocess.run(
                [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
                 "['configs/inference.yaml','configs/plan.yaml']", "--meta_file", "configs/metadata.json",
                 "--bundle_root", ".", "--device", "cpu", "--tta_mirror_axes", "None", "--save_overlay", "False",
                 "--input_files", repr(inputs + inputs[:1]), "--output_dir", str(out)],
                cwd=bundle, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
            self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
            written = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
            self.assertEqual(written, ["a/scan_2_seg.nii.gz", "a/scan_seg.nii.gz", "b/scan_seg.nii.gz"])
            self.assertIn("already used in this run", result.stdout + result.stderr)
            for name, src in (("a/scan_seg.nii.gz", inputs[0]), ("b/scan_seg.nii.gz", inputs[1])):
                np.testing.assert_allclose(nib.load(str(out / name)).affine, nib.load(src).affine, atol=1e-5)


if __name__ == "__main__":
    unittest.main()
