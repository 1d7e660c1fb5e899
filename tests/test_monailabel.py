# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Integration test of the MONAI Label backend: a real MONAI Label 0.8.5 server (monaibundle app) on loopback
serving a copy of this bundle with a tiny plan.

Needs the separate environment ``.venv-label`` (``bash scripts/label/setup_env.sh``, or ``make test-label``);
skipped without it. Takes a few minutes on 2 CPU cores: server start, app copy, /infer, 8 concurrent /infer,
bad inputs, and a 1-epoch /train that must rewrite ``models/model.pt``. Set ``MAMBACLINIX_LABEL_TESTS=0`` to skip;
the latencies are printed (``pytest -s``) and written to ``$MAMBACLINIX_LABEL_RESULTS`` when set.

The server is started by ``scripts.label.server`` (MONAI Label behind the request guard). ``test_7`` to
``test_9`` send hostile ids (``../``, ``%2e%2e%2f``, absolute, backslash) with raw HTTP and with MONAI Label's own
client, and cross-origin requests, and check that nothing outside the datastore changed (md5 of every file of
the app, the bundle copy and a sentinel beside the studies folder).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.checks.hostile_label import EVIL_ORIGIN, check_label_server
from tests.utils import free_port

ROOT = Path(__file__).resolve().parents[1]
LABEL_VENV = Path(os.environ.get("MAMBACLINIX_LABEL_VENV", ROOT / ".venv-label"))
LABEL_PY = LABEL_VENV / "bin" / "python"
MNI = ROOT / "data" / "mni"
NAME = "mambaclinix"

logger = logging.getLogger(__name__)

# a plan small enough that /infer and a 1-epoch /train take seconds on a CPU
TINY_PLAN = {
    "patch_size": [32, 32, 32],
    "pixdim": [4.0, 4.0, 4.0],
    "features": [8, 16, 32, 32],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[3, 3, 3]] * 4,
    "block_types": ["hgcn", "hgcn", "mamba", "mamba"],
    "hgcn_orders": [2, 3],
    "num_regions": [2, 2, 2],
    "batch_size": 1,
    "iterations_per_epoch": 2,
    "val_interval": 1,
    "sw_batch_size": 1,
    "cache_rate": 0.0,
    "epochs": 1,
    "save_overlay": False,
}


def _skip_reason() -> str | None:
    if os.environ.get("MAMBACLINIX_LABEL_TESTS", "1") == "0":
        return "MAMBACLINIX_LABEL_TESTS=0"
    if not LABEL_PY.exists() or not list(LABEL_VENV.glob("lib/python*/site-packages/monailabel/__init__.py")):
        return (f"MONAI Label environment {LABEL_VENV} is missing: create it with `bash scripts/label/setup_env.sh` "
                "(or run `make test-label`)")
    if not (MNI / "images" / "mni_left.nii.gz").is_file() or not (MNI / "labels" / "mni_left.nii.gz").is_file():
        return f"MNI demo case missing under {MNI}: fetch it with `python -m scripts.demo.data --output data`"
    return None


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _snapshot(work: Path) -> dict[str, str]:
    """md5 of every file under ``work`` except the datastore, the logs and Python caches (links not followed)."""
    skip_dirs = {"studies", "logs", "__pycache__", "client"}
    out = {}
    for folder, dirs, files in os.walk(work):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        for name in files:
            path = Path(folder) / name
            if name == "server.log" or name.endswith(".pyc") or not path.is_file():
                continue
            out[str(path.relative_to(work))] = _md5(path)
    return out


def _multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """Encode files (and text fields, filename ``None``) as multipart/form-data: ``{field: (filename, content)}``."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for field, (filename, content) in fields.items():
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        body.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n".encode())
        body.write(content)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def _downsampled_case(out_dir: Path) -> tuple[Path, Path]:
    """The MNI demo training case at 2 mm (every second voxel; the affine scaled to match)."""
    paths = []
    for kind in ("image", "label"):
        src = nib.load(str(MNI / f"{kind}s" / "mni_left.nii.gz"))
        arr = np.asarray(src.dataobj)[::2, ::2, ::2]
        affine = src.affine.copy()
        affine[:3, :3] *= 2
        path = out_dir / f"{kind}.nii.gz"
        nib.save(nib.Nifti1Image(arr, affine), str(path))
        paths.append(path)
    return paths[0], paths[1]


class Server:
    """A MONAI Label server process on a free loopback port, with helpers for its REST API."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, cmd: list[str], timeout: float = 240.0) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
        self._log = open(self.log_path, "wb")
        # own process group: the server and the training subprocesses it starts are stopped together by its PID
        # the launcher is `python -m scripts.label.server`: it runs from the bundle root
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MONAI Label server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.request("GET", "/info/", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"MONAI Label server did not answer in {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group whose leader is the server's PID
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:]) if self.log_path.exists() else ""

    def request(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None,
                timeout: float = 600.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        status, _, body = self.request_headers(method, path, data, content_type, timeout, headers)
        return status, body

    def request_headers(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None,
                        timeout: float = 600.0, headers: dict[str, str] | None = None
                        ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def upload(self, method: str, path: str, field: str, filename: str, content: bytes) -> tuple[int, bytes]:
        body, ctype = _multipart({field: (filename, content)})
        return self.request(method, path, body, ctype)

    def json(self, method: str, path: str, payload: dict | None = None) -> tuple[int, object]:
        data = json.dumps(payload).encode() if payload is not None else None
        status, body = self.request(method, path, data, "application/json" if data is not None else None)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")


# run by .venv-label/bin/python: MONAI Label's own client against the server; prints one JSON line
CLIENT_SCRIPT = """
import json, re, sys
from monailabel.client.client import MONAILabelClient, MONAILabelClientException

url, image, label, absolute, model = sys.argv[1:6]
client = MONAILabelClient(url, tmpdir=".")
cases = {
    "upload image id ../": lambda: client.upload_image(image, "../client_escape"),
    "upload image id absolute": lambda: client.upload_image(image, absolute),
    "upload image id backslash": lambda: client.upload_image(image, "..\\\\client_escape"),
    "upload image id ..": lambda: client.upload_image(image, ".."),
    "encoded upload image id %2e%2e%2f": lambda: client.upload_image(image, "%2e%2e%2fclient_escape"),
    "save label tag ../..": lambda: client.save_label("mni_left", label, tag="../../client_tag"),
    "save label tag absolute": lambda: client.save_label("mni_left", label, tag=absolute),
    "save label image id ../": lambda: client.save_label("../mni_left", label, tag="final"),
    "infer params label_tag ../..": lambda: client.infer(model, "mni_left", {"save_label": True,
                                                                             "label_tag": "../../client_tag"}),
    "plain upload image": lambda: client.upload_image(image, "client_plain"),
    "plain save label": lambda: client.save_label("client_plain", label, tag="final"),
}
out = {}
for name, call in cases.items():
    try:
        call()
        out[name] = {"status": 200, "detail": ""}
    except MONAILabelClientException as e:
        m = re.search(r"Status: (\\d+)", str(e))
        out[name] = {"status": int(m.group(1)) if m else e.status_code, "detail": str(e)[:300]}
print(json.dumps(out))
"""


def _nifti(content: bytes, work: Path) -> nib.Nifti1Image:
    fd, name = tempfile.mkstemp(suffix=".nii.gz", dir=work)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    img = nib.load(name)
    img = nib.Nifti1Image(np.asarray(img.dataobj).copy(), img.affine)
    os.remove(name)
    return img


@unittest.skipIf(_skip_reason() is not None, _skip_reason() or "")
class TestMONAILabel(unittest.TestCase):
    """Order matters: info, datastore, infer, concurrency, bad inputs, then training."""

    server: Server
    tmp: tempfile.TemporaryDirectory
    results: dict = {}

    @classmethod
    def setUpClass(cls) -> None:
        import yaml

        from scripts.label.app import copy_bundle, init_model, server_command

        cls.tmp = tempfile.TemporaryDirectory(prefix="mambaclinix_label_")
        work = Path(cls.tmp.name)
        cls.bundle = copy_bundle(ROOT, work / "bundle")
        # the plan is merged into the served configs by `prepare`, as a real configs/plan.yaml would be
        (cls.bundle / "configs" / "plan.yaml").write_text(yaml.safe_dump(TINY_PLAN))
        init_model(cls.bundle)
        cls.image, cls.label = _downsampled_case(work)
        (work / "studies").mkdir()
        (work / "sentinel.txt").write_text("beside the studies folder; must never change\n")
        subprocess.run([str(LABEL_PY), "-m", "scripts.label.app", "prepare", "--app", str(work / "app"), "--bundle",
                        str(cls.bundle), "--name", NAME], cwd=ROOT, check=True, capture_output=True, timeout=300)
        cls.server = Server(work)
        try:
            cls.server.start(server_command(work / "app", work / "studies", NAME, port=cls.server.port,
                                            python=str(LABEL_PY)))
        except BaseException:
            cls.server.stop()
            cls.tmp.cleanup()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            cls.server.stop()
            if cls.results:
                logger.warning("MONAI Label measurements: %s", json.dumps(cls.results))
                print(f"\nMONAI Label measurements: {json.dumps(cls.results)}", file=sys.stderr)
                out = os.environ.get("MAMBACLINIX_LABEL_RESULTS")  # e.g. eval/monailabel_test.json
                if out:
                    Path(out).parent.mkdir(parents=True, exist_ok=True)
                    Path(out).write_text(json.dumps(cls.results, indent=1))
        finally:
            cls.tmp.cleanup()

    def _fail(self, msg: str) -> None:
        self.fail(f"{msg}\n--- server log ---\n{self.server.log_tail()}")

    def _check_prediction(self, status: int, body: bytes) -> nib.Nifti1Image:
        if status != 200:
            self._fail(f"/infer returned {status}: {body[:500]!r}")
        pred = _nifti(body, Path(self.tmp.name))
        ref = nib.load(str(self.image))
        self.assertEqual(pred.shape, ref.shape)
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-4)
        values = set(np.unique(np.asarray(pred.dataobj)).tolist())
        self.assertTrue(values <= {0, 1, 2}, values)
        return pred

    def test_1_info(self):
        status, info = self.server.json("GET", "/info/")
        self.assertEqual(status, 200)
        model = info["models"][NAME]
        self.assertEqual(model["labels"], {"grey_matter": 1, "white_matter": 2})
        self.assertEqual(model["dimension"], 3)
        self.assertEqual(model["type"], "segmentation")
        self.assertIn(NAME, info["trainers"])
        self.assertEqual(set(info["labels"]), {"grey_matter", "white_matter"})

    def test_2_datastore(self):
        status, body = self.server.upload("PUT", "/datastore/image?image=mni_left", "file", "mni_left.nii.gz",
                                          self.image.read_bytes())
        self.assertEqual(status, 200, body)
        status, body = self.server.upload("PUT", "/datastore/label?image=mni_left&tag=final", "label",
                                          "mni_left.nii.gz", self.label.read_bytes())
        self.assertEqual(status, 200, body)
        status, ds = self.server.json("GET", "/datastore/?output=all")
        self.assertEqual(status, 200)
        self.assertIn("mni_left", ds["objects"])
        self.assertIn("final", ds["objects"]["mni_left"]["labels"])

    def test_3_infer(self):
        times = []
        for _ in range(2):  # the first call also loads the network
            start = time.time()
            status, body = self.server.request("POST", f"/infer/{NAME}?image=mni_left&output=image")
            times.append(round(time.time() - start, 2))
            self._check_prediction(status, body)
        self.results["infer_shape"] = list(nib.load(str(self.image)).shape)
        self.results["infer_first_s"], self.results["infer_warm_s"] = times

    def test_4_concurrent_infer(self):
        def one(_):
            start = time.time()
            status, body = self.server.request("POST", f"/infer/{NAME}?image=mni_left&output=image")
            return status, body, time.time() - start

        start = time.time()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        total = time.time() - start
        for status, body, _ in results:
            self._check_prediction(status, body)
        self.results["concurrent_8_total_s"] = round(total, 2)
        self.results["concurrent_8_max_latency_s"] = round(max(r[2] for r in results), 2)
        self.assertEqual(self.server.request("GET", "/info/")[0], 200)

    def test_5_bad_inputs(self):
        not_image = b"this is a text file, not an image\n" * 10
        # an upload that is not an image, sent with the request
        status, body = self.server.upload("POST", f"/infer/{NAME}?output=image", "file", "notes.nii.gz", not_image)
        self.assertEqual(status, 422, body)
        self.assertIn("could not be read", json.loads(body)["detail"])  # the reason follows
        # the same bytes stored in the datastore (MONAI Label accepts any file there), then inferred on
        status, _ = self.server.upload("PUT", "/datastore/image?image=not_an_image", "file", "notes.nii.gz", not_image)
        self.assertEqual(status, 200)
        status, body = self.server.request("POST", f"/infer/{NAME}?image=not_an_image&output=image")
        self.assertEqual(status, 422, body)
        self.assertIn("could not be read", json.loads(body)["detail"])  # the reason follows
        self.assertEqual(self.server.request("DELETE", "/datastore/image?id=not_an_image")[0], 200)
        # a two-channel image for a one-channel model
        ref = nib.load(str(self.image))
        arr = np.asarray(ref.dataobj)
        two = Path(self.tmp.name) / "two_channels.nii.gz"
        nib.save(nib.Nifti1Image(np.stack([arr, arr], -1), ref.affine), str(two))
        status, body = self.server.upload("POST", f"/infer/{NAME}?output=image", "file", two.name, two.read_bytes())
        self.assertEqual(status, 422, body)
        detail = json.loads(body)["detail"]
        self.assertIn("2 channel(s)", detail)
        self.assertIn("expects 1", detail)
        # still serving
        self.assertEqual(self.server.request("GET", "/info/")[0], 200)
        self._check_prediction(*self.server.request("POST", f"/infer/{NAME}?image=mni_left&output=image"))

    def test_6_train(self):
        model = self.bundle / "models" / "model.pt"
        before_hash, before_mtime = _md5(model), model.stat().st_mtime
        start = time.time()
        status, task = self.server.json("POST", f"/train/{NAME}", {"max_epochs": 1})  # as 3D Slicer sends it
        self.assertEqual(status, 200, task)
        deadline = time.time() + 480
        state = {}
        while time.time() < deadline:
            time.sleep(2)
            status, state = self.server.json("GET", "/train/")
            if status == 200 and isinstance(state, dict) and state.get("status") in ("DONE", "ERROR", "STOPPED"):
                break
        self.results["train_1_epoch_s"] = round(time.time() - start, 1)
        if state.get("status") != "DONE":
            self._fail(f"training did not finish: {json.dumps(state)[-3000:]}")
        self.assertNotEqual(_md5(model), before_hash, "training did not rewrite models/model.pt")
        self.assertGreater(model.stat().st_mtime, before_mtime)
        import torch

        state_dict = torch.load(model, map_location="cpu", weights_only=True)
        self.assertTrue(all(isinstance(v, torch.Tensor) for v in state_dict.values()))
        # the served model reloads the new weights
        self._check_prediction(*self.server.request("POST", f"/infer/{NAME}?image=mni_left&output=image"))
        self.assertIn("Reload model from cache", self.server.log_path.read_text(errors="replace"))

    # --- security: ids that would leave the datastore, cross-origin access (scripts/label/guard.py) ---

    def _assert_nothing_outside_changed(self, before: dict[str, str]) -> None:
        after = _snapshot(Path(self.tmp.name))
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        self.assertEqual(changed, [], "files outside the datastore were created or changed")
        ids = self.server.json("GET", "/datastore/?output=all")[1]["objects"]
        self.assertFalse([i for i in ids if "/" in i or "\\" in i or ".." in i], ids)

    def test_7_hostile_raw_http(self):
        work = Path(self.tmp.name)
        before = _snapshot(work)
        target = work / "hostile_targets"  # absolute hostile ids point in here
        target.mkdir()
        cases = check_label_server(self.server.url, target)
        self.results["hostile_raw_http"] = {c["case"]: c["status"] for c in cases}
        failed = [c for c in cases if not c["ok"]]
        self.assertEqual(failed, [], json.dumps(failed, indent=1))
        self.assertEqual(list(target.iterdir()), [])
        target.rmdir()
        hostile = [c for c in cases if not c["case"].startswith(("control", "CORS"))]
        self.assertGreaterEqual(len(hostile), 20)
        self.assertTrue(all(400 <= c["status"] < 500 for c in hostile), hostile)
        self._assert_nothing_outside_changed(before)
        # a plain upload and /infer still work behind the guard
        self._check_prediction(*self.server.request("POST", f"/infer/{NAME}?image=mni_left&output=image"))

    def test_8_hostile_monailabel_client(self):
        """MONAI Label's own client (in .venv-label) sends hostile ids as a user of the API would."""
        work = Path(self.tmp.name)
        before = _snapshot(work)
        client_dir = work / "client"  # the script and its temporary files (skipped by the snapshot)
        client_dir.mkdir()
        script = client_dir / "client.py"
        script.write_text(CLIENT_SCRIPT)
        out = subprocess.run([str(LABEL_PY), str(script), self.server.url, str(self.image), str(self.label),
                              str(work / "client_abs"), NAME], cwd=client_dir, capture_output=True, text=True,
                             timeout=600)
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        results = json.loads(out.stdout.strip().splitlines()[-1])
        self.results["hostile_monailabel_client"] = {k: v["status"] for k, v in results.items()}
        for case, r in results.items():
            if case.startswith("plain"):
                self.assertEqual(r["status"], 200, (case, r))
            elif case.startswith("encoded"):
                # the client encodes '%' itself: the server gets the literal name, a plain file in the datastore
                self.assertEqual(r["status"], 200, (case, r))
            else:
                self.assertIsNotNone(r["status"], (case, r))
                self.assertTrue(400 <= r["status"] < 500, (case, r))
        studies = {p.name for p in (work / "studies").iterdir()}
        self.assertIn("client_plain.nii.gz", studies)
        self.assertIn("%2e%2e%2fclient_escape.nii.gz", studies)
        self.assertTrue((work / "studies" / "labels" / "final" / "client_plain.nii.gz").is_file())
        self.assertFalse((work / "client_abs.nii.gz").exists())
        for image_id in ("client_plain", "%2e%2e%2fclient_escape"):
            status, _ = self.server.request("DELETE", f"/datastore/image?id={urllib.parse.quote(image_id)}")
            self.assertEqual(status, 200)
        import shutil

        shutil.rmtree(client_dir)
        self._assert_nothing_outside_changed(before)

    def test_9_cors(self):
        evil = {"Origin": EVIL_ORIGIN}
        status, headers, _ = self.server.request_headers("GET", "/info/", headers=evil)
        self.assertEqual(status, 200)  # a simple request is answered, but the browser may not read it
        self.assertNotIn("access-control-allow-origin", headers)
        status, headers, _ = self.server.request_headers(
            "OPTIONS", "/datastore/image?image=mni_left",
            headers={**evil, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "content-type"})
        self.assertNotIn("access-control-allow-origin", headers)
        self.assertGreaterEqual(status, 400)
        # a cross-site form post needs no preflight: refused outright
        body, ctype = _multipart({"file": ("x.nii.gz", self.image.read_bytes())})
        status, _ = self.server.request("PUT", "/datastore/image?image=from_evil", body, ctype, headers=evil)
        self.assertEqual(status, 403)
        status, _ = self.server.request("POST", f"/train/{NAME}", b"{}", "application/json", headers=evil)
        self.assertEqual(status, 403)
        # the server's own origin (a page it serves) is not cross-origin
        own = {"Origin": self.server.url}
        status, _ = self.server.request("PUT", "/datastore/image/info?image=mni_left",
                                        *_multipart({"info": (None, b"{}")}), headers=own)
        self.assertEqual(status, 200)


if __name__ == "__main__":
    unittest.main()
