# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""scripts.image_guard: headers checked before any array is allocated, per format and case; and the peak memory
of every entry point given a 1500^3 header bomb, each measured in a fresh process.

``python -m tests.test_image_guard probe ENTRY FILE`` runs one measurement and prints it as JSON (ENTRY: data,
loader, monailabel or hunet); the test runs it, and it runs against an older checkout the same way.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import unittest
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from parameterized import parameterized

from scripts.checks.hostile import _dicom, _gzip_of, _nifti_header, _nrrd_header, _png, _zip
from scripts.image_guard import (
    DataError,
    ImageLimits,
    ImageTooLargeError,
    InputError,
    check_image,
    check_spatial_dims,
    read_header,
    safe_extract_zip,
)
from tests.dicom_files import write_enhanced, write_rgb, write_series
from tests.utils import ROOT, env_with_root

BIG = (1500, 1500, 1500)
MB = 1024**2


def _w(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _nifti(path: Path, arr: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def _nrrd(path: Path, arr: np.ndarray, encoding: str = "raw") -> Path:
    import nrrd

    nrrd.write(str(path), arr, {"encoding": encoding})
    return path


GOOD = {  # name -> (writer, expected shape)
    "nii": (lambda p: _nifti(p / "a.nii", np.ones((6, 5, 4), np.int16)), (6, 5, 4)),
    "nii.gz": (lambda p: _nifti(p / "a.nii.gz", np.ones((6, 5, 4, 2), np.float32)), (6, 5, 4, 2)),
    "nrrd raw": (lambda p: _nrrd(p / "a.nrrd", np.ones((6, 5, 4), np.float32)), (6, 5, 4)),
    "nrrd gzip": (lambda p: _nrrd(p / "a.nrrd", np.ones((6, 5, 4), np.uint8), "gzip"), (6, 5, 4)),
    "nrrd bzip2": (lambda p: _nrrd(p / "a.nrrd", np.ones((6, 5, 4), np.uint8), "bzip2"), (6, 5, 4)),
    "dicom": (lambda p: _dicom(p / "a.dcm", 4, 6, 3, b"\0" * 144) or p / "a.dcm", (6, 4, 3)),
    "dicom series": (lambda p: write_series(p / "s", np.zeros((5, 4, 6), np.int16)) and p / "s", (6, 4, 5)),
    "dicom two series": (lambda p: (write_series(p / "s", np.zeros((5, 4, 6), np.int16), prefix="A"),
                                    write_series(p / "s", np.zeros((7, 3, 2), np.int16), prefix="B")) and p / "s",
                         (2, 3, 7)),
    "dicom multi-frame": (lambda p: write_enhanced(p / "e.dcm", np.zeros((5, 4, 6), np.int16)), (6, 4, 5)),
    "png": (lambda p: _png(p / "a.png", 7, 3) or p / "a.png", (7, 3)),
}

TOO_LARGE = {  # name -> writer of a header declaring 1500^3 (or the like) with next to no data
    "nifti gz header": lambda p: _w(p / "b.nii.gz", gzip.compress(_nifti_header(BIG))),
    "nifti raw header": lambda p: _w(p / "b.nii", _nifti_header(BIG)),
    "nrrd raw header": lambda p: _w(p / "b.nrrd", _nrrd_header(BIG)),
    "dicom header": lambda p: _dicom(p / "b.dcm", 65535, 65535, 1000, b"\0\0") or p / "b.dcm",
    "png 30000^2": lambda p: _png(p / "b.png", 30000, 30000) or p / "b.png",
    "nifti gzip bomb": lambda p: _w(p / "g.nii.gz", _gzip_of(_nifti_header((8, 8, 8)), 40 * MB)),
    "nrrd gzip bomb": lambda p: _w(p / "g.nrrd", _nrrd_header((8, 8, 8), "gzip") + _gzip_of(b"", 40 * MB)),
}

UNUSABLE = {  # name -> (writer, fragment of the message)
    "empty": (lambda p: _w(p / "e.nii.gz", b""), "empty"),
    "missing": (lambda p: p / "nope.nii.gz", "does not exist"),
    "wrong magic": (lambda p: _w(p / "w.nrrd", b"hello\n" * 20), "unrecognised"),
    "gzip of zeros": (lambda p: _w(p / "z.nii.gz", _gzip_of(b"", 40 * MB)), "NIfTI"),
    "complex nifti": (lambda p: _nifti(p / "c.nii.gz", np.ones((4, 4, 4), np.complex64)), "complex"),
    "rgb nifti": (lambda p: _nifti(p / "rgb.nii.gz", np.zeros((4, 4, 4), [("R", "u1"), ("G", "u1"), ("B", "u1")])),
                  "data type"),
    "truncated nii": (lambda p: _w(p / "t.nii", _nifti_header((32, 32, 32)) + b"\0" * 99),
                      "truncated"),
    "truncated nii.gz": (lambda p: _w(p / "t.nii.gz", 
        gzip.compress(_nifti_header((32, 32, 32)) + b"\1" * 1000)), "truncated"),
    "truncated nrrd": (lambda p: _w(p / "t.nrrd", _nrrd_header((8, 8, 8)) + b"\0" * 10),
                       "truncated"),
    "detached outside": (lambda p: _w(p / "d.nrrd", 
        _nrrd_header((4, 4, 4), extra="data file: ../../../../etc/passwd\n")), "outside"),
    "not dicom": (lambda p: _w(p / "x.dcm", b"\0" * 300), "DICOM"),
    "rgb dicom": (lambda p: write_rgb(p / "rgb.dcm"), "a colour image"),
    "rgb multi-frame dicom": (lambda p: write_rgb(p / "rgb.dcm", 8, 8, frames=4), "a colour image"),
    "rgb dicom series": (lambda p: [write_rgb(p / "s" / f"{i}.dcm", 8, 8) for i in range(3)] and p / "s",
                         "a colour image"),
    "dicom without series uid": (lambda p: write_series(p / "s", np.zeros((3, 4, 4), np.int16), series_uid=None)
                                 and p / "s", "without SeriesInstanceUID"),
    "dicom folder without images": (lambda p: (p / "s").mkdir() or _w(p / "s" / "notes.txt", b"hi").parent,
                                    "no DICOM image"),
    "bad png": (lambda p: _w(p / "x.png", b"\x89PNG\r\n\x1a\n" + b"junk" * 5), "2D image"),
}


class _TmpCase(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = Path(self._tmp.name)

    def tearDown(self):
        self._tmp.cleanup()


class TestReadHeader(_TmpCase):
    @parameterized.expand([(k,) for k in GOOD])
    def test_good(self, name):
        writer, shape = GOOD[name]
        h = read_header(writer(self.tmp))
        self.assertEqual(h.shape, shape)
        self.assertGreater(h.nbytes, 0)

    @parameterized.expand([(k,) for k in TOO_LARGE])
    def test_too_large(self, name):
        path = TOO_LARGE[name](self.tmp)
        with self.assertRaises(ImageTooLargeError) as ctx:
            read_header(path, name="client.img")
        e = ctx.exception
        self.assertEqual(e.status_code, 413)
        self.assertIsInstance(e, DataError)
        self.assertIsInstance(e, ValueError)
        self.assertTrue(str(e).startswith("client.img: "), str(e))

    @parameterized.expand([(k,) for k in UNUSABLE])
    def test_unusable(self, name):
        writer, fragment = UNUSABLE[name]
        with self.assertRaises(InputError) as ctx:
            read_header(writer(self.tmp))
        self.assertEqual(ctx.exception.status_code, 422, str(ctx.exception))
        self.assertNotIsInstance(ctx.exception, ImageTooLargeError)
        self.assertIn(fragment, str(ctx.exception))

    @parameterized.expand([
        ("voxels", {"max_voxels": 6 * 5 * 4 - 1}),
        ("bytes", {"max_bytes": 6 * 5 * 4 * 2 - 1}),
        ("plane", {"max_slice_pixels": 29}),
    ])
    def test_configurable_limits(self, _, limits):
        path = GOOD["nii"][0](self.tmp)
        read_header(path, ImageLimits())
        with self.assertRaises(ImageTooLargeError):
            read_header(path, limits)

    def test_channels_add_up(self):
        a = _nifti(self.tmp / "a.nii.gz", np.ones((6, 5, 4), np.float32))
        b = _nifti(self.tmp / "b.nii.gz", np.ones((6, 5, 4), np.float32))
        self.assertEqual(len(check_image([a, b], {"max_voxels": 240})), 2)
        with self.assertRaisesRegex(ImageTooLargeError, "2 channel files"):
            check_image([a, b], {"max_voxels": 239})

    def test_detached_beside_header(self):
        (self.tmp / "d.raw").write_bytes(np.ones((4, 4, 4), np.float32).tobytes())
        (self.tmp / "d.nhdr").write_bytes(_nrrd_header((4, 4, 4), extra="data file: d.raw\n"))
        self.assertEqual(read_header(self.tmp / "d.nhdr").shape, (4, 4, 4))

    def test_ill_arguments(self):
        with self.assertRaises(ValueError):
            ImageLimits(max_voxels=0)
        with self.assertRaises(ValueError):
            ImageLimits.coerce({"max_voxel": 3})
        with self.assertRaises(ValueError):
            ImageLimits.coerce(12)
        self.assertEqual(ImageLimits.coerce({"max_voxels": 1e3}).max_voxels, 1000)
        with self.assertRaises(ValueError):
            check_spatial_dims((4, 4, 4), 4, "x")


class TestSpatialDims(unittest.TestCase):
    @parameterized.expand([
        ((32, 32), 3, False), ((32, 32, 1), 3, False), ((32, 1, 32), 3, False), ((32, 32, 8), 3, True),
        ((32, 32), 2, True), ((32, 32, 1), 2, True), ((32, 32, 8), 2, False), ((32, 32, 8), None, True),
    ])
    def test_grid(self, shape, dims, accepted):
        if accepted:
            check_spatial_dims(shape, dims, "img.nii.gz")
            return
        with self.assertRaises(InputError) as ctx:
            check_spatial_dims(shape, dims, "img.nii.gz")
        self.assertIn("img.nii.gz", str(ctx.exception))
        self.assertIn(str(shape), str(ctx.exception))


class TestDicomHeaders(_TmpCase):
    """DICOM folders are checked per series (the one that will be read); single slices and colour are refused."""

    def _two_series(self) -> tuple[Path, str, str]:
        big = write_series(self.tmp / "s", np.zeros((6, 4, 5), np.int16), prefix="A", description="big")
        small = write_series(self.tmp / "s", np.zeros((3, 4, 5), np.int16), prefix="B", description="small")
        uid = lambda files: str(__import__("pydicom").dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        return self.tmp / "s", uid(big), uid(small)

    def test_series_uid(self):
        folder, big, small = self._two_series()
        self.assertEqual(check_image(folder, spatial_dims=3)[0].shape, (5, 4, 6))
        self.assertEqual(check_image(folder, spatial_dims=3, series_uid=small)[0].shape, (5, 4, 3))
        with self.assertRaises(InputError) as ctx:
            check_image(folder, series_uid="1.2.3")
        self.assertIn("1.2.3", str(ctx.exception))
        self.assertIn(big, str(ctx.exception))
        self.assertIn(small, str(ctx.exception))

    @parameterized.expand([("file",), ("folder",)])
    def test_single_slice_suggests_2d_workflow(self, kind):
        files = write_series(self.tmp / "s", np.zeros((1, 8, 8), np.int16))
        target = files[0] if kind == "file" else self.tmp / "s"
        with self.assertRaises(InputError) as ctx:
            check_image(target, spatial_dims=3)
        message = str(ctx.exception)
        self.assertTrue(message.startswith(str(target)), message)
        self.assertIn("multi-frame DICOM file", message)
        self.assertIn("configs/hunet_inference.yaml", message)
        self.assertEqual(len(message.splitlines()), 1)
        check_image(target)  # the 2D lesion workflow (spatial_dims None / 2) takes it

    def test_colour_bomb_is_too_large(self):
        """The size is checked before the colour: a colour header declaring 65535^2 x 1000 pixels is a 413."""
        path = write_rgb(self.tmp / "big.dcm", 65535, 65535, frames=1000, pixels=b"\0\0")
        with self.assertRaises(ImageTooLargeError):
            read_header(path)


class TestSafeExtractZip(_TmpCase):
    def test_flat_names(self):
        _zip(self.tmp / "a.zip", {"../../up.dcm": b"x" * 10, "/abs/b.dcm": b"y", "dir/.hidden": b"z"})
        out = safe_extract_zip(self.tmp / "a.zip", self.tmp / "out")
        self.assertEqual([p.name for p in out], ["00000.dcm", "00001.dcm"])
        self.assertFalse((self.tmp.parent / "up.dcm").exists())

    @parameterized.expand([
        ("ratio", {"IM1": 8 * MB}, {}, "bytes"),
        ("total", {"IM1": 300_000, "IM2": 300_000}, {"max_archive_bytes": 500_000}, "bytes"),
        ("files", {f"IM{i}": b"x" for i in range(5)}, {"max_files": 4}, "files"),
    ])
    def test_budget(self, _, members, limits, unit):
        _zip(self.tmp / "bomb.zip", members)
        with self.assertRaisesRegex(ImageTooLargeError, unit):
            safe_extract_zip(self.tmp / "bomb.zip", self.tmp / "out", limits)
        self.assertFalse((self.tmp / "out").exists())  # refused by the declared sizes, before writing anything

    def test_lying_sizes_stop_at_the_budget(self):
        """A member whose declared size is small but whose data is large: extraction counts what it writes."""
        _zip(self.tmp / "big.zip", {"IM1": 3 * MB})
        raw = bytearray((self.tmp / "big.zip").read_bytes())
        with zipfile.ZipFile(self.tmp / "big.zip") as zf:
            info = zf.infolist()[0]
        self.assertGreater(info.file_size, 1)
        # rewrite the declared sizes in the central directory to 1 byte: zipfile then reads 1 byte and fails the CRC
        cd = raw.rfind(b"PK\x01\x02")
        raw[cd + 24:cd + 28] = (1).to_bytes(4, "little")
        (self.tmp / "lie.zip").write_bytes(bytes(raw))
        with self.assertRaises(InputError):
            safe_extract_zip(self.tmp / "lie.zip", self.tmp / "out2", {"max_compression_ratio": 1.0})

    def test_not_a_zip(self):
        (self.tmp / "x.zip").write_bytes(b"PK\x03\x04" + b"\0" * 40)
        with self.assertRaises(InputError):
            safe_extract_zip(self.tmp / "x.zip", self.tmp / "out")


# ---- peak memory of the entry points, each in a fresh process ------------------------------------------------------

ENTRIES = ("data", "loader", "monailabel", "hunet")
MAX_GROWTH_MB = 100.0


def probe(entry: str, paths: list[str]) -> list[dict]:
    """Warm ``entry`` up on a small image, then give it each of ``paths`` and measure how far the peak RSS rises."""
    from scripts.checks.hostile import address_space_cap, peak_rss_growth_mb

    tmp = Path(tempfile.mkdtemp())
    warm = _nifti(tmp / "warm.nii.gz", np.random.default_rng(0).random((24, 22, 20)).astype(np.float32) + 1)
    if entry == "data":
        from scripts.data import validate_datalist

        def call(p):
            return validate_datalist([{"image": p}], 1, None, "inference")
    elif entry == "loader":
        from scripts.label.compat import LoadImageCheckedd

        loader = LoadImageCheckedd("image", in_channels=1, ensure_channel_first=True, image_only=True)

        def call(p):
            return loader({"image": p})
    elif entry == "monailabel":  # what the monaibundle app runs: inference.yaml's preprocessing on its data dict
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / "inference.yaml"))
        pre = parser.get_parsed_content("preprocessing")

        def call(p):  # MONAI Label calls the transforms one by one (no Compose wrapping of the errors)
            d = {"image": p, "image_path": p}
            for t in pre.transforms:
                d = t(d)
            return d
    else:
        from fastapi.testclient import TestClient

        from scripts.hunet.service import create_app
        from tests.test_hunet_service import make_segmenter

        client = TestClient(create_app(make_segmenter(tmp), tmp / "work", max_upload_bytes=200 * MB))

        def call(p):
            r = client.post("/api/segment", files={"file": (Path(p).name, Path(p).read_bytes())})
            if r.status_code >= 400:
                raise ValueError(f"HTTP {r.status_code}: {r.text[:200]}")
            return r

    call(str(warm))
    results = []
    for path in paths:
        with address_space_cap(float(os.environ.get("PROBE_EXTRA_ADDRESS_SPACE_GB", "3"))):  # safe on old code too
            outcome, growth = peak_rss_growth_mb(lambda: call(path))
        failed = isinstance(outcome, BaseException)
        results.append({"entry": entry, "file": Path(path).name, "refused": failed,
                        "error": f"{type(outcome).__name__}: {str(outcome)[:300]}" if failed else "",
                        "growth_mb": growth})
    return results


def run_probe(entry: str, paths: list[Path], pythonpath: Path = ROOT, timeout: float = 300) -> list[dict]:
    """Run :func:`probe` in a fresh interpreter (``pythonpath`` first on the path: another checkout)."""
    env = env_with_root()
    env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{ROOT}"
    cmd = [sys.executable, "-m", "tests.test_image_guard", "probe", entry] + [str(p) for p in paths]
    out = subprocess.run(cmd, cwd=pythonpath, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"probe {entry} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class TestEntryPointMemory(unittest.TestCase):
    """A ~54-byte header declaring 1500^3 voxels: refused by every entry point, peak RSS growth under 100 MB."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        tmp = Path(cls._tmp.name)
        cls.files = {
            "nifti": tmp / "bomb.nii.gz",
            "nrrd": tmp / "bomb.nrrd",
        }
        cls.files["nifti"].write_bytes(gzip.compress(_nifti_header(BIG)))
        cls.files["nrrd"].write_bytes(_nrrd_header(BIG))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    @parameterized.expand([(e,) for e in ENTRIES])
    def test_header_bombs(self, entry):
        for path in self.files.values():
            self.assertLess(path.stat().st_size, 100)
        results = run_probe(entry, list(self.files.values()))
        self.assertEqual(len(results), 2)
        for result in results:
            self.assertTrue(result["refused"], result)
            self.assertIn("413" if entry == "hunet" else "3,375,000,000 voxels", result["error"], result)
            self.assertIsNotNone(result["growth_mb"])
            self.assertLess(result["growth_mb"], MAX_GROWTH_MB, result)


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        print(json.dumps(probe(sys.argv[2], sys.argv[3:])))
    else:
        unittest.main()
