# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Transforms of the 2D Mamba-HUNet workflow: in-plane unsharp masking, 2D-to-volume lifting and lesion-balanced crop
centres (masks are saved by :class:`scripts.transforms.AtomicSaveSegmentationd` with ``report=True``)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.transforms.utils import map_binary_to_indices

from scripts.hunet.report import connected_components

__all__ = ["UnsharpMask", "UnsharpMaskd", "EnsureVolumed", "LesionBalancedIndicesd"]


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


class LesionBalancedIndicesd(MapTransform):
    """Foreground and background voxel indices for :class:`monai.transforms.RandCropByPosNegLabeld`
    (``fg_indices_key`` / ``bg_indices_key``), with the foreground weighted per lesion.

    ``RandCropByPosNegLabeld`` draws a positive centre uniformly from its foreground indices, so a lesion is chosen
    in proportion to its volume and a volume's few-voxel lesions are rarely the centre of a crop. Here every lesion
    (connected component of the label) is given a number of entries ``max(1, round(n ** (1 - balance) *
    ref ** balance))``, where ``n`` is its voxel count and ``ref`` the largest lesion's count capped at
    ``max_entries``; its voxels fill these entries evenly (repeated, or evenly thinned when there are fewer
    entries than voxels). ``balance`` 0 keeps MONAI's voxel-uniform choice (``n`` entries, every voxel once); 1 makes
    every lesion equally likely whatever its size. The background indices are MONAI's (``map_binary_to_indices``): label 0 and,
    with ``image_key``, image above ``image_threshold``.

    The indices are flat, over the label's spatial shape, as ``FgBgToIndicesd`` writes them; they are stored under
    ``key + fg_postfix`` and ``key + bg_postfix``. Apply before any random transform, so that a cached dataset keeps
    them.

    Args:
        keys: the label key(s); any non-zero value is foreground.
        image_key: optional image whose values above ``image_threshold`` bound the background.
        image_threshold: see ``image_key``.
        balance: 0 (voxel-uniform) to 1 (lesion-uniform).
        connectivity: neighbourhood of the lesions, 1 to the number of spatial axes (default: all, 26-connected
            in 3D), as in :func:`scripts.hunet.report.lesion_detection`.
        max_entries: cap on ``ref``, which bounds the entries per lesion.
        fg_postfix: suffix of the foreground indices' key.
        bg_postfix: suffix of the background indices' key.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        ValueError: ``balance`` outside [0, 1] or ``max_entries`` < 1.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str | None = None,
        image_threshold: float = 0.0,
        balance: float = 1.0,
        connectivity: int | None = None,
        max_entries: int = 4096,
        fg_postfix: str = "_fg_indices",
        bg_postfix: str = "_bg_indices",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= balance <= 1.0:
            raise ValueError(f"balance must be in [0, 1], got {balance}.")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}.")
        self.image_key, self.image_threshold = image_key, float(image_threshold)
        self.balance, self.connectivity, self.max_entries = float(balance), connectivity, int(max_entries)
        self.fg_postfix, self.bg_postfix = fg_postfix, bg_postfix

    def lesion_indices(self, fg: np.ndarray, spatial_shape: Sequence[int]) -> np.ndarray:
        """The foreground entries for the flat foreground indices ``fg`` of a label of ``spatial_shape``."""
        mask = np.zeros(int(np.prod(spatial_shape)), bool)
        mask[fg] = True  # the lesions are the components of MONAI's own foreground (one-hot: after the background)
        mask = mask.reshape(tuple(spatial_shape))
        components, num = connected_components(mask, self.connectivity or mask.ndim)
        if num == 0:
            return fg
        ids = components.reshape(-1)[fg]
        order = np.argsort(ids, kind="stable")
        sizes = np.bincount(ids, minlength=num + 1)[1:]
        ref = min(int(sizes.max()), self.max_entries)
        entries = np.maximum(1, np.round(sizes ** (1.0 - self.balance) * ref**self.balance)).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        picks = [
            fg[order[s + np.round(np.linspace(0, n - 1, e)).astype(np.int64)]]
            for s, n, e in zip(starts, sizes, entries)
        ]
        return np.concatenate(picks)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d[self.image_key] if self.image_key else None
        for key in self.key_iterator(d):
            label = d[key]
            fg, bg = map_binary_to_indices(label, image, self.image_threshold)
            fg_np = np.asarray(fg.cpu() if isinstance(fg, torch.Tensor) else fg, dtype=np.int64)
            d[str(key) + self.fg_postfix] = self.lesion_indices(fg_np, label.shape[1:])
            d[str(key) + self.bg_postfix] = bg
        return d
