# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The rules for routing a CPU convolution past PyTorch's own dispatch, shared by :mod:`scripts.networks.conv` (the
layers) and :mod:`scripts.networks.cpu_backward` (the training step's convolution and its backward).

- :func:`plain_eager`: only plain eager calls may be routed; ``torch.compile``, tracing and dispatch modes
  (``FlopCounterMode``, ``FakeTensorMode``, ``make_fx``) know ``aten.convolution``, not the backend operators.
- :func:`onednn_batch1`: PyTorch sends a batch-1 3D convolution with a small kernel to its native loop instead of
  oneDNN (figures in ``docs/benchmarks/``); float32 CPU inputs outside autocast can go to oneDNN directly.
- :func:`convolve`: ``torch.convolution`` with that rule applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["convolve", "onednn_batch1", "plain_eager"]


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether this is a plain eager call: not compiling or tracing, no dispatch mode, no fake tensor among
    ``tensors``."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: keeps a compiled graph free of the rest
        return False
    return _get_current_dispatch_mode() is None and not any(is_fake(t) for t in tensors)


def onednn_batch1(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the convolution of ``x`` with ``weight`` should call oneDNN directly: batch 1 (larger batches already
    reach it), float32 CPU tensors, oneDNN available and enabled, no CPU autocast (it casts inside ``F.conv3d``)."""
    return (
        x.shape[0] == 1
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def convolve(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``torch.convolution`` (not transposed, zero padding per axis), on oneDNN directly where
    :func:`onednn_batch1` holds. Call it in plain eager mode (:func:`plain_eager`)."""
    if onednn_batch1(x, weight):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * (x.ndim - 2), groups)
