# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Mamba-HUNet: a 2D U-Net of visual state-space (VSS) blocks with hierarchical (HUNet-style) upsampling.

Sanjid et al., "Integrating Mamba Sequence Model and Hierarchical Upsampling Network for Accurate Semantic
Segmentation of Multiple Sclerosis Lesion", https://arxiv.org/abs/2403.17432.

The encoder embeds non-overlapping patches, runs VSS blocks (SS2D: depthwise conv, SiLU, four-direction
cross-scan, selective scan, cross-merge, layer norm and SiLU gating) and merges patches between stages.
Each decoder stage upsamples along two pathways (a linear patch-expanding layer and a transposed
convolution), fuses the skip connection with extra convolutions (batch norm, dropout) and runs VSS blocks.
The decoder outputs of every level are brought to the finest token resolution and summed (hierarchical
upsampling) before a transposed-convolution head restores the input resolution and a 1x1 convolution
gives the class logits.

The network is two-dimensional by construction (the cross-scan is defined on a plane). Tensors inside
the VSS stages are channels-last ``(B, H, W, C)``; the convolutional parts are channels-first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import DropPath
from monai.networks.layers.utils import get_act_layer, get_norm_layer

from .initialization import init_dt_projection_, resolve_dt_rank, ssm_state_parameters
from .selective_scan import selective_scan

__all__ = ["SS2D", "VSSBlock", "PatchMerging2D", "HUNetUpBlock", "MambaHUNet", "cross_scan", "cross_merge"]


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Unfold a feature map into the four scan sequences of SS2D.

    Args:
        x: tensor of shape ``(B, D, H, W)``.

    Returns:
        tensor ``(B, 4, D, H * W)``: row-major, column-major, reversed row-major, reversed column-major.
    """
    b, d, h, w = x.shape
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    fwd = torch.stack([rows, cols], dim=1)
    return torch.cat([fwd, fwd.flip(-1)], dim=1)


def cross_merge(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Map the four scanned sequences back to row-major order and sum them (inverse of :func:`cross_scan`).

    Args:
        y: tensor ``(B, 4, D, H * W)`` in the order produced by :func:`cross_scan`.
        h: height of the feature map.
        w: width of the feature map.

    Returns:
        tensor ``(B, D, H * W)`` in row-major order.
    """
    b, k, d, length = y.shape
    y = y[:, 0:2] + y[:, 2:4].flip(-1)
    cols = y[:, 1].reshape(b, d, w, h).transpose(2, 3).reshape(b, d, length)
    return y[:, 0] + cols


class SS2D(nn.Module):
    """2D selective scan: the token mixer of a VSS block (channels-last in and out).

    Args:
        d_model: number of input/output channels.
        d_state: SSM state size ``N``.
        d_conv: kernel size of the depthwise convolution (odd).
        expand: inner width factor, ``d_inner = expand * d_model``.
        dt_rank: rank of the step-size projection, ``"auto"`` for ``ceil(d_model / 16)``.
        dt_min: lower bound of the initial step size.
        dt_max: upper bound of the initial step size.
        dt_init_floor: floor of the initial step size.
        dropout: dropout after the output projection.
        conv_bias: whether the depthwise convolution has a bias.
        bias: whether the input/output projections have biases.
        scan_backend: backend of :func:`scripts.networks.selective_scan.selective_scan` (``None`` = auto).
    """

    num_directions = 4

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: float = 2.0,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dropout: float = 0.0,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        if d_model < 1 or d_state < 1:
            raise ValueError(f"d_model and d_state must be positive, got d_model={d_model}, d_state={d_state}.")
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"d_conv must be a positive odd kernel size (it keeps the map size), got {d_conv}.")
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = max(1, int(expand * d_model))
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        self.scan_backend = scan_backend
        k, d, n, r = self.num_directions, self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d, bias=bias)
        self.conv2d = nn.Conv2d(d, d, d_conv, padding=d_conv // 2, groups=d, bias=conv_bias)
        self.act = nn.SiLU()
        # per-direction projections to (dt, B, C) and from dt_rank to d_inner
        bound = d**-0.5
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d))
        init_dt_projection_(self.dt_projs_weight, self.dt_projs_bias, dt_min, dt_max, dt_init_floor=dt_init_floor)
        self.A_logs, self.Ds = ssm_state_parameters(k * d, n)
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def scan(self, xs: torch.Tensor) -> torch.Tensor:
        """Run the selective scan on the four sequences.

        Args:
            xs: ``(B, 4, d_inner, L)`` from :func:`cross_scan`.

        Returns:
            ``(B, 4, d_inner, L)``.
        """
        b, k, d, length = xs.shape
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        y = selective_scan(
            xs.reshape(b, k * d, length),
            dts.reshape(b, k * d, length),
            -torch.exp(self.A_logs.float()),
            bs.contiguous(),
            cs.contiguous(),
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return y.reshape(b, k, d, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = cross_merge(self.scan(cross_scan(x)), h, w)
        y = self.out_norm(y.transpose(1, 2).reshape(b, h, w, self.d_inner))
        y = y * F.silu(z)
        return self.dropout(self.out_proj(y))


class VSSBlock(nn.Module):
    """Visual state-space block: ``x + drop_path(SS2D(LayerNorm(x)))`` on channels-last tensors.

    Args:
        dim: number of channels.
        drop_path: stochastic depth rate.
        attn_drop: dropout inside SS2D.
        ss2d_kwargs: further arguments of :class:`SS2D`.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, attn_drop: float = 0.0, **ss2d_kwargs) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = SS2D(d_model=dim, dropout=attn_drop, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class PatchMerging2D(nn.Module):
    """Halve the resolution: concatenate each 2x2 neighbourhood, normalise and project (channels-last).

    Args:
        in_dim: input channels.
        out_dim: output channels.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_dim)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class PatchExpand2D(nn.Module):
    """Double the resolution with a linear layer and a pixel shuffle (channels-last).

    Args:
        in_dim: input channels.
        out_dim: output channels.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(in_dim, 4 * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        x = self.expand(x).reshape(b, h, w, 2, 2, self.out_dim).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, 2 * h, 2 * w, self.out_dim))


def _conv_norm_act(in_ch: int, out_ch: int, norm: str | tuple, act: str | tuple, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
        get_norm_layer(norm, spatial_dims=2, channels=out_ch),
        get_act_layer(act),
    )


class HUNetUpBlock(nn.Module):
    """HUNet-style upsampling block: dual-pathway x2 upsampling, skip fusion by convolutions (channels-last I/O).

    The two pathways (linear patch expanding, and transposed convolution with norm and activation) are
    summed, concatenated with the skip features and fused by two 3x3 convolutions with norm, activation
    and dropout.

    Args:
        in_dim: channels of the coarser input.
        skip_dim: channels of the skip connection.
        out_dim: output channels.
        norm: normalisation of the convolutions (name or (name, kwargs)).
        act: activation of the convolutions (name or (name, kwargs)).
        dropout: dropout rate between the fusion convolutions.
    """

    def __init__(
        self,
        in_dim: int,
        skip_dim: int,
        out_dim: int,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.expand = PatchExpand2D(in_dim, out_dim)
        self.transp = nn.Sequential(
            nn.ConvTranspose2d(in_dim, out_dim, kernel_size=2, stride=2, bias=False),
            get_norm_layer(norm, spatial_dims=2, channels=out_dim),
            get_act_layer(act),
        )
        self.fuse = nn.Sequential(
            _conv_norm_act(out_dim + skip_dim, out_dim, norm, act),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            _conv_norm_act(out_dim, out_dim, norm, act),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.expand(x).permute(0, 3, 1, 2) + self.transp(x.permute(0, 3, 1, 2))
        y = self.fuse(torch.cat([up, skip.permute(0, 3, 1, 2)], dim=1))
        return y.permute(0, 2, 3, 1)


class MambaHUNet(nn.Module):
    """Mamba-HUNet for 2D segmentation (returns logits of shape ``(B, out_channels, H, W)``).

    Args:
        in_channels: number of input channels.
        out_channels: number of classes (including background).
        img_size: nominal input size (int or (H, W)); it must be divisible by the total downsampling
            ``patch_size * 2 ** (len(embed_dims) - 1)``. Any input size divisible by it is accepted.
        patch_size: size of the non-overlapping patches of the embedding.
        embed_dims: channels of the encoder stages (one per resolution level).
        depths: number of VSS blocks per encoder stage.
        depths_decoder: number of VSS blocks per decoder stage, finest level first; the coarsest level
            is the bottleneck and has none. Defaults to ``depths[:-1]``.
        d_state: SSM state size.
        d_conv: depthwise convolution kernel size of SS2D (odd).
        expand: inner width factor of SS2D.
        dt_rank: step-size projection rank, ``"auto"`` or an int.
        drop_rate: dropout of the SS2D output and of the convolutional decoder and head.
        drop_path_rate: largest stochastic depth rate (linearly increasing over the encoder blocks).
        norm: normalisation of the convolutional layers (the VSS stages use layer norm).
        act: activation of the convolutional layers.
        hierarchical: whether to sum the upsampled outputs of all decoder levels before the head.
        scan_backend: backend of the selective scan (``None`` = automatic).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        img_size: int | Sequence[int] = 256,
        patch_size: int = 4,
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 2, 2),
        depths_decoder: Sequence[int] | None = None,
        d_state: int = 16,
        d_conv: int = 3,
        expand: float = 2.0,
        dt_rank: int | str = "auto",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        hierarchical: bool = True,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        embed_dims, depths = [int(c) for c in embed_dims], [int(d) for d in depths]
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}.")
        if len(embed_dims) < 2 or any(c < 1 for c in embed_dims):
            raise ValueError(f"embed_dims needs at least two positive entries (one per level), got {embed_dims}.")
        if len(depths) != len(embed_dims) or any(d < 0 for d in depths):
            raise ValueError(
                f"depths must give one non-negative block count per level ({len(embed_dims)}), got {depths}."
            )
        depths_decoder = depths[:-1] if depths_decoder is None else [int(d) for d in depths_decoder]
        if len(depths_decoder) != len(embed_dims) - 1 or any(d < 0 for d in depths_decoder):
            raise ValueError(
                f"depths_decoder must give {len(embed_dims) - 1} non-negative block counts, got {depths_decoder}."
            )
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}.")
        if not 0.0 <= drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_rate and drop_path_rate must lie in [0, 1), got {drop_rate}, {drop_path_rate}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.num_levels = len(embed_dims)
        self.total_stride = patch_size * 2 ** (self.num_levels - 1)
        sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(sizes) != 2 or any(s < 1 or s % self.total_stride for s in sizes):
            raise ValueError(
                f"img_size {img_size} must be two positive sizes divisible by the total downsampling "
                f"{self.total_stride} (patch_size {patch_size} x 2**{self.num_levels - 1}); resize or pad the input, "
                "or change patch_size / the number of levels."
            )
        self.img_size = sizes
        ss2d_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, scan_backend=scan_backend)

        self.patch_embed = nn.Conv2d(in_channels, embed_dims[0], kernel_size=patch_size, stride=patch_size)
        self.embed_norm = nn.LayerNorm(embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, max(1, sum(depths))).tolist()
        self.encoder = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            self.encoder.append(
                nn.Sequential(*[VSSBlock(dim, drop_path=r, attn_drop=drop_rate, **ss2d_kw) for r in rates])
            )
            if i < self.num_levels - 1:
                self.merges.append(PatchMerging2D(dim, embed_dims[i + 1]))
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(self.num_levels - 2, -1, -1):  # coarse to fine
            self.ups.append(HUNetUpBlock(embed_dims[i + 1], embed_dims[i], embed_dims[i], norm, act, drop_rate))
            self.decoder.append(
                nn.Sequential(
                    *[VSSBlock(embed_dims[i], attn_drop=drop_rate, **ss2d_kw) for _ in range(depths_decoder[i])]
                )
            )
        self.hierarchical = hierarchical
        if hierarchical:  # 1x1 projections of the coarser decoder levels to the finest width
            self.side = nn.ModuleList(
                [nn.Conv2d(embed_dims[i], embed_dims[0], 1) for i in range(self.num_levels - 1, 0, -1)]
            )
        self.head_up = self._make_head_up(embed_dims[0], patch_size, norm, act)
        self.head_drop = nn.Dropout2d(drop_rate) if drop_rate > 0 else nn.Identity()
        self.out = nn.Conv2d(self._head_channels, out_channels, kernel_size=1)

    def _make_head_up(self, ch: int, patch_size: int, norm: str | tuple, act: str | tuple) -> nn.Module:
        """Transposed convolutions (x2 steps when ``patch_size`` is a power of two) back to the input size."""
        layers: list[nn.Module] = []
        if patch_size > 1:
            steps = [2] * int(math.log2(patch_size)) if patch_size & (patch_size - 1) == 0 else [patch_size]
            for s in steps:
                out = max(ch // 2, 8)
                layers += [nn.ConvTranspose2d(ch, out, kernel_size=s, stride=s, bias=False)]
                layers += list(_conv_norm_act(out, out, norm, act))
                ch = out
        self._head_channels = ch
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}.")
        if not torch.jit.is_tracing() and (x.shape[-2] % self.total_stride or x.shape[-1] % self.total_stride):
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be divisible by {self.total_stride} "
                f"(patch_size x 2**(levels - 1)); resize or pad the image."
            )
        h = self.embed_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        skips = []
        for i, stage in enumerate(self.encoder):
            h = stage(h)
            if i < self.num_levels - 1:
                skips.append(h)
                h = self.merges[i](h)
        levels = [h]
        for up, stage, skip in zip(self.ups, self.decoder, reversed(skips)):
            h = stage(up(h, skip))
            levels.append(h)
        y = levels[-1].permute(0, 3, 1, 2)
        if self.hierarchical:
            size = y.shape[-2:]
            for proj, feat in zip(self.side, levels[:-1]):
                y = y + F.interpolate(proj(feat.permute(0, 3, 1, 2)), size=size, mode="bilinear", align_corners=False)
        return self.out(self.head_drop(self.head_up(y)))
