# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""End-to-end tests of the Mamba-HUNet service on a real uvicorn server: httpx, and headless Debian chromium.

The browser test needs ``apt-get install -y chromium chromium-driver`` and ``pip install selenium==4.51.0``; it is
skipped (with the reason) when they are missing. Set HUNET_SCREENSHOT=/path/page.png to keep a screenshot.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import tempfile
import threading
import time
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.utils import optional_import

from tests.test_hunet_service import make_segmenter

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


if __name__ == "__main__":
    unittest.main()
