# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The networks the benchmarks compare: their names, ``+`` options, patch-edge rules and construction.

A model name is a base name (a key of :data:`MODELS`) with optional ``+`` options (:data:`OPTIONS`):
``+cl`` (channels_last_3d weights and input), ``+bf16`` (bfloat16 autocast), ``+nativebwd`` (PyTorch's own CPU backward
instead of :mod:`scripts.networks.cpu_backward`'s), ``+compile``
(``torch.compile(dynamic=False)``), ``+freeze`` (the same with Inductor's ``freezing``: inference only); for the
MambaClinix models also ``+cf`` (``channels_last=False``: channels-first memory, PyTorch's default; MambaClinix itself
runs channels-last on CPU), ``+ckptnone`` (``gradient_checkpointing=False``; without a ``+ckpt...`` option the
network's default ``"light"``), ``+ckpt`` (``gradient_checkpointing=True``, by sub-step), ``+ckptblock``
(``gradient_checkpointing="block"``), ``+ckptfirst`` (``gradient_checkpointing="first_level"``) and ``+naive`` /
``+chunked`` / ``+cuda`` (scan backend), e.g. ``mambaclinix+cf+bf16``. For every model, ``+omppassive`` /
``+ompspin`` start its timing process with ``OMP_WAIT_POLICY=PASSIVE`` / without ``OMP_WAIT_POLICY`` (libgomp's
default: spin, then sleep), whatever the benchmark's own environment (:func:`scripts.benchmark.worker.worker_env`).
``authors`` is the authors' own network, built only where their code is installed (:mod:`scripts.benchmark.peers`). :func:`build_model` applies the options that change the network; the memory-format,
autocast and compile options are applied by :class:`scripts.benchmark.workload.Workload`.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = [
    "DEFAULT_FEATURES",
    "DEFAULT_MODELS",
    "DEFAULT_STRIDES",
    "DEMO_PLAN",
    "MODELS",
    "OPTIONS",
    "SCALING_MODELS",
    "build_model",
    "count_parameters",
    "edge_problem",
    "parse_model_name",
    "size_divisor",
]

DEFAULT_FEATURES = (32, 64, 128, 256, 320, 320)
"""Features per stage of MambaClinix's default plan (also DynUNet's filters here: the same nnU-Net topology)."""
DEFAULT_STRIDES = (1, 2, 2, 2, 2, 2)
"""Strides per stage of the default plan."""
DEMO_PLAN = {
    "features": [16, 32, 64, 128, 128],
    "strides": [1, 2, 2, 2, 2],
    "block_types": ["hgcn", "hgcn", "hgcn", "mamba", "mamba"],
    "hgcn_orders": [2, 3, 4],
}
"""MambaClinix keyword arguments of ``mambaclinix_demo``: a small 5-stage CPU plan (features 16-128, the plan of the
bundle's first demo), kept fixed so that benchmark runs stay comparable; the current demo plan is the one in
``configs/train.yaml``."""

MODELS = {
    "mambaclinix": "MambaClinix, default plan: features (32,64,128,256,320,320), strides (1,2,2,2,2,2), Eq. 11 layout",
    "mambaclinix_demo": "MambaClinix, small 5-stage CPU plan: features (16,32,64,128,128), HGCN x3 (orders 2,3,4) + Mamba x2",
    "umamba_bot": "U-Mamba-Bot-like: MambaClinix default plan with block_types ['res']*5 + ['mamba']",
    "dynunet": "MONAI DynUNet (residual), the same nnU-Net topology: filters (32..320), kernels 3, strides (1,2,2,2,2,2)",
    "swinunetr": "MONAI SwinUNETR, feature_size 48",
    "segresnet": "MONAI SegResNet, init_filters 16, blocks_down (1,2,2,4) (as the MONAI BraTS bundle)",
    "authors": "the authors' MambaClinix (github CYB08/MambaClinix-PyTorch, when installed: scripts.benchmark.peers), "
    "default plan",
}
"""Base model names and what they build (in 1 channel, out 2 classes)."""

OPTIONS = (
    "cl", "cf", "ckptnone", "ckpt", "ckptblock", "ckptfirst", "bf16", "nativebwd", "compile", "freeze",
    "naive", "chunked", "cuda", "omppassive", "ompspin",
)
"""The ``+`` options a model name may carry (see the module docstring)."""
DEFAULT_MODELS = ("mambaclinix", "mambaclinix_demo", "umamba_bot", "dynunet", "swinunetr", "segresnet")
"""The models a benchmark run compares unless told otherwise."""
SCALING_MODELS = ("mambaclinix", "swinunetr", "dynunet")
"""The models of the latency-against-patch-edge study unless told otherwise."""

_MAMBACLINIX_ONLY = ("naive", "chunked", "cuda", "ckptnone", "ckpt", "ckptblock", "ckptfirst", "cf")


def parse_model_name(name: str) -> tuple[str, set[str]]:
    """Split a model name into its base name and its set of ``+`` options.

    Args:
        name: e.g. ``"mambaclinix+cf+bf16"``.

    Returns:
        ``(base, options)``, e.g. ``("mambaclinix", {"cf", "bf16"})``.

    Raises:
        ValueError: the base name is not in :data:`MODELS` or an option is not in :data:`OPTIONS`.
    """
    base, *opts = name.split("+")
    if base not in MODELS:
        raise ValueError(f"unknown model {base!r}; use one of {sorted(MODELS)} (optionally with +{'/+'.join(OPTIONS)}).")
    bad = [o for o in opts if o not in OPTIONS]
    if bad:
        raise ValueError(f"unknown model option(s) {bad} in {name!r}; use {OPTIONS}.")
    return base, set(opts)


def size_divisor(name: str) -> int:
    """The patch edge must be a multiple of this for the model ``name`` (models with instance normalisation also
    need more than one voxel at the bottleneck: at the smallest edge they fail and the error is recorded)."""
    base, _ = parse_model_name(name)
    return {"mambaclinix_demo": 16, "segresnet": 8}.get(base, 32)


def edge_problem(name: str, size: int) -> str | None:
    """Why the cubic patch edge ``size`` does not suit the model ``name``, or ``None`` when it does."""
    divisor = size_divisor(name)
    return None if size % divisor == 0 else f"edge {size} is not a multiple of {divisor}"


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(name: str, in_channels: int = 1, out_channels: int = 2) -> nn.Module:
    """Build the 3D model ``name`` in float32 on CPU.

    Args:
        name: a key of :data:`MODELS`, optionally with ``+`` options (:data:`OPTIONS`).
        in_channels: input channels.
        out_channels: output channels (classes).

    Raises:
        ValueError: an unknown name or option, a MambaClinix-only option on another model, or two options that
            exclude each other (``+cf`` with ``+cl``; ``+ckptnone``, ``+ckpt``, ``+ckptblock`` and ``+ckptfirst``).
        ImportError: ``authors`` where the authors' code is not installed (:mod:`scripts.benchmark.peers`).
    """
    from monai.networks.nets import DynUNet, SegResNet, SwinUNETR

    from scripts.networks import MambaClinix

    base, opts = parse_model_name(name)
    backend = next((o for o in ("naive", "chunked", "cuda") if o in opts), None)
    clinix = base.startswith("mambaclinix") or base == "umamba_bot"
    for opt in [o for o in opts if o in _MAMBACLINIX_ONLY]:
        if not clinix:
            raise ValueError(f"the option +{opt} applies to MambaClinix models only, not {base!r}.")
    if "cf" in opts and "cl" in opts:
        raise ValueError(f"+cf (channels-first) and +cl (channels-last) exclude each other in {name!r}.")
    modes = {"ckptnone": False, "ckpt": "step", "ckptblock": "block", "ckptfirst": "first_level"}
    chosen = [o for o in modes if o in opts]
    if len(chosen) > 1:
        raise ValueError(f"+{' and +'.join(chosen)} (checkpointing granularities) exclude each other in {name!r}.")
    kwargs: dict[str, Any] = {"scan_backend": backend}
    if chosen:  # otherwise the network's default
        kwargs["gradient_checkpointing"] = modes[chosen[0]]
    if "cf" in opts:
        kwargs["channels_last"] = False
    if base == "mambaclinix":
        model: nn.Module = MambaClinix(3, in_channels, out_channels, **kwargs)
    elif base == "mambaclinix_demo":
        model = MambaClinix(3, in_channels, out_channels, **kwargs, **DEMO_PLAN)
    elif base == "umamba_bot":
        n = len(DEFAULT_FEATURES)
        model = MambaClinix(3, in_channels, out_channels, block_types=["res"] * (n - 1) + ["mamba"], **kwargs)
    elif base == "dynunet":
        model = DynUNet(
            3, in_channels, out_channels, kernel_size=[3] * 6, strides=list(DEFAULT_STRIDES),
            upsample_kernel_size=list(DEFAULT_STRIDES[1:]), filters=list(DEFAULT_FEATURES), res_block=True,
        )
    elif base == "authors":
        from scripts.benchmark.peers import build_authors_network

        model = build_authors_network(in_channels, out_channels)
    elif base == "swinunetr":
        model = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=48, spatial_dims=3)
    else:
        model = SegResNet(3, init_filters=16, in_channels=in_channels, out_channels=out_channels)
    return model
