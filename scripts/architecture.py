# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The rules of the MambaClinix architecture that the network, the loss and the planner share.

`Bian et al., MambaClinix, 2024 <https://arxiv.org/abs/2409.12533>`_:

- :func:`default_block_types` / :func:`default_hgcn_orders`: the stage layout of Eq. 11 (HGCN blocks in the first
  half of the encoder, residual Mamba layers in the rest) and the HGCN interaction orders;
- :func:`deep_supervision_weights`: nnU-Net's deep-supervision weights, which the authors' trainer keeps;
- :data:`AUTHORS_REGION_GRID`: the region grid of the region-specific Tversky loss (Eq. 16) in the authors' trainer.

Standard library only (no torch, numpy or MONAI), so planning and reading a plan stay light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "AUTHORS_REGION_GRID",
    "BLOCK_TYPES",
    "HGCN_ORDER_RANGE",
    "deep_supervision_weights",
    "default_block_types",
    "default_hgcn_orders",
]

BLOCK_TYPES = ("hgcn", "mamba", "res")
"""Encoder block of a stage: ``"hgcn"`` (HGCN block), ``"mamba"`` (residual Mamba layer) or ``"res"`` (residual
convolutions only)."""

HGCN_ORDER_RANGE = (2, 6)
"""(min, max) interaction order of an HGCN block."""

AUTHORS_REGION_GRID = (8, 8, 14)
"""Cells per array axis of the network input in the region-specific Tversky loss of the authors' trainer, the same
for every dataset and patch; a 2D patch takes the last two entries."""


def default_block_types(num_stages: int) -> list[str]:
    """The stage layout of Eq. 11: the first ``ceil(n / 2)`` of ``n`` stages use HGCN, the rest residual Mamba.

    Args:
        num_stages: number of encoder stages (>= 0).

    Raises:
        ValueError: ``num_stages`` is not a non-negative integer.
    """
    if isinstance(num_stages, bool) or int(num_stages) != num_stages or num_stages < 0:
        raise ValueError(f"num_stages must be a non-negative integer, got {num_stages!r}.")
    num_hgcn = math.ceil(int(num_stages) / 2)
    return ["hgcn"] * num_hgcn + ["mamba"] * (int(num_stages) - num_hgcn)


def default_hgcn_orders(
    block_types: Sequence[str], min_order: int = HGCN_ORDER_RANGE[0], max_order: int = HGCN_ORDER_RANGE[1]
) -> list[int]:
    """HGCN interaction orders: ``s + 2`` for an HGCN block at stage ``s``, clipped to ``[min_order, max_order]``.

    Args:
        block_types: block of each stage (see :data:`BLOCK_TYPES`).
        min_order: smallest order.
        max_order: largest order.

    Returns:
        one order per ``"hgcn"`` entry of ``block_types``, in stage order.

    Raises:
        ValueError: ``min_order < 1`` or ``max_order < min_order``.
    """
    if min_order < 1 or max_order < min_order:
        raise ValueError(f"the HGCN order range needs 1 <= min_order <= max_order, got ({min_order}, {max_order}).")
    return [min(max(s + 2, min_order), max_order) for s, b in enumerate(block_types) if b == "hgcn"]


def deep_supervision_weights(levels: int) -> list[float]:
    """Deep-supervision weights of MambaClinix / nnU-Net: ``1 / 2**i`` for level ``i`` (full resolution first),
    the lowest-resolution level set to 0, normalised to sum to 1. One level gets weight 1.

    Example: 4 levels give ``[8/14, 4/14, 2/14, 0]``.

    Args:
        levels: number of deep-supervision outputs (>= 1).

    Raises:
        ValueError: ``levels`` is not a positive integer.
    """
    if isinstance(levels, bool) or int(levels) != levels or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels}.")
    levels = int(levels)
    if levels == 1:
        return [1.0]
    raw = [0.5**i for i in range(levels - 1)] + [0.0]
    total = sum(raw)
    return [w / total for w in raw]
