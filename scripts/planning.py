# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""nnU-Net-style self-configuration for MambaClinix: dataset fingerprint, network topology and experiment plan.

The three steps, as in nnU-Net v2 (`Isensee et al., Nature Methods 2021 <https://doi.org/10.1038/s41592-020-01008-z>`_)
and Sec. 2.4 / Table 2 of `MambaClinix <https://arxiv.org/abs/2409.12533>`_:

1. :func:`extract_fingerprint` checks the "training" list of an MSD-style datalist
   (:func:`scripts.data.validate_datalist`), runs MONAI's :class:`~monai.apps.auto3dseg.DataAnalyzer` on it and
   condenses its per-case statistics (spacings, shapes, per-channel foreground intensities, labels and class
   frequencies).
2. :func:`plan_topology` derives pooling per axis, strides, kernel sizes and the HGCN / Mamba stage layout (Eq. 11,
   :mod:`scripts.architecture`) from a target spacing and a patch size.
3. :func:`plan_experiment` picks the target spacing, intensity normalisation, patch size and batch size within a
   memory budget and returns a :class:`Plan`: :meth:`Plan.to_config` gives the top-level keys that
   ``configs/plan.yaml`` overrides in ``configs/train.yaml`` and ``configs/inference.yaml``.

Axes are in the order MONAI gives after ``Orientationd(axcodes="RAS")`` (DataAnalyzer reorients every case to RAS),
so a training config must orient to RAS before resampling to ``pixdim``.

Importing this module does not import torch (numpy and the standard library only); the fingerprint imports MONAI
when it runs.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

from scripts.architecture import AUTHORS_REGION_GRID, BLOCK_TYPES, HGCN_ORDER_RANGE, default_block_types, default_hgcn_orders

__all__ = [
    "ANISOTROPY_THRESHOLD",
    "ACTIVATIONS_PER_FEATURE_VOXEL",
    "BYTES_PER_ACTIVATION",
    "CPU_MEMORY_BUDGET_GB",
    "CPU_MAX_PATCH_VOXELS",
    "DEFAULT_GPU_MEMORY_GB",
    "INTENSITY_SCHEMES",
    "NOT_SET",
    "PLAN_INFO_KEY",
    "PLAN_KEYS",
    "Plan",
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

Counted on the MambaClinix layout: the encoder residual block keeps ~8 maps of width ``C`` (two convs, their
norms / activations, the skip projection and the sum); an HGCN block ~10 (1x1 stem, LayerNorm, proj_in at
2 x C/2, depth-wise conv, the recursive sums, layer scale, two output convs); the decoder level ~22 (upsample +
1x1 conv, a residual block on the skip, the concatenation at 2C, a 2C -> C residual block, the head). A Mamba
level replaces the HGCN block by LayerNorm, in_proj (4C), causal conv + SiLU (2C + 2C), delta (2C), the gate,
out_proj and the linear layer (~20C) plus the selective-scan states kept for backward (``d_inner * d_state = 32C``).
Rough counts, scaled by :data:`BYTES_PER_ACTIVATION`.
"""

BYTES_PER_ACTIVATION = {"cpu": 4.8, "gpu": 2.75}
"""Bytes per kept element, allocator slack included.

- ``cpu``: float32 (4 bytes) x 1.2, fitted to the peak resident memory of one CPU training step (MambaClinix, Adam,
  batch 2, deep-supervised loss) for patches from 32^3 to 48^3.
- ``gpu``: mixed float16 (AMP conv outputs) / float32 (norms, Mamba) storage, chosen so that the BraTS fingerprint
  (1 mm, median cropped shape ~138x169x138, 4 channels) gets Table 2's 128^3 patch with batch 2 at 24 GB (the
  authors' RTX 4090), the next larger candidate (128x160x128) not fitting.
"""

PARAMS_PER_KERNEL_CHANNEL_SQ = 6.2
"""Parameters ~= this x sum over stages of ``prod(kernel_s) * C_s**2``, fitted to the parameter count of the
paper's 6-stage network (features 32..320, kernel 3)."""

BYTES_PER_PARAM = 16.0
"""float32 weight + gradient + two Adam moments."""

FIXED_OVERHEAD_GB = {"cpu": 0.5, "gpu": 1.0}
"""Overhead independent of the patch: the torch / MONAI runtime on CPU, the CUDA context and cuDNN workspaces on
GPU."""

INTENSITY_SCHEMES = ("ct", "zscore", "none")
"""Intensity normalisation of a channel (:class:`scripts.transforms.NormalizeChannelsd`)."""

PLAN_INFO_KEY = "plan_info"
"""The one key of a plan file that no config reads: the fingerprint summary and the reasons behind the plan."""

_MAX_FEATURES = {2: 512, 3: 320}
_MIN_REGION_EDGE = 4


# --------------------------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------------------------
class _NotSet(Enum):
    NOT_SET = "NOT_SET"

    def __repr__(self) -> str:
        return "NOT_SET"


NOT_SET = _NotSet.NOT_SET
"""Value of an optional :class:`Plan` field that the plan leaves out: the config's own default applies."""


def _fail(name: str, what: str, value: Any) -> ValueError:
    return ValueError(f"plan key '{name}' must be {what}, got {value!r}.")


def _int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise _fail(name, f"an integer >= {minimum}", value)
    return int(value)


def _int_list(name: str, value: Any, length: int | None = None, minimum: int = 1) -> list[int]:
    what = f"a list of {'' if length is None else f'{length} '}integers >= {minimum}"
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise _fail(name, what, value)
    try:
        return [_int(name, v, minimum) for v in value]
    except ValueError:
        raise _fail(name, what, value) from None


def _float_list(name: str, value: Any, length: int, positive: bool = True) -> list[float]:
    what = f"a list of {length} {'positive ' if positive else ''}numbers"
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise _fail(name, what, value)
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(v) for v in value):
        raise _fail(name, what, value)
    if positive and any(v <= 0 for v in value):
        raise _fail(name, what, value)
    return [float(v) for v in value]


def _per_stage(name: str, value: Any, num_stages: int, spatial_dims: int) -> list[list[int]]:
    if not isinstance(value, (list, tuple)) or len(value) != num_stages:
        raise _fail(name, f"one entry per stage ({num_stages}, the length of features)", value)
    return [_int_list(name, v, spatial_dims) for v in value]


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The experiment plan: the top-level keys that ``configs/plan.yaml`` sets in ``configs/train.yaml`` (with
    ``configs/evaluate.yaml``) and ``configs/inference.yaml``, typed and checked.

    Written by :func:`plan_experiment` (``python -m scripts.plan``) and by ``python -m scripts.import_nnunet``;
    :meth:`to_config` gives the YAML mapping, :meth:`from_config` reads one back. Fields left at :data:`NOT_SET`
    are not written, so the config's own default applies. Values are validated and normalised to plain Python
    types on construction (a ``ValueError`` names the key).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes including background.
        class_names: names of the classes without background (``out_channels - 1``), for the metrics.
        pixdim: target spacing per axis, in the loaded array's axis order.
        axcodes: orientation of the loaded arrays (``"RAS"``), or ``None`` to keep the file's voxel grid.
        spatial_axes_order: network axis ``a`` is the loaded axis ``spatial_axes_order[a]`` after resampling, or
            ``None`` for the same order.
        patch_size: training patch (and sliding-window ROI) per axis, divisible by the total stride per axis.
        batch_size: training batch size.
        features: channels per stage (at least 2 stages).
        strides: per stage, per axis.
        kernel_sizes: per stage, per axis.
        block_types: per stage, one of :data:`scripts.architecture.BLOCK_TYPES`.
        hgcn_orders: one interaction order per ``"hgcn"`` stage.
        num_regions: cells per axis of the region-specific Tversky loss.
        intensity_schemes: one of :data:`INTENSITY_SCHEMES` per channel.
        intensity_stats: per channel ``[lower, upper, mean, std]`` (required for ``"ct"``) or ``None``.
        intensity_nonzero: z-score statistics over non-zero voxels only.
        tta_mirror_axes: mirroring test-time augmentation axes, or ``None`` for none.
        plan_info: information only (:data:`PLAN_INFO_KEY`, read by no config): fingerprint summary, memory
            estimate and the reasons behind the plan.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    class_names: list[str] | _NotSet = NOT_SET
    pixdim: list[float]
    axcodes: str | None | _NotSet = NOT_SET
    spatial_axes_order: list[int] | None | _NotSet = NOT_SET
    patch_size: list[int]
    batch_size: int | _NotSet = NOT_SET
    features: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    block_types: list[str]
    hgcn_orders: list[int]
    num_regions: list[int] | _NotSet = NOT_SET
    intensity_schemes: list[str]
    intensity_stats: list[list[float] | None]
    intensity_nonzero: bool | _NotSet = NOT_SET
    tta_mirror_axes: list[int] | None | _NotSet = NOT_SET
    plan_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)

    def _checked(self) -> dict[str, Any]:
        """Every field validated and as plain Python types."""
        out: dict[str, Any] = {}
        dims = _int("spatial_dims", self.spatial_dims)
        if dims not in (2, 3):
            raise _fail("spatial_dims", "2 or 3", self.spatial_dims)
        out["spatial_dims"] = dims
        out["in_channels"] = _int("in_channels", self.in_channels)
        out["out_channels"] = _int("out_channels", self.out_channels)
        if self.class_names is not NOT_SET:
            n = out["out_channels"] - 1
            if not isinstance(self.class_names, (list, tuple)) or len(self.class_names) != n:
                raise _fail("class_names", f"a list of {n} names (out_channels - 1, no background)", self.class_names)
            out["class_names"] = [str(c) for c in self.class_names]
        out["pixdim"] = _float_list("pixdim", self.pixdim, dims)
        if self.axcodes is not NOT_SET:
            if self.axcodes is not None and (not isinstance(self.axcodes, str) or not self.axcodes):
                raise _fail("axcodes", "null or orientation codes such as 'RAS'", self.axcodes)
            out["axcodes"] = self.axcodes
        if self.spatial_axes_order is not NOT_SET:
            order = self.spatial_axes_order
            if order is not None:
                order = _int_list("spatial_axes_order", order, dims, minimum=0)
                if sorted(order) != list(range(dims)):
                    raise _fail("spatial_axes_order", f"null or a permutation of 0..{dims - 1}", order)
            out["spatial_axes_order"] = order
        features = _int_list("features", self.features)
        if len(features) < 2:
            raise _fail("features", "the channels of at least 2 stages", self.features)
        n_stages = len(features)
        out["features"] = features
        out["strides"] = _per_stage("strides", self.strides, n_stages, dims)
        out["kernel_sizes"] = _per_stage("kernel_sizes", self.kernel_sizes, n_stages, dims)
        divisor = [math.prod(s[a] for s in out["strides"]) for a in range(dims)]
        patch = _int_list("patch_size", self.patch_size, dims)
        if any(p % d for p, d in zip(patch, divisor)):
            raise _fail("patch_size", f"divisible by the total stride {divisor} per axis", self.patch_size)
        out["patch_size"] = patch
        if self.batch_size is not NOT_SET:
            out["batch_size"] = _int("batch_size", self.batch_size)
        blocks = self.block_types
        if not isinstance(blocks, (list, tuple)) or len(blocks) != n_stages or any(b not in BLOCK_TYPES for b in blocks):
            raise _fail("block_types", f"one of {list(BLOCK_TYPES)} per stage ({n_stages})", blocks)
        out["block_types"] = [str(b) for b in blocks]
        out["hgcn_orders"] = _int_list("hgcn_orders", self.hgcn_orders, out["block_types"].count("hgcn"))
        if self.num_regions is not NOT_SET:
            out["num_regions"] = _int_list("num_regions", self.num_regions, dims)
        channels = out["in_channels"]
        schemes = self.intensity_schemes
        if not isinstance(schemes, (list, tuple)) or len(schemes) != channels or any(s not in INTENSITY_SCHEMES for s in schemes):
            raise _fail("intensity_schemes", f"one of {list(INTENSITY_SCHEMES)} per input channel ({channels})", schemes)
        out["intensity_schemes"] = [str(s) for s in schemes]
        stats = self.intensity_stats
        if not isinstance(stats, (list, tuple)) or len(stats) != channels:
            raise _fail("intensity_stats", f"one entry per input channel ({channels})", stats)
        out["intensity_stats"] = []
        for scheme, st in zip(out["intensity_schemes"], stats):
            if st is None and scheme != "ct":
                out["intensity_stats"].append(None)
            else:
                out["intensity_stats"].append(_float_list("intensity_stats", st, 4, positive=False))
        if self.intensity_nonzero is not NOT_SET:
            if not isinstance(self.intensity_nonzero, (bool, np.bool_)):
                raise _fail("intensity_nonzero", "true or false", self.intensity_nonzero)
            out["intensity_nonzero"] = bool(self.intensity_nonzero)
        if self.tta_mirror_axes is not NOT_SET:
            axes = self.tta_mirror_axes
            if axes is not None:
                axes = _int_list("tta_mirror_axes", axes, minimum=0)
                if len(set(axes)) != len(axes) or any(a >= dims for a in axes):
                    raise _fail("tta_mirror_axes", f"null or distinct axes in 0..{dims - 1}", self.tta_mirror_axes)
            out["tta_mirror_axes"] = axes
        if not isinstance(self.plan_info, Mapping):
            raise _fail(PLAN_INFO_KEY, "a mapping", self.plan_info)
        out[PLAN_INFO_KEY] = _to_builtin(dict(self.plan_info))
        return out

    def to_config(self, include_info: bool = True) -> dict[str, Any]:
        """The plan as the top-level keys of a config, in field order, plain Python types (YAML-ready).

        Args:
            include_info: add :data:`PLAN_INFO_KEY` (when it holds anything), the one key no config reads.

        Returns:
            a new dict: every field not :data:`NOT_SET`, then ``plan_info``.
        """
        config = {
            f.name: _to_builtin(getattr(self, f.name))
            for f in fields(self)
            if f.name != PLAN_INFO_KEY and getattr(self, f.name) is not NOT_SET
        }
        if include_info and self.plan_info:
            config[PLAN_INFO_KEY] = _to_builtin(self.plan_info)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], strict: bool = False) -> Plan:
        """The plan held by the top-level keys of a config or a plan file.

        Args:
            config: e.g. the parsed ``configs/plan.yaml`` or ``configs/train.yaml``; keys absent from it stay
                :data:`NOT_SET` (optional fields) or raise (required fields).
            strict: refuse keys that are neither plan keys nor :data:`PLAN_INFO_KEY` (reading a plan file);
                otherwise they are ignored (reading a whole config).

        Raises:
            ValueError: a required key is missing, an unknown key with ``strict``, or a value of the wrong type or
                length.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"a plan must be a mapping of config keys, got {type(config).__name__}.")
        known = {f.name for f in fields(cls)}
        if strict:
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"unknown plan key(s) {unknown}; a plan holds {sorted(known)}.")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"the plan misses the key(s) {missing}; write it with `python -m scripts.plan`.")
        return cls(**{k: config[k] for k in known if k in config})


PLAN_KEYS = tuple(f.name for f in fields(Plan) if f.name != PLAN_INFO_KEY)
"""The config keys a plan may set, in the order :meth:`Plan.to_config` writes them."""


# --------------------------------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------------------------------
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
    datalist: str | os.PathLike | Mapping[str, Any],
    dataset_dir: str,
    modality: str | Sequence[str] | None = None,
    work_dir: str | None = None,
    max_cases: int | None = None,
    limits: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Dataset fingerprint from MONAI's DataAnalyzer (CPU, no worker processes) on the "training" list.

    Every case is checked first from its file headers (:func:`scripts.data.validate_datalist` with
    ``read=False``): files present and within ``limits``, an image and a label on the same voxel grid, the same
    channel count in every case.

    Args:
        datalist: MSD-style datalist dict or path to its JSON file.
        dataset_dir: root of the relative paths in the datalist.
        modality: "CT", "MR", ..., one for all channels or one per channel (a list or a comma-separated string);
            defaults to the datalist's "modality" table (``{"0": "CT"}`` as in MSD), else "unknown".
        work_dir: where DataAnalyzer writes ``datastats.yaml`` (and ``datastats_by_case.yaml``); a temporary
            directory, removed afterwards, when None.
        max_cases: analyse only this many evenly spaced cases (all headers are still checked); DataAnalyzer reads
            every analysed case in full, so this bounds the time on large datasets.
        limits: image size limits of the check (fields of :class:`scripts.image_guard.ImageLimits`); ``None``: the
            defaults.

    Returns:
        dict with ``n_cases`` (all training cases), ``n_cases_analyzed``, ``spatial_dims``, ``channels``, ``modalities``, per-case ``spacings`` and ``shapes``,
        ``median_spacing``, ``median_shape``, ``foreground_intensity`` (per channel: mean, std, percentile_00_5,
        percentile_99_5), ``labels``, ``num_classes``, ``label_names`` (the datalist's ``labels`` as ``{value: name}``,
        MSD or nnU-Net form, :func:`scripts.data.label_names`; ``None`` without), ``class_frequency`` (mean fraction
        of voxels per label) and ``target_ratio`` (per foreground label: mean / median / min over cases of label
        voxels / all voxels, the T/W ratio).

    Raises:
        scripts.data.DataError: a missing or unreadable datalist or case, naming the file (a ``ValueError``).
    """
    from scripts.data import load_datalist, read_datalist, validate_datalist  # MONAI only when it runs

    datalist = read_datalist(datalist)
    cases = validate_datalist(
        load_datalist(datalist, dataset_dir, "training"), None, None, "training", limits=limits, require_label=True,
        read=False,
    )
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
        with warnings.catch_warnings():  # DataAnalyzer builds Orientationd without `labels`; it offers no way to pass it
            warnings.filterwarnings("ignore", message=r".*Orientationd\.__init__:labels", category=FutureWarning)
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
    from scripts.data import label_names

    names = label_names(datalist.get("labels"))
    n_label_classes = len(names) if names else 0
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
        "label_names": names,
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
    hgcn_order_range: tuple[int, int] = HGCN_ORDER_RANGE,
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
    Eq. 11 of MambaClinix (:func:`scripts.architecture.default_block_types` / ``default_hgcn_orders``): the first
    ``ceil(n/2)`` stages get HGCN blocks of order ``s + 2`` (clipped to ``hgcn_order_range``), the rest Mamba blocks.

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
    block_types = default_block_types(len(strides))
    return {
        "pool_per_axis": pools,
        "strides": strides,
        "kernel_sizes": kernels,
        "num_stages": len(strides),
        "patch_size": padded,
        "divisor": divisor,
        "block_types": block_types,
        "hgcn_orders": default_hgcn_orders(block_types, lo, hi),
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
    :data:`scripts.architecture.AUTHORS_REGION_GRID` ``(8, 8, 14)`` cells per array axis whatever the dataset and
    patch; 2D patches take its last two entries, (8, 14), the in-plane pair. Only where a patch is too small for it
    (an axis shorter than 4 voxels per cell) is an axis reduced, to ``max(1, patch // 4)`` cells. Every patch of the
    paper's Table 2 and the demo's (32, 64, 56) get (8, 8, 14).

    Args:
        patch_size: the patch, 2 or 3 axes.

    Raises:
        ValueError: not 2 or 3 positive entries.
    """
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
) -> Plan:
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
        spatial_dims: the dimensionality of the data (the default); any other value raises, since the configs
            train and infer on whole 2D images or 3D volumes, not on slices of them.
        min_feature_map: smallest bottleneck edge.
        max_pool_per_axis: most poolings per axis.
        min_batch_size: smallest batch size.
        max_patch_voxels: optional cap of the patch volume.
        target_spacing: use this spacing instead of the planned one (e.g. a coarser grid for a CPU demo).

    Returns:
        the :class:`Plan`: spatial_dims, in_channels, out_channels, class_names (from the fingerprint's
        ``label_names``, when the datalist has ``labels``), pixdim, patch_size, batch_size, features, strides,
        kernel_sizes, block_types, hgcn_orders, num_regions, intensity_schemes and intensity_stats (the other fields
        are left to the configs' defaults), and ``plan_info`` (fingerprint summary, memory estimate
        and the reasons in words). The deep-supervision weights follow from the number of stages
        (:func:`scripts.architecture.deep_supervision_weights`) and are not part of the plan.

    Raises:
        ValueError: conflicting budgets, a budget too small for the minimum network, ``spatial_dims`` other than
            the data's, or ``label_names`` that do not name the values ``0 .. num_classes - 1``
            (:class:`scripts.data.DataError`).
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
    if data_dims not in (2, 3):
        raise ValueError(f"The fingerprint has {data_dims} spatial axes; the planner plans 2D or 3D data.")
    dims = data_dims if spatial_dims is None else int(spatial_dims)
    if dims != data_dims:
        raise ValueError(
            f"spatial_dims={spatial_dims} for {data_dims}D data: the MambaClinix configs train and infer on whole "
            f"{data_dims}D images, so the plan has the data's dimensionality; omit --spatial_dims"
            + (", or use the 2D lesion workflow (configs/hunet_train.yaml), which trains on slices." if dims == 2 else ".")
        )
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
    names = fingerprint.get("label_names")
    if names:
        from scripts.data import class_names as _class_names

        class_names = _class_names({int(k): str(v) for k, v in names.items()}, out_channels)
        reasons.append(f"class names from the datalist's labels: {class_names}")
    else:
        class_names = NOT_SET
        reasons.append("class names: the datalist has no 'labels'; the configs name the classes class_1, class_2, ...")

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
    return Plan(
        spatial_dims=dims,
        in_channels=in_channels,
        out_channels=out_channels,
        class_names=class_names,
        pixdim=[round(s, 6) for s in spacing],
        patch_size=[int(p) for p in patch],
        batch_size=int(batch_size),
        features=features,
        strides=topo["strides"],
        kernel_sizes=topo["kernel_sizes"],
        block_types=topo["block_types"],
        hgcn_orders=topo["hgcn_orders"],
        num_regions=region_grid(patch),
        intensity_schemes=schemes,
        intensity_stats=stats,
        plan_info={
            "device": device,
            "memory_budget_gb": budget,
            "estimated_memory_gb": round(est["total"], 3),
            "pool_per_axis": topo["pool_per_axis"],
            "num_stages": topo["num_stages"],
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
    )


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
