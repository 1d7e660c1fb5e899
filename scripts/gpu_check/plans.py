# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The networks the check runs, built from the bundle's ``configs/train.yaml`` as its training builds them.

Two plans: ``"default"``, the paper's 6-stage plan (features 32-320, strides 1,2,2,2,2,2, Eq. 11 layout, the
benchmark's ``mambaclinix``), for GPUs at 128^3; ``"demo"``, the values of ``configs/train.yaml`` itself (the
4-stage CPU demo plan), for this CPU machine. MambaClinix runs in one of the :data:`VARIANTS` (selective-scan
backend and fused path); DynUNet is built with the plan's topology (for the default plan it is the benchmark's
``dynunet``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.bundle import ConfigParser

from scripts.architecture import default_block_types, default_hgcn_orders
from scripts.benchmark.models import DEFAULT_FEATURES, DEFAULT_STRIDES
from scripts.networks.mamba import Mamba
from scripts.networks.selective_scan import mamba_ssm_op, on_kernel_device

__all__ = [
    "PLANS",
    "TRAIN_CONFIG",
    "VARIANTS",
    "available_variants",
    "build_dynunet",
    "build_network",
    "bundle_parser",
    "plan_strides",
    "set_fast_path",
    "size_divisor",
    "size_problem",
]

TRAIN_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train.yaml"
"""The bundle's training config, whose ``network_def``, ``loss`` and ``optimizer`` the check instantiates."""

_DEFAULT_STAGES = len(DEFAULT_FEATURES)
_DEFAULT_BLOCKS = default_block_types(_DEFAULT_STAGES)
PLANS: dict[str, dict[str, Any]] = {
    "default": {
        "features": list(DEFAULT_FEATURES),
        "strides": [[s] * 3 for s in DEFAULT_STRIDES],
        "kernel_sizes": [[3, 3, 3]] * _DEFAULT_STAGES,
        "block_types": _DEFAULT_BLOCKS,
        "hgcn_orders": default_hgcn_orders(_DEFAULT_BLOCKS),
    },
    "demo": {},
}
"""Plan name -> top-level overrides of ``configs/train.yaml`` (``"demo"``: none, the config's own values)."""

VARIANTS: dict[str, tuple[str | None, bool]] = {
    "chunked": ("chunked", False),
    "cuda": ("cuda", False),
    "fused": (None, True),
}
"""MambaClinix variant -> (``scan_backend``, ``use_fast_path`` of every Mamba module): the pure-PyTorch path with the
chunked scan, the pure path with mamba-ssm's CUDA scan kernel, and mamba-ssm's fused ``mamba_inner_fn``."""


def bundle_parser(plan: str, device: torch.device | str = "cpu", **overrides: Any) -> ConfigParser:
    """``configs/train.yaml`` with the plan's values and ``overrides`` (top-level or ``#`` ids) set.

    Raises:
        ValueError: an unknown plan name.
    """
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; use one of {sorted(PLANS)}.")
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    parser.update({**PLANS[plan], "device": str(device), **overrides})
    return parser


def plan_strides(plan: str) -> list[list[int]]:
    """The per-stage, per-axis strides of ``plan``."""
    strides = bundle_parser(plan).get("strides")
    return [[int(s)] * 3 if isinstance(s, int) else [int(v) for v in s] for s in strides]


def size_divisor(plan: str) -> int:
    """A cubic patch edge of ``plan`` must be a multiple of this (the product of the strides, on every axis)."""
    per_axis = [math.prod(axis) for axis in zip(*plan_strides(plan))]
    return math.lcm(*per_axis)


def size_problem(plan: str, size: int, option: str = "--size") -> str | None:
    """Why the cubic edge ``size`` does not suit ``plan`` (given as ``option`` in the message), or ``None``.

    The edge must be a multiple of :func:`size_divisor` and leave at least 2 voxels at the bottleneck, where
    instance normalisation needs more than one.
    """
    divisor = size_divisor(plan)
    if size % divisor == 0 and size >= 2 * divisor:
        return None
    suggestion = max(2 * divisor, divisor * round(size / divisor))
    return (f"{option} {size} does not suit the {plan} plan: use a multiple of {divisor} (the product of its strides) "
            f"of at least {2 * divisor} (2 voxels at the bottleneck for instance normalisation), e.g. {option} "
            f"{suggestion}.")


def set_fast_path(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch mamba-ssm's fused path on or off in every Mamba module of ``model``; returns ``model``."""
    for module in model.modules():
        if isinstance(module, Mamba):
            module.use_fast_path = enabled
    return model


def build_network(plan: str, device: torch.device, variant: str | None = None, **overrides: Any) -> nn.Module:
    """The bundle's ``network_def`` for ``plan`` on ``device`` (float32).

    Args:
        plan: a key of :data:`PLANS`.
        device: where the network lives.
        variant: a key of :data:`VARIANTS`, or ``None`` for the bundle's default (automatic backend, fused path
            where it imports).
        overrides: further top-level config values, e.g. ``deep_supervision=False``.

    Raises:
        ValueError: an unknown plan or variant.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown MambaClinix variant {variant!r}; use one of {sorted(VARIANTS)}.")
    backend, fast = VARIANTS[variant] if variant is not None else (None, True)
    parser = bundle_parser(plan, device, **overrides)
    parser["network_def#scan_backend"] = backend
    return set_fast_path(parser.get_parsed_content("network"), fast)


def build_dynunet(plan: str, device: torch.device) -> nn.Module:
    """MONAI's residual DynUNet with the plan's topology (kernels, strides, filters; 1 input, the bundle's classes):
    for the default plan the benchmark's ``dynunet``."""
    from monai.networks.nets import DynUNet

    config = bundle_parser(plan)
    strides = plan_strides(plan)
    return DynUNet(
        3, config.get("in_channels"), config.get("out_channels"), kernel_size=config.get("kernel_sizes"),
        strides=strides, upsample_kernel_size=strides[1:], filters=list(config.get("features")), res_block=True,
    ).to(device)


def available_variants(device: torch.device) -> list[str]:
    """The MambaClinix variants that can run on ``device``: ``chunked`` everywhere; on a kernel device (CUDA) also
    ``cuda`` when mamba-ssm's scan imports and ``fused`` when its fused path (with causal-conv1d) imports."""
    variants = ["chunked"]
    if on_kernel_device(device):
        scan = mamba_ssm_op("selective_scan_fn") is not None
        fused = mamba_ssm_op("mamba_inner_fn", requires=("causal_conv1d",)) is not None
        variants += [name for name, ok in (("cuda", scan), ("fused", fused)) if ok]
    return variants
