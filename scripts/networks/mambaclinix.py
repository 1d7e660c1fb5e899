# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""MambaClinix: a U-Net whose encoder uses HGCN blocks in the early stages and residual Mamba layers later.

Bian et al., "MambaClinix: Hierarchical Gated Convolution and Mamba-Based U-Net for Enhanced 3D Medical
Image Segmentation", https://arxiv.org/abs/2409.12533.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from scripts.architecture import BLOCK_TYPES, default_block_types, default_hgcn_orders
from .blocks import (
    ChannelLayerNorm,
    ConvNormAct,
    HGCNBlock,
    ResidualBlock,
    ResidualMambaLayer,
    UpsampleBlock,
    step_runner,
)
from .conv import conv_layer
from .initialization import he_init_

# default_block_types / default_hgcn_orders: re-exported from scripts.architecture (the one definition)
__all__ = ["MambaClinix", "default_block_types", "default_hgcn_orders"]


def _per_stage(value, num_stages: int, spatial_dims: int, name: str) -> list[tuple[int, ...]]:
    """Normalise an int, a per-stage list of ints, or a per-stage list of per-axis lists."""
    if isinstance(value, int):
        return [(value,) * spatial_dims] * num_stages
    value = list(value)
    if len(value) != num_stages:
        raise ValueError(f"{name} needs one entry per stage ({num_stages}, the length of features), got {len(value)}.")
    out = []
    for v in value:
        if isinstance(v, (int, np.integer)):
            out.append((int(v),) * spatial_dims)
        else:
            v = tuple(int(i) for i in v)
            if len(v) != spatial_dims:
                raise ValueError(f"each {name} entry must have {spatial_dims} values (one per axis), got {v}.")
            out.append(v)
    for v in out:
        if any(i < 1 for i in v):
            raise ValueError(f"{name} values must be >= 1, got {v}.")
    return out


CHECKPOINT_MODES = (False, "light", "first_level", "block", "step")


def _checkpoint_mode(value: bool | str) -> bool | str:
    """``gradient_checkpointing`` as one of :data:`CHECKPOINT_MODES` (``True`` means ``"step"``; the strings
    ``"true"`` / ``"false"`` in any case count as the booleans, as command-line overrides arrive as text)."""
    if isinstance(value, (bool, np.bool_)):
        return "step" if value else False
    names = [m for m in CHECKPOINT_MODES if m]
    if isinstance(value, str) and value.lower() in ("true", "false", *names):
        return {"true": "step", "false": False}.get(value.lower(), value.lower())
    raise ValueError(f"gradient_checkpointing must be False, True or one of {names}, got {value!r}.")


class MambaClinix(nn.Module):
    """MambaClinix segmentation network for 2D or 3D inputs.

    Encoder: a stem convolution, then for every stage a residual block (strided for down-sampling) followed
    by an HGCN block (early stages, hgConv of increasing order) or a residual Mamba layer (later stages); a
    channels-first LayerNorm precedes the last HGCN block. Decoder: a residual block on the bottleneck, then
    per level nearest up-sampling + 1x1 conv, a residual block on the skip, concatenation, and a residual
    block back to the level's width (its 1x1 shortcut a plain convolution), with a 1x1 segmentation head per level.

    With the defaults, the 3D network computes the function of the authors' ``MambaClinix_3d.py`` (built by
    nnU-Net from a plan, including its He initialisation); ``tests/test_authors_fixture.py`` checks this against
    outputs of the authors' code, and :func:`scripts.networks.authors_state_dict_to_bundle` converts their
    weights. The 2D network is the same design in 2D.

    Args:
        spatial_dims: 2 or 3.
        in_channels: number of input channels (e.g. 4 MRI modalities).
        out_channels: number of output channels (classes incl. background for softmax).
        features: channels per stage; its length is the number of stages.
        kernel_size: an int, one int per stage, or one per-axis list per stage.
        strides: down-sampling stride per stage (same forms as ``kernel_size``); the first is usually 1.
        block_types: ``"hgcn"``, ``"mamba"`` or ``"res"`` (a second plain residual block) per stage; default
            Eq. 11 (first ``ceil(n/2)`` stages HGCN, the rest Mamba).
        hgcn_orders: interaction order of each HGCN stage; default ``s + 2`` clipped to 2..6.
        hgcn_gating: ``"add"`` (authors' hgConv) or ``"mul"`` (HorNet's gnConv).
        drop_path_rate: stochastic depth of the HGCN blocks rises linearly from 0 to this over the stages.
        norm: MONAI norm name or (name, kwargs).
        act: MONAI activation name or (name, kwargs).
        deep_supervision: in training mode return one output per decoder level, full resolution first.
        mamba_scan: ``"forward"`` (paper) or ``"bidirectional"`` scan of the flattened feature map.
        d_state: Mamba state size.
        d_conv: Mamba convolution width.
        expand: Mamba expansion factor.
        scan_backend: selective-scan backend (``None``: automatic; see ``scripts.networks.selective_scan``).
        gradient_checkpointing: recompute activations in backward instead of keeping them (training only): less
            memory for more step time. ``"light"`` (default) recomputes only steps without a dense convolution:
            the stem (a convolution from the few input channels) and the hgConv branch of every HGCN block
            (LayerNorm, 1x1 and depthwise convolutions, gating), about 300 MiB less for a default-plan 64^3
            batch-2 step for about 3% more time. ``"block"`` keeps the outputs of the blocks (stem, residual, HGCN
            and Mamba blocks, up-sampling, skip and fuse blocks) and recomputes each block once in backward;
            ``"first_level"`` does the same for the blocks of the first (highest-resolution) level only: the stem,
            the first encoder stage and the decoder's last up-sampling, skip and fuse blocks, where the
            activations are largest (deeper HGCN blocks as with ``"light"``); ``"step"`` (or ``True``) also
            checkpoints the convolution sub-steps inside the residual and HGCN blocks, so that the recomputation
            of a block holds one sub-step at a time: the least memory, for one more forward pass of those
            sub-steps. ``False`` keeps everything. Outputs and gradients are the same in every mode (figures in
            docs/benchmarks).
        channels_last: run the convolutions on channels-last memory (``channels_last_3d`` in 3D). ``None``
            (default) turns it on for 3D inputs on CPU, where oneDNN's kernels are faster in that layout
            (docs/benchmarks); the output is returned channels-first (contiguous) either way and the results are the same
            up to float rounding.
        he_init: initialise the network as nnU-Net does (:func:`scripts.networks.initialization.he_init_`:
            Kaiming-normal convolution weights with ``a=1e-2``, zero convolution biases; Mamba's ``conv1d``, the
            linear layers, norms and layer scales keep their own initialisation). ``False`` keeps PyTorch's
            default initialisation of the convolutions.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (32, 64, 128, 256, 320, 320),
        kernel_size: int | Sequence[int] | Sequence[Sequence[int]] = 3,
        strides: int | Sequence[int] | Sequence[Sequence[int]] = (1, 2, 2, 2, 2, 2),
        block_types: Sequence[str] | None = None,
        hgcn_orders: Sequence[int] | None = None,
        hgcn_gating: str = "add",
        drop_path_rate: float = 0.5,
        norm: str | tuple = ("instance", {"affine": True}),
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        deep_supervision: bool = False,
        mamba_scan: str = "forward",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        scan_backend: str | None = None,
        gradient_checkpointing: bool | str = "light",
        channels_last: bool | None = None,
        he_init: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}.")
        features = [int(f) for f in features]
        num_stages = len(features)
        if num_stages < 2:
            raise ValueError(f"MambaClinix needs at least 2 stages (len(features) >= 2), got {num_stages}.")
        if any(f < 2 for f in features):
            raise ValueError(f"features must all be >= 2, got {features}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        kernels = _per_stage(kernel_size, num_stages, spatial_dims, "kernel_size")
        stride_list = _per_stage(strides, num_stages, spatial_dims, "strides")
        block_types = list(block_types) if block_types is not None else default_block_types(num_stages)
        if len(block_types) != num_stages or any(b not in BLOCK_TYPES for b in block_types):
            raise ValueError(
                f"block_types needs one of 'hgcn'/'mamba'/'res' per stage ({num_stages} stages), got {block_types}."
            )
        num_hgcn = block_types.count("hgcn")
        hgcn_orders = list(hgcn_orders) if hgcn_orders is not None else default_hgcn_orders(block_types)
        if len(hgcn_orders) != num_hgcn:
            raise ValueError(f"hgcn_orders needs one order per HGCN stage ({num_hgcn}), got {hgcn_orders}.")

        self.spatial_dims = spatial_dims
        self.features = features
        self.strides = stride_list
        self.kernel_sizes = kernels
        self.block_types = block_types
        self.hgcn_orders = [int(o) for o in hgcn_orders]
        self.deep_supervision = deep_supervision
        self._gradient_checkpointing = _checkpoint_mode(gradient_checkpointing)
        self.channels_last = channels_last
        # the total down-sampling per axis: inputs must be divisible by it
        self.size_divisible = tuple(int(np.prod([s[a] for s in stride_list])) for a in range(spatial_dims))

        self.stem = ConvNormAct(spatial_dims, in_channels, features[0], kernels[0], 1, norm, act)
        drop_rates = np.linspace(0.0, drop_path_rate, num_stages).tolist()
        last_hgcn = max((s for s, b in enumerate(block_types) if b == "hgcn"), default=-1)
        orders = iter(self.hgcn_orders)
        self.encoder = nn.ModuleList()
        for s in range(num_stages):
            in_ch = features[0] if s == 0 else features[s - 1]
            layers: list[nn.Module] = [ResidualBlock(spatial_dims, in_ch, features[s], kernels[s], stride_list[s], norm, act)]
            if block_types[s] == "hgcn":
                if s == last_hgcn:
                    layers.append(ChannelLayerNorm(features[s]))
                layers.append(
                    HGCNBlock(spatial_dims, features[s], next(orders), kernels[s], hgcn_gating, drop_rates[s], act=act)
                )
            elif block_types[s] == "mamba":
                layers.append(ResidualMambaLayer(features[s], d_state, d_conv, expand, mamba_scan, scan_backend))
            else:  # "res": a second plain residual block (the ablation baseline, U-Mamba-Bot-like layouts)
                layers.append(ResidualBlock(spatial_dims, features[s], features[s], kernels[s], 1, norm, act))
            self.encoder.append(nn.Sequential(*layers))

        self.bottleneck = ResidualBlock(spatial_dims, features[-1], features[-1], kernels[-1], 1, norm, act)
        conv = conv_layer(spatial_dims)
        self.up = nn.ModuleList()
        self.skip_blocks = nn.ModuleList()
        self.fuse_blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(num_stages - 2, -1, -1):  # decoder levels, deepest first
            self.up.append(UpsampleBlock(spatial_dims, features[s + 1], features[s], stride_list[s + 1]))
            self.skip_blocks.append(ResidualBlock(spatial_dims, features[s], features[s], kernels[s], 1, norm, act))
            self.fuse_blocks.append(
                ResidualBlock(
                    spatial_dims, 2 * features[s], features[s], kernels[s], 1, norm, act, projection_norm=False
                )
            )
            self.heads.append(conv(features[s], out_channels, kernel_size=1))
        self.gradient_checkpointing = gradient_checkpointing  # also switches it in the blocks (property)
        if he_init:
            he_init_(self)

    @property
    def gradient_checkpointing(self) -> bool | str:
        """The checkpointing granularity: one of :data:`CHECKPOINT_MODES` (``True`` is stored as ``"step"``);
        setting it switches the blocks' sub-step checkpointing as well."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool | str) -> None:
        mode = _checkpoint_mode(value)
        self._gradient_checkpointing = mode
        for module in self.modules():
            if isinstance(module, (ResidualBlock, HGCNBlock)):
                module.gradient_checkpointing = mode == "step"
        for level, stage in enumerate(self.encoder):
            # the hgConv branch alone where the whole HGCN block is not checkpointed already
            for block in stage:
                if isinstance(block, HGCNBlock):
                    block.gated_checkpointing = bool(mode) and not self._whole_blocks(level)

    def _whole_blocks(self, level: int) -> bool:
        """Whether the blocks of ``level`` (0: the highest resolution, encoder and decoder) are checkpointed whole."""
        mode = self._gradient_checkpointing
        return mode in ("block", "step") or (mode == "first_level" and level == 0)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (batch, channels, *spatial) input with {self.spatial_dims} spatial dims, got shape "
                f"{tuple(x.shape)}."
            )
        in_channels = self.stem.conv.in_channels
        if x.shape[1] != in_channels:
            raise ValueError(f"the network was built for {in_channels} input channels, got {x.shape[1]}.")
        spatial = tuple(x.shape[2:])
        if any(int(d) % m != 0 for d, m in zip(spatial, self.size_divisible)):
            raise ValueError(
                f"input spatial size {spatial} must be divisible by {self.size_divisible} (the product of the "
                "strides per axis); pad or crop the input, e.g. with monai.transforms.DivisiblePad."
            )

    def _memory_format(self, x: torch.Tensor) -> torch.memory_format:
        use = self.channels_last if self.channels_last is not None else (x.ndim == 5 and x.device.type == "cpu")
        if not use:
            return torch.contiguous_format
        return torch.channels_last_3d if x.ndim == 5 else torch.channels_last

    def _fuse(self, level: int, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse_blocks[level](torch.cat([up, skip], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segmentation logits: with ``deep_supervision`` in training mode one tensor per decoder level (full
        resolution first), otherwise the full-resolution logits."""
        outputs = self._forward(x, all_levels=self.deep_supervision and self.training)
        return outputs if self.deep_supervision and self.training else outputs[0]

    def deep_supervision_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The logits of every decoder level, full resolution first, in training and in eval mode alike (what
        the authors' network returns whenever its ``deep_supervision`` is on)."""
        return self._forward(x, all_levels=True)

    def _forward(self, x: torch.Tensor, all_levels: bool) -> list[torch.Tensor]:
        if not torch.jit.is_tracing():
            self._check_input(x)
        memory_format = self._memory_format(x)
        x = x.contiguous(memory_format=memory_format)
        if memory_format != torch.contiguous_format and x.shape[1] == 1:
            # a 1-channel tensor counts as channels-last already, but oneDNN reads the layout from the channel
            # stride: give it the channels-last strides (a free view) so that the stem writes channels-last output
            spatial = int(np.prod(x.shape[2:]))
            x = x.as_strided(x.shape, (spatial, 1, *x.stride()[2:]))
        # with gradient_checkpointing: the stem, then one checkpoint per block ("first_level": the first level's only)
        first = step_runner(self, enabled=self._whole_blocks(0))
        deeper = step_runner(self, enabled=self._whole_blocks(1))
        stem = step_runner(self, enabled=bool(self._gradient_checkpointing))
        h = stem(self.stem, x).contiguous(memory_format=memory_format)
        skips = []
        for level, stage in enumerate(self.encoder):
            run = first if level == 0 else deeper
            for block in stage:  # checkpointed block by block: the recomputation peak stays one block's
                h = run(block, h)
            skips.append(h)
        h = deeper(self.bottleneck, skips[-1])
        outputs = []
        last = len(self.heads) - 1
        for i, head in enumerate(self.heads):
            run = first if i == last else deeper
            up, skip = run(self.up[i], h), run(self.skip_blocks[i], skips[-(i + 2)])
            h = run(functools.partial(self._fuse, i), up, skip)
            if all_levels or i == last:
                outputs.append(head(h).contiguous())
        return outputs[::-1]
