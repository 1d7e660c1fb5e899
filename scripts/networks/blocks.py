# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Building blocks of MambaClinix: residual conv blocks, hgConv / HGCN blocks and the residual Mamba layer.

Every block is ``spatial_dims``-generic (2D or 3D) and takes MONAI-style norm / activation names.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch.utils.checkpoint import checkpoint
from monai.networks.layers.utils import get_act_layer, get_norm_layer

from . import cpu_backward
from .conv import OneDNNConv2d, OneDNNConv3d, conv_layer, explicit_zero_padding
from .mamba import Mamba
from .pooling import StrideAvgPool

__all__ = [
    "ConvNormAct",
    "ResidualBlock",
    "ChannelLayerNorm",
    "InstanceGroupNorm",
    "HgConv",
    "HGCNBlock",
    "ResidualMambaLayer",
    "UpsampleBlock",
    "norm_act_conv",
    "same_padding",
    "step_runner",
]


def _as_tuple(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"{name} must be an int or a sequence of {spatial_dims} ints, got {value}.")
    return value


def same_padding(kernel_size: Sequence[int]) -> tuple[int, ...]:
    """Padding that keeps the spatial size for odd kernels (``k // 2`` per axis)."""
    for k in kernel_size:
        if k % 2 == 0:
            raise ValueError(f"kernel sizes must be odd, got {tuple(kernel_size)}.")
    return tuple(k // 2 for k in kernel_size)


class InstanceGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose one-group-per-channel case on channels-last CPU tensors, when gradients are recorded,
    runs :func:`scripts.networks.cpu_backward.instance_norm` (same values, cheaper backward); otherwise
    ``nn.GroupNorm`` itself. Same arguments, parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_backward.group_norm_forward(x, self.num_groups, self.weight, self.bias, self.eps)


def _fast_norm(layer: nn.Module) -> nn.Module:
    """Swap an instance norm without running statistics for the identical ``GroupNorm(C, C)`` (an
    :class:`InstanceGroupNorm`).

    Both normalise every channel of every sample over its spatial extent with the biased variance and have the
    same ``weight``/``bias`` parameters (same names, same initialisation), so state dicts and outputs are the same;
    PyTorch's CPU group-norm kernels are faster than its instance norm, which runs batch norm on a reshaped copy,
    the more so on ``channels_last_3d`` tensors (figures in ``docs/benchmarks/``).
    """
    if isinstance(layer, nn.modules.instancenorm._InstanceNorm) and not layer.track_running_stats:
        group_norm = InstanceGroupNorm(layer.num_features, layer.num_features, eps=layer.eps, affine=layer.affine)
        if layer.affine:
            with torch.no_grad():
                group_norm.weight.copy_(layer.weight)
                group_norm.bias.copy_(layer.bias)
        return group_norm
    return layer


class ConvNormAct(nn.Sequential):
    """Convolution followed by an optional normalisation and an optional activation.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: convolution kernel, an int or one value per axis (odd).
        stride: convolution stride, an int or one value per axis.
        norm: MONAI norm name or (name, kwargs); ``None`` for no normalisation.
        act: MONAI activation name or (name, kwargs); ``None`` for no activation.
        bias: whether the convolution has a bias.
        groups: convolution groups (``in_channels`` for a depthwise convolution).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        norm: str | tuple | None = ("instance", {"affine": True}),
        act: str | tuple | None = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        bias: bool = True,
        groups: int = 1,
    ) -> None:
        super().__init__()
        kernel = _as_tuple(kernel_size, spatial_dims, "kernel_size")
        self.add_module(
            "conv",
            conv_layer(spatial_dims)(
                in_channels,
                out_channels,
                kernel_size=kernel,
                stride=_as_tuple(stride, spatial_dims, "stride"),
                padding=same_padding(kernel),
                bias=bias,
                groups=groups,
            ),
        )
        if norm is not None:
            self.add_module("norm", _fast_norm(get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=out_channels)))
        if act is not None:
            self.add_module("act", get_act_layer(name=act))


def _activation_slope(act: nn.Module) -> float | None:
    """The negative slope of a LeakyReLU / ReLU module (0 for ReLU), ``None`` for any other module."""
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    return 0.0 if isinstance(act, nn.ReLU) else None


def norm_act_conv(norm: nn.Module, act: nn.Module, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(act(norm(x)))``. In a CPU training step with an instance norm (:class:`InstanceGroupNorm`), a
    (leaky) ReLU with a non-negative slope and one of the bundle's convolution layers on a channels-last ``x`` it
    runs :func:`scripts.networks.cpu_backward.norm_act_convolution`: the same values and gradients, with the
    activation recomputed in backward instead of kept."""
    slope = _activation_slope(act)
    fusable = (
        slope is not None
        and slope >= 0
        and isinstance(norm, InstanceGroupNorm)
        and norm.num_groups == x.shape[1]
        and isinstance(conv, (OneDNNConv2d, OneDNNConv3d))
        and explicit_zero_padding(conv)
        and cpu_backward.is_channels_last(x)
        and cpu_backward.applies(x, norm.weight, norm.bias, conv.weight, conv.bias)
    )
    if not fusable:
        return conv(act(norm(x)))
    return cpu_backward.norm_act_convolution(
        x, norm.weight, norm.bias, norm.eps, slope, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
        conv.groups,
    )


def _call(fn, *args):
    return fn(*args)


_checkpointed = functools.partial(checkpoint, use_reentrant=False)


def step_runner(module: nn.Module, enabled: bool | None = None):
    """How ``module`` calls its sub-steps: through a non-reentrant checkpoint (only the step's output is kept, its
    inside is recomputed in backward) when checkpointing is on (``enabled``, or the module's
    ``gradient_checkpointing`` when ``enabled`` is ``None``), it is training and gradients are enabled; directly
    otherwise."""
    on = getattr(module, "gradient_checkpointing", False) if enabled is None else enabled
    if on and module.training and torch.is_grad_enabled():
        return _checkpointed
    return _call


class ResidualBlock(nn.Module):
    """Residual block with two convolutions: ``act(norm(conv(act(norm(conv(x))))) + skip(x))``.

    The first convolution carries the stride. The skip path average-pools by the stride and, when the channel
    count changes, projects with a 1x1 convolution. Two projections are used in the authors' network: in the
    encoder and on the decoder's skips (dynamic-network-architectures' ``BasicBlockD``, ResNet-D) a 1x1
    convolution *without* bias followed by the norm (``projection_norm=True``, the default); in the decoder blocks
    that fuse the concatenated features (the authors' ``BasicResBlock``) a plain 1x1 convolution *with* bias and
    no norm (``projection_norm=False``).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel of both convolutions.
        stride: stride of the first convolution (down-sampling).
        norm: MONAI norm name or (name, kwargs).
        act: MONAI activation name or (name, kwargs).
        projection_norm: ``True``: the 1x1 skip projection is conv (no bias) + norm; ``False``: conv with bias.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        norm: str | tuple = ("instance", {"affine": True}),
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        projection_norm: bool = True,
    ) -> None:
        super().__init__()
        stride_t = _as_tuple(stride, spatial_dims, "stride")
        self.conv1 = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size, stride_t, norm, act)
        self.conv2 = ConvNormAct(spatial_dims, out_channels, out_channels, kernel_size, 1, norm, None)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride_t):
            skip.append(StrideAvgPool(spatial_dims, stride_t))
        if in_channels != out_channels:
            skip.append(
                ConvNormAct(
                    spatial_dims, in_channels, out_channels, 1, 1, norm if projection_norm else None, None,
                    bias=not projection_norm,
                )
            )
        self.skip = nn.Sequential(*skip)
        self.act = get_act_layer(name=act)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = step_runner(self)  # with checkpointing, each convolution separately: norm/activation are recomputed
        first, second = self.conv1, self.conv2
        if run is _call and all(hasattr(m, n) for m, n in ((first, "norm"), (first, "act"), (second, "norm"))):
            # conv1's norm and activation are recomputed in conv2's backward where that applies (norm_act_conv)
            out = second.norm(norm_act_conv(first.norm, first.act, second.conv, first.conv(x)))
        else:
            out = run(second, run(first, x))
        return self.act(out + (run(self.skip, x) if len(self.skip) else x))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a channels-first tensor ``(B, C, *spatial)``.

    Args:
        num_channels: number of channels ``C``.
        eps: value added to the variance for numerical stability.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        to_last = (0, *range(2, x.ndim), 1)
        if x.ndim > 2 and x.permute(to_last).is_contiguous():
            # channels-last memory (e.g. channels_last_3d): the permuted view is contiguous, use the fused kernel
            y = F.layer_norm(x.permute(to_last), (x.shape[1],), self.weight, self.bias, self.eps)
            return y.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
        # channels-first: normalise over channels without transposing the (large) spatial map
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.bias.view(shape), (x - mean) * torch.rsqrt(var + self.eps), self.weight.view(shape))


class HgConv(nn.Module):
    """High-order gated convolution (hgConv, paper Eqs. 4-6).

    ``proj_in`` expands ``C`` to ``2C`` channels, split into a base of ``C / 2^(order-1)`` channels and the rest,
    which a depthwise convolution filters and splits into ``order`` parts of widths ``C/2^(order-1), ..., C/2, C``.
    The recursion ``U_{j+1} = V_j (+|*) Phi_j(U_j)`` then widens the base step by step, and ``proj_out`` mixes
    the result.

    Args:
        spatial_dims: number of spatial dimensions.
        channels: channel count ``C`` (divisible by ``2^(order-1)``).
        order: spatial interaction order ``n`` (>= 1).
        kernel_size: kernel of the depthwise convolution.
        gating: ``"add"`` combines the branches by addition, as the MambaClinix authors' code (and Eq. 6) do;
            ``"mul"`` multiplies them, as HorNet's gnConv does.
        scale: the factor ``gamma_f`` applied to the depthwise features.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        order: int = 2,
        kernel_size: int | Sequence[int] = 3,
        gating: str = "add",
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if order < 1:
            raise ValueError(f"hgConv order must be >= 1, got {order}.")
        if channels % (2 ** (order - 1)) != 0:
            raise ValueError(
                f"hgConv of order {order} splits its {channels} channels by 2^{order - 1}; "
                f"use a channel count divisible by {2 ** (order - 1)} or a lower order."
            )
        if gating not in ("add", "mul"):
            raise ValueError(f"gating must be 'add' or 'mul', got {gating!r}.")
        self.order = order
        self.gating = gating
        self.scale = scale
        self.dims = [channels // 2**i for i in range(order)][::-1]
        conv = conv_layer(spatial_dims)
        kernel = _as_tuple(kernel_size, spatial_dims, "kernel_size")
        self.proj_in = conv(channels, 2 * channels, kernel_size=1)
        self.dwconv = conv(sum(self.dims), sum(self.dims), kernel, padding=same_padding(kernel), groups=sum(self.dims))
        self.proj_out = conv(channels, channels, kernel_size=1)
        self.pws = nn.ModuleList(conv(self.dims[i], self.dims[i + 1], kernel_size=1) for i in range(order - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.proj_in(x)
        base, rest = torch.split(fused, (self.dims[0], sum(self.dims)), dim=1)
        dw = self.dwconv(rest)
        dw_list = torch.split(dw * self.scale if self.scale != 1.0 else dw, self.dims, dim=1)
        mul = self.gating == "mul"
        out = base * dw_list[0] if mul else base + dw_list[0]
        for i, pw in enumerate(self.pws):
            out = pw(out) * dw_list[i + 1] if mul else pw(out) + dw_list[i + 1]
        return self.proj_out(out)


class HGCNBlock(nn.Module):
    """Hierarchical gated convolutional network block (paper Eqs. 1-3, as the authors' ``HGCN_BLOCK`` computes it).

    ``h = Stem(x)``, a plain 1x1 convolution with bias (``C -> C/2``, no norm, no activation);
    ``h = h + DropPath(gamma * hgConv(LN1(h)))``; ``out = Conv(k)(act(Conv(k)(LN2(h))))`` back to ``C`` (no norms);
    the block returns ``x + DropPath(out)`` (no final activation). ``LN1`` and ``LN2`` are channels-first
    LayerNorms (eps 1e-6).

    Args:
        spatial_dims: number of spatial dimensions.
        channels: input and output channels ``C`` (even).
        order: hgConv interaction order.
        kernel_size: kernel of the depthwise and output convolutions.
        gating: ``"add"`` (authors) or ``"mul"`` (HorNet) hgConv gating.
        drop_path: stochastic-depth rate.
        layer_scale_init: initial value of the layer scale ``gamma``.
        act: MONAI activation after the first output convolution.

    In training with gradients, ``gradient_checkpointing`` (attribute, default ``False``) checkpoints the block's
    sub-steps one by one and ``gated_checkpointing`` (default ``False``; :class:`MambaClinix` sets it) only the
    cheap one, ``h + DropPath(gamma * hgConv(LN1(h)))``: 1x1 and depthwise convolutions, no dense one.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        order: int = 2,
        kernel_size: int | Sequence[int] = 3,
        gating: str = "add",
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-6,
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
    ) -> None:
        super().__init__()
        if channels % 2 != 0:
            raise ValueError(f"HGCN blocks halve their channels; got an odd channel count {channels}.")
        inner = channels // 2
        self.stem = ConvNormAct(spatial_dims, channels, inner, 1, 1, None, None)
        self.norm = ChannelLayerNorm(inner)
        self.hgconv = HgConv(spatial_dims, inner, order, kernel_size, gating)
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(inner))
        self.norm2 = ChannelLayerNorm(inner)
        self.out_conv1 = ConvNormAct(spatial_dims, inner, channels, kernel_size, 1, None, act)
        self.out_conv2 = ConvNormAct(spatial_dims, channels, channels, kernel_size, 1, None, None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gradient_checkpointing = False
        self.gated_checkpointing = False

    def _gated(self, h: torch.Tensor) -> torch.Tensor:
        """``h + DropPath(gamma * hgConv(LN1(h)))``; one sub-step, so that a checkpoint of it keeps only ``h``."""
        gamma = self.gamma.view((1, -1) + (1,) * (h.ndim - 2))
        if isinstance(self.drop_path, nn.Identity):  # one fused pass for h + gamma * hgconv(...)
            return torch.addcmul(h, gamma, self.hgconv(self.norm(h)))
        return h + self.drop_path(gamma * self.hgconv(self.norm(h)))

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_conv1(self.norm2(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = step_runner(self)
        gated = step_runner(self, enabled=self.gradient_checkpointing or self.gated_checkpointing)
        h = gated(self._gated, run(self.stem, x))
        return x + self.drop_path(run(self.out_conv2, run(self._out, h)))


class ResidualMambaLayer(nn.Module):
    """Residual Mamba layer over the flattened feature map (paper Eqs. 7-10).

    ``tokens = flatten(x)``, ``y = Linear(LN(Mamba(LN(tokens))))`` with one LayerNorm used before and after
    Mamba (as the authors' code does), and ``x + reshape(y)``. The layer runs with autocast off and half-precision
    inputs cast to float32, a documented float32 island: the selective scan is unstable in half precision
    (float64 inputs stay float64).

    Args:
        channels: feature channels (Mamba ``d_model``).
        d_state: SSM state size.
        d_conv: width of Mamba's causal depthwise convolution.
        expand: Mamba's expansion factor.
        scan: ``"forward"`` scans the flattened volume once (paper); ``"bidirectional"`` adds a second Mamba
            on the reversed sequence and averages the two.
        scan_backend: selective-scan backend passed to :class:`Mamba` (``None`` chooses automatically).
    """

    def __init__(
        self,
        channels: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        scan: str = "forward",
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        if scan not in ("forward", "bidirectional"):
            raise ValueError(f"scan must be 'forward' or 'bidirectional', got {scan!r}.")
        self.norm = nn.LayerNorm(channels)
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend)
        self.mamba_backward = (
            Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend)
            if scan == "bidirectional"
            else None
        )
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x if x.dtype in (torch.float32, torch.float64) else x.float()  # half precision -> float32
            channels_last = h.movedim(1, -1)  # a view; no copy when h is in channels-last memory
            tokens = channels_last.reshape(h.shape[0], -1, h.shape[1])  # (B, L, C), L in raster order
            normed = self.norm(tokens)
            y = self.mamba(normed)
            if self.mamba_backward is not None:
                y = 0.5 * (y + self.mamba_backward(normed.flip(1)).flip(1))
            y = self.proj(self.norm(y))
            out = h + y.reshape(channels_last.shape).movedim(-1, 1)
        return out.to(dtype)


class UpsampleBlock(nn.Module):
    """Nearest-neighbour up-sampling by a stage stride followed by a 1x1 convolution.

    The two commute exactly (every output voxel is the 1x1 convolution of its nearest source voxel), so the block
    convolves first, on the coarse map, and up-samples the result: ``prod(scale_factor)`` times fewer convolution
    FLOPs, and the up-sampling copies ``out_channels`` instead of ``in_channels`` channels.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        scale_factor: up-sampling factor per axis (integers >= 1, the stage strides).

    Raises:
        ValueError: a factor is not an integer >= 1, or there is not one per axis.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, scale_factor: int | Sequence[int]
    ) -> None:
        super().__init__()
        self.scale_factor = cpu_backward.integer_scale(scale_factor, spatial_dims)
        self.conv = conv_layer(spatial_dims)(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if any(s != 1 for s in self.scale_factor):
            x = cpu_backward.upsample_nearest(x, self.scale_factor)
        return x
