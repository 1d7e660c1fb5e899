# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Pictures: the three-plane overlay (planes through the largest structure, spacing as aspect, orientation, legend,
output names), the per-case Dice bar chart, and the warnings the bundle's commands no longer print."""

from __future__ import annotations

import json
import math
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from monai.data import MetaTensor
from parameterized import parameterized

from scripts.visualize import (
    PLANES, DiceChartWriter, SaveOverlayd, dice_chart_figure, overlay_figure, save_dice_chart, structure_centre,
)
from tests.utils import ROOT, make_case, run_inference, tiny_inference_bundle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_blobs(shape=(40, 36, 30)):
    """A label map with a big sphere (class 1, radius 7) and a small one (class 2, radius 3) that no axis-aligned
    plane through the big one's centre touches; an image brighter inside them."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    big, small = np.array([12, 12, 10]), np.array([31, 28, 23])
    label = np.zeros(shape, np.int64)
    label[np.linalg.norm(grid - big, axis=-1) <= 7] = 1
    label[np.linalg.norm(grid - small, axis=-1) <= 3] = 2
    image = np.where(label > 0, 100.0, 10.0).astype(np.float32)
    return image, label, tuple(big)


def panels(fig):
    """The plane axes of an overlay figure, in :data:`PLANES` order."""
    return [ax for ax in fig.axes if ax.get_title().split(" ")[0] in PLANES]


def drawn(ax) -> np.ndarray:
    """The coloured (labelled) pixels of a panel: the alpha channel of its overlay image."""
    return np.asarray(ax.images[1].get_array())[..., 3] > 0


class TestOverlay(unittest.TestCase):
    def test_three_planes_through_the_largest_structure(self):
        image, label, big = two_blobs()
        centre, n_voxels = structure_centre(label)
        self.assertEqual(centre, big)
        self.assertEqual(n_voxels, int((label == 1).sum()))
        fig = overlay_figure(image, label, np.eye(4), ["big", "small"])
        axes = panels(fig)
        self.assertEqual([ax.get_title().split(" ")[0] for ax in axes], list(PLANES))
        # each plane through the big sphere's centre shows its disc of radius 7 (the small sphere is not cut)
        disc = int((np.linalg.norm(np.stack(np.meshgrid(np.arange(-7, 8), np.arange(-7, 8)), -1), axis=-1) <= 7).sum())
        for ax in axes:
            with self.subTest(ax.get_title()):
                self.assertEqual(int(drawn(ax).sum()), disc)
                colours = np.unique(np.asarray(ax.images[1].get_array())[drawn(ax)][:, :3].round(4), axis=0)
                self.assertEqual(len(colours), 1, "only the big structure's class is cut")

    def test_empty_prediction_shows_the_image_centre(self):
        image = np.random.default_rng(0).normal(size=(20, 16, 12)).astype(np.float32)
        label = np.zeros(image.shape, np.int64)
        self.assertEqual(structure_centre(label), ((10, 8, 6), 0))
        fig = overlay_figure(image, label)
        self.assertEqual(len(panels(fig)), 3)
        self.assertIn("nothing segmented", fig._suptitle.get_text())

    def test_legend_names_the_classes_with_their_colours(self):
        image, label, _ = two_blobs()
        fig = overlay_figure(image, label, np.eye(4), ["grey_matter", "white_matter"], title="sub-01.nii.gz")
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        self.assertTrue(texts[0].startswith("grey_matter (") and texts[1].startswith("white_matter ("), texts)
        self.assertIn("sub-01.nii.gz", fig._suptitle.get_text())
        # the legend's colour of class 1 is the colour drawn (only class 1 is cut by the planes)
        pixels = np.concatenate([np.asarray(ax.images[1].get_array())[drawn(ax)][:, :3] for ax in panels(fig)])
        np.testing.assert_allclose(pixels[0], fig.legends[0].get_patches()[0].get_facecolor()[:3], atol=1e-6)
        # fewer names than classes: the others are numbered
        texts = [t.get_text() for t in overlay_figure(image, label, None, ["only"]).legends[0].get_texts()]
        self.assertTrue(texts[1].startswith("class_2 ("), texts)

    @parameterized.expand([
        ("isotropic", (1.0, 1.0, 1.0), {"axial": 1.0, "coronal": 1.0, "sagittal": 1.0}),
        ("thick_slices", (0.5, 0.5, 4.0), {"axial": 1.0, "coronal": 8.0, "sagittal": 8.0}),
        ("all_different", (0.5, 2.0, 3.0), {"axial": 4.0, "coronal": 6.0, "sagittal": 1.5}),
    ])
    def test_aspect_ratio_follows_the_spacing(self, _, spacing, aspects):
        image, label, _ = two_blobs()
        fig = overlay_figure(image, label, np.diag([*spacing, 1.0]))
        for ax in panels(fig):
            plane = ax.get_title().split(" ")[0]
            self.assertAlmostEqual(float(ax.get_aspect()), aspects[plane], places=6, msg=plane)

    @parameterized.expand([
        # RAS grid: voxel index x grows to the patient's right; LPS grid: to the left
        ("ras", np.diag([1.0, 1.0, 1.0, 1.0]), True, "left"),
        ("ras", np.diag([1.0, 1.0, 1.0, 1.0]), False, "right"),
        ("lps", np.diag([-1.0, -1.0, 1.0, 1.0]), True, "right"),
        ("lps", np.diag([-1.0, -1.0, 1.0, 1.0]), False, "left"),
    ])
    def test_orientation(self, _, affine, radiological, side):
        """A structure at high voxel x: the patient's right in an RAS grid, left in an LPS grid; radiological
        convention shows the patient's right on the image's left."""
        image, label, _ = two_blobs((40, 36, 30))
        label[label == 2] = 0
        label = np.flip(label, 0).copy()  # the big sphere now at x = 27 of 40
        fig = overlay_figure(image, label, affine, radiological=radiological)
        axial = panels(fig)[0]
        cols = np.nonzero(drawn(axial).any(axis=0))[0]
        width = drawn(axial).shape[1]
        self.assertEqual("left" if cols.mean() < width / 2 else "right", side)
        letters = {t.get_text() for t in axial.texts}
        self.assertEqual(letters, {"R", "L", "A", "P"})
        left = min(axial.texts, key=lambda t: t.get_position()[0]).get_text()
        self.assertEqual(left, "R" if radiological else "L")
        self.assertIn("radiological" if radiological else "neurological", fig._suptitle.get_text())

    def test_mismatched_grids_are_refused(self):
        with self.assertRaisesRegex(ValueError, "same shape.*Invertd"):
            overlay_figure(np.zeros((8, 8, 8)), np.zeros((8, 8, 4), np.int64))


class TestSaveOverlayd(unittest.TestCase):
    def _item(self, path, seed=0):
        image, label, affine = make_case((20, 18, 16), seed, spacing=(1.0, 1.0, 2.5))
        meta = {"filename_or_obj": str(path)}
        return {"image_input": MetaTensor(torch.as_tensor(image), affine=torch.as_tensor(affine), meta=meta),
                "pred": MetaTensor(torch.as_tensor(label[None].astype(np.float32)), affine=torch.as_tensor(affine))}

    def test_names_follow_the_segmentation_rule(self):
        with tempfile.TemporaryDirectory() as tmp:
            root, out = Path(tmp, "in"), Path(tmp, "out")
            t = SaveOverlayd("pred", image_key="image_input", output_dir=out, class_names=["inner", "outer"],
                             data_root_dir=root)
            paths = [t(self._item(root / sub / "scan.nii.gz", i))["pred_overlay_path"]
                     for i, sub in enumerate(("a", "b", "a"))]
            self.assertEqual([Path(p).relative_to(out).as_posix() for p in paths],
                             ["a/scan_overlay.png", "b/scan_overlay.png", "a/scan_2_overlay.png"])
            for p in paths:
                self.assertEqual(Path(p).read_bytes()[:8], PNG_MAGIC)
            self.assertEqual(sorted(f.name for f in out.rglob("*") if f.is_file()),
                             ["scan_2_overlay.png", "scan_overlay.png", "scan_overlay.png"], "no temporary files")
            t.reset_names()
            self.assertEqual(Path(t(self._item(root / "a" / "scan.nii.gz"))["pred_overlay_path"]).name,
                             "scan_overlay.png")

    def test_probabilities_and_flat_names(self):
        with tempfile.TemporaryDirectory() as tmp:
            item = self._item("/data/case 7.nii.gz")
            label = item["pred"][0].long()
            item["pred"] = torch.nn.functional.one_hot(label, 3).permute(3, 0, 1, 2).float()  # 3 channels
            out = SaveOverlayd("pred", image_key="image_input", output_dir=tmp)(item)
            self.assertEqual(Path(out["pred_overlay_path"]).name, "case_7_overlay.png")


def metrics_json(classes=("grey_matter", "white_matter"), values=((0.9, 0.8), (0.7, None), (0.6, 0.5))):
    """A metrics.json of :class:`scripts.handlers.MetricsJSONWriter` with per-class Dice."""
    from scripts.metrics import summarise

    table = np.array([[math.nan if v is None else v for v in row] for row in values], dtype=np.float64)
    rows = [{"case": f"case{i}.nii.gz", "image": f"/d/case{i}.nii.gz",
             **{f"dice_{c}": v for c, v in zip(classes, row)},
             "dice_mean": float(np.nanmean(table[i]))} for i, row in enumerate(values)]
    return {"cases": rows, "summary": {"dice": summarise(table, list(classes)), "hd95": {"mean": 3.0}}}


class TestDiceChart(unittest.TestCase):
    def test_bars_names_and_mean(self):
        metrics = metrics_json()
        fig = dice_chart_figure(metrics)
        ax = fig.axes[0]
        self.assertEqual([t.get_text() for t in ax.get_yticklabels()], ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"])
        widths = sorted(round(p.get_width(), 6) for p in ax.patches)
        self.assertEqual(widths, [0.5, 0.6, 0.7, 0.8, 0.9], "one bar per case and class with a value")
        self.assertIn("n/a", [t.get_text() for t in ax.texts])
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        mean = metrics["summary"]["dice"]["mean"]  # per class over the cases, then over the classes
        self.assertAlmostEqual(mean, ((0.9 + 0.7 + 0.6) / 3 + (0.8 + 0.5) / 2) / 2)
        self.assertIn(f"mean {mean:.3f} (per class, then over the classes)", legend)
        self.assertTrue({"grey_matter", "white_matter"} <= set(legend), legend)
        (line,) = ax.get_lines()
        self.assertAlmostEqual(float(line.get_xdata()[0]), mean)

    def test_tens_of_cases_get_a_taller_figure(self):
        values = [(0.8, 0.7)] * 40
        small, large = dice_chart_figure(metrics_json()), dice_chart_figure(metrics_json(values=values))
        self.assertGreater(large.get_figheight(), 4 * small.get_figheight())
        self.assertEqual(len(large.axes[0].get_yticklabels()), 40)

    def test_save_and_errors(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "metrics.json")
            path.write_text(json.dumps(metrics_json()))
            out = save_dice_chart(path)
            self.assertEqual(out, Path(tmp, "dice_per_case.png"))
            self.assertEqual(out.read_bytes()[:8], PNG_MAGIC)
            with self.assertRaisesRegex(ValueError, "does not exist"):
                save_dice_chart(Path(tmp, "missing.json"))
            path.write_text(json.dumps({"cases": [{"case": "a", "hd95": 1.0}], "summary": {"hd95": {"mean": 1.0}}}))
            with self.assertRaisesRegex(ValueError, "no per-class Dice"):
                save_dice_chart(path)

    def test_handler_after_the_metrics_writer(self):
        from ignite.engine import Engine, Events

        with tempfile.TemporaryDirectory() as tmp:
            path, png = Path(tmp, "metrics.json"), Path(tmp, "chart.png")
            engine = Engine(lambda e, b: None)
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: path.write_text(json.dumps(metrics_json())))
            DiceChartWriter(path, png).attach(engine)
            engine.run([0], max_epochs=1)
            self.assertEqual(png.read_bytes()[:8], PNG_MAGIC)


class TestConfigs(unittest.TestCase):
    def test_orientation_labels_are_explicit(self):
        """MONAI warns (FutureWarning) at every Orientationd built without ``labels``: each config passes it."""
        found = 0
        for path in sorted((ROOT / "configs").glob("*.yaml")):
            text = yaml.safe_load(path.read_text())

            def visit(node):
                nonlocal found
                if isinstance(node, dict):
                    if node.get("_target_") in ("Orientationd", "Orientation"):
                        found += 1
                        self.assertIn("labels", node, f"{path.name}: Orientationd without labels")
                    for v in node.values():
                        visit(v)
                elif isinstance(node, list):
                    for v in node:
                        visit(v)

            visit(text)
        self.assertGreaterEqual(found, 5)

    def test_overlay_after_the_inversion(self):
        config = yaml.safe_load((ROOT / "configs" / "inference.yaml").read_text())
        post = [t["_target_"] for t in config["postprocessing"]["transforms"]]
        self.assertGreater(post.index("scripts.visualize.SaveOverlayd"), post.index("Invertd"))
        self.assertGreater(post.index("scripts.visualize.SaveOverlayd"), post.index("AsDiscreted"))


class TestInferenceRun(unittest.TestCase):
    def test_overlays_named_like_the_segmentations_without_warnings(self):
        """``python -m monai.bundle run inference`` (a tmp bundle copy, a tiny random model) on ``a/scan``,
        ``b/scan`` and ``a/scan`` again: an overlay beside each segmentation, and neither MONAI's nvImageCodec
        warning nor Orientationd's FutureWarning in the output."""
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            bundle = tiny_inference_bundle(tmp)
            inputs = []
            for seed, folder in enumerate(("a", "b")):
                image, _, affine = make_case((20, 18, 16), seed, spacing=(1.0, 1.0, 2.0))
                (tmp / "in" / folder).mkdir(parents=True)
                inputs.append(tmp / "in" / folder / "scan.nii.gz")
                nib.save(nib.Nifti1Image(image[0], affine), str(inputs[-1]))
            out = tmp / "out"
            result = run_inference(bundle, inputs + inputs[:1], out)
            log = result.stdout + result.stderr
            self.assertEqual(result.returncode, 0, log[-3000:])
            overlays = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
            self.assertEqual(overlays, ["a/scan_2_overlay.png", "a/scan_overlay.png", "b/scan_overlay.png"])
            segs = {p.relative_to(out).as_posix().replace("_seg.nii.gz", "") for p in out.rglob("*.nii.gz")}
            self.assertEqual(segs, {p.replace("_overlay.png", "") for p in overlays})
            for warning in ("nvImageCodec", "FutureWarning"):
                lines = [line for line in log.splitlines() if warning in line]
                self.assertEqual(lines, [], f"the run printed {warning}")


if __name__ == "__main__":
    unittest.main()
