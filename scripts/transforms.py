# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Transforms of the bundle's pipelines: per-channel intensity normalisation, deep-supervision output
selection, and an atomic segmentation writer."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import MapTransform, SaveImaged

from .image_guard import InputError
from .io_utils import atomic_path

__all__ = [
    "NormalizeChannelsd",
    "SelectFullResolutiond",
    "AtomicSaveSegmentationd",
    "full_resolution",
    "nonzero",
]

logger = logging.getLogger(__name__)


def nonzero(x):
    """Foreground selector for ``CropForegroundd``: the non-zero region (nnU-Net crops to it)."""
    return x != 0


def full_resolution(output):
    """The full-resolution output of a deep-supervision list (the first), or the output itself."""
    return output[0] if isinstance(output, (list, tuple)) else output


class SelectFullResolutiond(MapTransform):
    """Replace a deep-supervision list of outputs by its full-resolution element (post-transforms and metrics
    must see only that one)."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = full_resolution(d[key])
        return d


class NormalizeChannelsd(MapTransform):
    """Per-channel intensity normalisation as planned (nnU-Net's CT and z-score schemes).

    An image with NaN / infinite values or a channel count other than the schemes' raises
    :class:`scripts.image_guard.InputError` (a ``ValueError``; HTTP 422 inside MONAI Label).

    Args:
        keys: keys of the images to normalise.
        schemes: one entry per channel: ``"ct"`` clips to ``[lower, upper]`` then subtracts the dataset's
            foreground mean and divides by its std; ``"zscore"`` subtracts the image's own mean and divides by
            its std; ``"none"`` leaves the channel as it is. A single string applies to every channel.
        stats: one entry per channel: ``[lower, upper, mean, std]`` for ``"ct"``, ``None`` otherwise.
        nonzero: compute the z-score statistics over non-zero voxels only (for skull-stripped MRI).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        schemes: str | Sequence[str] = "zscore",
        stats: Sequence[Sequence[float] | None] | None = None,
        nonzero: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.schemes = [schemes] if isinstance(schemes, str) else list(schemes)
        for s in self.schemes:
            if s not in ("ct", "zscore", "none"):
                raise ValueError(f"intensity scheme must be 'ct', 'zscore' or 'none', got {s!r}.")
        self.stats = list(stats) if stats is not None else [None] * len(self.schemes)
        if len(self.stats) != len(self.schemes):
            raise ValueError(f"intensity_stats needs one entry per channel ({len(self.schemes)}), got {len(self.stats)}.")
        for s, st in zip(self.schemes, self.stats):
            if s == "ct" and (st is None or len(st) != 4):
                raise ValueError(f"the 'ct' scheme needs stats [lower, upper, mean, std], got {st}.")
        self.nonzero = nonzero

    def _normalize(self, img: torch.Tensor, filename: str) -> torch.Tensor:
        schemes, stats = self.schemes, self.stats
        if len(schemes) == 1 and img.shape[0] > 1:
            schemes, stats = schemes * img.shape[0], stats * img.shape[0]
        if len(schemes) != img.shape[0]:
            raise InputError(
                f"{filename}: the image has {img.shape[0]} channels but the configuration expects {len(schemes)} "
                "(intensity_schemes / in_channels); check the datalist or the plan."
            )
        out = img.float().clone()
        for c, (scheme, st) in enumerate(zip(schemes, stats)):
            ch = out[c]
            if scheme == "ct":
                lower, upper, mean, std = (float(v) for v in st)
                out[c] = (ch.clamp(lower, upper) - mean) / max(std, 1e-8)
            elif scheme == "zscore":
                values = ch[ch != 0] if self.nonzero and bool((ch != 0).any()) else ch
                mean, std = values.mean(), values.std() if values.numel() > 1 else values.new_tensor(1.0)
                normed = (ch - mean) / std.clamp_min(1e-8)
                out[c] = torch.where(ch != 0, normed, torch.zeros_like(ch)) if self.nonzero else normed
        return out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            filename = str(img.meta.get("filename_or_obj", key)) if isinstance(img, MetaTensor) else str(key)
            if not torch.isfinite(torch.as_tensor(img)).all():
                raise InputError(f"{filename}: the image contains NaN or infinite values; fix or remove the file.")
            out = self._normalize(torch.as_tensor(img), filename)
            d[key] = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations) if isinstance(
                img, MetaTensor
            ) else out
        return d


class AtomicSaveSegmentationd(SaveImaged):
    """Save a label map as NIfTI next to nothing half-written: the file is written under a temporary name in
    the output folder and renamed when complete.

    Subclasses :class:`monai.transforms.SaveImaged` (so MONAI Label's post-transform filter recognises and drops
    it); the file is ``<output_dir>/<input name>_<output_postfix>.nii.gz`` with the data's affine.

    Args:
        keys: keys of the label maps to save.
        output_dir: output folder (created when missing).
        output_postfix: postfix of the output file name.
        output_dtype: data type of the saved array.
        meta_key_postfix: kept for SaveImaged compatibility.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike = "./",
        output_postfix: str = "seg",
        output_dtype=np.uint8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, output_dir=output_dir, output_postfix=output_postfix, output_dtype=output_dtype,
                         allow_missing_keys=allow_missing_keys)
        self.out_dir = Path(output_dir)
        self.postfix = output_postfix
        self.dtype = output_dtype

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = img.meta if isinstance(img, MetaTensor) else {}
            src = Path(str(meta.get("filename_or_obj", "case")))
            stem = src.name
            for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"):
                if stem.endswith(ext):
                    stem = stem[: -len(ext)]
                    break
            final = self.out_dir / f"{stem}_{self.postfix}.nii.gz"
            arr = torch.as_tensor(img).detach().cpu()
            writer = NibabelWriter(output_dtype=self.dtype)
            writer.set_data_array(arr, channel_dim=0 if arr.ndim == 4 or arr.shape[0] == 1 else None)
            affine = img.affine if isinstance(img, MetaTensor) else None
            writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
            with atomic_path(final) as tmp:
                writer.write(str(tmp), verbose=False)
            logger.info("saved %s", final)
            d[f"{key}_path"] = str(final)
        return d
