# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Unit tests of the MONAI Label request guard (scripts/label/guard.py), without a MONAI Label server.

A small FastAPI app with MONAI Label 0.8.5's path-building routes and its CORS policy (every origin, with
credentials) stands in for ``monailabel.app.app``; its handlers record every call, so "refused" also means
"the handler never ran". Requests are sent as raw ASGI messages, so the query strings, paths and multipart
bodies are exactly the hostile bytes (no client normalises them).
"""

from __future__ import annotations

import asyncio
import json
import unittest
import uuid

import tempfile
from pathlib import Path

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from parameterized import parameterized

from scripts.label.guard import (
    LabelGuardMiddleware,
    install_guard,
    normalize_origin,
    validate_id,
    validate_params,
    validate_path,
    validate_upload_filename,
)
from scripts.label.server import check_layout, default_allowed_hosts

HOSTILE_IDS = [
    ("dotdot_slash", "../escape"),
    ("deep", "../../app/model/mambaclinix/configs/train"),
    ("dotdot", ".."),
    ("dot", "."),
    ("absolute", "/tmp/x"),
    ("backslash", "..\\escape"),
    ("backslash_only", "a\\b"),
    ("inner_slash", "a/b"),
    ("inner_dotdot", "a..b"),
    ("nul", "a\x00b"),
    ("newline", "a\nb"),
    ("del", "a\x7fb"),
    ("empty", ""),
    ("hidden", ".lock"),
    ("drive", "C:x"),
    ("reserved", "datastore_v2"),
    ("too_long", "x" * 201),
]
GOOD_IDS = ["mni_left", "case 001", "1.2.840.113619.2.55.3", "Ünïcode-ID_(v2)", "a.b", "x" * 200]
# hostile query strings as they arrive on the wire: starlette decodes them before MONAI Label sees them
ENCODED = [
    ("encoded_dotdot_slash", b"image=%2e%2e%2fescape"),
    ("encoded_upper", b"image=%2E%2E%2Fescape"),
    ("encoded_backslash", b"image=..%5Cescape"),
    ("encoded_nul", b"image=a%00b"),
    ("plus_and_slash", b"image=a+%2F+b"),
    ("second_value", b"image=ok&image=../escape"),
]


def _monailabel_like_app(calls: list[str]) -> FastAPI:
    """MONAI Label 0.8.5's routes that build paths from client input, and its wildcard CORS policy."""
    app = FastAPI(middleware=[])
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])

    @app.get("/info/")
    async def info():
        calls.append("info")
        return {"name": "test"}

    @app.put("/datastore/")
    @app.put("/datastore/image")
    async def add_image(image: str | None = None, params: str = Form("{}"), file: UploadFile = File(...)):
        calls.append(f"add_image {image} {file.filename} {params}")
        return {"image": image or file.filename}

    @app.put("/datastore/label")
    async def save_label(image: str, tag: str = "final", params: str = Form("{}"), label: UploadFile = File(...)):
        calls.append(f"save_label {image} {tag}")
        return {"image": image, "label": image}

    @app.delete("/datastore/image")
    async def remove_image(id: str):
        calls.append(f"remove_image {id}")
        return {}

    @app.get("/session/{session_id}")
    async def get_session(session_id: str):
        calls.append(f"session {session_id}")
        return {}

    @app.post("/infer/{model}")
    async def infer(model: str, image: str = "", params: str = Form("{}"), file: UploadFile = File(None)):
        calls.append(f"infer {model} {image} {params}")
        return {"params": json.loads(params)}

    @app.post("/train/{model}")
    async def train(model: str, params: dict = {}):  # noqa: B006 - as MONAI Label declares it
        calls.append(f"train {model} {params}")
        return params

    return app


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, bytes]:
    """``[(field, filename or None, content)]`` as a multipart body and its content type."""
    boundary = uuid.uuid4().hex
    out = b""
    for field, filename, content in parts:
        disp = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode("utf-8", "surrogatepass") + content
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}".encode()


class _Response:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def _call(app, method: str, path: str, query: bytes = b"", body: bytes = b"", headers=None,
          chunk: int = 7, host: bytes = b"127.0.0.1:8000") -> _Response:
    """Send one request as raw ASGI messages (the body in small chunks) and collect the response."""
    headers = [(b"host", host)] + [(k.lower(), v) for k, v in (headers or [])]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode("utf-8", "surrogatepass"), "query_string": query,
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return _Response(start["status"], dict(start["headers"]),
                     b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


class TestValidators(unittest.TestCase):
    @parameterized.expand(HOSTILE_IDS)
    def test_hostile_id(self, _, value):
        with self.assertRaises(ValueError):
            validate_id(value)

    @parameterized.expand([(v,) for v in GOOD_IDS])
    def test_good_id(self, value):
        self.assertEqual(validate_id(value), value)

    def test_non_string_id(self):
        with self.assertRaisesRegex(ValueError, "must be a string"):
            validate_id(3)

    @parameterized.expand([("/session/..",), ("/session/.",), ("/ohif/a/../../x",), ("/model/a\\b",),
                           ("/session/a\x00",)])
    def test_hostile_path(self, path):
        with self.assertRaises(ValueError):
            validate_path(path)

    def test_good_path(self):
        self.assertEqual(validate_path("/datastore/image"), "/datastore/image")
        self.assertEqual(validate_path("/ohif/viewer/index.html"), "/ohif/viewer/index.html")

    def test_upload_filename(self):
        # MONAI Label's own client sends the full local path; only the last component is used
        validate_upload_filename("/home/me/scans/case1.nii.gz", defines_id=True)
        validate_upload_filename("..\\x.nii.gz")  # a posix server keeps it as one name: only an extension source
        for name in ("..", "a/..", "a/", "", "x\x00.nii.gz"):
            with self.assertRaises(ValueError, msg=name):
                validate_upload_filename(name)
        with self.assertRaises(ValueError):
            validate_upload_filename("..\\x.nii.gz", defines_id=True)

    def test_params(self):
        validate_params({"max_epochs": 1, "label_tag": "final", "model_filename": ["model.pt"]})
        validate_params(["../x"])  # not a mapping: not merged into requests by MONAI Label
        for params in ({"label_tag": "../x"}, {"image": "/etc/passwd"}, {"model_filename": ["../../x.pt"]}):
            with self.assertRaises(ValueError, msg=str(params)):
                validate_params(params)

    def test_origin(self):
        self.assertEqual(normalize_origin("HTTP://LocalHost:3000/"), "http://localhost:3000")
        for bad in ("*", "localhost:3000", "http://a.example/path", "ftp://a.example"):
            with self.assertRaises(ValueError, msg=bad):
                normalize_origin(bad)


class TestMiddleware(unittest.TestCase):
    def setUp(self):
        self.calls: list[str] = []
        self.app = install_guard(_monailabel_like_app(self.calls))

    def assertRefused(self, response: _Response, status: int = 422):
        self.assertEqual(response.status, status, response.body)
        self.assertIn("detail", response.json())
        self.assertEqual(self.calls, [], "the handler ran although the request was refused")

    def _upload(self, query: bytes, filename: str = "case.nii.gz", path: str = "/datastore/image",
                field: str = "file", params: bytes = b"{}", headers=()):
        body, ctype = _multipart([("params", None, params), (field, filename, b"\x00" * 1000)])
        return _call(self.app, "PUT", path, query, body, [(b"content-type", ctype), *headers])

    @parameterized.expand(HOSTILE_IDS)
    def test_upload_image_hostile_id(self, _, value):
        self.assertRefused(self._upload(b"image=" + value.encode("utf-8").replace(b"%", b"%25")
                                        .replace(b"&", b"%26").replace(b"\x00", b"%00")))

    @parameterized.expand(ENCODED)
    def test_upload_image_encoded(self, _, query):
        self.assertRefused(self._upload(query))

    @parameterized.expand([(name, value) for name, value in HOSTILE_IDS if value])
    def test_save_label_hostile_tag(self, _, value):
        from urllib.parse import quote

        self.assertRefused(self._upload(f"image=mni_left&tag={quote(value)}".encode(), path="/datastore/label",
                                        field="label"))

    def test_save_label_hostile_image(self):
        self.assertRefused(self._upload(b"image=..%2F..%2Fescape&tag=final", path="/datastore/label", field="label"))

    def test_remove_image(self):
        self.assertRefused(_call(self.app, "DELETE", "/datastore/image", b"id=%2Ftmp%2Fx"))

    @parameterized.expand([("dotdot", "../.."), ("dotdot_name", ".."), ("nul", "x\x00")])
    def test_upload_filename_as_id(self, _, filename):
        # without ?image= MONAI Label takes the id from the upload's file name
        self.assertRefused(self._upload(b"", filename=filename, path="/datastore/"))

    def test_upload_filename_backslash_as_id(self):
        self.assertRefused(self._upload(b"", filename="..\\..\\escape.nii.gz"))

    def test_session_path(self):
        self.assertRefused(_call(self.app, "GET", "/session/.."))

    @parameterized.expand([("label_tag", {"label_tag": "../../escape", "save_label": True}),
                           ("image", {"image": "/etc/hostname"})])
    def test_infer_params(self, _, params):
        body, ctype = _multipart([("params", None, json.dumps(params).encode())])
        self.assertRefused(_call(self.app, "POST", "/infer/model", b"image=mni_left", body,
                                 [(b"content-type", ctype)]))
        form = b"params=" + json.dumps(params).encode().replace(b"/", b"%2F")
        self.assertRefused(_call(self.app, "POST", "/infer/model", b"image=mni_left", form,
                                 [(b"content-type", b"application/x-www-form-urlencoded")]))

    @parameterized.expand([("json", [(b"content-type", b"application/json")]), ("no_content_type", [])])
    def test_train_json(self, _, headers):
        body = json.dumps({"max_epochs": 1, "model_filename": "../../../tmp/x.pt"}).encode()
        self.assertRefused(_call(self.app, "POST", "/train/model", b"", body, headers))

    def test_plain_requests_pass(self):
        r = self._upload(b"image=mni_left", filename="/home/me/mni_left.nii.gz")
        self.assertEqual((r.status, r.json()), (200, {"image": "mni_left"}))
        r = self._upload(b"", filename="/home/me/case2.nii.gz", path="/datastore/")
        self.assertEqual(r.status, 200, r.body)
        r = self._upload(b"image=mni_left&tag=final", path="/datastore/label", field="label")
        self.assertEqual(r.status, 200, r.body)
        params = json.dumps({"label_tag": "original", "device": "cpu"}).encode()
        body, ctype = _multipart([("params", None, params)])
        r = _call(self.app, "POST", "/infer/model", b"image=mni_left", body, [(b"content-type", ctype)], chunk=3)
        self.assertEqual((r.status, r.json()), (200, {"params": {"label_tag": "original", "device": "cpu"}}))
        r = _call(self.app, "POST", "/train/model", b"", b'{"max_epochs": 1}', [(b"content-type", b"application/json")])
        self.assertEqual((r.status, r.json()), (200, {"max_epochs": 1}))
        self.assertEqual(_call(self.app, "GET", "/info/").status, 200)
        self.assertEqual(_call(self.app, "DELETE", "/datastore/image", b"id=mni_left").status, 200)
        self.assertEqual(len(self.calls), 7, self.calls)
        self.assertIn("/home/me/mni_left.nii.gz", self.calls[0])  # the body reaches the app unchanged

    def test_large_upload_replayed(self):
        content = bytes(range(256)) * 40000  # 10 MB: spooled to disk, replayed in chunks
        body, ctype = _multipart([("file", "big.nii.gz", content)])
        seen = []

        async def app(scope, receive, send):
            data = b""
            while True:
                m = await receive()
                data += m.get("body", b"")
                if not m.get("more_body"):
                    break
            seen.append(data)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        r = _call(LabelGuardMiddleware(app), "PUT", "/datastore/image", b"image=big", body,
                  [(b"content-type", ctype)], chunk=1 << 20)
        self.assertEqual(r.status, 200)
        self.assertEqual(seen, [body])

    def test_cors_no_wildcard(self):
        evil = [(b"origin", b"http://evil.example")]
        r = _call(self.app, "GET", "/info/", headers=evil)
        self.assertEqual(r.status, 200)
        self.assertNotIn(b"access-control-allow-origin", r.headers)
        r = _call(self.app, "OPTIONS", "/datastore/image", b"image=x",
                  headers=evil + [(b"access-control-request-method", b"PUT")])
        self.assertNotIn(b"access-control-allow-origin", r.headers)
        self.assertGreaterEqual(r.status, 400)

    def test_cross_origin_write_refused(self):
        r = self._upload(b"image=mni_left", headers=[(b"origin", b"http://evil.example")])
        self.assertRefused(r, 403)
        r = _call(self.app, "POST", "/train/model", headers=[(b"origin", b"null")])
        self.assertRefused(r, 403)

    def test_same_origin_and_listed_origin(self):
        r = self._upload(b"image=mni_left", headers=[(b"origin", b"http://127.0.0.1:8000")])
        self.assertEqual(r.status, 200, r.body)
        calls: list[str] = []
        app = install_guard(_monailabel_like_app(calls), cors_origins=["http://localhost:3000/"])
        ok = [(b"origin", b"http://localhost:3000")]
        r = _call(app, "OPTIONS", "/info/", headers=ok + [(b"access-control-request-method", b"GET")])
        self.assertEqual(r.headers.get(b"access-control-allow-origin"), b"http://localhost:3000")
        self.assertEqual(_call(app, "POST", "/train/model", b"", b"{}", ok).status, 200)

    def test_host_header(self):
        # DNS rebinding: a hostile page's name resolving to 127.0.0.1 arrives with its own Host
        self.assertRefused(_call(self.app, "GET", "/info/", host=b"evil.example:8000"), 400)
        for host in (b"localhost:8000", b"[::1]:8000", b"127.0.0.1"):
            self.assertEqual(_call(self.app, "GET", "/info/", host=host).status, 200, host)
        open_app = install_guard(_monailabel_like_app([]), allowed_hosts=["*"])
        self.assertEqual(_call(open_app, "GET", "/info/", host=b"evil.example").status, 200)

    def test_install_after_start(self):
        app = _monailabel_like_app([])
        _call(app, "GET", "/info/")
        with self.assertRaises(RuntimeError):
            install_guard(app)


class TestLayout(unittest.TestCase):
    """The server refuses a studies folder nested with the app, the bundle or the served model's links."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.root = Path(self._tmp.name)
        self.bundle = self.root / "bundle"
        for sub in ("scripts", "models", "data", "configs"):
            (self.bundle / sub).mkdir(parents=True)
        self.app = self.root / "app"
        served = self.app / "model" / "mambaclinix"
        served.mkdir(parents=True)
        for sub in ("scripts", "models", "data"):
            (served / sub).symlink_to(self.bundle / sub, target_is_directory=True)

    def tearDown(self):
        self._tmp.cleanup()

    @parameterized.expand([("in_bundle", "bundle/studies"), ("is_bundle_data", "bundle/data"),
                           ("in_app", "app/studies"), ("in_served", "app/model/mambaclinix/configs/x"),
                           ("contains_both", "."), ("is_app", "app")])
    def test_nested(self, _, studies):
        with self.assertRaisesRegex(ValueError, "nested"):
            check_layout(self.app, self.root / studies, "mambaclinix")

    def test_nested_through_link(self):
        (self.root / "studies_link").symlink_to(self.bundle / "models", target_is_directory=True)
        with self.assertRaises(ValueError):
            check_layout(self.app, self.root / "studies_link", "mambaclinix")

    def test_apart(self):
        check_layout(self.app, self.root / "studies", "mambaclinix")
        check_layout(self.app, "http://pacs.example/dicom-web", "mambaclinix")  # DICOMweb: no local files
        with self.assertRaises(ValueError):  # an explicit bundle root is protected too
            check_layout(self.app, self.root / "other" / "studies", "mambaclinix", bundle=self.root / "other")

    def test_allowed_hosts(self):
        self.assertEqual(default_allowed_hosts("127.0.0.1"), ["127.0.0.1", "localhost", "::1"])
        self.assertEqual(default_allowed_hosts("localhost", ["box"]), ["127.0.0.1", "localhost", "::1", "box"])
        self.assertIsNone(default_allowed_hosts("0.0.0.0"))
        self.assertEqual(default_allowed_hosts("0.0.0.0", ["label.example.org"]), ["label.example.org"])
        self.assertEqual(default_allowed_hosts("10.0.0.5"), ["10.0.0.5"])


if __name__ == "__main__":
    unittest.main()
