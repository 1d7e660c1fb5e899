# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Overlay pictures of a segmentation on its image, a few slices per case (PNG)."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .io_utils import atomic_path, safe_stem

__all__ = ["save_overlay", "SaveOverlayd"]

logger = logging.getLogger(__name__)


def save_overlay(image: np.ndarray, label: np.ndarray, path: str | os.PathLike, num_slices: int = 4,
                 title: str = "") -> Path:
    """Draw ``num_slices`` axial slices of ``image`` (spatial, last axis = slices) with ``label`` over it.

    The slices are spread over the labelled extent (or the whole volume when nothing is labelled). The PNG is
    written under a temporary name and renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    if image.ndim == 2:
        image, label = image[..., None], label[..., None]
    if image.shape != label.shape:
        raise ValueError(f"image {image.shape} and label {label.shape} must have the same shape to overlay.")
    zs = np.nonzero(label.reshape(-1, label.shape[-1]).any(0))[0]
    lo, hi = (zs.min(), zs.max()) if zs.size else (0, image.shape[-1] - 1)
    picks = np.unique(np.linspace(lo, hi, num_slices + 2)[1:-1].round().astype(int)) if hi > lo else [lo]
    vmin, vmax = np.percentile(image, (1, 99)) if image.size else (0, 1)
    n_cls = max(int(label.max()), 1)
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(picks), figsize=(3 * len(picks), 3.2), squeeze=False)
    for ax, z in zip(axes[0], picks):
        ax.imshow(np.rot90(image[..., z]), cmap="gray", vmin=vmin, vmax=vmax)
        rgba = np.zeros(image.shape[:2] + (4,), dtype=np.float32)
        for c in range(1, n_cls + 1):
            rgba[label[..., z] == c] = (*cmap((c - 1) % 10)[:3], 0.45)
        ax.imshow(np.rot90(rgba))
        ax.set_title(f"slice {z}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path


class SaveOverlayd(MapTransform):
    """Save a PNG with a few slices of ``image_key`` overlaid by the label map in ``keys`` (first key).

    Args:
        keys: key of the label map (class indices, channel-first with one channel, or one-hot).
        image_key: key of the image (first channel is drawn).
        output_dir: folder of the PNG files ``<stem>_overlay.png`` (:func:`scripts.io_utils.safe_stem` of the
            image's file name).
        num_slices: number of slices drawn.
    """

    def __init__(self, keys: KeysCollection, image_key: str = "image", output_dir: str | os.PathLike = "./",
                 num_slices: int = 4, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.num_slices = num_slices

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key]).detach().cpu()
            label = pred.argmax(0) if pred.shape[0] > 1 else pred[0]
            img = torch.as_tensor(d[self.image_key]).detach().cpu()[0]
            meta = getattr(d[self.image_key], "meta", {}) or {}
            name = safe_stem(meta.get("filename_or_obj") or "case")
            path = save_overlay(img.numpy(), label.numpy().astype(np.int64), self.output_dir / f"{name}_overlay.png",
                                self.num_slices, title=name)
            logger.info("saved %s", path)
        return d
