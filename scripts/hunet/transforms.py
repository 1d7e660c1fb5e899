# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Transforms of the 2D Mamba-HUNet workflow: in-plane unsharp masking, 2D-to-volume lifting, atomic mask saving."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from scripts.hunet.report import lesion_report, write_json_atomic
from scripts.io_utils import save_nifti_atomic

__all__ = [
    "UnsharpMask",
    "UnsharpMaskd",
    "EnsureVolumed",
    "SaveMaskd",
    "safe_stem",
    "save_nifti_atomic",
]

logger = logging.getLogger(__name__)


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, int(round(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class UnsharpMask(Transform):
    """Sharpen in plane: ``x + amount * (x - gaussian(x))`` over the first two spatial axes only.

    A channel-first image ``(C, H, W)`` or a volume ``(C, H, W, D)`` is accepted; in the latter every slice
    along the last axis is sharpened on its own, so the result equals slice-by-slice 2D processing.

    Args:
        sigma: standard deviation of the Gaussian blur, in pixels (> 0).
        amount: strength of the sharpening (>= 0; 0 leaves the image unchanged).
        clip: optional (min, max) to clip the result to, e.g. the range of the preceding normalisation.
    """

    def __init__(self, sigma: float = 1.0, amount: float = 0.5, clip: Sequence[float] | None = None) -> None:
        if sigma <= 0 or amount < 0:
            raise ValueError(f"UnsharpMask needs sigma > 0 and amount >= 0, got sigma={sigma}, amount={amount}.")
        if clip is not None and (len(clip) != 2 or clip[0] >= clip[1]):
            raise ValueError(f"clip must be (min, max) with min < max, got {clip}.")
        self.sigma, self.amount, self.clip = float(sigma), float(amount), clip

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        img_t = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
        if img_t.ndim not in (3, 4):
            raise ValueError(f"UnsharpMask expects (C, H, W) or (C, H, W, D), got shape {tuple(img_t.shape)}.")
        x = img_t.as_tensor() if isinstance(img_t, MetaTensor) else img_t
        x = x.float()
        vol = x if x.ndim == 4 else x[..., None]
        c, h, w, d = vol.shape
        planes = vol.permute(0, 3, 1, 2).reshape(c * d, 1, h, w)
        k = _gaussian_kernel(self.sigma, planes.dtype, planes.device)
        r = k.numel() // 2
        pad_h = F.pad(planes, (0, 0, r, r), mode="replicate" if h > 1 else "constant")
        blur = F.conv2d(pad_h, k.view(1, 1, -1, 1))
        pad_w = F.pad(blur, (r, r, 0, 0), mode="replicate" if w > 1 else "constant")
        blur = F.conv2d(pad_w, k.view(1, 1, 1, -1))
        out = planes + self.amount * (planes - blur)
        if self.clip is not None:
            out = out.clamp(float(self.clip[0]), float(self.clip[1]))
        out = out.reshape(c, d, h, w).permute(0, 2, 3, 1)
        out = out if x.ndim == 4 else out[..., 0]
        if isinstance(img_t, MetaTensor):
            return MetaTensor(out, meta=img_t.meta, applied_operations=img_t.applied_operations)
        return out


class UnsharpMaskd(MapTransform):
    """Dictionary version of :class:`UnsharpMask`.

    Args:
        keys: keys of the images to sharpen.
        sigma: see :class:`UnsharpMask`.
        amount: see :class:`UnsharpMask`.
        clip: see :class:`UnsharpMask`.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float = 1.0,
        amount: float = 0.5,
        clip: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.op = UnsharpMask(sigma, amount, clip)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


class EnsureVolumed(MapTransform):
    """Give a 2D channel-first image ``(C, H, W)`` a trailing slice axis ``(C, H, W, 1)``; volumes pass through.

    Lets the slice-by-slice pipeline take a single 2D image (e.g. a PNG) as a one-slice volume.

    Args:
        keys: keys of the images.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim == 3:
                if isinstance(img, MetaTensor):
                    aff = np.eye(4)
                    a2 = np.asarray(img.affine, dtype=np.float64)
                    aff[:2, :2], aff[:2, 3] = a2[:2, :2], a2[:2, 2]
                    img = MetaTensor(img.as_tensor()[..., None], meta=dict(img.meta))
                    img.affine = torch.as_tensor(aff)
                    img.meta["original_affine"] = aff
                    img.meta["spatial_shape"] = np.asarray(img.shape[1:])
                else:
                    img = img[..., None]
                d[key] = img
            elif img.ndim != 4:
                raise ValueError(f"{key!r} must be (C, H, W) or (C, H, W, D), got shape {tuple(img.shape)}.")
        return d


def safe_stem(name: str | os.PathLike, default: str = "case") -> str:
    """File name stem reduced to ``[A-Za-z0-9._-]`` without path parts or image suffixes (for output names)."""
    base = Path(str(name)).name
    for suf in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm", ".png", ".zip", ".mha", ".gz"):
        if base.lower().endswith(suf):
            base = base[: -len(suf)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")
    return base[:100] or default


class SaveMaskd(MapTransform):
    """Save a label map ``(1, H, W, D)`` as uint8 NIfTI with its affine, atomically, and a lesion report beside it.

    The output name is ``<input stem><suffix>.nii.gz`` (the stem taken from the image's ``filename_or_obj``,
    sanitised); the report is ``<input stem><suffix>_report.json``. The paths are stored in the data under
    ``<key>_file`` and ``<key>_report_file``.

    Args:
        keys: key of the label map (usually ``"pred"``).
        output_dir: folder of the outputs.
        suffix: appended to the input stem.
        report: whether to write the lesion report.
        connectivity: connectivity of the lesion components (1, 2 or 3 = 6-, 18-, 26-connected in 3D).
        meta_key: key whose ``filename_or_obj`` names the case (default the label map itself).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        suffix: str = "_seg",
        report: bool = True,
        connectivity: int = 3,
        meta_key: str | None = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.suffix = suffix
        self.report = report
        self.connectivity = connectivity
        self.meta_key = meta_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if not isinstance(pred, MetaTensor):
                raise ValueError(f"SaveMaskd needs a MetaTensor under {key!r} (with affine and file name).")
            src = d.get(self.meta_key, pred) if self.meta_key else pred
            name = src.meta.get("filename_or_obj", "") if isinstance(src, MetaTensor) else ""
            stem = safe_stem(name) + self.suffix
            arr = pred.detach().cpu().numpy()
            arr = arr[0] if arr.ndim == 4 else arr
            mask = np.rint(arr).clip(0, 255).astype(np.uint8)
            affine = np.asarray(pred.affine, dtype=np.float64)
            out = save_nifti_atomic(mask, affine, self.output_dir / f"{stem}.nii.gz")
            d[f"{key}_file"] = str(out)
            logger.info("saved mask %s", out)
            if self.report:
                spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
                rep = lesion_report(mask, spacing, connectivity=self.connectivity)
                rep["source"] = Path(str(name)).name
                rep["mask_file"] = out.name
                rep_path = self.output_dir / f"{stem}_report.json"
                write_json_atomic(rep, rep_path)
                d[f"{key}_report_file"] = str(rep_path)
        return d
