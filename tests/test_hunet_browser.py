# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""End-to-end tests of the Mamba-HUNet service on a real uvicorn server: httpx, and headless Debian chromium.

The browser test needs ``apt-get install -y chromium chromium-driver`` and ``pip install selenium==4.51.0``; it is
skipped (with the reason) when they are missing. Set HUNET_SCREENSHOT=/path/page.png to keep a screenshot.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import threading
import time
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.utils import optional_import

from tests.test_hunet_service import make_segmenter
from tests.utils import free_port, start_lesion_service, stop_process

httpx, has_httpx = optional_import("httpx")
uvicorn, has_uvicorn = optional_import("uvicorn")
webdriver, has_selenium = optional_import("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAS_BROWSER = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,800",
]


def write_volume(path: Path) -> Path:
    """A 40x32x5 volume with a bright disc, saved as NIfTI."""
    yy, xx = np.mgrid[:40, :32]
    disc = ((yy - 20) ** 2 + (xx - 16) ** 2 < 60).astype(np.float32)
    vol = np.repeat((50 + 150 * disc)[..., None], 5, axis=2) + np.random.default_rng(0).random((40, 32, 5)) * 20
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([0.9, 0.9, 3.0, 1.0])), path)
    return path


@unittest.skipUnless(has_httpx and has_uvicorn, "httpx and uvicorn are needed")
class TestServiceLive(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from scripts.hunet.service import create_app

        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = Path(cls._tmp.name)
        app = create_app(make_segmenter(cls.tmp), cls.tmp / "work", max_upload_bytes=2_000_000)
        cls.port = free_port()
        cls.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cls.port, log_level="warning"))
        cls.thread = threading.Thread(target=cls.server.run, daemon=True)
        cls.thread.start()
        deadline = time.time() + 20
        while not cls.server.started and time.time() < deadline:
            time.sleep(0.05)
        if not cls.server.started:
            raise RuntimeError("uvicorn did not start")
        cls.base = f"http://127.0.0.1:{cls.port}"
        cls.volume = write_volume(cls.tmp / "disc volume.nii.gz")

    @classmethod
    def tearDownClass(cls):
        cls.server.should_exit = True
        cls.thread.join(timeout=10)
        cls._tmp.cleanup()

    def test_http_upload_and_limit(self):
        with httpx.Client(base_url=self.base, timeout=60) as client:
            with open(self.volume, "rb") as f:
                r = client.post("/api/segment", files={"file": ("disc volume.nii.gz", f)})
            self.assertEqual(r.status_code, 200, r.text)
            res = r.json()
            self.assertEqual(res["shape"], [40, 32, 5])
            mask = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(res["mask_url"]).content))
            self.assertEqual(mask.get_data_dtype(), np.uint8)
            r = client.post("/api/segment", files={"file": ("big.nii", b"\x00" * 2_100_000)})
            self.assertEqual(r.status_code, 413)

    @unittest.skipUnless(has_selenium, "selenium is not installed (pip install selenium==4.51.0)")
    @unittest.skipUnless(
        HAS_BROWSER, "chromium / chromium-driver not installed (apt-get install -y chromium chromium-driver)"
    )
    def test_browser_upload_overlay_download(self):
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        downloads = self.tmp / "downloads"
        downloads.mkdir()
        opts = Options()
        opts.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=self.tmp, prefix='chrome-profile-')}")
        opts.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        try:
            driver.set_page_load_timeout(30)
            driver.get(self.base + "/")
            self.assertIn("Mamba-HUNet", driver.title)
            driver.find_element(By.ID, "file").send_keys(str(self.volume))
            driver.find_element(By.ID, "submit").click()
            wait = WebDriverWait(driver, 60)
            wait.until(
                lambda d: d.execute_script("return document.getElementById('canvas').dataset.ready !== undefined")
            )
            self.assertEqual(driver.find_element(By.ID, "error").text, "")
            self.assertIn("1 lesion(s)", driver.find_element(By.ID, "summary").text)
            counts = driver.execute_script(
                """const c = document.getElementById('canvas');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let red = 0, grey = 0;
                   for (let i = 0; i < d.length; i += 4) {
                     if (d[i] - d[i + 1] > 60 && d[i + 1] === d[i + 2]) red++; else if (d[i] === d[i + 1]) grey++;
                   }
                   return [red, grey, c.width, c.height];"""
            )
            red, _, width, height = counts
            self.assertEqual((width, height), (40, 32))  # x along the columns, y along the rows
            self.assertGreater(red, 0.9 * width * height)  # the test weights mark every voxel as lesion
            # slider: move to the first slice and the overlay is redrawn
            driver.execute_script(
                "const s = document.getElementById('slider'); s.value = 0; s.dispatchEvent(new Event('input'));"
            )
            wait.until(lambda d: d.execute_script("return document.getElementById('canvas').dataset.ready === '0'"))
            self.assertEqual(driver.find_element(By.ID, "sliceLabel").text, "1 / 5")
            shot = os.environ.get("HUNET_SCREENSHOT")
            if shot:
                driver.save_screenshot(shot)
            driver.find_element(By.ID, "download").click()
            deadline = time.time() + 30
            target = downloads / "disc_volume_seg.nii.gz"
            while not target.exists() and time.time() < deadline:
                time.sleep(0.1)
            self.assertTrue(target.exists(), f"no download in {sorted(p.name for p in downloads.iterdir())}")
            time.sleep(0.3)
            mask = nib.load(target)
            self.assertEqual((mask.shape, mask.get_data_dtype()), ((40, 32, 5), np.uint8))
        finally:
            driver.quit()


MNI_RAW = Path(__file__).resolve().parents[1] / "data" / "mni" / "raw"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "hunet_model.pt"


def _lesion_model(folder: Path) -> tuple[Path, bool]:
    """The model ``make lesion-model`` wrote (when present and trained on synthetic lesions), else a tiny one with a
    config record whose weights mark every voxel as lesion; returns the checkpoint in ``folder/models`` and whether
    it is the trained one."""
    import torch

    from scripts.hunet.checkpoint import ConfigRecord, recorded_config
    from scripts.networks.mamba_hunet import MambaHUNet

    target = folder / "models" / "hunet_model.pt"
    target.parent.mkdir(parents=True)
    if DEMO_MODEL.is_file():
        record = recorded_config(torch.load(DEMO_MODEL, map_location="cpu", weights_only=True))
        if record.get("synthetic_training_data"):
            shutil.copy(DEMO_MODEL, target)
            return target, True
    net = MambaHUNet(img_size=32, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), d_state=4)
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.copy_(torch.tensor([0.0, 5.0]))
    values = {"in_channels": 1, "out_channels": 2, "img_size": 32, "patch_size": 4, "embed_dims": [8, 16, 32, 64],
              "depths": [1, 1, 1, 1], "d_state": 4, "train_patch": 32,
              "intensity_percentiles": [0.5, 99.5], "intensity_clip": False,
              "sharpen_sigma": 1.0, "sharpen_amount": 0.5, "slice_axis": 2,
              "training_data": "Synthetic FLAIR-like volumes (test weights)", "synthetic_training_data": True}
    torch.save({"model": net.state_dict(), "config": ConfigRecord(values).state_dict()}, target)
    return target, False


@unittest.skipUnless(MNI_RAW.is_dir(), f"MNI maps missing under {MNI_RAW}: python -m scripts.demo.data --which mni")
@unittest.skipUnless(has_httpx and has_selenium and HAS_BROWSER, "httpx, selenium and chromium are needed")
class TestServiceCommandOnGeneratedFlair(unittest.TestCase):
    """``python -m scripts.hunet.service`` as a user starts it after ``make demo-lesions`` (the model in
    ``<bundle_root>/models``, no size overrides), driven in chromium with a generated FLAIR volume and its tissue
    map: the mask overlay, the lesion report with location classes, the slices to review, the synthetic-weights
    notice."""

    @classmethod
    def setUpClass(cls):
        from scripts.lesions.anatomy import load_anatomy
        from scripts.lesions.generate import generate_dataset

        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = Path(cls._tmp.name)
        cls.ckpt, cls.trained = _lesion_model(cls.tmp / "bundle")
        data = cls.tmp / "flair"
        generate_dataset(load_anatomy(MNI_RAW), data, train=1, val=0, test=1, seed=5, lesion_load="high",
                         test_lesion_load="high", shape=None if cls.trained else (48, 56, 12))
        entry = json.loads((data / "datalist.json").read_text())["test"][0]
        cls.image, cls.tissue, cls.label = (data / entry[k] for k in ("image", "tissue", "label"))
        root = Path(__file__).resolve().parents[1]
        cls.proc, cls.base = start_lesion_service(
            ["--bundle_root", str(cls.tmp / "bundle"), "--config_file", str(root / "configs" / "hunet_inference.yaml"),
             "--device", "cpu"], cls.tmp / "service.log", timeout=120)

    @classmethod
    def tearDownClass(cls):
        stop_process(cls.proc)
        cls._tmp.cleanup()

    def test_generated_flair_with_tissue_map(self):
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        health = httpx.get(self.base + "/api/health").json()
        self.assertTrue(health["model"]["synthetic_training_data"])
        opts = Options()
        opts.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=self.tmp, prefix='chrome-profile-')}")
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        try:
            driver.set_page_load_timeout(30)
            driver.get(self.base + "/")
            wait = WebDriverWait(driver, 300)
            wait.until(lambda d: d.find_element(By.ID, "model").text != "")
            notice = driver.find_element(By.ID, "model").text
            self.assertIn("synthetic FLAIR lesions", notice)
            self.assertIn("not for clinical use", notice)
            driver.find_element(By.ID, "file").send_keys(str(self.image))
            driver.find_element(By.ID, "tissue").send_keys(str(self.tissue))
            driver.find_element(By.ID, "submit").click()
            wait.until(
                lambda d: d.execute_script("return document.getElementById('canvas').dataset.ready !== undefined")
                or d.find_element(By.ID, "error").text
            )
            self.assertEqual(driver.find_element(By.ID, "error").text, "")
            self.assertRegex(driver.find_element(By.ID, "summary").text, r"^\d+ lesion\(s\), total")
            self.assertIn("periventricular", driver.find_element(By.ID, "locations").text)
            rows = driver.find_elements(By.CSS_SELECTOR, "#lesions tbody tr")
            self.assertGreater(len(rows), 0)
            locations = {r.find_elements(By.TAG_NAME, "td")[1].text for r in rows}
            self.assertTrue(locations <= {"periventricular", "juxtacortical", "deep white matter", "infratentorial",
                                          "other"}, locations)
            buttons = driver.find_elements(By.CSS_SELECTOR, "#reviewSlices button")
            self.assertGreater(len(buttons), 0)
            buttons[-1].click()
            k = int(buttons[-1].text) - 1
            wait.until(lambda d: d.execute_script(f"return document.getElementById('canvas').dataset.ready === '{k}'"))
            self.assertEqual(driver.find_element(By.ID, "sliceLabel").text.split(" / ")[0], str(k + 1))
            shot = os.environ.get("HUNET_SCREENSHOT")
            if shot:
                driver.save_screenshot(shot.replace(".png", "_generated.png"))
            result_id = driver.execute_script("return result.id")
        finally:
            driver.quit()
        report = httpx.get(f"{self.base}/api/results/{result_id}/report").json()
        self.assertEqual(report["num_lesions"], len(rows))
        if self.trained:  # the demo's model finds lesions of the generated volume
            from scripts.hunet.report import lesion_detection

            mask = nib.Nifti1Image.from_bytes(gzip.decompress(
                httpx.get(f"{self.base}/api/results/{result_id}/mask").content))
            detected = lesion_detection(np.asarray(mask.dataobj), np.asarray(nib.load(self.label).dataobj))
            self.assertGreater(detected["lesion_recall"], 0.3, detected)


if __name__ == "__main__":
    unittest.main()
