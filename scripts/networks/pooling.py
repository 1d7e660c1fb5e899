# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Average pooling by a stride that keeps ``channels_last_3d`` tensors in their layout.

PyTorch's CPU ``avg_pool3d`` has no channels-last kernel: a ``channels_last_3d`` input is copied to channels-first,
pooled, and the result handed back channels-first, so the next layers convert it again; the copies cost more than
the pooling itself (figures in ``docs/benchmarks/optimizations.md``). :class:`StrideAvgPool` pools
such inputs without leaving their layout: depth by adding strided slices, height and width with the channels-last
``avg_pool2d`` kernel. Other inputs take the standard ``avg_pool`` path; the results are the same up to float
rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["StrideAvgPool", "stride_avg_pool"]


def _channels_last_3d(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 5D tensor in channels-last memory order: its ``(N, D, H, W, C)`` permutation is contiguous,
    or the channels are adjacent and each of the W, H, D and N strides spans the axes before it, as in a channel
    slice of a channels-last tensor (what the backward of a channel concatenation hands on)."""
    if x.ndim != 5:
        return False
    if x.permute(0, 2, 3, 4, 1).is_contiguous():
        return True
    if x.stride(1) != 1:
        return False
    span = x.shape[1]
    for axis in (4, 3, 2, 0):
        if x.stride(axis) < span:
            return False
        span = x.stride(axis) * x.shape[axis]
    return True


def _pool_channels_last_3d(x: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """Average over non-overlapping ``stride`` windows of a channels-last 5D tensor whose size divides by it; the
    result is contiguous channels-last."""
    n, c, d, h, w = x.shape
    sd, sh, sw = stride
    y = x.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C), a contiguous view
    if sd > 1:  # sum the sd slices of each depth window: contiguous (N, D / sd, H, W, C)
        y = functools.reduce(torch.add, y.reshape(n, d // sd, sd, h, w, c).unbind(2))
    planes = y.reshape(n * (d // sd), h, w, c).permute(0, 3, 1, 2)  # channels-last 2D view (N * D', C, H, W)
    if sh * sw > 1:
        planes = F.avg_pool2d(planes, (sh, sw), (sh, sw), divisor_override=sd * sh * sw)
    else:
        planes = planes / sd
    pooled = planes.permute(0, 2, 3, 1).reshape(n, d // sd, h // sh, w // sw, c)
    return pooled.permute(0, 4, 1, 2, 3)  # (N, C, D', H', W') on channels-last memory


def _stride_tuple(stride: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """``stride`` as one positive int per spatial axis (``ValueError`` otherwise)."""
    stride_t = (int(stride),) * spatial_dims if isinstance(stride, int) else tuple(int(s) for s in stride)
    if len(stride_t) != spatial_dims or any(s < 1 for s in stride_t):
        raise ValueError(f"stride needs one positive value per spatial axis ({spatial_dims}), got {stride}.")
    return stride_t


def _pool(x: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """The pooling itself, for an input and a stride already checked against each other."""
    if all(s == 1 for s in stride):
        return x
    if _channels_last_3d(x) and all(size % s == 0 for size, s in zip(x.shape[2:], stride)):
        return _pool_channels_last_3d(x, stride)  # type: ignore[arg-type]
    pool = F.avg_pool3d if x.ndim == 5 else F.avg_pool2d
    return pool(x, kernel_size=stride, stride=stride, ceil_mode=True)


def _check_rank(x: torch.Tensor, spatial_dims: int | None = None) -> None:
    if x.ndim not in (4, 5) or (spatial_dims is not None and x.ndim != spatial_dims + 2):
        dims = "2 or 3" if spatial_dims is None else str(spatial_dims)
        raise ValueError(f"expected a (N, C, *spatial) input with {dims} spatial dims, got shape {tuple(x.shape)}.")


def stride_avg_pool(x: torch.Tensor, stride: int | Sequence[int]) -> torch.Tensor:
    """``avg_pool{2,3}d(x, kernel_size=stride, stride=stride, ceil_mode=True)``, channels-last 3D inputs kept so.

    Args:
        x: a ``(N, C, *spatial)`` tensor with 2 or 3 spatial dims.
        stride: window and stride, an int or one value per spatial axis.

    Raises:
        ValueError: when ``x`` is not 4D/5D or ``stride`` does not have one positive value per spatial axis.
    """
    _check_rank(x)
    return _pool(x, _stride_tuple(stride, x.ndim - 2))


class StrideAvgPool(nn.Module):
    """Average pooling with the window equal to the stride (ceil mode), as the skip path of a strided block.

    Computes what ``Pool[Pool.AVG, spatial_dims](kernel_size=stride, stride=stride, ceil_mode=True)`` computes;
    ``channels_last_3d`` inputs whose size divides by the stride stay channels-last and are not copied.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        stride: window and stride, an int or one value per axis.
    """

    def __init__(self, spatial_dims: int, stride: int | Sequence[int]) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.stride = _stride_tuple(stride, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x, self.spatial_dims)
        return _pool(x, self.stride)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, stride={self.stride}"
