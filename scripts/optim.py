# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Optimizer helpers."""

from __future__ import annotations

import torch

__all__ = ["param_groups"]


def param_groups(network: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: parameters tagged ``_no_weight_decay`` (Mamba's ``A_log`` and ``D``) get none."""
    decay, no_decay = [], []
    for p in network.parameters():
        if p.requires_grad:
            (no_decay if getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
