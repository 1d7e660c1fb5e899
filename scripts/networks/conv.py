# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Convolution layers that reach oneDNN's kernels on CPU for single-sample inputs.

PyTorch picks its CPU convolution backend with a heuristic written for 2D images: a batch-1 input with a 3x3 kernel
and fewer than ``20480`` elements in ``(N, C, D, H)`` goes to the native ``slow_conv3d`` loop instead of oneDNN. For
3D feature maps that rule catches the deep stages (e.g. ``256 x 8^3``) and the stem (``1 x 64^3``), which then run
several times slower than oneDNN would run them (figures in ``docs/benchmarks/``). These subclasses of ``nn.Conv2d`` /
``nn.Conv3d`` call oneDNN directly in exactly those cases; the module, its parameters, state dict and maths are the
standard ones, and every other case (CUDA, autocast, batches > 1, tracing, ``torch.compile``) takes PyTorch's own path.

When gradients are recorded on CPU (a training step) they convolve through :func:`scripts.networks.cpu_backward.convolution`,
whose backward is cheaper than PyTorch's.

They also route around a oneDNN bug: in bfloat16 on CPU (autocast or bfloat16 tensors), the weight gradient of a 3D
convolution whose input has a depth of 2 is wrong (as large as the gradient itself, or inf/NaN read from
uninitialised memory; the output and the input gradient are right; ``tests/test_conv.py`` checks it against a
float64 reference). Such convolutions, e.g. the 2^3 bottleneck of a 64^3 patch, run in float32 and give their
result back in bfloat16.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import cpu_backward, dispatch

__all__ = ["OneDNNConv2d", "OneDNNConv3d", "conv_layer", "explicit_zero_padding"]


def explicit_zero_padding(conv: nn.Module) -> bool:
    """Whether ``conv`` pads with zeros by an explicit amount per axis (not ``"same"`` / ``"valid"``), the padding
    that the bundle's direct convolution calls take."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _use_onednn(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` should call oneDNN directly instead of PyTorch's backend heuristic
    (:mod:`scripts.networks.dispatch`)."""
    return dispatch.plain_eager(x) and explicit_zero_padding(conv) and dispatch.onednn_batch1(x, conv.weight)


def _bf16_depth2_weight_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 3D convolution would compute its weight gradient with oneDNN's faulty bfloat16 depth-2 kernel."""
    if x.ndim != 5 or x.shape[2] != 2 or x.device.type != "cpu" or not (weight.requires_grad and torch.is_grad_enabled()):
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast_bf16 or torch.bfloat16 in (x.dtype, weight.dtype)


class _OneDNNForward:
    """Mixin for ``nn.Conv2d`` / ``nn.Conv3d``: batch-1 float32 CPU inputs go straight to oneDNN; bfloat16
    depth-2 3D inputs on CPU are convolved in float32 (see the module docstring)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _bf16_depth2_weight_grad(input, weight):
            with torch.autocast("cpu", enabled=False):
                out = super()._conv_forward(  # type: ignore[misc]
                    input.float(), weight.float(), None if bias is None else bias.float()
                )
            return out.to(torch.bfloat16)
        if explicit_zero_padding(self) and cpu_backward.applies(input, weight, bias):  # type: ignore[arg-type]
            # a training step on CPU: the same convolution with a cheaper backward (scripts.networks.cpu_backward)
            return cpu_backward.convolution(
                input, weight, bias, self.stride, self.padding, self.dilation, self.groups  # type: ignore[attr-defined]
            )
        if _use_onednn(self, input):  # type: ignore[arg-type]
            return torch.ops.aten.mkldnn_convolution(
                input, weight, bias, self.padding, self.stride, self.dilation, self.groups  # type: ignore[attr-defined]
            )
        return super()._conv_forward(input, weight, bias)  # type: ignore[misc]


class OneDNNConv3d(_OneDNNForward, nn.Conv3d):
    """``nn.Conv3d`` that runs batch-1 float32 CPU inputs on oneDNN (same arguments, parameters and results)."""


class OneDNNConv2d(_OneDNNForward, nn.Conv2d):
    """``nn.Conv2d`` that runs batch-1 float32 CPU inputs on oneDNN (same arguments, parameters and results)."""


def conv_layer(spatial_dims: int) -> type[nn.Module]:
    """The convolution class for ``spatial_dims`` (2 or 3), the counterpart of ``Conv[Conv.CONV, spatial_dims]``."""
    if spatial_dims == 3:
        return OneDNNConv3d
    if spatial_dims == 2:
        return OneDNNConv2d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
