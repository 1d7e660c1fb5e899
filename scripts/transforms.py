# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Transforms of the bundle's pipelines: per-channel intensity normalisation, deep-supervision output
selection, the segmentation writer of every workflow, and the parts of nnU-Net's augmentation MONAI lacks."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import Affine, Flip, MapTransform, RandAdjustContrast, Randomizable, RandomizableTransform, SaveImaged
from monai.utils import ensure_tuple_rep
from monai.utils.misc import MAX_SEED

from .hunet.report import lesion_report
from .image_guard import InputError
from .io_utils import OutputNames, atomic_write_json, save_nifti_atomic

__all__ = [
    "NormalizeChannelsd",
    "SelectFullResolutiond",
    "AtomicSaveSegmentationd",
    "LoadReferenced",
    "full_resolution",
    "nonzero",
    "RandRotateScaled",
    "RandPerChanneld",
    "RandGamma",
    "RandMirrord",
    "nnunet_uniform",
    "nnunet_rotation_range",
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


class LoadReferenced(MapTransform):
    """Replace each key's label map by the file it was loaded from, read again as stored: no reorientation, no
    resampling, no crop. An evaluation compares the prediction inverted to the case's original geometry
    (``Invertd``) with this reference, as nnU-Net evaluates, rather than with the label resampled to the
    network's grid.

    The file is the label map's ``filename_or_obj``; it is loaded channel-first with
    :class:`monai.transforms.LoadImage` (the readers of the training pipeline), keeping its affine, so distances
    are in the file's units (millimetres for NIfTI).

    Args:
        keys: keys of the label maps (MetaTensors that name their file).
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        ValueError: a label map that names no file.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        from monai.transforms import LoadImage

        self.loader = LoadImage(ensure_channel_first=True, image_only=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            name = (getattr(d[key], "meta", None) or {}).get("filename_or_obj")
            if isinstance(name, (list, tuple)):  # a collated batch of one
                name = name[0] if len(name) == 1 else None
            if not name:
                raise ValueError(f"{key!r} names no file (meta data 'filename_or_obj'); the reference cannot be "
                                 "read as stored.")
            d[key] = self.loader(str(name))
        return d


class AtomicSaveSegmentationd(SaveImaged):
    """Save a label map as NIfTI in its own geometry, atomically, optionally with a lesion report beside it.

    The file is :func:`scripts.io_utils.output_path` of the case's ``filename_or_obj`` (read from the
    ``meta_key`` entry's meta data, else from the label map's own; ``"case"`` when neither has one):
    ``<output_dir>/<folder relative to data_root_dir>/<stem>_<output_postfix>.nii.gz`` (``<stem>.nii.gz`` when the
    postfix is empty), flat when ``data_root_dir`` is ``None``. The saver owns the run's names
    (:class:`scripts.io_utils.OutputNames`): a name already written by this instance (the same input given twice,
    or two inputs whose names are equal after :func:`scripts.io_utils.safe_stem`) gets a number after the stem
    (``scan_2_seg.nii.gz``) and a warning, so no output of the run is overwritten; :meth:`reset_names` starts a
    new run. It is written under a temporary name in the output folder and renamed when complete
    (:func:`scripts.io_utils.save_nifti_atomic`), with the label map's affine as it is (permuted and oblique
    axes too; a 2D affine is lifted to 3D; a plain tensor gets the identity). The label map is channel-first:
    one channel is dropped, several are stored along NIfTI's 4th axis. Integer output types get the values
    rounded and clipped to the type's range (class indices from ``AsDiscreted``, float-typed, are stored
    exactly). A 2D image the lesion workflow lifted to a one-slice volume
    (:class:`scripts.hunet.transforms.EnsureVolumed`) is saved as that ``(H, W, 1)`` volume.

    With ``report=True`` the label map's foreground is described by
    :func:`scripts.hunet.report.lesion_report` (spacing from the affine) in ``<stem>_<output_postfix>_report.json``
    beside the mask. The paths are stored in the data under ``<key>_path`` and ``<key>_report_path``.

    Subclasses :class:`monai.transforms.SaveImaged`, so MONAI Label's post-transform filter recognises and drops
    it (MONAI Label writes its own result).

    Args:
        keys: keys of the label maps to save.
        output_dir: output folder (created when missing).
        output_postfix: postfix of the output file name.
        output_dtype: data type of the saved array.
        meta_key: key whose meta data names the case (e.g. the image); the label map's own meta data when the
            key is absent, has no meta data or is ``None``.
        report: write a lesion report beside each file.
        connectivity: neighbourhood of the report's lesion components (1, 2 or 3: 6-, 18-, 26-connected in 3D).
        data_root_dir: the inputs' common folder (:func:`scripts.io_utils.common_root` of the datalist): each
            output keeps its input's folder relative to it; ``None``: flat names.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        ValueError: for a connectivity other than 1, 2 or 3.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike = "./",
        output_postfix: str = "seg",
        output_dtype: DtypeLike = np.uint8,
        meta_key: str | None = "image",
        report: bool = False,
        connectivity: int = 3,
        data_root_dir: str | os.PathLike | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, output_dir=output_dir, output_postfix=output_postfix, output_dtype=output_dtype,
                         allow_missing_keys=allow_missing_keys)
        if connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}.")
        self.out_dir = Path(output_dir)
        self.postfix = output_postfix
        self.dtype = np.dtype(output_dtype)
        self.meta_key = meta_key
        self.report = report
        self.connectivity = connectivity
        self.names = OutputNames(output_dir, data_root_dir)

    def reset_names(self) -> None:
        """Start a new run: names written before may be written again."""
        self.names.reset()

    def _case_name(self, data: Mapping[Hashable, object], label: object) -> str:
        sources = [data.get(self.meta_key)] if self.meta_key is not None else []
        for src in [*sources, label]:
            name = (getattr(src, "meta", None) or {}).get("filename_or_obj")
            if isinstance(name, (list, tuple)):  # several files of one case (channels)
                name = name[0] if name else None
            if name:
                return str(name)
        return ""

    def _array(self, label: torch.Tensor) -> np.ndarray:
        arr = np.asarray(torch.as_tensor(label).detach().cpu())
        if np.issubdtype(self.dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(self.dtype)
            arr = np.rint(arr).clip(info.min, info.max)
        arr = np.moveaxis(arr.astype(self.dtype), 0, -1)  # channel first -> last
        return arr[..., 0] if arr.shape[-1] == 1 else arr

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            name = self._case_name(d, label)
            path = self.names.claim(name, self.postfix, ".nii.gz")
            affine = np.asarray(label.affine, dtype=np.float64) if isinstance(label, MetaTensor) else np.eye(4)
            affine = to_affine_nd(3, affine)
            mask = self._array(label)
            out = save_nifti_atomic(mask, affine, path)
            d[f"{key}_path"] = str(out)
            logger.info("saved %s", out)
            if self.report:
                spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
                rep = lesion_report(mask, spacing[: mask.ndim], connectivity=self.connectivity)
                rep["source"] = Path(name).name
                rep["mask_file"] = out.name
                report_path = path.with_name(path.name[: -len(".nii.gz")] + "_report.json")
                d[f"{key}_report_path"] = str(atomic_write_json(rep, report_path))
        return d


# ---- nnU-Net's default training augmentation: the pieces MONAI does not have ----------------------------------
# (batchgenerators semantics as used by nnU-Net v2's nnUNetTrainer.get_training_transforms; the intensity and
# resampling operations themselves are MONAI's)


def nnunet_uniform(rng: np.random.RandomState, low: float, high: float) -> float:
    """A factor from ``[low, high]`` as nnU-Net samples scale and gamma: when the range straddles 1, below 1 and
    above 1 are equally likely (uniform within each side); otherwise uniform over the range."""
    if low > high:
        raise ValueError(f"the range must be (low, high) with low <= high, got ({low}, {high}).")
    if low < 1.0 < high and rng.uniform() < 0.5:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(max(low, 1.0) if low < 1.0 < high else low, high))


def nnunet_rotation_range(patch_size: Sequence[int]) -> list[tuple[float, float]]:
    """Rotation ranges (radians, one per rotation axis) of nnU-Net's default augmentation for a patch.

    2D: one in-plane angle, +-180 deg, or +-15 deg when the patch's aspect ratio exceeds 1.5. 3D: +-30 deg about
    every axis; when the patch is anisotropic (longest edge more than 3x the shortest: nnU-Net's "dummy 2D"
    augmentation), +-180 deg about the axis of the shortest edge only (nnU-Net's first, coarse axis).
    """
    patch = [int(p) for p in patch_size]
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise ValueError(f"patch_size must have 2 or 3 positive entries, got {list(patch_size)}.")
    if len(patch) == 2:
        angle = math.radians(15.0 if max(patch) / min(patch) > 1.5 else 180.0)
        return [(-angle, angle)]
    if max(patch) / min(patch) > 3:
        coarse = patch.index(min(patch))
        return [(-math.pi, math.pi) if a == coarse else (0.0, 0.0) for a in range(3)]
    angle = math.radians(30.0)
    return [(-angle, angle)] * 3


def _as_ranges(rotate_range: Sequence[Sequence[float] | float]) -> list[tuple[float, float]]:
    ranges = []
    for r in rotate_range:
        lo, hi = (-abs(float(r)), abs(float(r))) if isinstance(r, (int, float)) else (float(r[0]), float(r[1]))
        if lo > hi:
            raise ValueError(f"rotate_range entries must be (low, high) with low <= high, got {r}.")
        ranges.append((lo, hi))
    if len(ranges) not in (1, 3):
        raise ValueError(f"rotate_range needs 1 (2D) or 3 (3D) entries, got {len(ranges)}.")
    return ranges


def _check_prob(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}.")
    return value


class RandRotateScaled(Randomizable, MapTransform):
    """Rotation and isotropic scaling as nnU-Net's spatial augmentation, resampled once by MONAI's ``Affine``.

    Rotation happens with ``prob_rotate``, each axis then with ``prob_rotate_per_axis`` (angle uniform in its
    range); scaling happens independently with ``prob_scale``, one factor for all axes drawn by
    :func:`nnunet_uniform` (nnU-Net: ``p_rot_per_sample = p_scale_per_sample = 0.2``, ``p_rot_per_axis = 1``,
    scale ``(0.7, 1.4)``; a factor above 1 zooms out). ``monai.transforms.RandAffined`` has one probability for
    both and samples every axis' scale separately, hence this transform.

    Args:
        keys: keys to resample (image and label alike).
        rotate_range: one ``(low, high)`` (or ``x`` for ``(-x, x)``) in radians per rotation axis: 1 entry in 2D,
            3 in 3D; e.g. :func:`nnunet_rotation_range`.
        prob_rotate: probability of rotating a sample.
        prob_rotate_per_axis: probability of each axis' angle being non-zero once rotating.
        scale_range: ``(low, high)`` scale factors.
        prob_scale: probability of scaling a sample.
        mode: interpolation per key (e.g. ``[bilinear, nearest]``).
        padding_mode: ``Affine`` padding mode outside the input.
    """

    def __init__(
        self,
        keys: KeysCollection,
        rotate_range: Sequence[Sequence[float] | float],
        prob_rotate: float = 0.2,
        prob_rotate_per_axis: float = 1.0,
        scale_range: Sequence[float] = (0.7, 1.4),
        prob_scale: float = 0.2,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str = "zeros",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.rotate_range = _as_ranges(rotate_range)
        self.prob_rotate = _check_prob("prob_rotate", prob_rotate)
        self.prob_rotate_per_axis = _check_prob("prob_rotate_per_axis", prob_rotate_per_axis)
        self.prob_scale = _check_prob("prob_scale", prob_scale)
        if len(scale_range) != 2 or not 0 < float(scale_range[0]) <= float(scale_range[1]):
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}.")
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = padding_mode
        self.angles: list[float] | None = None
        self.scale: float | None = None

    def randomize(self, data: Any = None) -> None:
        self.angles = self.scale = None
        if self.R.uniform() < self.prob_rotate:
            self.angles = [
                float(self.R.uniform(lo, hi)) if self.R.uniform() < self.prob_rotate_per_axis else 0.0
                for lo, hi in self.rotate_range
            ]
        if self.R.uniform() < self.prob_scale:
            self.scale = nnunet_uniform(self.R, *self.scale_range)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        if self.angles is None and self.scale is None:
            return d
        for key, mode in self.key_iterator(d, self.mode):
            dims = d[key].ndim - 1
            if (dims, len(self.rotate_range)) not in ((2, 1), (3, 3)):
                raise ValueError(
                    f"rotate_range has {len(self.rotate_range)} entries but {key!r} has {dims} spatial dims; "
                    "give 1 entry for 2D and 3 for 3D."
                )
            affine = Affine(
                rotate_params=self.angles or [0.0] * len(self.rotate_range),
                scale_params=[self.scale or 1.0] * dims,
                padding_mode=self.padding_mode,
                image_only=True,
            )
            d[key] = affine(d[key], mode=mode)
        return d


class RandPerChanneld(Randomizable, MapTransform):
    """Apply an array transform to each channel on its own: with ``prob`` per sample, then with
    ``prob_per_channel`` per channel, each channel drawing its own random parameters (nnU-Net's
    ``p_per_sample`` / ``p_per_channel`` / ``per_channel=True``, e.g. its blur and low-resolution simulation).

    Args:
        keys: keys of the images.
        transform: the array transform, applied to one (1, *spatial) channel at a time; give it ``prob=1.0``
            if it is a MONAI random transform (the probabilities are this wrapper's).
        prob: probability per sample.
        prob_per_channel: probability per channel once the sample is chosen.
    """

    def __init__(
        self,
        keys: KeysCollection,
        transform: Callable[[torch.Tensor], torch.Tensor],
        prob: float = 1.0,
        prob_per_channel: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not callable(transform):
            raise ValueError(f"transform must be callable, got {type(transform).__name__}.")
        self.transform = transform
        self.prob = _check_prob("prob", prob)
        self.prob_per_channel = _check_prob("prob_per_channel", prob_per_channel)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.R.uniform() >= self.prob:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            out = torch.as_tensor(img).clone()
            if isinstance(out, MetaTensor):
                out = out.as_tensor()
            for c in range(out.shape[0]):
                if self.R.uniform() < self.prob_per_channel:
                    piece = self.transform(out[c : c + 1])
                    out[c : c + 1] = piece.as_tensor() if isinstance(piece, MetaTensor) else torch.as_tensor(piece)
            d[key] = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations) if isinstance(
                img, MetaTensor
            ) else out
        return d


class RandGamma(RandAdjustContrast):
    """``monai.transforms.RandAdjustContrast`` with nnU-Net's draw of gamma (:func:`nnunet_uniform`: below and
    above 1 equally likely, where MONAI draws uniformly over the range). Same arguments."""

    def randomize(self, data: Any = None) -> None:
        RandomizableTransform.randomize(self, None)
        if self._do_transform:
            self.gamma_value = nnunet_uniform(self.R, *self.gamma)


class RandMirrord(Randomizable, MapTransform):
    """Flip along each spatial axis independently with ``prob`` (nnU-Net's ``MirrorTransform``, 0.5 per axis);
    ``spatial_axes`` ``None`` means every spatial axis of the data, so one entry serves 2D and 3D configs
    (``monai.transforms.RandFlipd`` flips its axes together, ``RandAxisFlipd`` only one).

    Args:
        keys: keys to flip together (image and label).
        prob: probability per axis.
        spatial_axes: 0-based spatial axes, or ``None`` for all.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        spatial_axes: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.prob = _check_prob("prob", prob)
        self.spatial_axes = None if spatial_axes is None else [int(a) for a in spatial_axes]
        if self.spatial_axes is not None and any(a < 0 for a in self.spatial_axes):
            raise ValueError(f"spatial_axes are 0-based spatial axes (>= 0), got {spatial_axes}.")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        dims = d[keys[0]].ndim - 1
        axes = list(range(dims)) if self.spatial_axes is None else self.spatial_axes
        if any(a >= dims for a in axes):
            raise ValueError(f"spatial_axes {axes} exceed the {dims} spatial axes of the data.")
        flip = [a for a in axes if self.R.uniform() < self.prob]
        if flip:
            op = Flip(spatial_axis=flip)
            for key in keys:
                d[key] = op(d[key])
        return d
