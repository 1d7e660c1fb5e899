# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The sliding-window section: MONAI's :class:`~monai.inferers.SlidingWindowInferer` over a ``1 x 1 x volume^3``
volume with the plan's network as the bundle builds it (automatic scan backend, fused path where it imports),
roi the patch edge, overlap 0.5, Gaussian blending and the bundle's ``sw_batch_size``; float16 autocast on CUDA,
float32 on CPU."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from scripts.gpu_check.budget import Budget
from scripts.gpu_check.errors import SectionSkipped
from scripts.gpu_check.plans import build_network, bundle_parser
from scripts.gpu_check.timing import measure_call

__all__ = ["OVERLAP", "run_sliding_window", "window_count"]

OVERLAP = 0.5
"""Overlap of neighbouring windows (the bundle's ``sw_overlap``)."""


def window_count(volume: int, roi: int, overlap: float = OVERLAP) -> int:
    """Windows MONAI's sliding window places on a ``volume^3`` cube with a ``roi^3`` window."""
    if roi >= volume:
        return 1
    step = max(1, int(roi * (1 - overlap)))
    return (math.ceil((volume - roi) / step) + 1) ** 3


def run_sliding_window(device: torch.device, plan: str, volume: int, roi: int, budget: Budget,
                       forward_s: float | None = None) -> dict[str, Any]:
    """Time sliding-window inference (on CUDA one warm-up run, then two timed runs; on CPU one timed run).

    Args:
        device: where it runs.
        plan: the network's plan.
        volume: edge of the cubic volume.
        roi: edge of the window (the patch).
        budget: the run's budget.
        forward_s: a measured forward time of the network at ``roi`` (batch 1), to predict the run's time.

    Raises:
        SectionSkipped: the predicted time does not fit in the budget.
    """
    windows = window_count(volume, roi)
    sw_batch = int(bundle_parser(plan).get("sw_batch_size"))
    predicted = windows * forward_s if forward_s is not None else None
    if predicted is not None and not budget.allows(predicted):
        raise SectionSkipped(f"{windows} windows at {forward_s:.2f} s each: {budget.spent_reason(predicted)}")
    from monai.inferers import SlidingWindowInferer

    torch.manual_seed(0)
    network = build_network(plan, device, deep_supervision=False).eval()
    inferer = SlidingWindowInferer(roi_size=(roi,) * 3, sw_batch_size=sw_batch, overlap=OVERLAP, mode="gaussian")
    image = torch.randn(1, 1, volume, volume, volume, generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == "cuda"

    def run() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            inferer(image, network)

    calls, last = [], None
    for index in range(3 if cuda else 1):
        if last is not None and not budget.allows(last):
            break
        call = measure_call(run, device)
        last = call["s"]
        if not cuda or index > 0:  # on CUDA the first run (cuDNN autotuning) is the warm-up
            calls.append(call)
    times = [c["s"] for c in calls]
    return {
        "volume": volume, "roi": roi, "overlap": OVERLAP, "windows": windows, "sw_batch_size": sw_batch,
        "precision": "float16 autocast" if cuda else "float32", "runs_s": [round(t, 4) for t in times],
        "median_s": statistics.median(times) if times else None,
        "peak_mib": max((c["peak_mib"] for c in calls if c["peak_mib"] is not None), default=None),
    }
