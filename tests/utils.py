# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the tests: small generated volumes and datalists, tiny plan overrides."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# a tiny network and patch for the config workflows (seconds per step on a CPU)
TINY_PLAN = {
    "patch_size": [16, 16, 16],
    "pixdim": [1.0, 1.0, 1.0],
    "features": [8, 16, 16],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "block_types": ["hgcn", "hgcn", "mamba"],
    "hgcn_orders": [2, 3],
    "num_regions": [4, 4, 4],
    "batch_size": 2,
    "in_channels": 1,
    "out_channels": 3,
    "class_names": ["inner", "outer"],
}


def make_case(shape=(24, 22, 20), seed=0, channels=1, spacing=(1.0, 1.0, 1.0)):
    """An image with two nested blobs (classes 1 and 2) on a zero background, and its label."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    r = np.linalg.norm(grid - centre, axis=-1)
    label = np.zeros(shape, np.uint8)
    label[r < 7] = 2
    label[r < 4] = 1
    image = np.zeros((channels,) + tuple(shape), np.float32)
    for c in range(channels):
        image[c] = np.where(label == 1, 200.0, np.where(label == 2, 120.0, 0.0)) + rng.normal(0, 10, shape)
        image[c][r > 9] = 0.0  # background outside the head is exactly zero (foreground cropping)
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = rng.uniform(-20, 20, 3)
    return image, label, affine


def write_dataset(folder, n_train=2, n_val=1, n_test=1, shape=(24, 22, 20), channels=1):
    """Write NIfTI cases and an MSD-style datalist.json into ``folder``; return the datalist path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    lists = {"training": [], "validation": [], "test": []}
    seed = 0
    for key, n in (("training", n_train), ("validation", n_val), ("test", n_test)):
        for _ in range(n):
            image, label, affine = make_case(shape, seed, channels)
            img_arr = image[0] if channels == 1 else np.moveaxis(image, 0, -1)
            nib.save(nib.Nifti1Image(img_arr, affine), str(folder / "images" / f"case{seed}.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine), str(folder / "labels" / f"case{seed}.nii.gz"))
            lists[key].append({"image": f"images/case{seed}.nii.gz", "label": f"labels/case{seed}.nii.gz"})
            seed += 1
    path = folder / "datalist.json"
    with open(path, "w") as f:
        json.dump(lists, f)
    return path


def env_with_root():
    """Environment for subprocesses: the bundle root on PYTHONPATH, few threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def torchrun_training_command(tmp, dataset_dir, datalist, nproc=2, **overrides):
    """``torchrun`` (``torch.distributed.run``) command line of a gloo bundle training with ``TINY_PLAN``, the
    multi-process override config, checkpoints in ``tmp/models`` and logs in ``tmp/runs``; ``overrides`` are
    further top-level config values (e.g. ``epochs=2``)."""
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
            str(29500 + os.getpid() % 1000), "-m", "monai.bundle", "run", "training",
            "--config_file", "['configs/train.yaml','configs/multi_gpu_train.yaml']",
            "--meta_file", "configs/metadata.json", "--bundle_root", ".",
            "--dataset_dir", str(dataset_dir), "--datalist", str(datalist), "--ckpt_dir", f"{tmp}/models",
            "--output_dir", f"{tmp}/runs"]
    for k, v in {**TINY_PLAN, **overrides}.items():
        args += [f"--{k}", json.dumps(v)]
    return args


def tiny_inference_bundle(folder) -> Path:
    """A copy of the bundle in ``folder/bundle`` (configs, scripts) with ``TINY_PLAN`` as ``configs/plan.yaml`` and
    a random model of that plan as ``models/model.pt``, for subprocess runs of the inference config."""
    import shutil

    import torch

    from scripts.networks import MambaClinix

    bundle = Path(folder) / "bundle"
    shutil.copytree(ROOT / "configs", bundle / "configs")
    shutil.copytree(ROOT / "scripts", bundle / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    plan = {k: v for k, v in TINY_PLAN.items() if k not in ("num_regions", "batch_size")}
    (bundle / "configs" / "plan.yaml").write_text(json.dumps(plan))  # JSON is YAML
    net = MambaClinix(3, plan["in_channels"], plan["out_channels"], features=plan["features"],
                      kernel_size=plan["kernel_sizes"], strides=plan["strides"], block_types=plan["block_types"],
                      hgcn_orders=plan["hgcn_orders"])
    (bundle / "models").mkdir()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


def run_inference(bundle, input_files, output_dir, *args, timeout=600):
    """``python -m monai.bundle run inference`` of a :func:`tiny_inference_bundle` on CPU without TTA, with further
    ``--key value`` ``args``; the completed process (stdout and stderr as text)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
         "['configs/inference.yaml','configs/plan.yaml']", "--meta_file", "configs/metadata.json",
         "--bundle_root", ".", "--device", "cpu", "--tta_mirror_axes", "None",
         "--input_files", repr([str(f) for f in input_files]), "--output_dir", str(output_dir), *args],
        cwd=bundle, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Terminate ``proc``; kill it if it has not ended within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_lesion_service(args: list[str], log_path: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start ``python -m scripts.hunet.service ARGS --port P`` (P free, output in ``log_path``) and wait until
    ``/api/health`` answers 200; returns the process and its URL.

    Raises:
        RuntimeError: the service ended or did not answer within ``timeout`` seconds (it is stopped), with the end
            of its log.
    """
    import httpx

    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scripts.hunet.service", *args, "--port", str(port)],
                                cwd=ROOT, env=env_with_root(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_process(proc)
    raise RuntimeError(f"the lesion service did not start: {Path(log_path).read_text(errors='replace')[-2000:]}")
