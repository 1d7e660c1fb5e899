# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Transforms of the 2D Mamba-HUNet workflow: in-plane unsharp masking and 2D-to-volume lifting (masks are saved by
:class:`scripts.transforms.AtomicSaveSegmentationd` with ``report=True``)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = ["UnsharpMask", "UnsharpMaskd", "EnsureVolumed"]


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
