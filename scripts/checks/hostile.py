# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Hostile-input suite: generate files built to exhaust memory or to slip through checks, send each to a target,
and report what happened against what should have happened.

    python -m scripts.checks.hostile --target bundle [--out report.json]
    python -m scripts.checks.hostile --target hunet --url http://127.0.0.1:8008 [--server_pid PID]
    python -m scripts.checks.hostile --target monailabel --url http://127.0.0.1:8000 [--model mambaclinix]

Targets: ``bundle`` runs the bundle's data check (``scripts.data.validate_datalist``) and its inference / MONAI Label
loader (``scripts.label.compat.LoadImageCheckedd`` and ``NormalizeChannelsd``) in this process; ``hunet`` posts each
file to ``/api/segment`` of a running lesion service; ``monailabel`` posts it to ``/infer/<model>?output=image`` of a
running MONAI Label server (multipart field ``file``) and then runs
:func:`scripts.checks.hostile_label.check_label_server` (path traversal, CORS). Each case prints its HTTP status
(for ``bundle`` the status the error carries), the time, and the growth of the peak resident memory: of this process
for ``bundle``, of the server for ``--server_pid`` (its ``VmHWM``, reset before each case through
``/proc/<pid>/clear_refs`` where allowed). A case fails when the status is not one of those expected or a
decompression / header bomb grew the peak by more than ``--max_rss_mb``; the exit status is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import math
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from scripts.benchmark.procfs import proc_status_mib, reset_peak_rss_of
from scripts.io_utils import atomic_write_json

__all__ = ["Case", "CASES", "make_cases", "run_bundle", "run_http", "peak_rss_growth_mb", "address_space_cap", "main"]

logger = logging.getLogger(__name__)

MB = 1024**2
_CHUNK = 32 * MB


@dataclass
class Case:
    """One hostile file and the statuses each target may answer (200: accepted; 413 / 415 / 422 / 400: refused)."""

    name: str
    filename: str
    make: Callable[[Path, int], None]
    expect: dict[str, tuple[int, ...]]
    bomb: bool = False  # must not grow the peak memory beyond --max_rss_mb


@dataclass
class Result:
    case: str
    request: str
    status: int | None
    seconds: float
    rss_growth_mb: float | None
    ok: bool
    expected: tuple[int, ...] = ()
    detail: str = ""
    outcome: str = field(default="")


# ---- building blocks of the files --------------------------------------------------------------------------------


def _repeated_deflate(chunk: bytes, times: int) -> tuple[bytes, int, int, int]:
    """Raw deflate of ``chunk`` repeated ``times`` times without compressing it ``times`` times.

    After a full flush the compressor starts afresh, so the blocks of the second chunk equal those of every later
    one. Returns the stream, its CRC-32, its Adler-32 and the inflated length.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    body = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) if times > 1 else b""
    stream = first + body * (times - 1) + c.flush()
    crc, adler = 0, 1
    for _ in range(times):
        crc, adler = zlib.crc32(chunk, crc), zlib.adler32(chunk, adler)
    return stream, crc, adler, len(chunk) * times


def _gzip_of(prefix: bytes, zeros: int) -> bytes:
    """A gzip member of ``prefix`` followed by ``zeros`` (> 0, rounded up to 32 MiB) zero bytes, built in seconds
    for gigabytes."""
    chunk = b"\0" * min(zeros, _CHUNK)
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    pre = head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)
    stream, crc, _, size = _repeated_deflate(chunk, math.ceil(zeros / len(chunk)))
    crc = zlib.crc32(prefix)
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + pre + stream
            + struct.pack("<II", crc, (len(prefix) + size) & 0xFFFFFFFF))


def _png(path: Path, width: int, height: int) -> None:
    """A greyscale 8-bit PNG of zeros, ``width`` x ``height``, written without holding the image in memory."""
    row = b"\0" * (width + 1)  # filter byte + pixels
    rows = max(1, min(height, _CHUNK // len(row)))
    times, rest = divmod(height, rows)
    stream, _, adler, _ = _repeated_deflate(row * rows, times) if not rest else _repeated_deflate(row, height)
    idat = b"\x78\xda" + stream + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _nifti_header(shape: tuple[int, ...], dtype: str = "float32") -> bytes:
    """A single-file NIfTI-1 header (352 bytes, no data) declaring ``shape``."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["magic"], hdr["vox_offset"] = b"n+1", 352
    return hdr.binaryblock + b"\0" * 4


def _nrrd_header(sizes: tuple[int, ...], encoding: str = "raw", extra: str = "") -> bytes:
    dims = " ".join(str(s) for s in sizes)
    return (f"NRRD0004\ntype: float\ndimension: {len(sizes)}\nsizes: {dims}\nencoding: {encoding}\n"
            f"endian: little\n{extra}\n").encode()


def _dicom(path: Path, rows: int, cols: int, frames: int, pixels: bytes) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = rows, cols, frames, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels
    ds.save_as(str(path), enforce_file_format=True)


def _zip(path: Path, members: dict[str, bytes | int]) -> None:
    """A zip of members given as bytes, or as a count of zero bytes (streamed)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, content in members.items():
            if isinstance(content, bytes):
                zf.writestr(name, content)
                continue
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as dst:
                left = content
                while left:
                    n = min(left, _CHUNK)
                    dst.write(b"\0" * n)
                    left -= n


def _mr_small() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("MR_small.dcm")).read_bytes()


def _volume(shape=(24, 22, 20), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32) + 1.0


def _nan_volume() -> np.ndarray:
    v = _volume()
    v[3, 4, 5] = np.nan
    return v


def _truncated_gz(path: Path) -> None:
    buf = gzip.compress(_nifti_header((64, 64, 64)) + _volume((64, 64, 64)).tobytes())
    path.write_bytes(buf[: len(buf) // 2])


# ---- the cases ---------------------------------------------------------------------------------------------------

_REFUSED = {"bundle": (413, 422), "hunet": (413, 422), "monailabel": (413, 422)}
_TOO_LARGE = {"bundle": (413,), "hunet": (413,), "monailabel": (413,)}
_UNUSABLE = {"bundle": (422,), "hunet": (422,), "monailabel": (422,)}


def make_cases() -> list[Case]:
    """The hostile cases; ``make(path, bomb_bytes)`` writes each file."""
    big = (1500, 1500, 1500)
    return [
        Case("nifti_header_bomb", "header_bomb.nii.gz", lambda p, n: p.write_bytes(gzip.compress(_nifti_header(big))),
             _TOO_LARGE, bomb=True),
        Case("nrrd_header_bomb", "header_bomb.nrrd", lambda p, n: p.write_bytes(_nrrd_header(big)), _TOO_LARGE, bomb=True),
        Case("dicom_header_bomb", "header_bomb.dcm", lambda p, n: _dicom(p, 65535, 65535, 1000, b"\0\0"), _TOO_LARGE,
             bomb=True),
        Case("nifti_gzip_bomb", "gzip_bomb.nii.gz", lambda p, n: p.write_bytes(_gzip_of(_nifti_header((32, 32, 32)), n)),
             _TOO_LARGE, bomb=True),
        Case("gzip_of_zeros", "zeros.nii.gz", lambda p, n: p.write_bytes(_gzip_of(b"", n)), _UNUSABLE, bomb=True),
        Case("nrrd_gzip_bomb", "gzip_bomb.nrrd",
             lambda p, n: p.write_bytes(_nrrd_header((32, 32, 32), "gzip") + _gzip_of(b"", n)), _TOO_LARGE, bomb=True),
        Case("png_10000", "big_10000.png", lambda p, n: _png(p, 10000, 10000),
             {"bundle": (413, 422), "hunet": (413,), "monailabel": (413, 422)}, bomb=True),
        Case("png_30000", "big_30000.png", lambda p, n: _png(p, 30000, 30000), _TOO_LARGE, bomb=True),
        Case("zip_bomb", "series_bomb.zip", lambda p, n: _zip(p, {"IM0001.dcm": n}),
             {"bundle": (422,), "hunet": (413,), "monailabel": (422,)}, bomb=True),
        Case("zip_traversal", "traversal.zip",
             lambda p, n: _zip(p, {"../../hostile_escape.dcm": _mr_small(), "/tmp/hostile_abs.dcm": _mr_small()}),
             {"bundle": (422,), "hunet": (422,), "monailabel": (422,)}),
        Case("nrrd_detached_outside", "detached.nrrd",
             lambda p, n: p.write_bytes(_nrrd_header((4, 4, 4), extra="data file: ../../../../../etc/passwd\n")),
             _UNUSABLE),
        Case("complex_nifti", "complex.nii.gz", lambda p, n: _nifti(p, (_volume() + 1j).astype(np.complex64)),
             _UNUSABLE),
        Case("nan_image", "nan.nii.gz", lambda p, n: _nifti(p, _nan_volume()), _UNUSABLE),
        Case("image_2d", "slice_2d.nii.gz", lambda p, n: _nifti(p, _volume((32, 32))),
             {"bundle": (422,), "hunet": (200,), "monailabel": (422,)}),
        Case("truncated_nifti", "truncated.nii",
             lambda p, n: p.write_bytes(_nifti_header((64, 64, 64)) + b"\0" * 1024), _UNUSABLE),
        Case("truncated_nifti_gz", "truncated.nii.gz", lambda p, n: _truncated_gz(p), _UNUSABLE),
        Case("wrong_magic", "not_an_image.nrrd", lambda p, n: p.write_bytes(b"NOT AN IMAGE\n" * 40),
             {"bundle": (422,), "hunet": (415,), "monailabel": (415, 422)}),
        Case("empty_file", "empty.nii.gz", lambda p, n: p.write_bytes(b""),
             {"bundle": (422,), "hunet": (400, 422), "monailabel": (400, 422)}),
        Case("four_channels", "four_channels.nii.gz", lambda p, n: _nifti(p, _volume((16, 16, 12, 4))), _UNUSABLE),
    ]


CASES = make_cases()


# ---- measuring ---------------------------------------------------------------------------------------------------


@contextmanager
def address_space_cap(extra_gb: float = 3.0) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra_gb`` while the block runs (Linux), so
    that an unguarded reader given a bomb gets ``MemoryError`` instead of exhausting the machine."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = proc_status_mib("VmSize")
    if vm is None:
        yield
        return
    cap = int(vm * 2**20) + int(extra_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def peak_rss_growth_mb(fn: Callable[[], object], pid: int | str = "self") -> tuple[object, float | None]:
    """Run ``fn`` and return its result (or the exception it raised) and how far it raised the peak RSS of ``pid``
    above the RSS before it (MB); ``None`` where ``/proc`` can't tell."""
    reset = reset_peak_rss_of(pid)
    before = proc_status_mib("VmRSS" if reset else "VmHWM", pid)
    try:
        out: object = fn()
    except Exception as e:  # the caller judges what was raised
        out = e
    after = proc_status_mib("VmHWM", pid)
    growth = None if before is None or after is None else max(0.0, after - before)
    return out, growth


# ---- targets -----------------------------------------------------------------------------------------------------


def _status_of(outcome: object) -> tuple[int, str]:
    from scripts.image_guard import DataError

    if isinstance(outcome, DataError):
        return int(getattr(outcome, "status_code", 422)), str(outcome)
    if isinstance(outcome, Exception):
        return 500, f"{type(outcome).__name__}: {outcome}"
    return 200, "accepted"


def run_bundle(files: dict[str, Path], max_rss_mb: float, in_channels: int = 1) -> list[Result]:
    """Each file through the bundle's data check and its inference / MONAI Label loader, in this process."""
    from scripts.data import validate_datalist
    from scripts.label.compat import LoadImageCheckedd
    from scripts.transforms import NormalizeChannelsd

    loader = LoadImageCheckedd("image", in_channels=in_channels, spatial_dims=3, ensure_channel_first=True,
                               image_only=True)
    normalize = NormalizeChannelsd("image", "zscore", nonzero=True)
    steps = {
        "data check": lambda p: validate_datalist([{"image": str(p)}], in_channels, None, "hostile", spatial_dims=3),
        "inference loader": lambda p: normalize(loader({"image": str(p), "image_path": str(p)})),
    }
    results = []
    for case in CASES:
        if case.name not in files:
            continue
        for step, call in steps.items():
            t0 = time.perf_counter()
            with address_space_cap():  # an unguarded reader fails instead of exhausting the machine
                outcome, growth = peak_rss_growth_mb(lambda: call(files[case.name]))
            results.append(_judge(case, "bundle", step, outcome, time.perf_counter() - t0, growth, max_rss_mb))
    return results


def run_http(files: dict[str, Path], target: str, url: str, max_rss_mb: float, server_pid: int | None = None,
             model: str = "mambaclinix", timeout: float = 600.0) -> list[Result]:
    """Post each file to a running lesion service (``hunet``) or MONAI Label server (``monailabel``)."""
    import httpx

    endpoint = "/api/segment" if target == "hunet" else f"/infer/{model}?output=image"
    results = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as client:
        for case in CASES:
            if case.name not in files:
                continue
            path = files[case.name]

            def post() -> httpx.Response:
                with open(path, "rb") as f:
                    return client.post(endpoint, files={"file": (case.filename, f, "application/octet-stream")})

            t0 = time.perf_counter()
            outcome, growth = peak_rss_growth_mb(post, server_pid) if server_pid else (post_safe(post), None)
            results.append(_judge(case, target, f"POST {endpoint}", outcome, time.perf_counter() - t0, growth,
                                  max_rss_mb))
    return results


def post_safe(post: Callable[[], object]) -> object:
    try:
        return post()
    except Exception as e:  # a dropped connection is a result too
        return e


def _judge(case: Case, target: str, request: str, outcome: object, seconds: float, growth: float | None,
           max_rss_mb: float) -> Result:
    if hasattr(outcome, "status_code") and hasattr(outcome, "text"):  # an HTTP response
        status, detail = int(outcome.status_code), outcome.text[:300]
    elif isinstance(outcome, Exception) and not hasattr(outcome, "status_code") and target != "bundle":
        status, detail = None, f"no response: {type(outcome).__name__}: {outcome}"
    else:
        status, detail = _status_of(outcome)
    expected = case.expect[target]
    ok = status in expected and not (case.bomb and growth is not None and growth > max_rss_mb)
    outcome_text = "accepted" if status == 200 else "refused" if status is not None and status < 500 else "error"
    return Result(case.name, request, status, round(seconds, 3), None if growth is None else round(growth, 1), ok,
                  expected, detail[:300], outcome_text)


def _label_server_checks(url: str, workdir: Path) -> list[Result]:
    from scripts.checks.hostile_label import check_label_server

    out = []
    for r in check_label_server(url, workdir):
        out.append(Result(str(r.get("case")), str(r.get("request")), r.get("status"), 0.0, None, bool(r.get("ok")),
                          (), str(r.get("detail", ""))[:300], str(r.get("outcome", ""))))
    return out


def _print(results: list[Result]) -> None:
    print(f"{'case':24s} {'request':30s} {'status':>6s} {'expected':>12s} {'time s':>8s} {'peak+MB':>8s}  result")
    for r in results:
        growth = "-" if r.rss_growth_mb is None else f"{r.rss_growth_mb:.1f}"
        expected = "/".join(str(s) for s in r.expected) or "-"
        print(f"{r.case:24s} {r.request[:30]:30s} {str(r.status):>6s} {expected:>12s} {r.seconds:8.2f} {growth:>8s}  "
              f"{'OK' if r.ok else 'FAIL'}" + ("" if r.ok else f"  {r.detail[:160]}"))
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} OK, {failed} FAIL")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.checks.hostile", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", choices=("bundle", "hunet", "monailabel"), required=True)
    ap.add_argument("--url", default=None, help="base URL of the running server (hunet, monailabel)")
    ap.add_argument("--model", default="mambaclinix", help="MONAI Label model name")
    ap.add_argument("--server_pid", type=int, default=None, help="server process id, to measure its peak memory")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--bomb_mb", type=int, default=512, help="inflated size of the gzip and zip bombs (MB)")
    ap.add_argument("--max_rss_mb", type=float, default=100.0, help="largest peak-memory growth a bomb may cause")
    ap.add_argument("--cases", nargs="*", default=None, help="run only these cases")
    ap.add_argument("--workdir", default=None, help="folder for the generated files (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.target != "bundle" and not args.url:
        ap.error(f"--target {args.target} needs --url")
    unknown = set(args.cases or ()) - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; known: {[c.name for c in CASES]}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        files = {}
        for case in CASES:
            if args.cases and case.name not in args.cases:
                continue
            files[case.name] = folder / case.filename
            case.make(files[case.name], args.bomb_mb * MB)
        if args.target == "bundle":
            results = run_bundle(files, args.max_rss_mb)
        else:
            results = run_http(files, args.target, args.url, args.max_rss_mb, args.server_pid, args.model)
        if args.target == "monailabel":
            (folder / "label_server").mkdir()
            results += _label_server_checks(args.url, folder / "label_server")
    _print(results)
    if args.out:
        atomic_write_json([asdict(r) for r in results], args.out, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
