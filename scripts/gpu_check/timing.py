# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The timing section: forward and training-step time (and, on CUDA, peak memory) of MambaClinix in each variant
that runs here (:func:`scripts.gpu_check.plans.available_variants`) against SwinUNETR (feature size 48, the
benchmark's) and DynUNet (the plan's topology), at one cubic patch edge.

- Forward: batch 1, ``eval()``, ``torch.inference_mode``. Training step: batch ``train_batch``, cross entropy of
  the full-resolution output against the fixed label of :func:`scripts.gpu_check.training.fixed_batch`, backward and
  an Adam step. On CUDA both run under float16 autocast (the training step with a ``GradScaler``), as the bundle
  trains and infers there; on CPU in float32, as the bundle runs on CPU.
- The calls are interleaved: every round runs each model's forward and training step once, so that drift of a shared
  machine hits all models alike. The first ``warmup`` rounds are not timed; the figures are medians.
- Peak memory (CUDA): ``torch.cuda.max_memory_allocated`` after a reset before each timed call, absolute and above
  the memory allocated just before the call (all models stay resident, so the absolute figure includes the others'
  weights and optimizer states). On CPU: ``None``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.benchmark.models import build_model, count_parameters, size_divisor
from scripts.gpu_check.budget import Budget
from scripts.gpu_check.errors import error_text
from scripts.gpu_check.plans import available_variants, build_dynunet, build_network
from scripts.gpu_check.training import fixed_batch

__all__ = ["Case", "build_cases", "measure_call", "run_timing", "swinunetr_problem"]

_MODES = ("forward", "train")


class Case:
    """One model prepared for timing: its forward and training-step calls on fixed inputs.

    Args:
        model: the network (on ``device``).
        device: where it runs.
        size: the cubic patch edge.
        train_batch: batch size of the training step.
        classes: output channels (the label's classes).
    """

    def __init__(self, model: nn.Module, device: torch.device, size: int, train_batch: int, classes: int) -> None:
        self.model = model
        self.device = device
        self.params = count_parameters(model)
        self.amp = device.type == "cuda"
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.image = fixed_batch(1, size, 1, classes, device)[0]
        self.train_image, label = fixed_batch(train_batch, size, 1, classes, device)
        self.label = label[:, 0]

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def forward(self) -> None:
        """One forward pass (batch 1, eval, inference mode)."""
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            self.model(self.image)

    def train(self) -> None:
        """One training step: forward, cross entropy, backward, Adam step."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(self.train_image)
        loss = F.cross_entropy(out.float(), self.label)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def call(self, mode: str) -> Callable[[], None]:
        """The call of ``mode`` (``"forward"`` or ``"train"``)."""
        return self.forward if mode == "forward" else self.train


def measure_call(fn: Callable[[], None], device: torch.device) -> dict[str, float | None]:
    """Wall-clock seconds of one call of ``fn`` (``device`` synchronised) and, on CUDA, its peak memory.

    Returns:
        ``s``, ``peak_mib`` and ``peak_above_baseline_mib`` (``None`` on CPU).
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not cuda:
        return {"s": seconds, "peak_mib": None, "peak_above_baseline_mib": None}
    peak = torch.cuda.max_memory_allocated(device)
    return {"s": seconds, "peak_mib": peak / 2**20, "peak_above_baseline_mib": (peak - base) / 2**20}


def swinunetr_problem(size: int) -> str | None:
    """Why SwinUNETR cannot run at edge ``size`` (a multiple of 32 with 2 voxels at its bottleneck), or ``None``."""
    divisor = size_divisor("swinunetr")
    if size % divisor == 0 and size >= 2 * divisor:
        return None
    return (f"SwinUNETR needs a multiple of {divisor} of at least {2 * divisor} (instance norm at its bottleneck), "
            f"got {size}")


def build_cases(device: torch.device, plan: str, size: int, train_batch: int, classes: int
                ) -> dict[str, Case | dict[str, str]]:
    """The timed models: MambaClinix per available variant, DynUNet, SwinUNETR.

    Returns:
        By name (in that order) the case, or for a model that could not be built or cannot run at ``size`` a dict
        with ``skipped`` or ``error``.
    """
    builders: dict[str, Callable[[], nn.Module]] = {
        f"mambaclinix[{v}]": (lambda v=v: build_network(plan, device, v, deep_supervision=False))
        for v in available_variants(device)
    }
    builders["dynunet"] = lambda: build_dynunet(plan, device)
    builders["swinunetr"] = lambda: build_model("swinunetr", 1, classes).to(device)
    cases: dict[str, Case | dict[str, str]] = {}
    for name, build in builders.items():
        if name == "swinunetr" and swinunetr_problem(size):
            cases[name] = {"skipped": swinunetr_problem(size)}
            continue
        try:
            torch.manual_seed(0)
            cases[name] = Case(build(), device, size, train_batch, classes)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: record it, time the others
            cases[name] = {"error": error_text(e)}
    return cases



def _summary(calls: list[dict[str, float | None]]) -> dict[str, Any]:
    if not calls:
        return {"runs_s": [], "median_s": None, "peak_mib": None, "peak_above_baseline_mib": None}
    peaks = [c["peak_mib"] for c in calls if c["peak_mib"] is not None]
    above = [c["peak_above_baseline_mib"] for c in calls if c["peak_above_baseline_mib"] is not None]
    return {"runs_s": [round(c["s"], 4) for c in calls], "median_s": statistics.median(c["s"] for c in calls),
            "peak_mib": max(peaks) if peaks else None, "peak_above_baseline_mib": max(above) if above else None}


def run_timing(device: torch.device, plan: str, size: int, train_batch: int, classes: int, warmup: int,
               repeats: int, budget: Budget) -> dict[str, Any]:
    """Time every case in interleaved rounds (see the module docs); stop when the next call would not fit in
    ``budget`` (recorded in ``stopped``).

    Returns:
        ``size``, ``train_batch``, ``precision``, ``warmup``, ``repeats`` and ``cases``: per model ``params`` and
        per mode (``forward``, ``train``) :func:`_summary` of the timed calls, or ``skipped`` / ``error``.
    """
    built = build_cases(device, plan, size, train_batch, classes)
    cases = {name: case for name, case in built.items() if isinstance(case, Case)}
    timed: dict[tuple[str, str], list[dict[str, float | None]]] = {(n, m): [] for n in cases for m in _MODES}
    last: dict[tuple[str, str], float] = {}
    errors: dict[tuple[str, str], str] = {}
    stopped = None
    for round_index in range(warmup + repeats):
        for key in timed:
            if key in errors:
                continue
            if not budget.allows(last.get(key, 0.0)):
                stopped = f"in round {round_index + 1} of {warmup + repeats}: {budget.spent_reason(last.get(key))}"
                break
            try:
                call = measure_call(cases[key[0]].call(key[1]), device)
            except (RuntimeError, ValueError) as e:  # out of memory, an unsupported size: record it, go on
                errors[key] = error_text(e)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            last[key] = call["s"]
            if round_index >= warmup:
                timed[key].append(call)
        if stopped:
            break
    results: dict[str, Any] = {}
    for name, case in built.items():
        if not isinstance(case, Case):
            results[name] = case
            continue
        results[name] = {"params": case.params}
        for mode in _MODES:
            key = (name, mode)
            results[name][mode] = {"error": errors[key]} if key in errors else _summary(timed[key])
    precision = "float16 autocast" if device.type == "cuda" else "float32"
    out = {"size": size, "train_batch": train_batch, "precision": precision, "warmup": warmup, "repeats": repeats,
           "cases": results}
    if stopped:
        out["stopped"] = stopped
    return out
