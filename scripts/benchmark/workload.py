# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""A benchmark model prepared for measuring: its forward and training-step calls, and the timing of one call."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.benchmark.models import build_model, count_parameters, parse_model_name
from scripts.networks import cpu_backward

__all__ = ["Workload", "synchronize", "timed"]


class Workload:
    """A model of :mod:`scripts.benchmark.models` with its device, memory-format, autocast and compile options
    applied, and the optimizer of the bundle's ``configs/train.yaml`` (``torch.optim.Adam``) for training steps.

    Args:
        name: model name with ``+`` options (:func:`scripts.benchmark.models.parse_model_name`).
        device: where the model and its inputs live.
        train_batch: batch size of :meth:`train_step`.
        lr: learning rate of the Adam optimizer (``train.yaml``'s ``learning_rate``).

    Attributes:
        model: the network (channels_last_3d with ``+cl``).
        params: its trainable parameter count.
        compiled: whether calls go through ``torch.compile`` (``+compile`` or ``+freeze``): the first call compiles.
        optimizer: the Adam optimizer of :meth:`train_step`.
    """

    def __init__(self, name: str, device: torch.device, train_batch: int, lr: float = 1e-4) -> None:
        _, opts = parse_model_name(name)
        self.name = name
        self.device = device
        self.channels_last = "cl" in opts
        self.bf16 = "bf16" in opts
        self.native_backward = "nativebwd" in opts
        self.model = build_model(name).to(device)
        self.params = count_parameters(self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.freeze = "freeze" in opts
        self.compiled = "compile" in opts or self.freeze
        self.fn: nn.Module | Callable = torch.compile(self.model, dynamic=False) if self.compiled else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.train_batch = train_batch

    def _input(self, batch: int, size: int, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 1, size, size, size, generator=gen).to(self.device)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze:  # Inductor's freezing (weights folded in as constants) applies to inference graphs only
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):
                return self.fn(x)
        return self.fn(x)

    def forward(self, size: int) -> Callable[[], Any]:
        """A call running one forward pass on a fixed random ``(1, 1, size, size, size)`` input (``eval()``,
        ``torch.inference_mode``)."""
        x = self._input(1, size)

        def run():
            self.model.eval()
            with torch.inference_mode(), self._autocast():
                return self._call(x)

        return run

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """The model's float32 output for ``x`` with this workload's options (a predictor for an inferer)."""
        with self._autocast():
            return self._call(x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x).float()

    def train_step(self, size: int) -> Callable[[], Any]:
        """A call running one training step on a fixed random batch of ``train_batch`` cubes of edge ``size``:
        forward, cross-entropy against random labels, backward and an optimizer step (with ``+nativebwd`` inside
        :func:`scripts.networks.cpu_backward.native_backward`).

        Raises:
            ValueError: the model carries ``+freeze`` (inference only).
        """
        if self.freeze:
            raise ValueError("+freeze (Inductor freezing) is an inference-only option: no training step.")
        x = self._input(self.train_batch, size)
        gen = torch.Generator().manual_seed(1)
        target = torch.randint(0, 2, (self.train_batch, size, size, size), generator=gen).to(self.device)

        def run():
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            with cpu_backward.native_backward() if self.native_backward else contextlib.nullcontext():
                with self._autocast():
                    out = self.fn(x)
                loss = F.cross_entropy(out.float(), target)
                loss.backward()
            self.optimizer.step()
            return loss.detach()

        return run


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call of ``fn`` (``device`` synchronised before and after)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu
