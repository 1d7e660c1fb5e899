# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The AMP training section: training steps of the bundle's network, loss and optimizer under autocast on one
fixed batch; the check is that every loss is finite and that the loss falls (the last below the first).

The network (with deep supervision), the loss (:class:`scripts.losses.MambaClinixLoss`, its region grid from
:func:`scripts.planning.region_grid`) and the Adam optimizer come from ``configs/train.yaml``
(:func:`scripts.gpu_check.plans.bundle_parser`), with the gradient clipping of its ``grad_clip_norm``. Two settings
differ from a training run, so that the check is deterministic and quick: ``drop_path_rate`` 0 (no stochastic
depth) and a learning rate of :data:`LEARNING_RATE`. Autocast: float16 with a ``GradScaler`` on CUDA (what MONAI's
``SupervisedTrainer`` does with ``amp: true``), bfloat16 on CPU. The batch: a seeded normal image and a label that
is a fixed function of it (three intensity bands), so that the network can fit it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from scripts.gpu_check.budget import Budget
from scripts.gpu_check.errors import SectionSkipped
from scripts.gpu_check.plans import bundle_parser
from scripts.planning import region_grid

__all__ = ["LEARNING_RATE", "amp_dtype", "fixed_batch", "run_amp_training"]

LEARNING_RATE = 1e-3
"""Adam learning rate of the check (the bundle trains with 1e-4 over many steps; a few steps on one batch need more)."""


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of the check: float16 on CUDA (the bundle's AMP), bfloat16 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def fixed_batch(batch: int, size: int, in_channels: int, classes: int, device: torch.device,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded ``(batch, in_channels, size^3)`` normal image and its ``(batch, 1, size^3)`` label: class ``k`` where
    the first channel lies in the ``k``-th of ``classes`` equal-probability bands of the standard normal."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, in_channels, size, size, size, generator=gen)
    edges = torch.distributions.Normal(0.0, 1.0).icdf(torch.arange(1, classes) / classes)
    label = torch.bucketize(image[:, :1], edges)
    return image.to(device), label.to(device)


def run_amp_training(device: torch.device, plan: str, size: int, batch: int, steps: int,
                     budget: Budget) -> dict[str, Any]:
    """Run ``steps`` AMP training steps of ``plan`` at ``size^3`` on one fixed batch.

    Steps stop early when the next one would not fit in ``budget`` (recorded in ``stopped``); with fewer than two
    steps done the loss cannot be judged and the section is skipped.

    Returns:
        ``plan``, ``size``, ``batch``, ``steps`` (done / asked), ``autocast`` (dtype), ``grad_scaler``, ``lr``,
        ``losses`` and ``step_s`` per step, ``finite``, ``loss_fell``, ``passed`` and, when cut short, ``stopped``.

    Raises:
        SectionSkipped: fewer than two steps fit in the budget.
    """
    dtype = amp_dtype(device)
    parser = bundle_parser(plan, device, drop_path_rate=0.0, deep_supervision=True, gradient_checkpointing=False,
                           learning_rate=LEARNING_RATE, num_regions=region_grid([size] * 3))
    torch.manual_seed(0)
    network, loss_fn, optimizer = (parser.get_parsed_content(k) for k in ("network", "loss", "optimizer"))
    clip = parser.get_parsed_content("grad_clip_norm")
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    image, label = fixed_batch(batch, size, parser.get("in_channels"), parser.get("out_channels"), device)
    network.train()
    losses: list[float] = []
    times: list[float] = []
    stopped = None
    for step in range(steps):
        if times and not budget.allows(max(times)):
            stopped = f"after {step} of {steps} steps: {budget.spent_reason(max(times))}"
            break
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            outputs = network(image)
        loss = loss_fn(outputs, label)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(network.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        losses.append(float(loss.detach()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if len(losses) < 2:
        raise SectionSkipped(f"only {len(losses)} step(s) fit: {stopped}")
    finite = all(math.isfinite(v) for v in losses)
    fell = finite and losses[-1] < losses[0]
    result = {
        "plan": plan, "size": size, "batch": batch, "steps": f"{len(losses)}/{steps}",
        "autocast": str(dtype).replace("torch.", ""), "grad_scaler": scaler is not None, "lr": LEARNING_RATE,
        "losses": losses, "step_s": times, "finite": finite, "loss_fell": fell, "passed": finite and fell,
    }
    if stopped:
        result["stopped"] = stopped
    return result
