# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""API tests of scripts.hunet.service with FastAPI's TestClient (the bundle's own inference config, tiny sizes)."""

from __future__ import annotations

import gzip
import io
import os
import re
import tempfile
import threading
import time
import unittest
import zipfile
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import torch
from parameterized import parameterized
from PIL import Image

from monai.utils import optional_import

TestClient, has_fastapi = optional_import("fastapi.testclient", name="TestClient")

BUNDLE = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "embed_dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "d_state": 4, "sw_batch_size": 4}


def make_segmenter(tmp: Path, foreground: bool = True):
    """Tiny segmenter with weights that label every voxel as lesion (or none), saved and loaded as a checkpoint."""
    from scripts.hunet.service import HUNetSegmenter
    from scripts.networks.mamba_hunet import MambaHUNet

    net = MambaHUNet(img_size=32, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), d_state=4)
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.copy_(torch.tensor([0.0, 5.0] if foreground else [5.0, 0.0]))
    ckpt = tmp / "tiny.pt"
    torch.save({"model": net.state_dict()}, ckpt)
    return HUNetSegmenter(BUNDLE, ckpt_path=ckpt, device="cpu", overrides=TINY)


def nifti_bytes(shape=(20, 18, 4), affine=None) -> tuple[bytes, np.ndarray]:
    affine = np.diag([0.7, 0.8, 3.0, 1.0]) if affine is None else affine
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    return gzip.compress(img.to_bytes()), affine


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class _ServiceCase(unittest.TestCase):
    """A tiny segmenter served by a TestClient, shared by the tests of a class."""

    max_upload_bytes = 300_000

    @classmethod
    def setUpClass(cls):
        from scripts.hunet.service import create_app

        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = Path(cls._tmp.name)
        cls.work = cls.tmp / "work"
        cls.segmenter = make_segmenter(cls.tmp)
        cls.client = TestClient(create_app(cls.segmenter, cls.work, max_upload_bytes=cls.max_upload_bytes))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()


@unittest.skipUnless(has_fastapi, "fastapi is not installed")
class TestHUNetService(_ServiceCase):
    def post(self, name: str, content: bytes):
        return self.client.post("/api/segment", files={"file": (name, content, "application/octet-stream")})

    def test_page_and_health(self):
        self.assertIn("Mamba-HUNet", self.client.get("/").text)
        self.assertEqual(self.client.get("/api/health").json()["status"], "ok")

    def test_nifti_upload(self):
        content, affine = nifti_bytes()
        r = self.post("../../evil name.nii.gz", content)
        self.assertEqual(r.status_code, 200, r.text)
        res = r.json()
        self.assertEqual((res["kind"], res["shape"], res["num_slices"]), ("nifti", [20, 18, 4], 4))
        self.assertEqual(res["report"]["num_lesions"], 1)
        self.assertAlmostEqual(res["report"]["total_volume_ml"], 20 * 18 * 4 * 0.7 * 0.8 * 3.0 / 1000, places=6)
        mask_resp = self.client.get(res["mask_url"])
        self.assertEqual(mask_resp.status_code, 200)
        self.assertIn("evil_name_seg.nii.gz", mask_resp.headers["content-disposition"])
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(mask_resp.content))
        self.assertEqual((mask.shape, mask.get_data_dtype()), ((20, 18, 4), np.uint8))
        np.testing.assert_allclose(mask.affine, affine, atol=1e-6)
        self.assertEqual(self.client.get(res["report_url"]).json()["num_lesions"], 1)
        sl = self.client.get(res["slice_url"].format(k=2, layer="image"))
        self.assertEqual(sl.headers["content-type"], "image/png")
        self.assertEqual(Image.open(io.BytesIO(sl.content)).size, (20, 18))
        self.assertEqual(self.client.get(res["slice_url"].format(k=4, layer="mask")).status_code, 404)
        files = sorted(p.name for p in (self.work / res["id"]).iterdir())
        self.assertEqual(
            files,
            ["display_image.npy", "display_mask.npy", "input.nii.gz", "mask.nii.gz", "report.json", "result.json"],
        )
        self.assertEqual(sorted(p.name for p in self.work.iterdir() if not p.is_dir()), [])

    def post_with_tissue(self, image: bytes, tissue: bytes, field: str = "tissue"):
        return self.client.post("/api/segment", files=[("file", ("flair.nii.gz", image, "application/octet-stream")),
                                                       (field, ("tissue.nii.gz", tissue, "application/octet-stream"))])

    def test_tissue_map_gives_locations(self):
        image, affine = nifti_bytes()
        tissue = np.full((20, 18, 4), 4, np.uint8)  # white matter
        tissue[:, :, 0] = 5  # infratentorial slice
        r = self.post_with_tissue(image, gzip.compress(nib.Nifti1Image(tissue, affine).to_bytes()))
        self.assertEqual(r.status_code, 200, r.text)
        report = r.json()["report"]
        self.assertEqual(report["num_lesions"], 1)  # every voxel is lesion with these weights
        self.assertEqual(report["lesions"][0]["location"], "deep_white_matter")  # the voxel nearest the centroid
        self.assertEqual(report["location_counts"]["deep_white_matter"], 1)
        self.assertEqual(report["tissue_map"], "tissue.nii.gz")
        self.assertEqual(report["slices_to_review"], [0])  # the slices hold equal areas: the first
        files = sorted(p.name for p in (self.work / r.json()["id"]).iterdir())
        self.assertEqual(
            files,
            ["display_image.npy", "display_mask.npy", "input.nii.gz", "mask.nii.gz", "report.json", "result.json"],
        )
        without = self.post("flair.nii.gz", image).json()["report"]
        self.assertNotIn("location_counts", without)
        self.assertIsNone(without["tissue_map"])

    @parameterized.expand([
        ("other_grid", np.full((20, 18, 5), 4, np.uint8), None, 422, "grid"),
        ("other_affine", np.full((20, 18, 4), 4, np.uint8), np.diag([1.0, 1.0, 1.0, 1.0]), 422, "grid"),
        ("other_values", np.full((20, 18, 4), 9, np.uint8), None, 422, "tissue"),
        ("empty", None, None, 400, "empty"),
    ])
    def test_bad_tissue_maps(self, _, tissue, tissue_affine, status, word):
        image, affine = nifti_bytes()
        content = b"" if tissue is None else gzip.compress(nib.Nifti1Image(
            tissue, affine if tissue_affine is None else tissue_affine).to_bytes())
        before = set(self.work.iterdir())
        r = self.post_with_tissue(image, content)
        self.assertEqual(r.status_code, status, r.text)
        self.assertIn(word, r.json()["detail"])
        self.assertEqual(set(self.work.iterdir()), before)  # the request's folder is gone
        self.assertEqual(self.client.get("/api/health").status_code, 200)

    def test_two_images_refused(self):
        image, _ = nifti_bytes()
        r = self.post_with_tissue(image, image, field="file")
        self.assertEqual(r.status_code, 400, r.text)
        self.assertIn("exactly one image", r.json()["detail"])

    def test_raw_body_upload(self):
        content, _ = nifti_bytes(shape=(16, 16, 2))
        r = self.client.post(
            "/api/segment?filename=raw.nii.gz", content=content, headers={"content-type": "application/octet-stream"}
        )
        self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(r.json()["shape"], [16, 16, 2])

    def test_png_upload(self):
        arr = (np.arange(30 * 20).reshape(30, 20) % 251).astype(np.uint8)
        r = self.post("slice.png", png_bytes(arr))
        self.assertEqual(r.status_code, 200, r.text)
        res = r.json()
        self.assertEqual((res["kind"], res["num_slices"]), ("png", 1))
        png_mask = Image.open(io.BytesIO(self.client.get(res["mask_png_url"]).content))
        self.assertEqual(png_mask.size, (20, 30))
        self.assertEqual(np.asarray(png_mask).max(), 255)
        shown = np.asarray(Image.open(io.BytesIO(self.client.get(res["slice_url"].format(k=0, layer="image")).content)))
        self.assertEqual(shown.shape, (30, 20))
        self.assertGreater(np.corrcoef(shown.ravel().astype(float), arr.ravel().astype(float))[0, 1], 0.99)

    def test_grey_rgb_png_and_nrrd_and_dicom(self):
        grey = np.tile(np.arange(24, dtype=np.uint8)[:, None, None] * 10, (1, 16, 3))
        self.assertEqual(self.post("grey_rgb.png", png_bytes(grey)).status_code, 200)
        import nrrd

        nrrd_path = self.tmp / "v.nrrd"
        nrrd.write(
            str(nrrd_path),
            np.random.default_rng(1).random((12, 10, 3)).astype(np.float32),
            {
                "space": "left-posterior-superior",
                "space directions": np.diag([0.5, 0.5, 2.0]),
                "space origin": np.zeros(3),
            },
        )
        r = self.post("v.nrrd", nrrd_path.read_bytes())
        self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(r.json()["shape"], [12, 10, 3])
        from pydicom.data import get_testdata_file

        dcm = Path(get_testdata_file("MR_small.dcm")).read_bytes()
        r = self.post("mr.dcm", dcm)
        self.assertEqual(r.status_code, 200, r.text)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("../../series/IM0001", dcm)
        r = self.post("series.zip", buf.getvalue())
        self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(r.json()["kind"], "dicom_zip")
        self.assertFalse((self.tmp / "series").exists())

    @parameterized.expand(
        [
            ["notes.txt", b"hello, not an image", 415],
            ["broken.nii.gz", b"\x1f\x8b" + b"\x00" * 50, 422],
            ["broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, 422],
            ["colour.png", "colour", 422],
            ["multi.nii.gz", "multichannel", 422],
            ["bad.zip", b"PK\x03\x04" + b"\x00" * 40, 422],
            ["empty.nii", b"", 400],
        ]
    )
    def test_bad_files(self, name, content, status):
        if content == "colour":
            rgb = np.zeros((8, 8, 3), np.uint8)
            rgb[..., 0] = 200
            content = png_bytes(rgb)
        elif content == "multichannel":
            content = gzip.compress(nib.Nifti1Image(np.zeros((6, 6, 3, 2), np.float32), np.eye(4)).to_bytes())
        r = self.post(name, content)
        self.assertEqual(r.status_code, status, r.text)
        self.assertIn("detail", r.json())

    def test_too_large(self):
        r = self.post("big.nii", b"\x00" * 400_000)
        self.assertEqual(r.status_code, 413)
        r = self.client.post("/api/segment?filename=big.nii", content=iter([b"\x00" * 200_000, b"\x00" * 200_000]))
        self.assertEqual(r.status_code, 413)

    @parameterized.expand([["0" * 32], ["../../etc"], ["ABCDEF"]])
    def test_unknown_ids(self, rid):
        self.assertEqual(self.client.get(f"/api/results/{rid}/report").status_code, 404)

    def test_concurrent_requests(self):
        content, _ = nifti_bytes(shape=(16, 16, 3))
        codes, ids = [], []

        def worker():
            r = self.post("c.nii.gz", content)
            codes.append(r.status_code)
            ids.append(r.json().get("id"))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(codes, [200] * 4)
        self.assertEqual(len(set(ids)), 4)


def _hostile(tmp: Path, case: str) -> bytes:
    """The bytes of one of scripts.checks.hostile's cases (bombs inflating to 16 MB at most)."""
    from scripts.checks.hostile import CASES

    spec = next(c for c in CASES if c.name == case)
    path = tmp / spec.filename
    spec.make(path, 16 * 1024**2)
    return path.read_bytes()


def _no_server_paths(test: unittest.TestCase, detail: str, work: Path) -> None:
    test.assertNotIn(str(work), detail)
    test.assertNotIn(str(work.parent), detail)
    test.assertIsNone(re.search(r"(^|[\s'\"(:])/[\w.-]+/", detail), detail)
    test.assertIsNone(re.search(r"[0-9a-f]{32}", detail), detail)


class TestCheckpointRecord(unittest.TestCase):
    """A checkpoint saved by configs/hunet_train.yaml carries its sizes: the service rebuilds the network from them."""

    def test_train_config_records_every_key(self):
        from monai.bundle import ConfigParser

        from scripts.hunet.checkpoint import RECORDED_KEYS

        with tempfile.TemporaryDirectory() as tmp:
            datalist = Path(tmp) / "datalist.json"
            datalist.write_text('{"description": "synthetic FLAIR", "synthetic": true, "training": []}')
            parser = ConfigParser()
            parser.read_config(str(BUNDLE / "configs" / "hunet_train.yaml"))
            parser.update({"bundle_root": str(BUNDLE), "datalist": str(datalist), "img_size": 64, "train_patch": 32})
            record = parser.get_parsed_content("config_record").state_dict()
        self.assertEqual(set(record), {*RECORDED_KEYS, "training_data", "synthetic_training_data"})
        self.assertEqual((record["img_size"], record["train_patch"], record["synthetic_training_data"]), (64, 32, True))
        self.assertEqual(record["training_data"], "synthetic FLAIR")
        saved = parser.get_parsed_content("validate#handlers")[1]  # the CheckpointSaver
        self.assertEqual(sorted(saved.save_dict), ["config", "model"])

    def test_service_uses_the_record(self):
        from scripts.hunet.checkpoint import ConfigRecord, recorded_config
        from scripts.hunet.service import HUNetSegmenter
        from scripts.networks.mamba_hunet import MambaHUNet

        values = {"in_channels": 1, "out_channels": 2, "img_size": 64, "patch_size": 4, "embed_dims": [8, 16, 32, 64],
                  "depths": [1, 1, 1, 1], "d_state": 4, "train_patch": 32,
                  "intensity_percentiles": [0.5, 99.5], "intensity_clip": False,
                  "sharpen_sigma": 1.0, "sharpen_amount": 0.5, "slice_axis": 2,
                  "training_data": "synthetic volumes", "synthetic_training_data": True}
        net = MambaHUNet(img_size=64, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), d_state=4)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "hunet_model.pt"
            torch.save({"model": net.state_dict(), "config": ConfigRecord(values).state_dict()}, ckpt)
            self.assertEqual(recorded_config(torch.load(ckpt, weights_only=True))["train_patch"], 32)
            seg = HUNetSegmenter(BUNDLE, ckpt_path=ckpt, device="cpu")  # no overrides: the record's sizes
            self.assertEqual(seg.network.img_size, (64, 64))
            self.assertEqual(list(seg.inferer.roi_size), [32, 32])
            self.assertEqual(seg.model_info(), {"weights": "hunet_model.pt", "training_data": "synthetic volumes",
                                                "synthetic_training_data": True})
            image = Path(tmp) / "image.nii.gz"
            nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 36, 3)).astype(np.float32), np.eye(4)),
                     image)
            mask, _ = seg(image)
            self.assertEqual(mask.shape, (40, 36, 3))
            torch.save(net.state_dict(), ckpt)  # a plain state dict: the config's sizes (256), which do not fit
            with self.assertRaises(RuntimeError):
                HUNetSegmenter(BUNDLE, ckpt_path=ckpt, device="cpu")

    def test_bad_records(self):
        from scripts.hunet.checkpoint import ConfigRecord, recorded_config

        with self.assertRaises(ValueError):
            ConfigRecord({"img_size": 64})  # keys missing
        with self.assertRaises(ValueError):
            recorded_config({"model": {}, "config": [1, 2]})
        self.assertEqual(recorded_config({"weight": torch.zeros(1)}), {})


@unittest.skipUnless(has_fastapi, "fastapi is not installed")
class TestHostileUploads(_ServiceCase):
    """Bombs and broken files: refused from the header with 413 / 422, details without server paths."""

    max_upload_bytes = 4 * 1024**2

    @parameterized.expand([
        ["nifti_header_bomb", 413], ["nrrd_header_bomb", 413], ["dicom_header_bomb", 413], ["nifti_gzip_bomb", 413],
        ["nrrd_gzip_bomb", 413], ["gzip_of_zeros", 422], ["png_10000", 413], ["png_30000", 413], ["zip_bomb", 413],
        ["complex_nifti", 422], ["nan_image", 422], ["truncated_nifti", 422], ["truncated_nifti_gz", 422],
        ["nrrd_detached_outside", 422], ["four_channels", 422], ["wrong_magic", 415],
    ])
    def test_refused(self, case, status):
        from scripts.checks.hostile import CASES, address_space_cap

        name = next(c for c in CASES if c.name == case).filename
        content = _hostile(self.tmp, case)
        before = {p.name for p in self.work.iterdir()} if self.work.exists() else set()
        t0 = time.perf_counter()
        with address_space_cap():  # without the guard: MemoryError, not an exhausted machine
            r = self.client.post("/api/segment", files={"file": (name, content)})
        self.assertEqual(r.status_code, status, r.text)
        self.assertLess(time.perf_counter() - t0, 30)
        detail = r.json()["detail"]
        _no_server_paths(self, detail, self.work)
        if status == 413:
            self.assertIn(name, detail)  # the client's name, not the server's
        self.assertEqual({p.name for p in self.work.iterdir()} - before, set())  # the request folder is gone

    def test_zip_traversal_stays_inside(self):
        r = self.client.post("/api/segment", files={"file": ("t.zip", _hostile(self.tmp, "zip_traversal"))})
        self.assertEqual(r.status_code, 422, r.text)  # the same slice twice: no geometry, but no 500
        self.assertIn("geometry", r.json()["detail"])
        self.assertFalse((self.tmp / "hostile_escape.dcm").exists())
        self.assertFalse(Path("/tmp/hostile_abs.dcm").exists())

    def test_public_detail(self):
        from scripts.hunet.service import public_detail

        text = "cannot read /srv/work/" + "ab" * 16 + "/upload.nrrd. Please check 'C:\\data\\x.nii' (shape 3/4)"
        self.assertEqual(public_detail(text), "cannot read upload.nrrd. Please check 'x.nii' (shape 3/4)")


@unittest.skipUnless(has_fastapi, "fastapi is not installed")
class TestServiceResources(unittest.TestCase):
    """Decode slots (503 after the wait limit) and the retention of result folders."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = Path(self._tmp.name)
        self.work = self.tmp / "work"

    def tearDown(self):
        self._tmp.cleanup()

    def _client(self, **kwargs):
        from scripts.hunet.service import create_app

        if not hasattr(self, "segmenter"):
            self.segmenter = make_segmenter(self.tmp)
        return TestClient(create_app(self.segmenter, self.work, max_upload_bytes=300_000, **kwargs))

    def test_decode_slot_busy_gives_503(self):
        import scripts.hunet.service as service

        client = self._client(max_concurrent_decodes=1, slot_timeout_s=0.3)
        entered, release = threading.Event(), threading.Event()
        real = service.load_upload

        def slow(*args, **kwargs):
            entered.set()
            release.wait(20)
            return real(*args, **kwargs)

        content, _ = nifti_bytes(shape=(16, 16, 2))
        codes = []
        with mock.patch.object(service, "load_upload", slow):
            first = threading.Thread(target=lambda: codes.append(
                client.post("/api/segment", files={"file": ("a.nii.gz", content)}).status_code))
            first.start()
            self.assertTrue(entered.wait(20))
            r = client.post("/api/segment", files={"file": ("b.nii.gz", content)})
            release.set()
            first.join()
        self.assertEqual(r.status_code, 503, r.text)
        self.assertEqual(r.headers.get("retry-after"), "30")
        self.assertEqual(codes, [200])

    def test_retention(self):
        from scripts.hunet.retention import ResultRetention

        self.work.mkdir()
        old = self.work / ("a" * 32)
        old.mkdir()
        os.utime(old, (time.time() - 3 * 3600,) * 2)
        keep = self.work / "notes"  # not a request folder: never touched
        keep.mkdir()
        client = self._client(retention_hours=2, max_results=2)
        self.assertFalse(old.exists())  # at start
        content, _ = nifti_bytes(shape=(16, 16, 2))
        ids = []
        for i in range(3):
            r = client.post("/api/segment", files={"file": (f"{i}.nii.gz", content)})
            self.assertEqual(r.status_code, 200, r.text)
            ids.append(r.json()["id"])
            time.sleep(0.02)
        left = sorted(p.name for p in self.work.iterdir() if p.is_dir() and p.name != "notes")
        self.assertEqual(left, sorted(ids[1:]))  # the oldest went first
        self.assertEqual(client.get(f"/api/results/{ids[0]}").status_code, 404)
        self.assertTrue(keep.is_dir())
        # a folder in use is never removed, however old
        retention = ResultRetention(self.work, retention_hours=1, max_results=1)
        busy = self.work / ("b" * 32)
        busy.mkdir()
        os.utime(busy, (time.time() - 7200,) * 2)
        with retention.in_use(busy):
            retention.sweep()
            self.assertTrue(busy.is_dir())
        retention.sweep()
        self.assertFalse(busy.exists())

    def test_ill_arguments(self):
        from scripts.hunet.retention import ResultRetention

        with self.assertRaises(ValueError):
            ResultRetention(self.tmp, retention_hours=0)
        with self.assertRaises(ValueError):
            ResultRetention(self.tmp, max_results=0)
        with self.assertRaises(ValueError):
            self._client(max_concurrent_decodes=0)


if __name__ == "__main__":
    unittest.main()
