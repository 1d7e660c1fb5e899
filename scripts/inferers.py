# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Sliding-window inference with optional mirroring test-time augmentation (nnU-Net style)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

__all__ = ["MirroringSlidingWindowInferer"]


class MirroringSlidingWindowInferer(SlidingWindowInferer):
    """:class:`monai.inferers.SlidingWindowInferer` that can average the prediction over mirrored inputs.

    With ``mirror_axes`` (spatial axes, 0-based), the volume is also predicted flipped along every non-empty
    subset of these axes; each prediction is flipped back and the logits are averaged (nnU-Net's mirroring
    test-time augmentation, 2^k passes for k axes). All other arguments are SlidingWindowInferer's (Gaussian
    blending: ``mode="gaussian"``; ``overlap`` between windows).

    Args:
        mirror_axes: spatial axes to mirror; ``None``, empty, or the text ``"null"`` / ``"none"`` (what a
            command-line override ``--tta_mirror_axes null`` delivers) for a single pass.
        args, kwargs: passed to :class:`monai.inferers.SlidingWindowInferer`.
    """

    def __init__(self, *args: Any, mirror_axes: Sequence[int] | str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(mirror_axes, str):
            if mirror_axes.strip().lower() not in ("", "null", "none"):
                raise ValueError(f"mirror_axes must be a list of spatial axes or null, got the text {mirror_axes!r}.")
            mirror_axes = None
        self.mirror_axes = tuple(int(a) for a in mirror_axes) if mirror_axes else ()
        if any(a < 0 for a in self.mirror_axes):
            raise ValueError(f"mirror_axes are 0-based spatial axes (>= 0), got {self.mirror_axes}.")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        spatial_dims = inputs.ndim - 2
        if any(a >= spatial_dims for a in self.mirror_axes):
            raise ValueError(f"mirror_axes {self.mirror_axes} exceed the {spatial_dims} spatial axes of the input.")
        pred = super().__call__(inputs, network, *args, **kwargs)
        if not self.mirror_axes:
            return pred
        count = 1
        for r in range(1, len(self.mirror_axes) + 1):
            for axes in itertools.combinations(self.mirror_axes, r):
                dims = [a + 2 for a in axes]
                pred = pred + torch.flip(super().__call__(torch.flip(inputs, dims), network, *args, **kwargs), dims)
                count += 1
        return pred / count
