# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Fetch the real demo images from package registries and write MSD-style datalists.

Nothing is downloaded from a data hub: the images ship inside registry packages.

* ``mni``: the MNI152 2009a T1 template with grey/white-matter probability maps, from the nilearn wheel. The
  label is 0 background, 1 grey matter, 2 white matter (the larger probability where it exceeds 50%). The left
  hemisphere is the training case; the right hemisphere is held out, its posterior half for validation and its
  anterior half for testing.
* ``brats_like``: a synthetic BraTS-like set (4 MRI channels, 1 mm, nested tumour regions) made here, for showing
  what the planner does with multi-channel data of BraTS's size (no real BraTS data ships in a registry).
* ``pyradiomics``: five real lesion volumes (brain MRI, lung CT, breast MRI) with binary masks, from the
  pyradiomics 3.0.1 source distribution.

Usage::

    python -m scripts.demo.data --output data [--which mni pyradiomics]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.io_utils import atomic_path, atomic_write_json, save_nifti_atomic

__all__ = ["fetch_mni", "fetch_pyradiomics", "make_brats_like", "make_mni_hemispheres", "main"]

logger = logging.getLogger(__name__)

NILEARN_VERSION = "0.14.1"
PYRADIOMICS_VERSION = "3.0.1"
MNI_FILES = {
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
PYRADIOMICS_CASES = ("brain1", "brain2", "lung1", "lung2", "breast1")


def _pip_download(requirement: str, dest: str, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *extra, requirement, "-d", dest]
    logger.info("fetching %s from the package registry", requirement)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    for f in Path(dest).iterdir():
        if f.name.replace("-", "_").lower().startswith(name):
            return f
    raise RuntimeError(f"pip reported success but no file for {requirement} is in {dest}.")


def fetch_mni(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Extract the MNI152 T1, GM and WM volumes from the nilearn wheel into ``out_dir/raw``."""
    raw = Path(out_dir) / "raw"
    paths = {k: raw / Path(v).name for k, v in MNI_FILES.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(f"nilearn=={NILEARN_VERSION}", tmp)
        with zipfile.ZipFile(wheel) as zf:
            for key, member in MNI_FILES.items():
                with zf.open(member) as src, atomic_path(paths[key]) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return paths


def make_mni_hemispheres(paths: dict[str, Path], out_dir: str | os.PathLike) -> Path:
    """Split the MNI152 template into a left-hemisphere training case and held-out right-hemisphere cases."""
    out_dir = Path(out_dir)
    t1_img = nib.load(str(paths["t1"]))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(paths["gm"])).dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(str(paths["wm"])).dataobj, dtype=np.float32)
    threshold = 0.5 * max(float(gm.max()), float(wm.max()))
    label = np.zeros(t1.shape, dtype=np.uint8)
    label[(gm >= wm) & (gm > threshold)] = 1
    label[(wm > gm) & (wm > threshold)] = 2
    affine = t1_img.affine
    # voxel axis 0 runs along x (left-right), axis 1 along y (posterior-anterior) in this template
    mid_x = t1.shape[0] // 2
    mid_y = t1.shape[1] // 2
    # image x grows to the right when affine[0, 0] > 0 (RAS)
    right = (slice(mid_x, None), slice(None)) if affine[0, 0] > 0 else (slice(None, mid_x), slice(None))
    left = (slice(None, mid_x), slice(None)) if affine[0, 0] > 0 else (slice(mid_x, None), slice(None))
    posterior = slice(None, mid_y) if affine[1, 1] > 0 else slice(mid_y, None)
    anterior = slice(mid_y, None) if affine[1, 1] > 0 else slice(None, mid_y)
    crops = {
        "mni_left": (left[0], slice(None), slice(None)),
        "mni_right_posterior": (right[0], posterior, slice(None)),
        "mni_right_anterior": (right[0], anterior, slice(None)),
    }
    images = out_dir / "images"
    labels = out_dir / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for name, crop in crops.items():
        offset = np.array([c.start or 0 for c in crop] + [1.0])
        crop_affine = affine.copy()
        crop_affine[:3, 3] = (affine @ offset)[:3]
        save_nifti_atomic(t1[crop], crop_affine, images / f"{name}.nii.gz")
        save_nifti_atomic(label[crop], crop_affine, labels / f"{name}.nii.gz")
    datalist = {
        "description": "MNI152 2009a T1 template, grey/white matter from its probability maps; "
        "left hemisphere for training, right hemisphere held out",
        "labels": {"0": "background", "1": "grey_matter", "2": "white_matter"},
        "modality": {"0": "MR"},
        "training": [{"image": "images/mni_left.nii.gz", "label": "labels/mni_left.nii.gz"}],
        "validation": [{"image": "images/mni_right_posterior.nii.gz", "label": "labels/mni_right_posterior.nii.gz"}],
        "test": [{"image": "images/mni_right_anterior.nii.gz", "label": "labels/mni_right_anterior.nii.gz"}],
    }
    path = out_dir / "datalist.json"
    atomic_write_json(datalist, path)
    return path


def fetch_pyradiomics(out_dir: str | os.PathLike) -> Path:
    """Extract the pyradiomics 3.0.1 test volumes (NRRD) into ``out_dir`` and write ``datalist_<kind>.json``."""
    out_dir = Path(out_dir)
    if not all((out_dir / f"{c}_image.nrrd").exists() for c in PYRADIOMICS_CASES):
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            sdist = _pip_download(f"pyradiomics=={PYRADIOMICS_VERSION}", tmp, "--no-build-isolation")
            prefix = f"pyradiomics-{PYRADIOMICS_VERSION}/data/"
            with tarfile.open(sdist) as tf:
                for member in tf.getmembers():
                    name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                    if member.isfile() and name.endswith(".nrrd") and "/" not in name:
                        src = tf.extractfile(member)
                        with atomic_path(out_dir / name) as tmp, open(tmp, "wb") as dst:
                            shutil.copyfileobj(src, dst)
    pairs = {
        "brain": ("brain1", "brain2", "MR"),
        "lung": ("lung1", "lung2", "CT"),
    }
    for kind, (train, test, modality) in pairs.items():
        atomic_write_json(
            {
                "description": f"pyradiomics {kind} lesion cases: train on {train}, evaluate on {test}",
                "labels": {"0": "background", "1": "lesion"},
                "modality": {"0": modality},
                "training": [{"image": f"{train}_image.nrrd", "label": f"{train}_label.nrrd"}],
                "validation": [{"image": f"{test}_image.nrrd", "label": f"{test}_label.nrrd"}],
                "test": [{"image": f"{test}_image.nrrd", "label": f"{test}_label.nrrd"}],
                # both cases, for a model trained elsewhere (e.g. on synthetic lesions: make demo-lesions)
                "all": [{"image": f"{c}_image.nrrd", "label": f"{c}_label.nrrd"} for c in (train, test)],
            },
            out_dir / f"datalist_{kind}.json",
        )
    return out_dir


def make_brats_like(out_dir: str | os.PathLike, n_cases: int = 4, shape=(144, 176, 144), seed: int = 0) -> Path:
    """Write a synthetic BraTS-like dataset: 4 channels (FLAIR, T1, T1gd, T2 stand-ins) per case, a brain-shaped
    ellipsoid with a tumour of three nested regions (1 edema, 2 non-enhancing core, 3 enhancing), 1 mm spacing."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    centre = np.array(shape, np.float32) / 2
    brain = (((grid - centre) / (centre * 0.85)) ** 2).sum(-1) < 1
    items = []
    for i in range(n_cases):
        c = centre + rng.uniform(-20, 20, 3).astype(np.float32)
        r = np.linalg.norm(grid - c, axis=-1)
        radius = rng.uniform(14, 24)
        label = np.zeros(shape, np.uint8)
        label[(r < radius) & brain] = 1
        label[(r < 0.6 * radius) & brain] = 2
        label[(r < 0.6 * radius) & (r > 0.45 * radius) & brain] = 3
        channels = []
        for ch, (base, contrast) in enumerate(((300, 120), (400, -60), (350, 150), (500, 200))):
            img = brain * (base + contrast * (label > 0) + 40 * (label == 3) + rng.normal(0, 25, shape))
            name = f"case{i:03d}_{ch:04d}.nii.gz"
            save_nifti_atomic(img.astype(np.float32), np.eye(4), out_dir / name)
            channels.append(name)
        save_nifti_atomic(label, np.eye(4), out_dir / f"case{i:03d}_seg.nii.gz")
        items.append({"image": channels, "label": f"case{i:03d}_seg.nii.gz"})
    path = out_dir / "datalist.json"
    atomic_write_json(
        {
            "description": "synthetic BraTS-like data made by scripts.demo.data (not real images)",
            "modality": {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumour", "3": "enhancing tumour"},
            "training": items,
        },
        path,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="data", help="folder for the data (default: data)")
    parser.add_argument("--which", nargs="+", default=["mni"], choices=["mni", "pyradiomics", "brats_like"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output)
    if "mni" in args.which:
        datalist = make_mni_hemispheres(fetch_mni(out / "mni"), out / "mni")
        logger.info("MNI152 hemisphere dataset ready: %s", datalist)
    if "brats_like" in args.which:
        logger.info("synthetic BraTS-like dataset ready: %s", make_brats_like(out / "brats_like"))
    if "pyradiomics" in args.which:
        folder = fetch_pyradiomics(out / "pyradiomics")
        logger.info("pyradiomics lesion cases ready in %s (datalist_brain.json, datalist_lung.json)", folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
