# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Hostile requests against a running MONAI Label server: path traversal through ids, cross-origin access.

:func:`check_label_server` sends each case with raw HTTP (``http.client``: the path and query go out byte for
byte, nothing is normalised) and reports one dict per case. A guarded server (:mod:`scripts.label.server`)
refuses every hostile case with a 4xx; an unguarded MONAI Label 0.8.5 accepts most of them or fails with a 500.

The probes are meant to do little harm on an unguarded server: absolute targets point into ``workdir`` (a write
that escapes is found there and reported), ``../`` ones can leave a tiny ``escape_<token>.nii.gz`` (or a
``tmp*`` file) beside the studies folder, nothing outside the datastore and ``workdir`` is deleted, and
/infer and /train are asked of a model name that does not exist. One plain probe image (a tiny NIfTI) is uploaded
under a unique id and removed at the end. ``python -m scripts.checks.hostile --target monailabel`` runs these
checks after its hostile files.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import logging
import struct
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

__all__ = ["EVIL_ORIGIN", "check_label_server", "tiny_nifti"]

logger = logging.getLogger(__name__)

EVIL_ORIGIN = "http://evil.example"


def tiny_nifti(shape: tuple[int, int, int] = (8, 8, 8)) -> bytes:
    """A gzipped NIfTI-1 volume of zeros (uint8, 1 mm, identity affine), written without nibabel."""
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 2, 8)  # datatype uint8, 8 bits per voxel
    struct.pack_into("<8f", hdr, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<hh", hdr, 252, 0, 1)  # qform 0, sform scanner
    for row, values in enumerate(((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0))):
        struct.pack_into("<4f", hdr, 280 + 16 * row, *values)
    hdr[344:348] = b"n+1\x00"
    return gzip.compress(bytes(hdr) + bytes(shape[0] * shape[1] * shape[2]))


def _multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """``{field: (filename or None, content)}`` as a multipart body and its content type."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for field, (filename, content) in fields.items():
        disp = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.write(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode())
        out.write(content + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class _Raw:
    """One HTTP/1.1 request per call to a server, with the target sent exactly as given."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL of a MONAI Label server, e.g. http://127.0.0.1:8000")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout

    def __call__(self, method: str, target: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        try:
            conn.putrequest(method, self.prefix + target, skip_host="Host" in (headers or {}),
                            skip_accept_encoding=True)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders(body or b"")
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


def _outcome(status: int | None) -> str:
    if status is None or status >= 500:
        return "error"
    return "refused" if status >= 400 else "accepted"


def check_label_server(url: str, workdir: Path, timeout: float = 120.0) -> list[dict]:
    """Run the path-traversal and cross-origin cases against a running MONAI Label server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        workdir: an existing empty folder of this machine; absolute hostile ids point into it, so a server on
            this machine that lets them through leaves files there (reported in ``detail``).
        timeout: seconds per request.

    Returns:
        one dict per case: ``case``, ``request`` (method and target), ``status`` (``None`` when no answer),
        ``outcome`` (``"refused"``: 4xx, ``"accepted"``: 2xx/3xx, ``"error"``: 5xx or no answer), ``ok``
        (the expected outcome: refused for hostile cases, accepted for the plain controls) and ``detail``.

    Raises:
        ValueError: ``url`` is not an http(s) URL, or ``workdir`` is not a folder.
    """
    workdir = Path(workdir).absolute()
    if not workdir.is_dir():
        raise ValueError(f"workdir {workdir} must be an existing folder.")
    send = _Raw(url, timeout)
    token = uuid.uuid4().hex[:8]
    probe = f"hostile_probe_{token}"
    nifti = tiny_nifti()
    before = {p for p in workdir.rglob("*")}
    results: list[dict] = []

    def run(case: str, method: str, target: str, body: bytes | None = None, headers: dict | None = None,
            expect: str = "refused", check: Any = None) -> tuple[int | None, dict[str, str], bytes]:
        try:
            status, resp_headers, data = send(method, target, body, headers)
        except OSError as e:
            status, resp_headers, data = None, {}, str(e).encode()
        outcome = _outcome(status)
        ok, detail = outcome == expect, data[:300].decode(errors="replace")
        if check is not None:
            ok, detail = check(status, resp_headers, data)
        results.append({"case": case, "request": f"{method} {target}", "status": status, "outcome": outcome,
                        "ok": bool(ok), "detail": detail})
        return status, resp_headers, data

    def upload(case: str, target: str, field: str = "file", filename: str = "probe.nii.gz",
               params: dict | None = None, expect: str = "refused", headers: dict | None = None) -> None:
        fields = {"params": (None, json.dumps(params or {}).encode()), field: (filename, nifti)}
        body, ctype = _multipart(fields)
        run(case, "PUT", target, body, {"Content-Type": ctype, **(headers or {})}, expect)

    # a plain upload must still work: it also gives the label cases an existing image
    upload("control: plain image upload", f"/datastore/image?image={probe}", expect="accepted")
    escape = workdir / f"escape_{token}"
    hostile_ids = {
        "dotdot": f"../escape_{token}",
        # enough ../ to reach the file system root from any studies folder, then down into workdir
        "deep dotdot": "../" * 32 + str(escape.relative_to(escape.anchor)),
        "absolute": str(escape),
        "backslash": f"..\\..\\escape_{token}",
        "dot": ".",
    }
    for name, value in hostile_ids.items():
        upload(f"upload image id {name}", f"/datastore/image?image={quote(value, safe='')}")
    # percent-encoding written by hand, lower and upper case: starlette decodes it to ../
    upload("upload image id %2e%2e%2f", f"/datastore/image?image=%2e%2e%2fescape_{token}")
    upload("upload image id %2E%2E%2F (deprecated PUT /datastore/)", f"/datastore/?image=%2E%2E%2Fescape_{token}")
    upload("upload image id NUL", f"/datastore/image?image=x%00{token}")
    upload("upload image without id, file name '..'", "/datastore/image", filename="..")
    for name, value in hostile_ids.items():
        upload(f"save label tag {name}", f"/datastore/label?image={probe}&tag={quote(value, safe='')}",
               field="label")
    upload("save label image id %2e%2e%2f", f"/datastore/label?image=%2e%2e%2fescape_{token}&tag=final",
           field="label")
    run("remove image id absolute", "DELETE", f"/datastore/image?id={quote(str(escape), safe='')}")
    run("remove label tag dotdot", "DELETE", f"/datastore/label?id={probe}&tag=..%2F..")
    run("get image info id dotdot", "GET", f"/datastore/image/info?image=..%2F..%2Fescape_{token}")
    run("session id dotdot (path)", "GET", "/session/..")
    # /infer merges its params JSON into the request: label_tag names the folder a saved label goes to
    body, ctype = _multipart({"params": (None, json.dumps({"save_label": True,
                                                           "label_tag": str(workdir / f"tag_{token}")}).encode())})
    run("infer params label_tag absolute", "POST", f"/infer/any_model?image={probe}&output=json", body,
        {"Content-Type": ctype})
    run("train params model_filename dotdot", "POST", "/train/any_model",
        json.dumps({"max_epochs": 1, "model_filename": f"../../escape_{token}.pt"}).encode(),
        {"Content-Type": "application/json"})

    # cross-origin: a page on another site must not read answers nor post state changes
    def no_acao(status: int | None, headers: dict[str, str], data: bytes) -> tuple[bool, str]:
        acao = headers.get("access-control-allow-origin")
        return acao not in ("*", EVIL_ORIGIN), f"Access-Control-Allow-Origin: {acao}"

    run("CORS simple GET from evil origin", "GET", "/info/", headers={"Origin": EVIL_ORIGIN}, check=no_acao)
    run("CORS preflight PUT from evil origin", "OPTIONS", f"/datastore/image?image={probe}",
        headers={"Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "PUT",
                 "Access-Control-Request-Headers": "content-type"}, check=no_acao)
    upload("cross-origin upload (no preflight needed by a form post)", f"/datastore/image?image={probe}_x",
           headers={"Origin": EVIL_ORIGIN})
    run("DNS rebinding: foreign Host header", "GET", "/info/", headers={"Host": "evil.example"})

    run("control: remove the probe image", "DELETE", f"/datastore/image?id={probe}", expect="accepted")
    try:  # only there when the cross-origin upload got through
        send("DELETE", f"/datastore/image?id={probe}_x")
    except OSError:
        pass
    escaped = sorted(str(p) for p in set(workdir.rglob("*")) - before)
    if escaped:
        results.append({"case": "files written into workdir", "request": "-", "status": None, "outcome": "accepted",
                        "ok": False, "detail": ", ".join(escaped)})
    for r in results:
        logger.info("%s %s: %s %s", "ok  " if r["ok"] else "FAIL", r["case"], r["status"], r["outcome"])
    return results
