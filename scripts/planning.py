# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""nnU-Net-style self-configuration for MambaClinix: dataset fingerprint, network topology and experiment plan.

The three steps, as in nnU-Net v2 (`Isensee et al., Nature Methods 2021 <https://doi.org/10.1038/s41592-020-01008-z>`_)
and Sec. 2.4 / Table 2 of `MambaClinix <https://arxiv.org/abs/2409.12533>`_:

1. :func:`extract_fingerprint` runs MONAI's :class:`~monai.apps.auto3dseg.DataAnalyzer` on the "training" list of an
   MSD-style datalist and condenses its per-case statistics (spacings, shapes, per-channel foreground intensities,
   labels and class frequencies).
2. :func:`plan_topology` derives pooling per axis, strides, kernel sizes and the HGCN / Mamba stage layout (Eq. 11)
   from a target spacing and a patch size.
3. :func:`plan_experiment` picks the target spacing, intensity normalisation, patch size and batch size within a
   memory budget, and returns the top-level keys that ``configs/plan.yaml`` overrides in ``configs/train.yaml``.

Axes are in the order MONAI gives after ``Orientationd(axcodes="RAS")`` (DataAnalyzer reorients every case to RAS),
so a training config must orient to RAS before resampling to ``pixdim``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import numpy as np

__all__ = [
    "ANISOTROPY_THRESHOLD",
    "ACTIVATIONS_PER_FEATURE_VOXEL",
    "BYTES_PER_ACTIVATION",
    "CPU_MEMORY_BUDGET_GB",
    "CPU_MAX_PATCH_VOXELS",
    "DEFAULT_GPU_MEMORY_GB",
    "check_datalist",
    "estimate_training_memory_gb",
    "extract_fingerprint",
    "plan_experiment",
    "region_grid",
    "plan_topology",
]

logger = logging.getLogger(__name__)

ANISOTROPY_THRESHOLD = 3.0
"""nnU-Net's anisotropy threshold: a median spacing this many times coarser than the others marks an anisotropic axis."""

MIN_BATCH_SIZE = 2
"""Smallest batch size (Table 2 uses 2 for every dataset)."""

MAX_DATASET_COVERED = 0.05
"""A batch may cover at most this fraction of the (resampled) training voxels (nnU-Net's overfitting guard)."""

DEFAULT_GPU_MEMORY_GB = 24.0
"""Default GPU budget: the authors trained on NVIDIA RTX 4090 cards (24 GB)."""

CPU_MEMORY_BUDGET_GB = 1.5
"""RAM budget of one training step (batch 2) for the CPU demo."""

CPU_MAX_PATCH_VOXELS = 64**3
"""Largest patch (voxels) planned with ``cpu=True``; larger patches make a CPU training step take far too long."""

ACTIVATIONS_PER_FEATURE_VOXEL = {"hgcn": 40.0, "mamba": 80.0}
"""Tensor elements kept for the backward pass per feature-map element ``C_s * V_s`` of a resolution level ``s``.

Counted on the MambaClinix layout (docs: shared notes): the encoder residual block keeps ~8 maps of width ``C``
(two convs, their norms / activations, the skip projection and the sum); an HGCN block ~10 (1x1 stem, LayerNorm,
proj_in at 2 x C/2, depth-wise conv, the recursive sums, layer scale, two output convs); the decoder level ~22
(upsample + 1x1 conv, a residual block on the skip, the concatenation at 2C, a 2C -> C residual block, the head).
A Mamba level replaces the HGCN block by LayerNorm, in_proj (4C), causal conv + SiLU (2C + 2C), delta (2C), the
gate, out_proj and the linear layer (~20C) plus the selective-scan states kept for backward (``d_inner * d_state
= 32C``). These are rough counts: the lead calibrates them by the peak memory of one CPU training step.
"""

BYTES_PER_ACTIVATION = {"cpu": 4.8, "gpu": 2.75}
"""Bytes per kept element, allocator slack included.

- ``cpu``: float32 (4 bytes) x 1.2, measured: peak RSS increase of one training step (MambaClinix, Adam, batch 2,
  4 -> 4 channels, deep-supervised CE) on this 2-core machine was 0.63 / 1.46 / 1.69 / 1.03 GB for patches
  32^3, 40x56x40, 48^3 (features capped at 64) and 32x48x40 (features 32..256), against 0.45 / 1.18 / 1.44 / 1.05 GB
  estimated with 4.0 bytes.
- ``gpu``: mixed float16 (AMP conv outputs) / float32 (norms, Mamba) storage, calibrated so that the BraTS fingerprint
  (1 mm, median cropped shape ~138x169x138, 4 channels) gets Table 2's 128^3 patch with batch 2 at 24 GB (the
  authors' RTX 4090), the next larger candidate (128x160x128) not fitting.
"""

PARAMS_PER_KERNEL_CHANNEL_SQ = 6.2
"""Parameters ~= this x sum over stages of ``prod(kernel_s) * C_s**2``: 48.88 M parameters for the reference network
(features 32..320, kernel 3, 6 stages: sum 27 * C_s**2 = 7.88 M)."""

BYTES_PER_PARAM = 16.0
"""float32 weight + gradient + two Adam moments."""

FIXED_OVERHEAD_GB = {"cpu": 0.5, "gpu": 1.0}
"""Overhead independent of the patch: torch / MONAI runtime (0.5 GB RSS measured on CPU before the first step), the
CUDA context and cuDNN workspaces on GPU."""

_MAX_FEATURES = {2: 512, 3: 320}
_MIN_REGION_EDGE = 4
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".mgz", ".mgh")


# --------------------------------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------------------------------
def _as_path_list(item: str | Sequence[str], dataset_dir: str) -> list[str]:
    files = [item] if isinstance(item, str) else list(item)
    return [f if os.path.isabs(f) else os.path.join(dataset_dir, f) for f in files]


def _read_header(path: str) -> tuple[tuple[int, ...], int]:
    """Spatial shape and channel count of an image file, reading only the header where the format allows it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image or label file not found: '{path}'. Check the datalist and --dataset_dir.")
    if path.lower().endswith(_NIFTI_SUFFIXES):
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(path).shape)
        spatial = shape[:3] if len(shape) >= 3 else shape
        return spatial, int(np.prod(shape[3:])) if len(shape) > 3 else 1
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True, ensure_channel_first=True)(path)
    return tuple(int(s) for s in img.shape[1:]), int(img.shape[0])


def check_datalist(datalist: Mapping[str, Any], dataset_dir: str, key: str = "training") -> list[dict]:
    """Check the cases of ``datalist[key]`` before analysing them, reading file headers only.

    Args:
        datalist: MSD-style datalist, ``{"training": [{"image": ..., "label": ...}, ...], ...}``; ``image`` is a path
            or a list of per-channel paths, relative to ``dataset_dir`` unless absolute.
        dataset_dir: root directory of the relative paths.
        key: the list to check.

    Returns:
        the cases with absolute paths.

    Raises:
        ValueError: empty list, a case without image or label, inconsistent channel counts, or a label whose spatial
            shape differs from its image.
        FileNotFoundError: a file that does not exist.
    """
    cases = datalist.get(key) if isinstance(datalist, Mapping) else None
    if not cases:
        raise ValueError(f"The datalist has no '{key}' cases; add a non-empty '{key}' list of image/label pairs.")
    checked, first_channels = [], None
    for i, case in enumerate(cases):
        if not isinstance(case, Mapping) or "image" not in case or "label" not in case:
            raise ValueError(f"Case {i} of '{key}' needs both an 'image' and a 'label' entry, got {case!r}.")
        images = _as_path_list(case["image"], dataset_dir)
        label = _as_path_list(case["label"], dataset_dir)[0]
        shapes, channels = [], 0
        for f in images:
            shape, ch = _read_header(f)
            shapes.append(shape)
            channels += ch
        if len(set(shapes)) > 1:
            raise ValueError(f"The channel files of case {i} have different shapes {shapes}: {images}.")
        if first_channels is None:
            first_channels = (channels, images[0])
        elif channels != first_channels[0]:
            raise ValueError(
                f"Inconsistent channel counts: '{images[0]}' has {channels} channel(s) but '{first_channels[1]}' has "
                f"{first_channels[0]}; every case needs the same channels in the same order."
            )
        label_shape, _ = _read_header(label)
        if tuple(label_shape) != tuple(shapes[0]):
            raise ValueError(
                f"Label '{label}' has shape {list(label_shape)} but its image '{images[0]}' has {list(shapes[0])}; "
                "labels must be on the image grid."
            )
        checked.append({"image": images if len(images) > 1 else images[0], "label": label})
    return checked


def _modalities(datalist: Mapping[str, Any], channels: int, modality: str | Sequence[str] | None) -> list[str]:
    if modality is not None:
        mods = [m.strip() for m in modality.split(",")] if isinstance(modality, str) else [str(m) for m in modality]
    elif isinstance(datalist.get("modality"), Mapping):
        table = datalist["modality"]
        mods = [str(table.get(str(c), table.get(c, "unknown"))) for c in range(channels)]
    else:
        mods = ["unknown"]
    if len(mods) == 1:
        mods = mods * channels
    if len(mods) != channels:
        raise ValueError(f"Got {len(mods)} modalities {mods} for {channels} image channels; give one or one per channel.")
    return mods


def extract_fingerprint(
    datalist: str | Mapping[str, Any],
    dataset_dir: str,
    modality: str | Sequence[str] | None = None,
    work_dir: str | None = None,
    max_cases: int | None = None,
) -> dict[str, Any]:
    """Dataset fingerprint from MONAI's DataAnalyzer (CPU, no worker processes) on the "training" list.

    Args:
        datalist: MSD-style datalist dict or path to its JSON file.
        dataset_dir: root of the relative paths in the datalist.
        modality: "CT", "MR", ..., one for all channels or one per channel (a list or a comma-separated string);
            defaults to the datalist's "modality" table (``{"0": "CT"}`` as in MSD), else "unknown".
        work_dir: where DataAnalyzer writes ``datastats.yaml`` (and ``datastats_by_case.yaml``); a temporary
            directory, removed afterwards, when None.
        max_cases: analyse only this many evenly spaced cases (all headers are still checked). DataAnalyzer needs
            about 15 s per 4 x 240 x 240 x 155 case on 2 busy CPU cores, so a full BraTS (1251 cases) takes hours.

    Returns:
        dict with ``n_cases`` (all training cases), ``n_cases_analyzed``, ``spatial_dims``, ``channels``, ``modalities``, per-case ``spacings`` and ``shapes``,
        ``median_spacing``, ``median_shape``, ``foreground_intensity`` (per channel: mean, std, percentile_00_5,
        percentile_99_5), ``labels``, ``class_frequency`` (mean fraction of voxels per label) and ``target_ratio``
        (per foreground label: mean / median / min over cases of label voxels / all voxels, the T/W ratio).
    """
    if isinstance(datalist, str):
        import json

        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"Datalist file not found: '{datalist}'.")
        with open(datalist) as f:
            datalist = json.load(f)
    cases = check_datalist(datalist, dataset_dir)
    n_total = len(cases)
    if max_cases is not None:
        if max_cases < 1:
            raise ValueError(f"max_cases must be None or >= 1, got {max_cases}.")
        if max_cases < n_total:
            cases = [cases[int(i)] for i in np.linspace(0, n_total - 1, max_cases).round()]

    from monai.apps.auto3dseg import DataAnalyzer

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = work_dir or tmp
        os.makedirs(out_dir, exist_ok=True)
        analyzer = DataAnalyzer(
            {"training": cases},
            dataroot="",
            output_path=os.path.join(out_dir, "datastats.yaml"),
            average=False,
            device="cpu",
            worker=0,
        )
        stats = analyzer.get_all_case_stats(key="training")
    by_case = _plain_keys(stats)["stats_by_cases"]
    if len(by_case) != len(cases):
        done = {c["image_filepath"] for c in by_case}
        failed = [c["image"] for c in cases if (c["image"][0] if isinstance(c["image"], list) else c["image"]) not in done]
        raise ValueError(f"DataAnalyzer could not process {len(cases) - len(by_case)} case(s): {failed}.")
    fingerprint = _summarise(by_case, datalist, modality)
    fingerprint["n_cases_analyzed"], fingerprint["n_cases"] = fingerprint["n_cases"], n_total
    return fingerprint


def _plain_keys(obj: Any) -> Any:
    """DataAnalyzer keys are StrEnum members (hashed by name); turn them into their plain string values."""
    if isinstance(obj, Mapping):
        return {(k.value if isinstance(k, Enum) else k): _plain_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_keys(v) for v in obj]
    return obj


def _summarise(by_case: list[dict], datalist: Mapping[str, Any], modality: str | Sequence[str] | None) -> dict:
    spacings = [[float(s) for s in c["image_stats"]["spacing"]] for c in by_case]
    shapes = [[int(s) for s in c["image_stats"]["shape"][0]] for c in by_case]
    channels = sorted({int(c["image_stats"]["channels"]) for c in by_case})
    if len(channels) != 1:
        raise ValueError(f"Inconsistent channel counts {channels} across cases; every case needs the same channels.")
    n_ch = channels[0]
    labels = sorted({int(v) for c in by_case for v in c["label_stats"]["labels"]})
    # per case: fraction of voxels of each label (DataAnalyzer's "foreground_percentage" is a fraction in [0, 1])
    per_case = [
        {int(v): float(lab["foreground_percentage"]) for v, lab in zip(c["label_stats"]["labels"], c["label_stats"]["label"])}
        for c in by_case
    ]
    fractions_arr = np.asarray([[f.get(v, 0.0) for v in labels] for f in per_case], dtype=np.float64)
    fg_voxels = [(1.0 - f.get(0, 0.0)) * float(np.prod(s)) for f, s in zip(per_case, shapes)]
    # per-channel foreground intensity: pooled mean / std over cases (weights = foreground voxels); percentiles are
    # per-case values averaged over cases (DataAnalyzer reports percentiles per case, not over the pooled voxels)
    fg_stats = []
    for ch in range(n_ch):
        rows = [(n, c["image_foreground_stats"]["intensity"][ch]) for n, c in zip(fg_voxels, by_case) if n > 0]
        if not rows:
            fg_stats.append({"mean": 0.0, "std": 1.0, "percentile_00_5": 0.0, "percentile_99_5": 0.0})
            continue
        w = np.array([n for n, _ in rows])
        means = np.array([float(r["mean"]) for _, r in rows])
        stds = np.array([float(r["stdev"]) for _, r in rows])
        mean = float(np.sum(w * means) / w.sum())
        std = float(np.sqrt(np.sum(w * (stds**2 + (means - mean) ** 2)) / w.sum()))
        fg_stats.append({
            "mean": mean,
            "std": std,
            "percentile_00_5": float(np.mean([float(r["percentile_00_5"]) for _, r in rows])),
            "percentile_99_5": float(np.mean([float(r["percentile_99_5"]) for _, r in rows])),
        })
    target_ratio = {
        v: {"mean": float(fractions_arr[:, i].mean()), "median": float(np.median(fractions_arr[:, i])), "min": float(fractions_arr[:, i].min())}
        for i, v in enumerate(labels) if v != 0
    }
    n_label_classes = len(datalist["labels"]) if isinstance(datalist.get("labels"), Mapping) else 0
    return {
        "n_cases": len(by_case),
        "spatial_dims": len(shapes[0]),
        "channels": n_ch,
        "modalities": _modalities(datalist, n_ch, modality),
        "spacings": spacings,
        "shapes": shapes,
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "median_shape": [float(v) for v in np.median(shapes, axis=0)],
        "foreground_intensity": fg_stats,
        "labels": labels,
        "num_classes": max(len(labels), n_label_classes),
        "class_frequency": {v: float(fractions_arr[:, i].mean()) for i, v in enumerate(labels)},
        "target_ratio": target_ratio,
    }


# --------------------------------------------------------------------------------------------------------------------
# topology
# --------------------------------------------------------------------------------------------------------------------
def plan_topology(
    spacing: Sequence[float],
    patch_size: Sequence[int],
    min_feature_map: int = 4,
    max_pool_per_axis: int = 6,
    max_num_stages: int | None = None,
    spacing_ratio: float = 2.0,
    hgcn_order_range: tuple[int, int] = (2, 6),
) -> dict[str, Any]:
    """Pooling, strides, kernels and HGCN / Mamba stage layout from a spacing and a patch size (nnU-Net's rule).

    Every stage halves, together, all axes that may still be pooled. An axis may be pooled while

    - its feature map is at least ``2 * min_feature_map`` voxels, so that it stays ``>= min_feature_map`` after
      pooling (if it is the only axis left to pool, it needs ``3 * min_feature_map`` voxels: nnU-Net does not build a
      stage that pools a single, already small axis);
    - its current spacing is below ``spacing_ratio`` x the finest current spacing among the axes large enough to pool
      (anisotropic axes wait until the fine axes have caught up);
    - it has been pooled fewer than ``max_pool_per_axis`` times, and the network has fewer than ``max_num_stages``.

    The kernel of an axis is 1 at the stages where its spacing is still ``>= spacing_ratio`` x the finest spacing of
    that stage, 3 from the first stage where it is not. The patch is padded up to a multiple of ``2**pools`` per axis.
    Eq. 11 of MambaClinix: the first ``ceil(n/2)`` stages get HGCN blocks of order ``s + 2`` (clipped to
    ``hgcn_order_range``), the rest Mamba blocks.

    Args:
        spacing: target spacing per axis (2 or 3 axes).
        patch_size: patch size in voxels per axis.
        min_feature_map: smallest bottleneck edge length.
        max_pool_per_axis: most poolings of one axis.
        max_num_stages: most stages (None: no limit).
        spacing_ratio: spacing factor that makes an axis too coarse to pool (and to convolve with 3).
        hgcn_order_range: (min, max) HGCN interaction order.

    Returns:
        dict with ``pool_per_axis``, ``strides`` (per stage, per axis; first stage all 1), ``kernel_sizes``,
        ``num_stages``, ``patch_size`` (padded), ``divisor`` (total stride per axis), ``block_types``,
        ``hgcn_orders`` and ``stop_reasons`` (why each axis stopped pooling, in words).
    """
    dims = len(spacing)
    if dims not in (2, 3) or len(patch_size) != dims:
        raise ValueError(f"spacing {list(spacing)} and patch_size {list(patch_size)} need the same length, 2 or 3.")
    if any(float(s) <= 0 for s in spacing) or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"spacing {list(spacing)} and patch_size {list(patch_size)} must be positive.")
    if min_feature_map < 1 or max_pool_per_axis < 0 or spacing_ratio <= 1:
        raise ValueError("min_feature_map must be >= 1, max_pool_per_axis >= 0 and spacing_ratio > 1.")
    if max_num_stages is not None and max_num_stages < 1:
        raise ValueError(f"max_num_stages must be None or >= 1, got {max_num_stages}.")
    lo, hi = int(hgcn_order_range[0]), int(hgcn_order_range[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"hgcn_order_range must be (min, max) with 1 <= min <= max, got {hgcn_order_range}.")

    cur_sp = [float(s) for s in spacing]
    cur_sz = [int(p) for p in patch_size]
    pools = [0] * dims
    strides = [[1] * dims]
    stage_spacings = [list(cur_sp)]
    stop_all = None
    while True:
        if max_num_stages is not None and len(strides) >= max_num_stages:
            stop_all = f"the network reached max_num_stages={max_num_stages}"
            break
        big = [a for a in range(dims) if cur_sz[a] >= 2 * min_feature_map]
        if not big:
            break
        finest = min(cur_sp[a] for a in big)
        valid = [a for a in big if cur_sp[a] / finest < spacing_ratio and pools[a] < max_pool_per_axis]
        if not valid or (len(valid) == 1 and cur_sz[valid[0]] < 3 * min_feature_map):
            break
        strides.append([2 if a in valid else 1 for a in range(dims)])
        for a in valid:
            pools[a] += 1
            cur_sp[a] *= 2
            cur_sz[a] = math.ceil(cur_sz[a] / 2)
        stage_spacings.append(list(cur_sp))

    reasons = []
    big = [a for a in range(dims) if cur_sz[a] >= 2 * min_feature_map]
    finest = min(cur_sp[a] for a in big) if big else min(cur_sp)
    for a in range(dims):
        head = f"axis {a}: {pools[a]} pool(s), bottleneck {cur_sz[a]} voxel(s) at spacing {cur_sp[a]:.3g}; stops because "
        if pools[a] >= max_pool_per_axis:
            why = f"it reached max_pool_per_axis={max_pool_per_axis}"
        elif cur_sz[a] < 2 * min_feature_map:
            why = f"it has fewer than 2 x min_feature_map = {2 * min_feature_map} voxels"
        elif stop_all is not None:
            why = stop_all
        elif cur_sp[a] / finest >= spacing_ratio:
            why = f"its spacing is >= {spacing_ratio:g} x the finest spacing {finest:.3g} of the poolable axes"
        else:
            why = f"it would be the only axis left to pool and has < 3 x min_feature_map={3 * min_feature_map} voxels"
        reasons.append(head + why)

    kernels, sticky = [], [False] * dims
    for sp in stage_spacings:
        fine = min(sp)
        sticky = [sticky[a] or sp[a] / fine < spacing_ratio for a in range(dims)]
        kernels.append([3 if sticky[a] else 1 for a in range(dims)])

    divisor = [2**p for p in pools]
    padded = [int(math.ceil(int(p) / d) * d) for p, d in zip(patch_size, divisor)]
    n = len(strides)
    n_hgcn = math.ceil(n / 2)
    return {
        "pool_per_axis": pools,
        "strides": strides,
        "kernel_sizes": kernels,
        "num_stages": n,
        "patch_size": padded,
        "divisor": divisor,
        "block_types": ["hgcn"] * n_hgcn + ["mamba"] * (n - n_hgcn),
        "hgcn_orders": [min(max(s + 2, lo), hi) for s in range(n_hgcn)],
        "stop_reasons": reasons,
    }


# --------------------------------------------------------------------------------------------------------------------
# memory estimate
# --------------------------------------------------------------------------------------------------------------------
def _features(num_stages: int, spatial_dims: int, base_features: int, max_features: int | None) -> list[int]:
    cap = _MAX_FEATURES[spatial_dims] if max_features is None else min(int(max_features), _MAX_FEATURES[spatial_dims])
    return [int(min(cap, base_features * 2**s)) for s in range(num_stages)]


def estimate_training_memory_gb(
    patch_size: Sequence[int],
    batch_size: int,
    in_channels: int,
    out_channels: int,
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    block_types: Sequence[str],
    device: str = "gpu",
) -> dict[str, float]:
    """Rough peak memory (GB) of one training step (forward, backward, Adam update) of MambaClinix.

    ``activations = batch * BYTES_PER_ACTIVATION[device] * (sum_s ACTIVATIONS_PER_FEATURE_VOXEL[block_s] * C_s * V_s
    + (in_channels + 4 * out_channels) * V_0)``, with ``V_s`` the voxels of level ``s``; the last term is the input,
    logits, softmax and loss maps. ``parameters = BYTES_PER_PARAM * PARAMS_PER_KERNEL_CHANNEL_SQ * sum_s
    prod(kernel_s) * C_s**2``; ``fixed = FIXED_OVERHEAD_GB[device]``.

    Args:
        patch_size: patch in voxels.
        batch_size: batch size.
        in_channels: image channels.
        out_channels: classes incl. background.
        features: channels per stage.
        strides: per-stage, per-axis strides.
        kernel_sizes: per-stage, per-axis kernels.
        block_types: "hgcn" / "mamba" per stage.
        device: "gpu" (mixed precision) or "cpu" (float32).

    Returns:
        dict with ``total``, ``per_sample`` (activations of one sample), ``parameters`` and ``fixed``, in GB.
    """
    if device not in BYTES_PER_ACTIVATION:
        raise ValueError(f"device must be one of {sorted(BYTES_PER_ACTIVATION)}, got {device!r}.")
    size = [float(p) for p in patch_size]
    elements = (in_channels + 4 * out_channels) * float(np.prod(size))
    weighted_c2 = 0.0
    for c, st, k, bt in zip(features, strides, kernel_sizes, block_types):
        size = [math.ceil(s / t) for s, t in zip(size, st)]
        elements += ACTIVATIONS_PER_FEATURE_VOXEL[bt] * c * float(np.prod(size))
        weighted_c2 += float(np.prod(k)) * c * c
    per_sample = elements * BYTES_PER_ACTIVATION[device] / 1024**3
    params = BYTES_PER_PARAM * PARAMS_PER_KERNEL_CHANNEL_SQ * weighted_c2 / 1024**3
    fixed = FIXED_OVERHEAD_GB[device]
    return {"total": batch_size * per_sample + params + fixed, "per_sample": per_sample, "parameters": params, "fixed": fixed}


# --------------------------------------------------------------------------------------------------------------------
# experiment plan
# --------------------------------------------------------------------------------------------------------------------
def _target_spacing(fp: Mapping[str, Any], reasons: list[str]) -> list[float]:
    spacings = np.asarray(fp["spacings"], dtype=np.float64)
    target = np.median(spacings, axis=0)
    sizes = np.median(np.asarray(fp["shapes"], dtype=np.float64), axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[a] for a in others)
    aniso_voxels = sizes[worst] * ANISOTROPY_THRESHOLD < min(sizes[a] for a in others)
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        new = max(p10, max(target[a] for a in others) + 1e-5)
        reasons.append(
            f"target spacing: median {target.round(4).tolist()}; axis {worst} is anisotropic (spacing > "
            f"{ANISOTROPY_THRESHOLD:g} x the others and {ANISOTROPY_THRESHOLD:g} x fewer voxels), so it uses the 10th "
            f"percentile {new:.4g} of its spacings instead of the median"
        )
        target[worst] = new
    else:
        reasons.append(f"target spacing: median spacing {target.round(4).tolist()} (no anisotropic axis)")
    return [float(t) for t in target]


def _next_smaller(spacing: Sequence[float], patch: list[int], axis: int, floor: int, topo_kw: dict) -> list[int] | None:
    """Largest patch with ``patch[axis]`` reduced, not below ``floor``, that its own topology divides exactly."""
    for v in range(patch[axis] - 1, floor - 1, -1):
        cand = list(patch)
        cand[axis] = v
        if plan_topology(spacing, cand, **topo_kw)["patch_size"] == cand:
            return cand
    return None


def region_grid(patch_size: Sequence[int]) -> list[int]:
    """Region grid of the RS loss for a patch, chosen as the authors' trainer does: its fixed grid
    ``AUTHORS_REGION_GRID = (8, 8, 14)`` cells per array axis whatever the dataset and patch (their patches range
    from (40, 224, 192) to (128, 128, 128)); 2D patches take its last two entries, (8, 14), the in-plane pair.
    Only where a patch is too small for it (an axis shorter than 4 voxels per cell) is an axis reduced, to
    ``max(1, patch // 4)`` cells. Every patch of the paper's Table 2 and the demo's (32, 64, 56) get (8, 8, 14).

    Args:
        patch_size: the patch, 2 or 3 axes.
    """
    from .losses import AUTHORS_REGION_GRID  # torch only when planning, not when reading this module

    patch = [int(p) for p in patch_size]
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise ValueError(f"patch_size must have 2 or 3 positive entries, got {list(patch_size)}.")
    grid = AUTHORS_REGION_GRID[-len(patch):]
    return [max(1, min(r, p // _MIN_REGION_EDGE)) for r, p in zip(grid, patch)]


def plan_experiment(
    fingerprint: Mapping[str, Any],
    gpu_memory_gb: float | None = None,
    cpu: bool = False,
    max_features: int | None = None,
    base_features: int = 32,
    spatial_dims: int | None = None,
    min_feature_map: int = 4,
    max_pool_per_axis: int = 6,
    min_batch_size: int = MIN_BATCH_SIZE,
    max_patch_voxels: int | None = None,
    target_spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """nnU-Net 3d_fullres-like experiment plan for MambaClinix.

    Target spacing: the median spacing (an anisotropic axis uses the 10th percentile of its spacings, nnU-Net's rule).
    Patch: nnU-Net's initial patch (the aspect ratio of ``1 / spacing`` scaled to 256**3 voxels in 3D, 2048**2 in 2D)
    clipped to the median shape at target spacing, then shrunk - always along the axis that is largest relative to
    the median shape, to the next size its topology divides - until :func:`estimate_training_memory_gb` of a batch
    of ``min_batch_size`` fits the budget. Batch: grown while the budget allows and the batch covers at most 5 % of
    the training voxels (never below ``min_batch_size``; kept at ``min_batch_size`` on CPU, where time, not memory,
    limits it).

    Args:
        fingerprint: output of :func:`extract_fingerprint` (or a dict with the same keys).
        gpu_memory_gb: GPU memory budget in GB (default :data:`DEFAULT_GPU_MEMORY_GB` unless ``cpu``).
        cpu: plan the CPU demo: :data:`CPU_MEMORY_BUDGET_GB` of RAM, float32, patches of at most
            :data:`CPU_MAX_PATCH_VOXELS` voxels.
        max_features: cap of the channels per stage (320 in 3D / 512 in 2D at most).
        base_features: channels of the first stage (doubled every stage).
        spatial_dims: 2 plans in-plane slices of 3D data (drops the axis with the coarsest spacing); default the
            dimensionality of the data.
        min_feature_map: smallest bottleneck edge.
        max_pool_per_axis: most poolings per axis.
        min_batch_size: smallest batch size.
        max_patch_voxels: optional cap of the patch volume.
        target_spacing: use this spacing instead of the planned one (e.g. a coarser grid for a CPU demo).

    Returns:
        the top-level config keys (spatial_dims, in_channels, out_channels, pixdim, patch_size, batch_size, features,
        strides, kernel_sizes, block_types, hgcn_orders, num_regions, intensity_schemes, intensity_stats,
        ds_weights) and ``plan_info`` (fingerprint summary, memory estimate and the reasons in words).

    Raises:
        ValueError: conflicting budgets, or a budget too small for the minimum network.
    """
    if cpu and gpu_memory_gb is not None:
        raise ValueError("Give either gpu_memory_gb or cpu=True, not both.")
    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        raise ValueError(f"gpu_memory_gb must be positive, got {gpu_memory_gb}.")
    if base_features < 1 or (max_features is not None and max_features < 1) or min_batch_size < 1:
        raise ValueError("base_features, max_features and min_batch_size must be >= 1.")
    device = "cpu" if cpu else "gpu"
    budget = CPU_MEMORY_BUDGET_GB if cpu else float(gpu_memory_gb if gpu_memory_gb is not None else DEFAULT_GPU_MEMORY_GB)
    if cpu:
        max_patch_voxels = min(max_patch_voxels or CPU_MAX_PATCH_VOXELS, CPU_MAX_PATCH_VOXELS)
    reasons: list[str] = []

    data_dims = len(fingerprint["median_spacing"])
    if target_spacing is not None:
        spacing = [float(v) for v in target_spacing]
        if len(spacing) != data_dims or any(v <= 0 for v in spacing):
            raise ValueError(f"target_spacing needs {data_dims} positive values, got {list(target_spacing)}.")
        reasons.append(f"target spacing: {spacing} as requested (the data's median spacing is "
                       f"{[round(float(v), 3) for v in fingerprint['median_spacing']]})")
    else:
        spacing = _target_spacing(fingerprint, reasons)
    shapes = np.asarray(fingerprint["shapes"], dtype=np.float64)
    new_shapes = np.round(shapes * np.asarray(fingerprint["spacings"], dtype=np.float64) / np.asarray(spacing))
    median_shape = np.median(new_shapes, axis=0)
    n_voxels_dataset = float(np.prod(median_shape)) * int(fingerprint["n_cases"])
    dims = data_dims if spatial_dims is None else int(spatial_dims)
    slice_axis = None
    if dims not in (2, 3) or dims > data_dims:
        raise ValueError(f"spatial_dims must be 2 or 3 and at most the data's {data_dims}, got {spatial_dims}.")
    if dims < data_dims:
        slice_axis = int(len(spacing) - 1 - int(np.argmax(spacing[::-1])))
        reasons.append(f"2D plan on 3D data: slices along axis {slice_axis} (the coarsest spacing)")
        keep = [a for a in range(data_dims) if a != slice_axis]
        spacing = [spacing[a] for a in keep]
        median_shape = median_shape[keep]
    median_shape = np.maximum(median_shape, 1)

    tmp = 1.0 / np.asarray(spacing)
    ref = 256.0**3 if dims == 3 else 2048.0**2
    initial = [int(round(v)) for v in tmp * (ref / np.prod(tmp)) ** (1.0 / dims)]
    initial = [max(1, min(i, int(m))) for i, m in zip(initial, median_shape)]
    reasons.append(
        f"median shape at target spacing {median_shape.astype(int).tolist()}; initial patch {initial} "
        f"(aspect ratio of 1/spacing at {'256^3' if dims == 3 else '2048^2'} voxels, clipped to the median shape)"
    )
    topo_kw = {"min_feature_map": min_feature_map, "max_pool_per_axis": max_pool_per_axis}
    patch = list(initial)
    for _ in range(8):  # padding can change the topology once or twice; settle on a self-consistent patch
        padded = plan_topology(spacing, patch, **topo_kw)["patch_size"]
        if padded == patch:
            break
        patch = padded
    floors = [min(2 * min_feature_map, p) for p in patch]

    in_channels = int(fingerprint["channels"])
    out_channels = int(fingerprint.get("num_classes", len(fingerprint["labels"])))

    def _estimate(p: list[int], bs: int) -> tuple[dict, dict, list[int]]:
        t = plan_topology(spacing, p, **topo_kw)
        f = _features(t["num_stages"], dims, base_features, max_features)
        e = estimate_training_memory_gb(p, bs, in_channels, out_channels, f, t["strides"], t["kernel_sizes"], t["block_types"], device)
        return t, e, f

    shrunk, capped = 0, False
    while True:
        topo, est, features = _estimate(patch, min_batch_size)
        too_big = max_patch_voxels is not None and float(np.prod(patch)) > max_patch_voxels
        if est["total"] <= budget and not too_big:
            break
        capped = capped or (too_big and est["total"] <= budget)
        order = np.argsort([-p / m for p, m in zip(patch, median_shape)], kind="stable")
        for axis in order:
            smaller = _next_smaller(spacing, patch, int(axis), floors[int(axis)], topo_kw)
            if smaller is not None:
                patch = smaller
                shrunk += 1
                break
        else:
            raise ValueError(
                f"The memory budget of {budget:g} GB is too small for the minimum network: patch {patch} with batch "
                f"{min_batch_size} needs about {est['total']:.2f} GB. Raise --gpu_memory_gb, or lower --max_features "
                "/ --base_features."
            )
    if shrunk:
        why = f"it has at most {max_patch_voxels} voxels and " if capped else ""
        reasons.append(
            f"patch shrunk {shrunk} time(s) to {patch} so that {why}the estimated memory of one training step with "
            f"batch {min_batch_size} ({est['total']:.2f} GB) fits {budget:g} GB ({device}); each step shrank the axis "
            "largest relative to the median shape to the next size its own topology divides"
        )
    else:
        reasons.append(
            f"patch {patch}: the initial patch fits {budget:g} GB ({device}) with batch {min_batch_size} "
            f"({est['total']:.2f} GB estimated)"
        )
    reasons.extend(topo["stop_reasons"])

    fixed_gb = est["parameters"] + est["fixed"]
    bs_memory = int((budget - fixed_gb) // est["per_sample"]) if est["per_sample"] > 0 else min_batch_size
    bs_cover = int(round(n_voxels_dataset * MAX_DATASET_COVERED / float(np.prod(patch))))
    if cpu:
        batch_size = min_batch_size
        reasons.append(f"batch size {batch_size}: kept at the minimum on CPU (step time grows with the batch)")
    else:
        batch_size = max(min_batch_size, min(bs_memory, bs_cover))
        reasons.append(
            f"batch size {batch_size}: memory allows {bs_memory}, 5% of the training voxels allows {bs_cover}, "
            f"minimum {min_batch_size}"
        )
    est = estimate_training_memory_gb(
        patch, batch_size, in_channels, out_channels, features, topo["strides"], topo["kernel_sizes"], topo["block_types"], device
    )

    modalities = list(fingerprint.get("modalities") or ["unknown"] * in_channels)
    schemes, stats = [], []
    for m, fg in zip(modalities, fingerprint["foreground_intensity"]):
        if str(m).upper() == "CT":
            schemes.append("ct")
            stats.append([float(fg["percentile_00_5"]), float(fg["percentile_99_5"]), float(fg["mean"]), max(float(fg["std"]), 1e-8)])
        else:
            schemes.append("zscore")
            stats.append(None)
    reasons.append(
        "intensity: " + ", ".join(
            f"channel {c} ({m}) -> {s}" + (" (clip to the foreground 0.5/99.5 percentiles, z-score with the foreground mean/std)" if s == "ct" else " (per-image z-score)")
            for c, (m, s) in enumerate(zip(modalities, schemes))
        )
    )
    n_out = topo["num_stages"] - 1
    ds = [1.0 / 2**i for i in range(n_out)]
    if n_out > 1:
        ds[-1] = 0.0
    ds = [w / sum(ds) for w in ds] if n_out else []
    num_regions = region_grid(patch)

    plan = {
        "spatial_dims": dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "pixdim": [round(s, 6) for s in spacing],
        "patch_size": [int(p) for p in patch],
        "batch_size": int(batch_size),
        "features": features,
        "strides": topo["strides"],
        "kernel_sizes": topo["kernel_sizes"],
        "block_types": topo["block_types"],
        "hgcn_orders": topo["hgcn_orders"],
        "num_regions": num_regions,
        "intensity_schemes": schemes,
        "intensity_stats": stats,
        "ds_weights": [round(w, 6) for w in ds],
        "plan_info": {
            "device": device,
            "memory_budget_gb": budget,
            "estimated_memory_gb": round(est["total"], 3),
            "pool_per_axis": topo["pool_per_axis"],
            "num_stages": topo["num_stages"],
            "slice_axis": slice_axis,
            "median_shape_at_target_spacing": [int(v) for v in median_shape],
            "fingerprint": {
                "n_cases": int(fingerprint["n_cases"]),
                "modalities": modalities,
                "median_spacing": [float(v) for v in fingerprint["median_spacing"]],
                "median_shape": [float(v) for v in fingerprint["median_shape"]],
                "labels": [int(v) for v in fingerprint["labels"]],
                "class_frequency": {int(k): float(v) for k, v in fingerprint.get("class_frequency", {}).items()},
                "target_ratio": {int(k): dict(v) for k, v in fingerprint.get("target_ratio", {}).items()},
                "foreground_intensity": [dict(v) for v in fingerprint["foreground_intensity"]],
            },
            "reasons": reasons,
        },
    }
    return _to_builtin(plan)


def _to_builtin(obj: Any) -> Any:
    """Plain Python types (lists, ints, floats) for YAML."""
    if isinstance(obj, Mapping):
        return {(_to_builtin(k) if not isinstance(k, str) else k): _to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_to_builtin(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj
