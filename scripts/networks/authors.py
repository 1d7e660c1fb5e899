# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Weights of the authors' MambaClinix (nnU-Net v2, github CYB08/MambaClinix-PyTorch) in this bundle's network.

An nnU-Net checkpoint (``checkpoint_final.pth``) keeps the network's ``state_dict()`` under ``network_weights``.
The authors' network stores most tensors under two or more names: dynamic-network-architectures'
``ConvDropoutNormReLU`` holds its convolution and norm both as ``conv`` / ``norm`` and inside an ``all_modules``
``nn.Sequential``, and the decoder keeps a reference to the encoder (``decoder.encoder.*`` repeats ``encoder.*``).
:func:`authors_state_dict_to_bundle` keeps one name per tensor (checking that the aliases agree), renames it to
:class:`~scripts.networks.MambaClinix`'s key and drops the authors' unused ``skip_scale`` of the Mamba layers.

The plan of the network (features, kernels, HGCN orders, Mamba sizes) can be read off the weights
(:func:`authors_network_kwargs`); the down-sampling strides cannot (average pooling has no weights) and must come
from the nnU-Net plan (``pool_op_kernel_sizes``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["authors_network_kwargs", "authors_state_dict_to_bundle"]

_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / torch.compile wrappers
_REQUIRED = (
    "encoder.stem.convs.0.conv.weight",
    "encoder.stages.0.blocks.0.conv1.conv.weight",
    "decoder.seg_layers.0.weight",
)

# (pattern of an authors' key inside one HGCN / Mamba layer or the decoder, the bundle's name for it)
_HGCN_RULES = [
    (r"transconv\.conv\.(weight|bias)", r"stem.conv.\1"),
    (r"lynorm1\.gamma", "norm.weight"),
    (r"lynorm1\.beta", "norm.bias"),
    (r"lynorm2\.gamma", "norm2.weight"),
    (r"lynorm2\.beta", "norm2.bias"),
    (r"hgConvs\.(proj_in|dwconv|proj_out)\.(weight|bias)", r"hgconv.\1.\2"),
    (r"hgConvs\.reconv\.(\d+)\.(weight|bias)", r"hgconv.pws.\1.\2"),
    (r"gamma1", "gamma"),
    (r"conv1\.conv\.(weight|bias)", r"out_conv1.conv.\1"),
    (r"conv2\.conv\.(weight|bias)", r"out_conv2.conv.\1"),
]
_MAMBA_RULES = [
    (r"norm\.(weight|bias)", r"norm.\1"),
    (r"mamba\.(in_proj\.weight|conv1d\.weight|conv1d\.bias|x_proj\.weight|dt_proj\.weight|dt_proj\.bias|A_log|D"
     r"|out_proj\.weight|in_proj\.bias|out_proj\.bias)", r"mamba.\1"),
    (r"proj\.(weight|bias)", r"proj.\1"),
]
_RES_BLOCK = r"((conv1|conv2|skip\.\d+)\.(conv|norm)\.(weight|bias))"
_DECODER_RULES = [
    (r"decoder\.Init_Residual\." + _RES_BLOCK, r"bottleneck.\1"),
    (r"decoder\.upsample_layers\.(\d+)\.conv\.(weight|bias)", r"up.\1.conv.\2"),
    (r"decoder\.residual_blocks\.(\d+)\." + _RES_BLOCK, r"skip_blocks.\1.\2"),
    (r"decoder\.stages\.(\d+)\.conv1\.(weight|bias)", r"fuse_blocks.\1.conv1.conv.\2"),
    (r"decoder\.stages\.(\d+)\.norm1\.(weight|bias)", r"fuse_blocks.\1.conv1.norm.\2"),
    (r"decoder\.stages\.(\d+)\.conv2\.(weight|bias)", r"fuse_blocks.\1.conv2.conv.\2"),
    (r"decoder\.stages\.(\d+)\.norm2\.(weight|bias)", r"fuse_blocks.\1.conv2.norm.\2"),
    (r"decoder\.stages\.(\d+)\.conv3\.(weight|bias)", r"fuse_blocks.\1.skip.0.conv.\2"),
    (r"decoder\.seg_layers\.(\d+)\.(weight|bias)", r"heads.\1.\2"),
]


def _canonical(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One entry per tensor: wrapper prefixes stripped, ``decoder.encoder.*`` and ``all_modules`` aliases dropped
    after checking that they hold the same values as the names kept."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(
            "expected a state dict (a mapping of names to tensors), e.g. checkpoint['network_weights'] of an nnU-Net "
            f"checkpoint; got {type(state_dict).__name__}."
        )
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        stripped[key] = value
    missing = [k for k in _REQUIRED if k not in stripped]
    if missing:
        raise ValueError(
            f"not a state dict of the authors' MambaClinix (nnU-Net MambaClinix_3d): missing {missing}. Pass "
            "checkpoint['network_weights'] of a checkpoint trained with github CYB08/MambaClinix-PyTorch."
        )
    canonical = {k: v for k, v in stripped.items() if not k.startswith("decoder.encoder.") and ".all_modules." not in k}
    aliases = {k: v for k, v in stripped.items() if k not in canonical}
    for key, value in aliases.items():
        original = key[len("decoder.") :] if key.startswith("decoder.encoder.") else key
        if ".all_modules." in original:  # ConvDropoutNormReLU: all_modules.0 is the conv, the next one the norm
            match = re.fullmatch(r"(.*)\.all_modules\.(\d+)\.(.*)", original)
            head, index, tail = match.groups()  # type: ignore[union-attr]
            original = f"{head}.{'conv' if index == '0' else 'norm'}.{tail}"
        if original in canonical and not (
            canonical[original].shape == value.shape and torch.equal(canonical[original], value)
        ):
            raise ValueError(f"the aliased entries {key!r} and {original!r} of the state dict differ; it is corrupt.")
    return canonical


def _stage_indices(keys: list[str], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def _encoder_layout(sd: Mapping[str, torch.Tensor]) -> tuple[list[str], int]:
    """Block type (``"hgcn"`` / ``"mamba"``) of each stage and the stage whose HGCN block the LayerNorm precedes."""
    keys = list(sd)
    stages = _stage_indices(keys, r"encoder\.stages\.(\d+)\.")
    if stages != list(range(len(stages))) or len(stages) < 2:
        raise ValueError(f"the authors' encoder stages must be numbered 0..n-1 (n >= 2), got {stages}.")
    types = []
    for s in stages:
        prefix = f"encoder.encoder_layers.{s}."
        if f"{prefix}hgConvs.proj_in.weight" in sd:
            types.append("hgcn")
        elif f"{prefix}mamba.A_log" in sd:
            types.append("mamba")
        else:
            raise ValueError(f"stage {s} of the state dict has neither an HGCN block nor a Mamba layer ({prefix}*).")
        if _stage_indices(keys, rf"encoder\.stages\.{s}\.blocks\.(\d+)\.") != [0]:
            raise ValueError(f"stage {s} of the authors' encoder should hold one residual block (blocks.0).")
    if "hgcn" not in types or "encoder.LayerNorm.gamma" not in sd:
        raise ValueError("the authors' MambaClinix has at least one HGCN stage and an encoder.LayerNorm; not found.")
    return types, max(s for s, t in enumerate(types) if t == "hgcn")


def authors_network_kwargs(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments of :class:`~scripts.networks.MambaClinix` read off an authors' state dict.

    Gives ``spatial_dims``, ``in_channels``, ``out_channels``, ``features``, ``kernel_size`` (per stage and axis),
    ``block_types``, ``hgcn_orders``, ``d_state``, ``d_conv`` and ``expand``. The strides are not in the weights;
    pass the plan's ``pool_op_kernel_sizes`` as ``strides``.

    Raises:
        ValueError: for a state dict of another architecture.
    """
    sd = _canonical(state_dict)
    types, _ = _encoder_layout(sd)
    stem = sd["encoder.stem.convs.0.conv.weight"]
    stages = range(len(types))
    conv1 = [sd[f"encoder.stages.{s}.blocks.0.conv1.conv.weight"] for s in stages]
    kwargs: dict[str, Any] = {
        "spatial_dims": stem.ndim - 2,
        "in_channels": int(stem.shape[1]),
        "out_channels": int(sd["decoder.seg_layers.0.weight"].shape[0]),
        "features": [int(w.shape[0]) for w in conv1],
        "kernel_size": [[int(k) for k in w.shape[2:]] for w in conv1],
        "block_types": types,
        "hgcn_orders": [
            1 + len(_stage_indices(list(sd), rf"encoder\.encoder_layers\.{s}\.hgConvs\.reconv\.(\d+)\.weight"))
            for s in stages
            if types[s] == "hgcn"
        ],
    }
    mamba = next((s for s in stages if types[s] == "mamba"), None)
    if mamba is not None:
        a_log = sd[f"encoder.encoder_layers.{mamba}.mamba.A_log"]
        kwargs["d_state"] = int(a_log.shape[1])
        kwargs["d_conv"] = int(sd[f"encoder.encoder_layers.{mamba}.mamba.conv1d.weight"].shape[-1])
        kwargs["expand"] = int(a_log.shape[0]) // kwargs["features"][mamba]
    return kwargs


def _rename(key: str, types: list[str], norm_stage: int) -> str | None:
    """The bundle's name of an authors' key (``None`` for a key to drop, ``""`` for an unknown one)."""
    if m := re.fullmatch(r"encoder\.stem\.convs\.0\.(conv|norm)\.(weight|bias)", key):
        return f"stem.{m.group(1)}.{m.group(2)}"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.blocks\.0\." + _RES_BLOCK, key):
        return f"encoder.{m.group(1)}.0.{m.group(2)}"
    if m := re.fullmatch(r"encoder\.LayerNorm\.(gamma|beta)", key):
        return f"encoder.{norm_stage}.1.{'weight' if m.group(1) == 'gamma' else 'bias'}"
    if m := re.fullmatch(r"encoder\.encoder_layers\.(\d+)\.(.+)", key):
        s, rest = int(m.group(1)), m.group(2)
        if s >= len(types):
            return ""
        if types[s] == "mamba" and rest == "skip_scale":  # a parameter the authors' forward never uses
            return None
        index = 2 if s == norm_stage else 1
        for pattern, target in _HGCN_RULES if types[s] == "hgcn" else _MAMBA_RULES:
            if re.fullmatch(pattern, rest):
                return f"encoder.{s}.{index}." + re.sub(pattern, target, rest)
        return ""
    for pattern, target in _DECODER_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return ""


def _expected_shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Key -> shape of the bundle's network for the plan of ``sd`` (built on the meta device: no memory, no init).

    A strided stage that changes the channel count has its skip projection at index 1 (after the pooling); the
    network is built with stride 2 there, the only stride-dependent part of the keys."""
    from .mambaclinix import MambaClinix  # late import: mambaclinix does not depend on this module

    kwargs = authors_network_kwargs(sd)
    num_stages = len(kwargs["features"])
    strides = [2 if f"encoder.stages.{s}.blocks.0.skip.1.conv.weight" in sd else 1 for s in range(num_stages)]
    with torch.device("meta"):
        net = MambaClinix(strides=strides, he_init=False, drop_path_rate=0.0, **kwargs)
    return {k: v.shape for k, v in net.state_dict().items()}


def authors_state_dict_to_bundle(
    state_dict: Mapping[str, Any], network: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Map a state dict of the authors' MambaClinix onto :class:`~scripts.networks.MambaClinix`'s keys.

    The result loads with ``load_state_dict(..., strict=True)`` into ``MambaClinix`` built with
    :func:`authors_network_kwargs` of the same state dict and the plan's strides (default options otherwise). The
    tensors are not copied.

    Args:
        state_dict: ``checkpoint["network_weights"]`` of an nnU-Net checkpoint of the authors' network (aliased
            duplicate keys, ``module.`` / ``_orig_mod.`` prefixes allowed).
        network: optional bundle network the result is meant for; its keys and shapes are checked as well.

    Raises:
        ValueError: for a state dict of another architecture, inconsistent shapes, or a mismatch with ``network``.
    """
    sd = _canonical(state_dict)
    types, norm_stage = _encoder_layout(sd)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        name = _rename(key, types, norm_stage)
        if name == "":
            unknown.append(key)
        elif name is not None:
            out[name] = value
    if unknown:
        raise ValueError(f"keys the authors' MambaClinix does not have (another architecture?): {unknown[:8]}.")
    checks = [("a MambaClinix with the plan read off the weights", _expected_shapes(sd))]
    if network is not None:
        checks.append(("the given network", {k: v.shape for k, v in network.state_dict().items()}))
    for what, expected in checks:
        missing = sorted(set(expected) - set(out))
        extra = sorted(set(out) - set(expected))
        shapes = [
            f"{k}: {tuple(out[k].shape)} vs {tuple(s)}" for k, s in expected.items() if k in out and out[k].shape != s
        ]
        if missing or extra or shapes:
            raise ValueError(
                f"the converted weights do not fit {what}: missing {missing[:6]}, unexpected {extra[:6]}, "
                f"shape mismatches (converted vs expected) {shapes[:6]}. Build the network with the checkpoint's plan "
                "(features, kernels, in/out channels) and default options."
            )
    return out
