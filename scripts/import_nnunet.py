# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Command line: import a MambaClinix trained with the authors' nnU-Net v2 code into this bundle.

Example::

    python -m scripts.import_nnunet --checkpoint fold_0/checkpoint_final.pth --plans nnUNetPlans.json \\
        --dataset_json dataset.json [--configuration 3d_fullres] --output_dir DIR

writes ``DIR/models/model.pt`` (the bundle network's state dict, loadable with ``weights_only=True``) and
``DIR/configs/plan.yaml`` (the top-level keys the configs read). Run it with
``python -m monai.bundle run --config_file "['configs/inference.yaml','DIR/configs/plan.yaml']"
--ckpt_dir DIR/models``, or copy both files into a bundle (MONAI Label merges ``configs/plan.yaml``).

Axis order. nnU-Net reads a NIfTI with SimpleITK: a (z, y, x) array of the file's voxel grid, never reoriented,
then permutes it with the plans' ``transpose_forward``; the network (its anisotropic kernels, strides, patch and
the Mamba scan order) works in that order. This bundle loads (x, y, z) with nibabel, so the plan sets
``axcodes: null`` (keep the file's voxel grid, no reorientation to RAS) and ``spatial_axes_order`` (network axis
``a`` is our axis ``spatial_axes_order[a]``: ``2 - transpose_forward[a]``), applied after resampling and undone by
the inversion of the preprocessing. ``pixdim`` is in our (x, y, z) order, so Spacingd resamples each voxel-grid
axis to nnU-Net's target spacing of that axis; ``patch_size``, ``kernel_sizes`` and ``strides`` stay in the
network's order.

What still differs from nnU-Net's predictor: resampling (bilinear here, third-order splines there, along the
in-plane axes only for anisotropic data), the z-score's standard deviation (unbiased here, population there) and
its mask (non-zero voxels of each channel here, nnU-Net's filled non-zero mask of all channels there).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.data import label_names
from scripts.io_utils import atomic_torch_save
from scripts.networks import MambaClinix, authors_network_kwargs, authors_state_dict_to_bundle
from scripts.plan import write_plan
from scripts.planning import NOT_SET, Plan

__all__ = ["load_nnunet_checkpoint", "nnunet_plan", "spatial_axes_order", "main"]

logger = logging.getLogger("scripts.import_nnunet")

#: nnU-Net's normalisation classes -> this bundle's ``intensity_schemes``.
SCHEMES = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "none"}


def _numpy_globals() -> list:
    """The numpy types an nnU-Net checkpoint pickles (scalars in its ``logging`` and ``_best_ema``)."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def load_nnunet_checkpoint(path: str | Path) -> dict[str, Any]:
    """An nnU-Net checkpoint, loaded with ``weights_only=True`` (numpy scalars allowed; no arbitrary code).

    Raises:
        ValueError: not a readable checkpoint dict with ``network_weights``.
    """
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(_numpy_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot be read as a weights-only nnU-Net checkpoint ({first}).") from None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("network_weights"), Mapping):
        raise ValueError(f"{path}: not an nnU-Net checkpoint (a dict with 'network_weights'), e.g. checkpoint_final.pth.")
    return dict(checkpoint)


def _load_json(path: str | Path, what: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the {what} ({e}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object.")
    return value


def _configuration(plans: Mapping, name: str, path: str | Path) -> dict:
    """One configuration of nnU-Net plans with its ``inherits_from`` chain resolved."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping) or name not in configurations:
        available = list(configurations) if isinstance(configurations, Mapping) else []
        raise ValueError(f"{path}: no configuration {name!r} in the plans (available: {available}); pass --configuration.")
    chain, config = [name], dict(configurations[name])
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in chain or parent not in configurations:
            raise ValueError(f"{path}: configuration {chain[-1]!r} inherits from {parent!r}, which is missing or circular.")
        chain.append(parent)
        config = {**configurations[parent], **config}
    return config


def _architecture(config: Mapping, path: str | Path) -> tuple[list, list]:
    """(strides, kernel sizes) of a configuration: ``architecture.arch_kwargs`` (nnU-Net >= 2.5) or the older
    ``pool_op_kernel_sizes`` / ``conv_kernel_sizes`` (the nnU-Net the authors' code is built on)."""
    arch = config.get("architecture", {}).get("arch_kwargs") if isinstance(config.get("architecture"), Mapping) else None
    if arch is not None and "strides" in arch and "kernel_sizes" in arch:
        return arch["strides"], arch["kernel_sizes"]
    if "pool_op_kernel_sizes" in config and "conv_kernel_sizes" in config:
        return config["pool_op_kernel_sizes"], config["conv_kernel_sizes"]
    raise ValueError(f"{path}: the configuration has neither architecture.arch_kwargs nor pool_op_kernel_sizes.")


def spatial_axes_order(transpose_forward: Sequence[int]) -> list[int]:
    """Network axis ``a`` is our (nibabel, x-y-z) axis ``order[a]``: SimpleITK reverses the axes, then nnU-Net
    applies ``transpose_forward``."""
    n = len(transpose_forward)
    return [n - 1 - int(t) for t in transpose_forward]


def _per_stage(values: Sequence, n: int) -> list[list[int]]:
    return [[int(v) for v in (s if isinstance(s, (list, tuple)) else [s] * n)] for s in values]


def _intensity(plans: Mapping, config: Mapping, channels: int, path: str | Path) -> dict[str, Any]:
    names = list(config.get("normalization_schemes", []))
    masks = list(config.get("use_mask_for_norm", [False] * len(names)))
    if len(names) != channels or len(masks) != channels:
        raise ValueError(f"{path}: normalization_schemes / use_mask_for_norm need one entry per input channel ({channels}).")
    props = plans.get("foreground_intensity_properties_per_channel") or plans.get("foreground_intensity_properties_by_modality") or {}
    schemes, stats = [], []
    for c, name in enumerate(names):
        if name not in SCHEMES:
            raise ValueError(f"{path}: normalisation {name!r} of channel {c} is not supported (only {sorted(SCHEMES)}).")
        schemes.append(SCHEMES[name])
        if name == "CTNormalization":
            p = props.get(str(c), props.get(c))
            keys = ("percentile_00_5", "percentile_99_5", "mean", "std")
            if not isinstance(p, Mapping) or any(k not in p for k in keys):
                raise ValueError(f"{path}: CTNormalization of channel {c} needs foreground_intensity_properties_per_channel['{c}'] with {keys}.")
            stats.append([float(p[k]) for k in keys])
        else:
            stats.append(None)
    zscore_masks = {bool(m) for s, m in zip(schemes, masks) if s == "zscore"}
    if len(zscore_masks) > 1:
        logger.warning("use_mask_for_norm differs between z-score channels %s; the bundle uses one flag (True).", masks)
    return {"intensity_schemes": schemes, "intensity_stats": stats, "intensity_nonzero": True in zscore_masks}


def _labels(dataset: Mapping, path: str | Path) -> tuple[int, list[str]]:
    """(output channels, class names without background) of a dataset.json; the ``ignore`` label has no output."""
    if dataset.get("regions_class_order") is not None:
        raise ValueError(f"{path}: region-based labels (sigmoid outputs) are not supported; the bundle predicts classes.")
    names = label_names(dataset.get("labels"), str(path))
    if not names:
        raise ValueError(f"{path}: dataset.json needs 'labels' (name -> value).")
    if list(names) != list(range(len(names))):
        raise ValueError(f"{path}: label values must be 0..n-1, got {list(names)}.")
    return len(names), [names[v] for v in range(1, len(names))]


def nnunet_plan(
    checkpoint: Mapping[str, Any],
    plans: Mapping[str, Any],
    dataset: Mapping[str, Any],
    configuration: str = "3d_fullres",
    paths: Mapping[str, str] | None = None,
) -> tuple[Plan, dict[str, torch.Tensor]]:
    """The bundle's plan and state dict for an authors' nnU-Net checkpoint.

    Args:
        checkpoint: a loaded ``checkpoint_final.pth`` (see :func:`load_nnunet_checkpoint`).
        plans: ``nnUNetPlans.json`` (a dict).
        dataset: ``dataset.json`` (``channel_names`` or ``modality``, ``labels``).
        configuration: the plans' configuration the checkpoint was trained with.
        paths: file names for the error messages (keys ``checkpoint``, ``plans``, ``dataset_json``).

    Raises:
        ValueError: one line naming the file: another architecture, no such configuration, mismatching channels.
    """
    paths = {"checkpoint": "checkpoint", "plans": "plans", "dataset_json": "dataset.json", **(paths or {})}
    weights = checkpoint["network_weights"]
    try:
        kwargs = authors_network_kwargs(weights)
    except ValueError as e:
        raise ValueError(f"{paths['checkpoint']}: {e}") from None
    config = _configuration(plans, configuration, paths["plans"])
    strides, plan_kernels = _architecture(config, paths["plans"])
    dims = len(config.get("patch_size", ()))
    if dims != 3 or kwargs["spatial_dims"] != 3:
        raise ValueError(f"{paths['plans']}: configuration {configuration!r} is {dims}D; the authors' MambaClinix is 3D only.")
    strides, plan_kernels = _per_stage(strides, 3), _per_stage(plan_kernels, 3)
    n_stages = len(kwargs["features"])
    if len(strides) != n_stages or plan_kernels != kwargs["kernel_size"]:
        raise ValueError(
            f"{paths['plans']}: configuration {configuration!r} ({len(strides)} stages, kernels {plan_kernels}) does not "
            f"match the weights of {paths['checkpoint']} ({n_stages} stages, kernels {kwargs['kernel_size']})."
        )
    defaults = inspect.signature(MambaClinix).parameters
    for key in ("d_state", "d_conv", "expand"):
        if key in kwargs and kwargs[key] != defaults[key].default:
            raise ValueError(f"{paths['checkpoint']}: Mamba {key}={kwargs[key]} differs from the bundle's {defaults[key].default}, which the configs do not set.")
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    n_labels, class_names = _labels(dataset, paths["dataset_json"])
    if len(channels) != kwargs["in_channels"] or n_labels != kwargs["out_channels"]:
        raise ValueError(
            f"{paths['dataset_json']}: {len(channels)} input channel(s) and {n_labels} label(s), but the weights of "
            f"{paths['checkpoint']} have {kwargs['in_channels']} input(s) and {kwargs['out_channels']} output(s)."
        )
    transpose_forward = [int(t) for t in plans.get("transpose_forward", range(3))]
    if sorted(transpose_forward) != [0, 1, 2]:
        raise ValueError(f"{paths['plans']}: transpose_forward {transpose_forward} is not a permutation of 0, 1, 2.")
    order = spatial_axes_order(transpose_forward)
    spacing = [float(s) for s in config["spacing"]]  # network order
    pixdim = [0.0] * 3
    for a, axis in enumerate(order):
        pixdim[axis] = spacing[a]

    net_kwargs = {k: v for k, v in kwargs.items() if k not in ("d_state", "d_conv", "expand")}
    with torch.device("meta"):
        net = MambaClinix(strides=strides, he_init=False, **net_kwargs)
    try:
        state_dict = authors_state_dict_to_bundle(weights, network=net)
    except ValueError as e:
        raise ValueError(f"{paths['checkpoint']}: {e}") from None
    mirror = checkpoint.get("inference_allowed_mirroring_axes")
    plan = Plan(
        spatial_dims=3,
        in_channels=kwargs["in_channels"],
        out_channels=kwargs["out_channels"],
        class_names=class_names,
        axcodes=None,
        spatial_axes_order=order,
        pixdim=pixdim,
        patch_size=[int(p) for p in config["patch_size"]],
        batch_size=int(config["batch_size"]) if "batch_size" in config else NOT_SET,
        features=kwargs["features"],
        strides=strides,
        kernel_sizes=kwargs["kernel_size"],
        block_types=kwargs["block_types"],
        hgcn_orders=kwargs["hgcn_orders"],
        **_intensity(plans, config, kwargs["in_channels"], paths["plans"]),
        tta_mirror_axes=[int(a) for a in mirror] if mirror else None,
        plan_info={
            "source": "nnU-Net v2 checkpoint of the authors' MambaClinix",
            "checkpoint": str(paths["checkpoint"]),
            "trainer_name": str(checkpoint.get("trainer_name", "")),
            "dataset_name": str(plans.get("dataset_name", "")),
            "configuration": configuration,
            "transpose_forward": transpose_forward,
            "nnunet_spacing": spacing,
            "channel_names": [str(v) for _, v in sorted(channels.items(), key=lambda kv: int(kv[0]))],
        },
    )
    return plan, state_dict


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.import_nnunet", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="nnU-Net checkpoint_final.pth of the authors' MambaClinix")
    p.add_argument("--plans", required=True, help="nnUNetPlans.json (or the plans the trainer used)")
    p.add_argument("--dataset_json", required=True, help="dataset.json of the training set")
    p.add_argument("--configuration", default="3d_fullres", help="configuration of the plans (default 3d_fullres)")
    p.add_argument("--output_dir", required=True, help="writes models/model.pt and configs/plan.yaml here")
    return p


def main(argv: Sequence[str] | None = None) -> Plan:
    """Run the import; returns the plan that was written."""
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = {"checkpoint": args.checkpoint, "plans": args.plans, "dataset_json": args.dataset_json}
    plan, state_dict = nnunet_plan(
        load_nnunet_checkpoint(args.checkpoint),
        _load_json(args.plans, "nnU-Net plans"),
        _load_json(args.dataset_json, "dataset.json"),
        args.configuration,
        paths,
    )
    out = Path(args.output_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    atomic_torch_save({k: v.detach().clone().contiguous() for k, v in state_dict.items()}, out / "models" / "model.pt")
    write_plan(plan, out / "configs" / "plan.yaml", writer="python -m scripts.import_nnunet")
    logger.info("wrote %s and %s (network axes = our axes %s)", out / "models" / "model.pt", out / "configs" / "plan.yaml",
                plan.spatial_axes_order)
    return plan


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
