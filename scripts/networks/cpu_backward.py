# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Cheaper CPU backward passes for convolutions and channels-last instance norms (the training step).

Several parts of PyTorch's CPU backward cost more than their arithmetic (profiles in
``docs/benchmarks/optimizations.md``):

- oneDNN's convolution backward, asked for the bias gradient as well, runs a slower weight-gradient primitive; the
  bias gradient is only the sum of the output gradient over the batch and the spatial axes.
- The input gradient of a stride-1 depthwise convolution is the depthwise convolution of the output gradient with
  the spatially flipped kernel, a forward-sized operation; oneDNN's backward-data primitive for it is an order of
  magnitude slower than that.
- oneDNN has no depthwise kernel for the weight gradient of a 3D depthwise convolution: it runs its generic grouped
  kernel, which pads every one-channel group to a 16 x 16 block. Its 2D depthwise weight gradient has one. A
  stride-1 3D depthwise weight gradient is the sum, over the kernel's depth offsets, of 2D ones whose batch is the
  depth planes that meet at that offset (:func:`_depthwise_weight_grad_by_planes`).
- PyTorch's group-norm backward kernel on channels-last tensors is several times slower than on channels-first
  ones. The replacement here takes the two per-channel sums it needs in one chunked pass (:func:`_channel_sums`).
- PyTorch's nearest up-sampling backward has no channels-last kernel: it copies the output gradient (the largest
  map of a decoder stage) to channels-first, a transposing copy that costs several times the sum it computes, and
  hands on a channels-first gradient.

Another part is memory rather than time: a convolution after an instance norm and a (leaky) ReLU keeps the
activation for its weight gradient, the norm keeps its input, so the step holds two feature maps for one; the
activation is two memory-bound passes from the norm's input.

:func:`convolution`, :func:`instance_norm` and :func:`upsample_nearest` compute the same values and gradients
(within float32 rounding; the tests compare them with float64 references) through
:class:`torch.autograd.Function` s whose backward avoids those paths; :func:`norm_act_convolution` keeps only the
norm's input and recomputes the norm and the activation in backward. They apply to float32 CPU tensors in eager mode
when gradients are recorded; everything else (CUDA, autocast, float64, ``torch.compile``, tracing, dispatch modes
such as ``FlopCounterMode``, inference) takes PyTorch's own path.
:func:`native_backward` switches them off, e.g. to compare the two.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dispatch import convolve, plain_eager
from .pooling import stride_avg_pool

__all__ = [
    "applies",
    "convolution",
    "group_norm_forward",
    "instance_norm",
    "integer_scale",
    "is_channels_last",
    "native_backward",
    "norm_act_convolution",
    "upsample_nearest",
]

_state = threading.local()


@contextlib.contextmanager
def native_backward() -> Iterator[None]:
    """Within this block (in this thread) convolutions and instance norms use PyTorch's own backward."""
    previous = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = previous


def applies(*tensors: torch.Tensor | None) -> bool:
    """Whether the functions of this module take over: float32 CPU tensors, some of them requiring a gradient that
    is being recorded, in eager mode, outside autocast and outside :func:`native_backward`."""
    if getattr(_state, "off", False) or not torch.is_grad_enabled():
        return False
    present = [t for t in tensors if t is not None]
    if not plain_eager(*present) or torch.is_autocast_enabled("cpu") or not any(t.requires_grad for t in present):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in present)


def _depthwise_same_stride(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups) -> bool:
    """A stride-1, dilation-1 depthwise convolution (one filter per channel) whose padding is at most ``k - 1``."""
    return (
        groups == x.shape[1] == weight.shape[0]
        and weight.shape[1] == 1
        and all(s == 1 for s in stride)
        and all(d == 1 for d in dilation)
        and all(0 <= p <= k - 1 for p, k in zip(padding, weight.shape[2:]))
    )


class _Convolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (tuple(stride), tuple(padding), tuple(dilation), groups, bias is not None)
        return convolve(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return (*_convolution_grads(grad, x, weight, ctx.conf, ctx.needs_input_grad[:3]), None, None, None, None)


def _depthwise_weight_grad_by_planes(grad, x, weight, padding):
    """The weight gradient of a stride-1, dilation-1 3D depthwise convolution of ``x`` (``(B, C, D, H, W)``, padding
    at most ``k - 1`` per axis) for the output gradient ``grad``, as a sum of 2D depthwise weight gradients: for
    kernel depth offset ``a``, output plane ``z`` meets input plane ``z + a - padding[0]``; the planes that meet form
    the batch of one 2D call (channels-last 3D memory gives channels-last 2D planes without a copy)."""
    channels, depth_k = weight.shape[0], weight.shape[2]
    pad_d = padding[0]
    x, grad = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, grad))
    plane_weight = weight[:, :, 0]  # only its shape matters to the weight gradient
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    for a in range(depth_k):
        first, stop = max(0, pad_d - a), min(grad.shape[2], x.shape[2] + pad_d - a)
        if stop <= first:  # no input plane meets this offset
            continue
        for n in range(x.shape[0]):
            planes = x[n, :, first + a - pad_d : stop + a - pad_d].movedim(1, 0)
            grad_planes = grad[n, :, first:stop].movedim(1, 0)
            grad_w[:, :, a] += torch.ops.aten.convolution_backward(
                grad_planes, planes, plane_weight, None, [1, 1], list(padding[1:]), [1, 1], False, [0, 0], channels,
                [False, True, False],
            )[1]
    return grad_w


def _convolution_grads(grad, x, weight, conf, needs):
    """The input, weight and bias gradients (``None`` where ``needs`` says no) of ``convolve(x, weight, bias,
    *conf[:4])`` for the output gradient ``grad``; ``conf`` is ``(stride, padding, dilation, groups, has_bias)``."""
    stride, padding, dilation, groups, has_bias = conf
    need_x, need_w, need_b = needs
    grad_x = grad_w = grad_b = None
    spatial = tuple(range(2, x.ndim))
    depthwise = _depthwise_same_stride(x, weight, stride, padding, dilation, groups)
    if need_x and depthwise:
        full = [k - 1 - p for p, k in zip(padding, weight.shape[2:])]
        grad_x = convolve(grad, weight.flip(spatial), None, [1] * len(spatial), full, [1] * len(spatial), groups)
        need_x = False
    if need_w and depthwise and x.ndim == 5:
        grad_w = _depthwise_weight_grad_by_planes(grad, x, weight, padding)
        need_w = False
    if need_x or need_w:
        zeros = [0] * len(spatial)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, zeros, groups, [need_x, need_w, False]
        )
        grad_x = gx if need_x else grad_x
        grad_w = gw if need_w else grad_w
    if has_bias and need_b:
        grad_b = grad.sum((0, *spatial))
    return grad_x, grad_w, grad_b


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``torch.convolution`` (not transposed, zero padding given per axis) with the cheaper CPU backward.

    Call it where :func:`applies` holds for ``(x, weight, bias)``; elsewhere use PyTorch's convolution.
    """
    return _Convolution.apply(x, weight, bias, stride, padding, dilation, groups)


def _channels_last_rows(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` in channels-last memory as a ``(B, N, C)`` view (``N`` = spatial size); ``t`` is made
    channels-last first when it is not."""
    last = (0, *range(2, t.ndim), 1)
    rows = t.permute(last)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    return rows.reshape(t.shape[0], -1, t.shape[1])


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        batch, channels = x.shape[:2]
        out, mean, rstd = torch.native_group_norm(x, weight, bias, batch, channels, x[0, 0].numel(), channels, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        return (*_instance_norm_grads(grad, x, weight, mean, rstd, ctx.needs_input_grad[:3]), None)


_SUM_ROWS = 16384
"""Rows per chunk of :func:`_channel_sums`: a chunk of both operands (a few MiB at the bundle's widths) stays in
the cache between the product and the sums."""


def _channel_sums(
    grad_rows: torch.Tensor, rows: torch.Tensor, chunk: int = _SUM_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums over the rows of ``grad_rows`` and of ``grad_rows * rows`` (both ``(B, N, C)``), per sample and
    channel, as two ``(B, 1, C)`` tensors.

    Both are taken ``chunk`` rows at a time: the product exists one chunk at a time and each chunk of ``grad_rows``
    is read once for the two sums. (The second sum is also the diagonal of a ``(C, N) x (N, C)`` matrix product,
    which computes ``C`` times the products it needs.)

    Raises:
        ValueError: ``chunk`` < 1.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 row, got {chunk}.")
    batch, n, channels = rows.shape
    sum_dy = grad_rows.new_zeros(batch, 1, channels)
    sum_dy_x = grad_rows.new_zeros(batch, 1, channels)
    product = grad_rows.new_empty(batch, min(chunk, n), channels)
    for start in range(0, n, chunk):
        g, r = grad_rows[:, start : start + chunk], rows[:, start : start + chunk]
        sum_dy += g.sum(1, keepdim=True)
        sum_dy_x += torch.mul(g, r, out=product[:, : g.shape[1]]).sum(1, keepdim=True)
    return sum_dy, sum_dy_x


def _instance_norm_grads(grad, x, weight, mean, rstd, needs):
    """The input, weight and bias gradients (``None`` where ``needs`` says no) of the instance norm of ``x``
    (channels-last; ``mean`` / ``rstd`` as ``torch.native_group_norm`` returns them) for the output gradient
    ``grad``."""
    need_x, need_w, need_b = needs
    batch, channels = x.shape[:2]
    rows, grad_rows = _channels_last_rows(x), _channels_last_rows(grad)
    n = rows.shape[1]
    mean, rstd = mean.view(batch, 1, channels), rstd.view(batch, 1, channels)
    sum_dy, sum_dy_x = _channel_sums(grad_rows, rows)
    sum_dy_xhat = rstd * (sum_dy_x - mean * sum_dy)
    grad_x = grad_w = grad_b = None
    if need_x:
        scale = rstd if weight is None else rstd * weight.view(1, 1, channels)
        # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)) = scale * dy + coef_x * x + const
        coef_x = -scale * rstd * sum_dy_xhat / n
        const = -scale * sum_dy / n - coef_x * mean
        grad_rows_x = torch.addcmul(const, rows, coef_x).addcmul_(grad_rows, scale)  # one full-size buffer
        grad_x = grad_rows_x.view(batch, *x.shape[2:], channels).permute(0, x.ndim - 1, *range(1, x.ndim - 1))
    if weight is not None and need_w:
        grad_w = sum_dy_xhat.sum((0, 1))
    if need_b:
        grad_b = sum_dy.sum((0, 1))
    return grad_x, grad_w, grad_b


def instance_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.group_norm(x, C, weight, bias, eps)`` (every channel of every sample normalised over its spatial extent,
    biased variance) for a channels-last ``(B, C, *spatial)`` tensor, with the cheaper CPU backward.

    Call it where :func:`applies` holds for ``(x, weight, bias)`` and ``x`` is channels-last; elsewhere use
    ``F.group_norm``.

    Raises:
        ValueError: ``x`` has no spatial axis.
    """
    if x.ndim < 3:
        raise ValueError(f"instance_norm needs a (B, C, *spatial) tensor, got shape {tuple(x.shape)}.")
    return _InstanceNorm.apply(x, weight, bias, eps)


class _NormActConvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, slope, weight, bias, stride, padding, dilation, groups):
        z, mean, rstd = _norm_act(x, norm_weight, norm_bias, eps, slope)
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, weight)  # not z: recomputed in backward
        ctx.eps, ctx.slope = eps, slope
        ctx.conf = (tuple(stride), tuple(padding), tuple(dilation), groups, bias is not None)
        return convolve(z, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_weight, norm_bias, mean, rstd, weight = ctx.saved_tensors
        need_x, need_nw, need_nb, _, _, need_w, need_b = ctx.needs_input_grad[:7]
        # the same kernels on the same input: z is bitwise the forward's
        z = _norm_act(x, norm_weight, norm_bias, ctx.eps, ctx.slope)[0]
        need_z = need_x or need_nw or need_nb
        grad_z, grad_w, grad_b = _convolution_grads(grad, z, weight, ctx.conf, (need_z, need_w, need_b))
        grad_x = grad_nw = grad_nb = None
        if need_z:
            grad_y = torch.ops.aten.leaky_relu_backward(grad_z, z, ctx.slope, True)
            del grad_z, z
            needs = (need_x, need_nw, need_nb)
            grad_x, grad_nw, grad_nb = _instance_norm_grads(grad_y, x, norm_weight, mean, rstd, needs)
        return grad_x, grad_nw, grad_nb, None, None, grad_w, grad_b, None, None, None, None


def _norm_act(x, norm_weight, norm_bias, eps, slope):
    """``leaky_relu(instance_norm(x), slope)`` with the norm's ``mean`` and ``rstd``."""
    batch, channels = x.shape[:2]
    y, mean, rstd = torch.native_group_norm(x, norm_weight, norm_bias, batch, channels, x[0, 0].numel(), channels, eps)
    return torch.ops.aten.leaky_relu_(y, slope), mean, rstd


def norm_act_convolution(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    slope: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``convolution(leaky_relu(instance_norm(x), slope), weight, bias, ...)`` that keeps ``x`` for backward instead
    of the activation: the norm and the activation (memory-bound passes) are recomputed from ``x`` in backward, so a
    training step holds one feature map less for each such sequence. Values and gradients are those of the three
    steps one after the other (:func:`instance_norm`, ``F.leaky_relu``, :func:`convolution`).

    Call it where :func:`applies` holds for all the tensors and ``x`` is channels-last; ``slope`` >= 0 (0 is ReLU).

    Raises:
        ValueError: ``x`` has no spatial axis, or ``slope`` is negative.
    """
    if x.ndim < 3:
        raise ValueError(f"norm_act_convolution needs a (B, C, *spatial) tensor, got shape {tuple(x.shape)}.")
    if slope < 0:
        raise ValueError(
            f"the activation's negative slope must be >= 0 (its backward reads the input's sign from the output), "
            f"got {slope}."
        )
    return _NormActConvolution.apply(
        x, norm_weight, norm_bias, eps, slope, weight, bias, stride, padding, dilation, groups
    )


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` ``(B, C, *spatial)`` is laid out channels-last (its channels-last view is contiguous) and not
    also plain contiguous (a 1-channel or 1-voxel tensor is both: it takes PyTorch's own path)."""
    return x.ndim >= 3 and x.permute(0, *range(2, x.ndim), 1).is_contiguous() and not x.is_contiguous()


def group_norm_forward(x: torch.Tensor, num_groups: int, weight, bias, eps: float) -> torch.Tensor:
    """``F.group_norm``, through :func:`instance_norm` where it applies (one group per channel, channels-last)."""
    if num_groups == x.shape[1] and is_channels_last(x) and applies(x, weight, bias):
        return instance_norm(x, weight, bias, eps)
    return F.group_norm(x, num_groups, weight, bias, eps)


def integer_scale(scale_factor: float | Sequence[float], spatial_dims: int) -> tuple[int, ...]:
    """``scale_factor`` (one factor for every axis, or one per axis) as one integer factor per spatial axis.

    Raises:
        ValueError: a factor is not an integer >= 1 (``2.0`` is one), or there is not one per axis.
    """
    factors = (scale_factor,) * spatial_dims if isinstance(scale_factor, (int, float)) else tuple(scale_factor)
    if len(factors) != spatial_dims or any(float(f) < 1 or not float(f).is_integer() for f in factors):
        raise ValueError(
            f"scale_factor must be one integer factor >= 1 for each of the {spatial_dims} spatial axes, got "
            f"{scale_factor}."
        )
    return tuple(int(f) for f in factors)


def _interpolate_nearest(x: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, scale_factor=tuple(float(s) for s in scale), mode="nearest")


class _UpsampleNearest(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return _interpolate_nearest(x, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        # every input voxel was copied to a window of `scale`: its gradient is the window's sum, here the window mean
        # (in the gradient's layout) times the window size, exact for power-of-two windows
        return stride_avg_pool(grad, ctx.scale) * math.prod(ctx.scale), None


def upsample_nearest(x: torch.Tensor, scale_factor: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=scale_factor, mode="nearest")`` for integer factors, with a channels-last CPU
    backward where the cheaper backward passes apply (:func:`applies`), ``x`` is channels-last and every factor is a
    power of two (the index arithmetic of PyTorch's nearest mode is exact for them); elsewhere ``F.interpolate``
    itself. The forward is ``F.interpolate``'s in every case.

    Raises:
        ValueError: ``x`` has no spatial axis, or ``scale_factor`` is not one integer >= 1 per spatial axis of
            ``x`` (:func:`integer_scale`).
    """
    if x.ndim < 3:
        raise ValueError(f"upsample_nearest needs a (B, C, *spatial) tensor, got shape {tuple(x.shape)}.")
    scale = integer_scale(scale_factor, x.ndim - 2)
    if all(s & (s - 1) == 0 for s in scale) and is_channels_last(x) and applies(x):
        return _UpsampleNearest.apply(x, scale)
    return _interpolate_nearest(x, scale)
