# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""HTTP service and web page of the Mamba-HUNet lesion segmentation.

Upload a NIfTI / NRRD / DICOM volume (a ``.dcm`` file or a ``.zip`` of one series) or a greyscale PNG slice; get
the mask (uint8 NIfTI in the input geometry, plus a PNG for PNG input) and the lesion report, and browse the image
with the mask overlaid slice by slice. The pipeline is the bundle's own ``configs/hunet_inference.yaml`` (loaded with
``ConfigParser``; its saving step is replaced by the service's per-request folder), with the sizes and preprocessing
recorded in the checkpoint (:mod:`scripts.hunet.checkpoint`), so ``make lesion-model``'s model is served as is::

    python -m scripts.hunet.service --bundle_root . --host 127.0.0.1 --port 8008

API: ``POST /api/segment`` (multipart field ``file``, or the raw bytes with ``?filename=``; optionally a tissue map
of the same grid in the multipart field ``tissue``, which gives each lesion of the report a location class), ``GET
/api/results/{id}``, ``/api/results/{id}/mask``, ``/api/results/{id}/mask.png``, ``/api/results/{id}/report``,
``/api/results/{id}/slices/{k}/{image|mask}.png``, ``GET /api/health``. Every request works in its own folder
``<work_dir>/<uuid>``; uploads beyond ``--max_upload_mb`` are answered with 413.

Memory: each upload's header is checked before anything is decoded (:mod:`scripts.image_guard`; images beyond
``--max_image_voxels`` / ``--max_image_mb`` / ``--max_slice_pixels`` and zip archives beyond ``--max_files`` or their
size / ratio budget get 413). At most ``--max_concurrent_decodes`` uploads are checked and decoded at the same
time, and at most ``--max_concurrent`` run the pipeline (its own decoding, resizing, inference); a request waits
for its slot up to ``--slot_timeout_s`` seconds and then gets 503 with ``Retry-After`` (waiting keeps bursts
working, the time limit keeps a queue from growing without bound). Result folders are kept at most
``--retention_hours`` and ``--max_results`` of them, oldest removed first, at start and after each request; folders
of running requests are never removed. Error details never show server paths.
"""

import argparse
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, SaveImaged

from scripts.hunet.checkpoint import RECORDED_KEYS, recorded_config
from scripts.hunet.report import check_tissue, lesion_report
from scripts.hunet.retention import RESULT_ID, ResultRetention
from scripts.hunet.uploads import UPLOAD_LIMITS, LoadedUpload, UploadError, load_upload
from scripts.image_guard import ImageLimits, InputError
from scripts.io_utils import atomic_path, atomic_write_bytes, atomic_write_json, safe_stem, save_nifti_atomic
from scripts.runtime import check_openmp_wait_policy

__all__ = ["HUNetSegmenter", "BodySizeLimit", "ServiceBusy", "create_app", "public_detail", "main"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MASK_RGB = (255, 0, 0)
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:)?[/\\](?:[^\s'\"`,;:()\[\]{}<>|/\\]+[/\\])*([^\s'\"`,;:()\[\]{}<>|/\\]*)")


class ServiceBusy(RuntimeError):
    """No slot became free within the wait limit (HTTP 503)."""


@contextmanager
def _slot(semaphore: threading.Semaphore, timeout: float | None, what: str):
    if not semaphore.acquire(timeout=timeout):
        raise ServiceBusy(f"the service is busy ({what}); retry later")
    try:
        yield
    finally:
        semaphore.release()


def public_detail(text: str) -> str:
    """``text`` without server paths: absolute paths reduced to their last part, request folder names hidden."""
    text = _ABS_PATH.sub(lambda m: m.group(1) or "<path>", str(text))
    return re.sub(r"[0-9a-f]{32}", "<request>", text)


class HUNetSegmenter:
    """The bundle's inference pipeline (network, preprocessing, inferer, postprocessing) for one image at a time.

    Args:
        bundle_root: the bundle folder.
        config_file: inference config, relative to ``bundle_root`` or absolute.
        ckpt_path: weights (state dict, or ``{"model": state_dict}`` with an optional ``"config"`` record, see
            :mod:`scripts.hunet.checkpoint`); default ``<ckpt_dir>/<ckpt_name>`` of the config.
        device: torch device name.
        overrides: config values to override (e.g. a smaller ``img_size`` / ``embed_dims``); the checkpoint's
            record sets the values it holds, and an override that differs from it is logged and kept.
        allow_untrained: run with random weights when the checkpoint is missing (tests and UI demos only).
        max_concurrent: number of pipelines (loading, preprocessing, inference, postprocessing) run at the same
            time; further requests wait.
        slot_timeout_s: longest wait for a slot before :class:`ServiceBusy`; ``None`` waits for ever.
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike = ".",
        config_file: str = "configs/hunet_inference.yaml",
        ckpt_path: str | os.PathLike | None = None,
        device: str = "cpu",
        overrides: dict[str, Any] | None = None,
        allow_untrained: bool = False,
        max_concurrent: int = 1,
        slot_timeout_s: float | None = None,
    ) -> None:
        root = Path(bundle_root).resolve()
        cfg = Path(config_file) if os.path.isabs(config_file) else root / config_file
        parser = ConfigParser()
        parser.read_config(str(cfg))
        parser["bundle_root"] = str(root)
        parser["device"] = f"$torch.device('{device}')"
        overrides = dict(overrides or {})
        for k, v in overrides.items():
            parser[k] = v
        self.device = torch.device(device)
        ckpt = (
            Path(ckpt_path)
            if ckpt_path
            else Path(parser.get_parsed_content("ckpt_dir")) / parser.get_parsed_content("ckpt_name")
        )
        checkpoint, record = None, {}
        if ckpt.is_file():
            checkpoint = torch.load(ckpt, map_location=self.device, weights_only=True)
            record = recorded_config(checkpoint)
        elif not allow_untrained:
            raise FileNotFoundError(f"checkpoint {ckpt} not found: train the bundle first (make lesion-model), or "
                                    "pass --ckpt PATH.")
        for k in RECORDED_KEYS:  # the sizes and preprocessing the weights were trained with
            if k not in record:
                continue
            if k in overrides and overrides[k] != record[k]:
                logger.warning("override %s=%r differs from the checkpoint's %r", k, overrides[k], record[k])
            else:
                parser[k] = record[k]
        self.training_data = str(record.get("training_data", ""))
        self.synthetic_training_data = bool(record.get("synthetic_training_data", False))
        self.network = parser.get_parsed_content("network").to(self.device).eval()
        if checkpoint is not None:
            sd = checkpoint["model"] if isinstance(checkpoint, dict) and "model" in checkpoint else checkpoint
            self.network.load_state_dict(sd)
            self.weights = str(ckpt)
        else:
            logger.warning("checkpoint %s not found: serving RANDOM weights (allow_untrained)", ckpt)
            self.weights = "untrained"
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        post = parser.get_parsed_content("postprocessing")
        self.postprocessing = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])
        self._slots = threading.BoundedSemaphore(max(1, int(max_concurrent)))
        self.slot_timeout_s = slot_timeout_s

    def model_info(self) -> dict[str, Any]:
        """What the weights are: file name, the training data's description and whether it was synthetic."""
        return {"weights": Path(self.weights).name, "training_data": self.training_data,
                "synthetic_training_data": self.synthetic_training_data}

    def __call__(self, nifti_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """Segment a volume file; returns the uint8 mask ``(X, Y, Z)`` on the input grid and its affine.

        Raises:
            ServiceBusy: no pipeline slot within ``slot_timeout_s``.
        """
        with _slot(self._slots, self.slot_timeout_s, "all inference slots taken"):
            data = self.preprocessing({"image": str(nifti_path)})
            with torch.inference_mode():
                pred = self.inferer(data["image"][None].to(self.device), self.network)
            data["pred"] = pred[0].cpu()
            data = self.postprocessing(data)
        out = data["pred"]
        mask = np.rint(np.asarray(out.detach().cpu())[0]).astype(np.uint8)
        return mask, np.asarray(out.affine, dtype=np.float64)


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware answering 413 for request bodies beyond ``max_bytes`` (by Content-Length or while streaming)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"detail": f"upload larger than the limit of {self.max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        received, started = 0, False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._reject(send)


def _to_png(arr2d: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr2d)).save(buf, format="PNG")
    return buf.getvalue()


def _display_u8(arr: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(arr, [0.5, 99.5]) if arr.size else (0.0, 1.0)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((arr - lo) * scale, 0, 255).astype(np.uint8)


def _store(part: Any, target: Path) -> str:
    """Move a parsed multipart file to ``target``; returns the client's file name."""
    name = (part.file_name or b"").decode("utf-8", "replace")
    if part.in_memory:
        part.file_object.seek(0)
        target.write_bytes(part.file_object.read())
    else:
        part.file_object.close()
        os.replace(part.actual_file_name.decode(), target)
    return name


def create_app(
    segmenter: HUNetSegmenter,
    work_dir: str | os.PathLike,
    max_upload_bytes: int = 200 * 1024**2,
    limits: ImageLimits | Mapping | None = None,
    max_concurrent_decodes: int = 1,
    slot_timeout_s: float | None = 300.0,
    retention_hours: float | None = 24.0,
    max_results: int | None = 1000,
) -> Any:
    """The FastAPI application (wrapped in :class:`BodySizeLimit`) serving ``segmenter``.

    Args:
        segmenter: the pipeline.
        work_dir: folder of the per-request folders.
        max_upload_bytes: largest request body (413 beyond).
        limits: image limits of the uploads (default :data:`scripts.hunet.uploads.UPLOAD_LIMITS`).
        max_concurrent_decodes: uploads checked and decoded at the same time.
        slot_timeout_s: longest wait for a decode slot before 503; ``None`` waits for ever.
        retention_hours: result folders older than this are removed; ``None`` keeps them.
        max_results: at most this many result folders are kept (the newest); ``None`` keeps any number.
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from python_multipart import create_form_parser
    from python_multipart.exceptions import FormParserError

    work_root = Path(work_dir).resolve()
    work_root.mkdir(parents=True, exist_ok=True)
    limits = UPLOAD_LIMITS if limits is None else ImageLimits.coerce(limits)
    if int(max_concurrent_decodes) < 1:
        raise ValueError(f"max_concurrent_decodes must be >= 1, got {max_concurrent_decodes}.")
    decodes = threading.BoundedSemaphore(int(max_concurrent_decodes))
    retention = ResultRetention(work_root, retention_hours, max_results)
    retention.sweep()
    app = FastAPI(title="Mamba-HUNet lesion segmentation", version="0.1.0")

    def result_dir(rid: str) -> Path:
        if not RESULT_ID.match(rid) or not (work_root / rid / "result.json").is_file():
            raise HTTPException(404, "unknown result id")
        return work_root / rid

    async def receive_upload(request: Request, folder: Path) -> tuple[Path, str, Path | None, str]:
        """The image (multipart field ``file``, or the raw body with ``?filename=``) and the optional tissue map
        (multipart field ``tissue``), stored in ``folder``."""
        target = folder / "upload.bin"
        tissue_target, tissue_name = None, ""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            files: list = []
            cfg = {"UPLOAD_DIR": str(folder), "MAX_MEMORY_FILE_SIZE": 1024**2, "UPLOAD_DELETE_TMP": False}
            try:
                parser = create_form_parser(
                    {"Content-Type": ctype.encode("latin-1")}, lambda f: None, files.append, config=cfg
                )
                async for chunk in request.stream():
                    parser.write(chunk)
                parser.finalize()
            except (FormParserError, ValueError) as e:
                raise HTTPException(400, f"malformed multipart body: {e}") from e
            fields = [(f.field_name or b"").decode("utf-8", "replace") for f in files]
            images = [f for f, n in zip(files, fields) if n != "tissue"]
            tissues = [f for f, n in zip(files, fields) if n == "tissue"]
            if len(images) != 1 or len(tissues) > 1:
                raise HTTPException(400, "send exactly one image (multipart field 'file') and at most one tissue map "
                                         "(field 'tissue')")
            name = _store(images[0], target)
            if tissues:
                tissue_target = folder / "tissue_upload.bin"
                tissue_name = _store(tissues[0], tissue_target)
                if tissue_target.stat().st_size == 0:
                    raise HTTPException(400, "empty tissue map")
        else:
            name = request.query_params.get("filename", "")
            with open(target, "wb") as out:
                async for chunk in request.stream():
                    out.write(chunk)
        if target.stat().st_size == 0:
            raise HTTPException(400, "empty upload")
        return target, Path(name.replace("\\", "/")).name, tissue_target, Path(tissue_name.replace("\\", "/")).name

    def load_tissue(path: Path, name: str, folder: Path, image: LoadedUpload) -> np.ndarray:
        """The tissue map, checked like any upload and required on the image's grid (422 otherwise)."""
        sub = folder / "tissue"
        sub.mkdir()
        tissue = load_upload(path.rename(sub / path.name), name, sub, limits)
        if tissue.array.shape != image.array.shape or not np.allclose(tissue.affine, image.affine, atol=1e-3):
            raise UploadError(f"the tissue map {name or 'tissue'} {tissue.array.shape} is not on the image's grid "
                              f"{image.array.shape}; send the map of the same volume")
        try:  # its values too, before any inference is spent on the request
            checked = check_tissue(tissue.array, image.array.shape)
        except ValueError as e:
            raise UploadError(f"tissue map {name or 'tissue'}: {e}") from e
        shutil.rmtree(sub, ignore_errors=True)
        return checked

    def process(upload: Path, name: str, folder: Path, tissue_upload: Path | None = None,
                tissue_name: str = "") -> dict:
        t0 = time.perf_counter()
        with _slot(decodes, slot_timeout_s, "all decode slots taken"):
            loaded = load_upload(upload, name, folder, limits)
            tissue = None if tissue_upload is None else load_tissue(tissue_upload, tissue_name, folder, loaded)
        mask, affine = segmenter(loaded.nifti_path)
        if mask.shape != loaded.array.shape:
            raise RuntimeError(f"mask shape {mask.shape} differs from the input {loaded.array.shape}")
        stem = safe_stem(name or "upload")
        save_nifti_atomic(mask, affine, folder / "mask.nii.gz")
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        report = lesion_report(mask, spacing, tissue=tissue)
        report["source"] = name
        report["tissue_map"] = tissue_name if tissue is not None else None
        atomic_write_json(report, folder / "report.json")
        for name_npy, arr in (("display_image.npy", _display_u8(loaded.array)), ("display_mask.npy", mask)):
            with atomic_path(folder / name_npy) as tmp:
                np.save(tmp, arr)
        if loaded.kind == "png":
            atomic_write_bytes(_to_png((mask[:, :, 0].T > 0).astype(np.uint8) * 255), folder / "mask.png")
        rid = folder.name
        result = {
            "id": rid,
            "source": name,
            "stem": stem,
            "kind": loaded.kind,
            "shape": list(mask.shape),
            "num_slices": int(mask.shape[2]),
            "display_flip": loaded.display_flip,
            "weights": segmenter.weights,
            "model": segmenter.model_info(),
            "seconds": round(time.perf_counter() - t0, 3),
            "report": report,
            "mask_url": f"/api/results/{rid}/mask",
            "mask_png_url": f"/api/results/{rid}/mask.png" if loaded.kind == "png" else None,
            "report_url": f"/api/results/{rid}/report",
            "slice_url": f"/api/results/{rid}/slices/{{k}}/{{layer}}.png",
        }
        atomic_write_json(result, folder / "result.json")
        loaded.upload_path.unlink(missing_ok=True)
        return result

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "weights": Path(segmenter.weights).name, "model": segmenter.model_info(),
                "max_upload_bytes": max_upload_bytes,
                "max_image_voxels": limits.max_voxels, "max_slice_pixels": limits.max_slice_pixels}

    @app.post("/api/segment")
    async def segment(request: Request) -> JSONResponse:
        folder = work_root / uuid.uuid4().hex
        folder.mkdir()
        try:
            with retention.in_use(folder):
                try:
                    upload, name, tissue, tissue_name = await receive_upload(request, folder)
                    result = await run_in_threadpool(process, upload, name, folder, tissue, tissue_name)
                except BaseException:
                    shutil.rmtree(folder, ignore_errors=True)
                    raise
        except _TooLarge as e:
            raise HTTPException(413, f"upload larger than the limit of {max_upload_bytes} bytes") from e
        except InputError as e:  # UploadError and the image guard's errors: 413, 415, 422
            raise HTTPException(e.status_code, public_detail(str(e))) from e
        except ServiceBusy as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "30"}) from e
        except HTTPException as e:
            raise HTTPException(e.status_code, public_detail(e.detail), e.headers) from e
        except Exception as e:
            logger.exception("request %s failed", folder.name)
            raise HTTPException(500, "internal error while processing the image; see the service log") from e
        finally:
            await run_in_threadpool(retention.sweep)
        return JSONResponse(result)

    @app.get("/api/results/{rid}")
    def result(rid: str) -> JSONResponse:
        return JSONResponse(json.loads((result_dir(rid) / "result.json").read_text()))

    @app.get("/api/results/{rid}/report")
    def report(rid: str) -> JSONResponse:
        return JSONResponse(json.loads((result_dir(rid) / "report.json").read_text()))

    @app.get("/api/results/{rid}/mask")
    def mask(rid: str) -> FileResponse:
        folder = result_dir(rid)
        stem = json.loads((folder / "result.json").read_text())["stem"]
        return FileResponse(folder / "mask.nii.gz", media_type="application/gzip", filename=f"{stem}_seg.nii.gz")

    @app.get("/api/results/{rid}/mask.png")
    def mask_png(rid: str) -> FileResponse:
        folder = result_dir(rid)
        if not (folder / "mask.png").is_file():
            raise HTTPException(404, "a PNG mask exists only for PNG uploads")
        return FileResponse(folder / "mask.png", media_type="image/png")

    @app.get("/api/results/{rid}/slices/{k}/{layer}.png")
    def slice_png(rid: str, k: int, layer: str) -> Response:
        folder = result_dir(rid)
        if layer not in ("image", "mask"):
            raise HTTPException(404, "layer must be 'image' or 'mask'")
        arr = np.load(folder / f"display_{layer}.npy", mmap_mode="r")
        if not 0 <= k < arr.shape[2]:
            raise HTTPException(404, f"slice index out of range [0, {arr.shape[2] - 1}]")
        plane = np.asarray(arr[:, :, k]).T
        if json.loads((folder / "result.json").read_text())["display_flip"]:
            plane = plane[::-1]
        if layer == "mask":
            plane = (plane > 0).astype(np.uint8) * 255
        return Response(_to_png(plane), media_type="image/png", headers={"Cache-Control": "no-store"})

    return BodySizeLimit(app, max_upload_bytes)


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override expects KEY=VALUE (VALUE in JSON), got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Mamba-HUNet lesion segmentation service (FastAPI + uvicorn).")
    ap.add_argument("--bundle_root", default=".")
    ap.add_argument("--config_file", default="configs/hunet_inference.yaml")
    ap.add_argument("--ckpt", default=None, help="weights (default: <ckpt_dir>/<ckpt_name> of the config)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    ap.add_argument("--port", type=int, default=8008)
    ap.add_argument(
        "--work_dir", default=None, help="folder of the per-request folders (default <bundle_root>/runs/hunet_service)"
    )
    ap.add_argument("--max_upload_mb", type=float, default=200.0)
    ap.add_argument("--max_concurrent", type=int, default=1, help="pipelines (load, preprocess, infer) at the same time")
    ap.add_argument("--max_concurrent_decodes", type=int, default=1, help="uploads checked and decoded at the same time")
    ap.add_argument("--slot_timeout_s", type=float, default=300.0, help="longest wait for a slot, then 503")
    ap.add_argument("--max_image_voxels", type=int, default=UPLOAD_LIMITS.max_voxels, help="voxels of an upload")
    ap.add_argument("--max_image_mb", type=float, default=UPLOAD_LIMITS.max_bytes / 1024**2,
                    help="decoded size of an upload at its stored data type")
    ap.add_argument("--max_slice_pixels", type=int, default=UPLOAD_LIMITS.max_slice_pixels,
                    help="pixels of the largest plane (a PNG's pixels)")
    ap.add_argument("--max_files", type=int, default=UPLOAD_LIMITS.max_files, help="files of a DICOM zip")
    ap.add_argument("--retention_hours", type=float, default=24.0, help="result folders older than this are removed")
    ap.add_argument("--max_results", type=int, default=1000, help="result folders kept (the newest)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--override", action="append", default=[], help="config KEY=JSON_VALUE, e.g. img_size=128")
    ap.add_argument(
        "--allow_untrained", action="store_true", help="serve random weights when the checkpoint is missing"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_openmp_wait_policy()
    import uvicorn

    seg = HUNetSegmenter(
        args.bundle_root,
        args.config_file,
        args.ckpt,
        args.device,
        _parse_overrides(args.override),
        args.allow_untrained,
        args.max_concurrent,
        args.slot_timeout_s,
    )
    work = args.work_dir or os.path.join(args.bundle_root, "runs", "hunet_service")
    limits = ImageLimits(max_voxels=args.max_image_voxels, max_bytes=int(args.max_image_mb * 1024**2),
                         max_slice_pixels=args.max_slice_pixels, max_files=args.max_files)
    app = create_app(seg, work, int(args.max_upload_mb * 1024**2), limits, args.max_concurrent_decodes,
                     args.slot_timeout_s, args.retention_hours, args.max_results)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
